//! Telemetry set-up: the Prometheus recorder behind `/metrics`, `tracing` logs (plain or JSON)
//! and, when an OTLP endpoint is configured, trace export of the pipeline's spans (per batch,
//! state flush and rules reload).
//!
//! It installs process-wide things (the metrics recorder, the tracing subscriber) exactly once;
//! it must not be called from libraries, only from the binary's start or a test's.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use riskstream_common::TelemetryConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the Prometheus metrics recorder: {0}")]
    Metrics(String),
    #[error("cannot export traces to {endpoint}: {message}")]
    Traces { endpoint: String, message: String },
}

/// Latency buckets (seconds) of `riskstream_event_to_verdict_seconds`: 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 10.0,
];
/// Buckets (seconds) of `riskstream_state_flush_seconds`: 0.1 ms to 1 s.
const FLUSH_BUCKETS: [f64; 9] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.2, 1.0];

/// Buckets (seconds) of `riskstream_checkpoint_duration_seconds`: 10 ms to 5 minutes.
const CHECKPOINT_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use as the global `metrics` recorder.
/// Fails when another recorder was installed first.
pub fn prometheus() -> Result<PrometheusHandle, TelemetryError> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("riskstream_event_to_verdict_seconds".into()),
                    &LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("riskstream_state_flush_seconds".into()),
                        &FLUSH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("riskstream_checkpoint_duration_seconds".into()),
                        &CHECKPOINT_BUCKETS,
                    )
                })
                .map_err(|e| e.to_string())?;
            let handle = builder.install_recorder().map_err(|e| e.to_string())?;
            // Histograms are drained into their buckets by upkeep; run it in the background.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .map_err(|e| e.to_string())?;
            Ok(handle)
        })
        .clone()
        .map_err(TelemetryError::Metrics)
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Flushes and stops trace export when dropped (at the end of `main`).
#[derive(Debug)]
pub struct TelemetryGuard {
    traces: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take() {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: traces not all exported at exit: {e}");
            }
        }
    }
}

/// Installs the `tracing` subscriber: logs to stderr in `format`, filtered by `RISKSTREAM_LOG`
/// (default `info`), and spans exported over OTLP/HTTP when `config.otlp_endpoint` is set.
pub fn init_tracing(
    format: LogFormat,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("RISKSTREAM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    // Colours only on a terminal: a container's log or a file gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = match format {
        LogFormat::Plain => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    }
    .with_filter(filter());
    let (traces, provider) = if config.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let traces_error = |message: String| TelemetryError::Traces {
            endpoint: config.otlp_endpoint.clone(),
            message,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .map_err(|e| traces_error(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("riskstream");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter());
        (Some(layer), Some(provider))
    };
    // A second initialisation (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if provider.is_some() {
        tracing::info!(endpoint = %config.otlp_endpoint, "exporting traces over OTLP");
    }
    Ok(TelemetryGuard { traces: provider })
}

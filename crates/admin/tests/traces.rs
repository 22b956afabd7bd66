//! With `telemetry.otlp_endpoint` set, the pipeline's spans reach an OTLP/HTTP collector: here a
//! small HTTP server that keeps what is posted to `/v1/traces`.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use riskstream_admin::telemetry::{init_tracing, LogFormat};
use riskstream_common::{Config, TelemetryConfig};
use riskstream_pipeline::{JsonLinesSink, JsonLinesSource, Pipeline};
use riskstream_rules::{RuleCompiler, RuleTable};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[test]
fn batch_spans_are_exported_over_otlp_http() -> TestResult {
    // The collector.
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(received): State<Arc<Mutex<Vec<Vec<u8>>>>>, body: Bytes| async move {
                    if let Ok(mut r) = received.lock() {
                        r.push(body.to_vec());
                    }
                    ""
                },
            ),
        )
        .with_state(received.clone());
    runtime.spawn(async move { axum::serve(listener, app).await });

    let guard = init_tracing(
        LogFormat::Plain,
        &TelemetryConfig {
            otlp_endpoint: format!("http://{address}/v1/traces"),
            service_name: "riskstream-trace-test".into(),
        },
    )?;

    // A real pipeline run over a few events: one span per batch, and a state flush.
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("events.jsonl");
    let events: String = (0..50)
        .map(|i| {
            format!(
                "{{\"tx_id\":\"t{i}\",\"ts\":{},\"customer_id\":\"c1\",\"terminal_id\":\"t1\",\"amount\":{i},\"tx_type\":\"CP\"}}\n",
                1_700_000_000_000i64 + i * 1000
            )
        })
        .collect();
    std::fs::write(&input, events)?;
    let mut config = Config::defaults()?;
    // A state directory that outlives the run: its state is written out at the end (a
    // `state_flush` span); a temporary one is not written to.
    config.state.dir = Some(dir.path().join("state"));
    let bundle = "rules:\n  - {id: big, when: \"amount > 40\", score: 60}\ndecision: {review_at: 40, block_at: 80}\n";
    let compiled = RuleCompiler::new(&config.event_schema()?).compile_text(bundle, 1)?;
    let mut pipeline = Pipeline::new(&config, Arc::new(RuleTable::new(compiled)), "file")?;
    let mut source = JsonLinesSource::open(&input)?;
    let mut sink = JsonLinesSink::create(
        &dir.path().join("verdicts.jsonl"),
        &dir.path().join("dlq.jsonl"),
        &dir.path().join("late.jsonl"),
    )?;
    let summary = riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink)?;
    assert_eq!(summary.verdicts, 50);

    // Dropping the guard flushes the exporter.
    drop(guard);
    let bodies = received.lock().map_err(|_| "poisoned")?.clone();
    assert!(!bodies.is_empty(), "no trace export reached the collector");
    let all: Vec<u8> = bodies.concat();
    let contains = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"batch"), "no `batch` span exported");
    assert!(contains(b"state_flush"), "no `state_flush` span exported");
    assert!(contains(b"riskstream-trace-test"), "service name missing");
    Ok(())
}

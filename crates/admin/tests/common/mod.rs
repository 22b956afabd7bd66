//! Shared set-up of the admin API tests: an embedded broker with the pipeline's topics and the
//! control topic, instances (control plane + Kafka pipeline), a producer of events, an HTTP
//! client and a reader of the verdicts topic.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
pub use riskstream_admin::RulesPlane;
use riskstream_admin::{AdminServer, AdminState, LocalRules, RulesSlot};
use riskstream_common::Config;
use riskstream_kafka::{EmbeddedBroker, LabelStore, RulesControl};
use riskstream_pipeline::{RecentEvents, Summary};
use riskstream_rules::RuleCompiler;

use riskstream_testkit as testkit;
pub use riskstream_testkit::TestResult;

pub const TRANSACTIONS_PARTITIONS: i32 = 4;
pub const VERDICTS_PARTITIONS: i32 = 4;

/// A bundle without windowed features: one rule whose threshold tells versions apart.
pub fn bundle(threshold: u32) -> String {
    format!(
        "rules:\n  - {{id: high_amount, when: \"amount > {threshold}\", score: 60}}\n  - {{id: tiny, when: \"amount < 1\", score: 10, mode: shadow}}\ndecision: {{review_at: 40, block_at: 80}}\n"
    )
}

/// A broker with the pipeline's topics and the control topic.
pub fn broker() -> TestResult<EmbeddedBroker> {
    testkit::broker(&[
        ("transactions", TRANSACTIONS_PARTITIONS),
        ("verdicts", VERDICTS_PARTITIONS),
        ("dlq", 1),
        ("late", 1),
        ("labels", 1),
        ("riskstream.rules", 1),
    ])
}

/// Configuration over `broker`, the admin API on a free loopback port, plus `extra` TOML.
pub fn config(broker: &EmbeddedBroker, extra: &str) -> TestResult<Config> {
    let toml = format!(
        r#"
[kafka]
brokers = "{}"
group_id = "test"
commit_interval = "200ms"
[kafka.properties]
"reconnect.backoff.max.ms" = "500"
[kafka.consumer]
"fetch.wait.max.ms" = "5"
[admin]
listen = "127.0.0.1:0"
backtest_events = 50000
{extra}
"#,
        broker.bootstrap_servers()
    );
    Ok(Config::from_toml_over_defaults(&toml)?)
}

/// The admin API over one process's rules ([`LocalRules`], no broker), on a free loopback
/// port, configured by the `[admin]` lines `admin` over the defaults.
pub struct LocalApi {
    pub plane: Arc<LocalRules>,
    pub base: String,
    /// What `/readyz` and `/api/v1/status` report (no pipeline updates it here).
    pub status: Arc<riskstream_pipeline::StatusBoard>,
    _server: AdminServer,
}

impl LocalApi {
    pub fn start(admin: &str, seed: &str) -> TestResult<Self> {
        let config = Config::from_toml_over_defaults(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n"
        ))?;
        let compiler = RuleCompiler::new(&config.event_schema()?);
        let plane = Arc::new(LocalRules::new(compiler, seed, "test")?);
        let rules = Arc::new(RulesSlot::holding(plane.clone()));
        let state = AdminState::new(&config, rules, None, None)?;
        let status = Arc::clone(&state.status);
        let server = AdminServer::start(
            &config.admin.listen,
            riskstream_admin::router(state, config.admin.max_body_bytes),
        )?;
        Ok(Self {
            plane,
            base: format!("http://{}", server.address()),
            status,
            _server: server,
        })
    }
}

/// One instance ([`riskstream_runtime::Instance`]: admin API, control plane, Kafka pipeline),
/// its rules loaded.
pub struct Instance {
    pub base: String,
    instance: riskstream_runtime::Instance,
    rules: Arc<RulesControl>,
}

impl Instance {
    /// Starts an instance (seeding the control topic with `seed` when it is empty) in consumer
    /// group `kafka.group_id`, and waits for its rules.
    pub fn start(config: &Config, seed: &str, metrics: bool) -> TestResult<Self> {
        let metrics = if metrics {
            Some(riskstream_admin::telemetry::prometheus()?)
        } else {
            None
        };
        let instance = riskstream_runtime::Instance::start(
            config,
            riskstream_runtime::Options {
                seed: Some(seed.to_string()),
                metrics,
                labels: 100_000,
                stop: None,
            },
        )?;
        let rules = instance.wait_rules(Duration::from_secs(60))?;
        Ok(Self {
            base: format!("http://{}", instance.address()),
            instance,
            rules,
        })
    }

    /// The control plane.
    pub fn rules(&self) -> &RulesControl {
        &self.rules
    }

    pub fn recent(&self) -> &Arc<RecentEvents> {
        self.instance.recent()
    }

    pub fn labels(&self) -> &Arc<LabelStore> {
        self.instance.labels()
    }

    /// Waits until the pipeline owns partitions (`/readyz` answers 200).
    pub fn wait_ready(&self, client: &Http) -> TestResult {
        let url = format!("{}/readyz", self.base);
        testkit::wait_until(
            &format!("{url} answers 200"),
            Duration::from_secs(30),
            || client.get(&url).send().is_ok_and(|r| r.status() == 200),
        )
    }

    pub fn stop(self) -> TestResult<Summary> {
        drop(self.rules);
        Ok(self
            .instance
            .stop()?
            .ok_or("the instance stopped before its rules were loaded")?)
    }
}

pub type Http = reqwest::blocking::Client;

pub fn http() -> TestResult<Http> {
    Ok(reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// `PUT /api/v1/rules` with `If-Match: "expected"` and an optional token.
pub fn put_rules(
    client: &Http,
    base: &str,
    text: &str,
    expected: Option<u64>,
    token: Option<&str>,
) -> TestResult<(u16, serde_json::Value)> {
    let mut request = client
        .put(format!("{base}/api/v1/rules"))
        .header("content-type", "application/yaml")
        .body(text.to_string());
    if let Some(v) = expected {
        request = request.header("if-match", format!("\"{v}\""));
    }
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    let body = response.json::<serde_json::Value>().unwrap_or_default();
    Ok((status, body))
}

/// Sends every `(base, bundle)` update at once, each naming `expected` in `If-Match`; their
/// statuses and bodies in the same order.
pub fn concurrent_puts(
    client: &Http,
    updates: &[(String, String)],
    expected: u64,
    token: Option<&str>,
) -> TestResult<Vec<(u16, serde_json::Value)>> {
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = updates
            .iter()
            .map(|(base, text)| {
                s.spawn(move || {
                    put_rules(client, base, text, Some(expected), token).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "panicked".to_string()).and_then(|r| r))
            .collect::<Result<Vec<_>, String>>()
    })?;
    Ok(results)
}

/// `GET base+path` as JSON.
pub fn get_json(client: &Http, base: &str, path: &str) -> TestResult<(u16, serde_json::Value)> {
    let response = client.get(format!("{base}{path}")).send()?;
    let status = response.status().as_u16();
    Ok((status, response.json()?))
}

pub fn producer(broker: &EmbeddedBroker) -> TestResult<testkit::EventProducer> {
    testkit::producer(&broker.bootstrap_servers())
}

/// Sends one event to `partition`, retrying while the producer queue is full.
pub fn send(producer: &testkit::EventProducer, partition: i32, payload: &str) {
    testkit::send(producer, "transactions", partition, payload)
}

pub fn flush(producer: &ThreadedProducer<DefaultProducerContext>) -> TestResult {
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// A payment event.
pub fn event(id: &str, ts_ms: i64, amount: f64) -> String {
    testkit::event(id, ts_ms, amount)
}

pub fn now_ms() -> i64 {
    testkit::now_ms()
}

/// Verdicts read from the verdicts topic: tx id → every verdict for it (parsed JSON).
pub type Verdicts = BTreeMap<String, Vec<serde_json::Value>>;

/// Reads the verdicts topic from its start until `expected` verdicts arrived (or 90 s), then
/// half a second longer to catch duplicates.
pub fn read_verdicts(broker: &EmbeddedBroker, expected: usize) -> TestResult<Verdicts> {
    let records = testkit::read_until(
        &broker.bootstrap_servers(),
        &["verdicts"],
        false,
        Duration::from_secs(90),
        |records| records.len() >= expected,
    )?;
    let mut verdicts = Verdicts::new();
    for record in records {
        verdicts
            .entry(record.key_str())
            .or_default()
            .push(record.json()?);
    }
    Ok(verdicts)
}

//! Shared set-up of the admin API tests: an embedded broker with the pipeline's topics and the
//! control topic, instances (control plane + Kafka pipeline), a producer of events, an HTTP
//! client and a reader of the verdicts topic.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use riskstream_admin::ControlPlane;
use riskstream_common::Config;
use riskstream_kafka::{Assignment, EmbeddedBroker, LabelStore};
use riskstream_pipeline::{PipelineError, Summary};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

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
    let broker = EmbeddedBroker::start(1)?;
    broker.create_topic("transactions", TRANSACTIONS_PARTITIONS)?;
    broker.create_topic("verdicts", VERDICTS_PARTITIONS)?;
    broker.create_topic("dlq", 1)?;
    broker.create_topic("late", 1)?;
    broker.create_topic("labels", 1)?;
    broker.create_topic("riskstream.rules", 1)?;
    Ok(broker)
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

/// One instance: its control plane (admin API) and its Kafka pipeline.
pub struct Instance {
    pub plane: ControlPlane,
    pub base: String,
    pub labels: Arc<LabelStore>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Summary, PipelineError>>,
}

impl Instance {
    /// Starts the control plane (seeding the control topic with `seed` when it is empty) and
    /// the pipeline in consumer group `kafka.group_id`.
    pub fn start(config: &Config, seed: &str, metrics: bool) -> TestResult<Self> {
        let labels = Arc::new(LabelStore::new(100_000));
        let handle = if metrics {
            Some(riskstream_admin::telemetry::prometheus()?)
        } else {
            None
        };
        let plane = ControlPlane::start(config, Some(seed), Some(labels.clone()), handle)?;
        let base = format!("http://{}", plane.address());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let config = config.clone();
            let stop = stop.clone();
            let rules = plane.control.table();
            let observers = plane.observers();
            let labels = labels.clone();
            std::thread::spawn(move || {
                riskstream_kafka::run_observed(
                    &config,
                    rules,
                    Assignment::Group,
                    stop,
                    Some(labels),
                    observers,
                )
            })
        };
        Ok(Self {
            plane,
            base,
            labels,
            stop,
            thread,
        })
    }

    /// Waits until the pipeline owns partitions (`/readyz` answers 200).
    pub fn wait_ready(&self, client: &Http) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = client.get(format!("{}/readyz", self.base)).send()?;
            if response.status() == 200 {
                return Ok(());
            }
            if Instant::now() > deadline {
                let body = response.text().unwrap_or_default();
                return Err(format!("{} not ready after 30 s: {body}", self.base).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(self) -> TestResult<Summary> {
        self.stop.store(true, Ordering::Release);
        let summary = self
            .thread
            .join()
            .map_err(|_| "the pipeline thread panicked")??;
        Ok(summary)
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

pub fn producer(broker: &EmbeddedBroker) -> TestResult<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("message.timeout.ms", "0")
        .set("linger.ms", "2")
        .create()?)
}

/// Sends one event to `partition`, retrying while the producer queue is full.
pub fn send(producer: &ThreadedProducer<DefaultProducerContext>, partition: i32, payload: &str) {
    let mut record = BaseRecord::<(), str>::to("transactions")
        .partition(partition)
        .payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

pub fn flush(producer: &ThreadedProducer<DefaultProducerContext>) -> TestResult {
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// A payment event.
pub fn event(id: &str, ts_ms: i64, amount: f64) -> String {
    format!(
        r#"{{"tx_id":"{id}","ts":{ts_ms},"customer_id":"c{}","terminal_id":"t1","amount":{amount},"tx_type":"CP"}}"#,
        id.len() % 7
    )
}

pub fn now_ms() -> i64 {
    riskstream_pipeline::source::now_ms()
}

/// Verdicts read from the verdicts topic: tx id → every verdict for it (parsed JSON).
pub type Verdicts = BTreeMap<String, Vec<serde_json::Value>>;

/// Reads the verdicts topic from its start until `expected` verdicts arrived (or 90 s), then
/// half a second longer to catch duplicates.
pub fn read_verdicts(broker: &EmbeddedBroker, expected: usize) -> TestResult<Verdicts> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..VERDICTS_PARTITIONS {
        list.add_partition_offset("verdicts", p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut verdicts = Verdicts::new();
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut settle: Option<Instant> = None;
    while Instant::now() < deadline && settle.is_none_or(|s| Instant::now() < s) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        verdicts.entry(key).or_default().push(value);
        count += 1;
        if count >= expected && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_millis(500));
        }
    }
    Ok(verdicts)
}

//! The Kafka pipeline against a real Kafka-protocol broker (librdkafka's mock cluster, in
//! process) with real clients: exactly one verdict per valid event, dead letters with reasons,
//! offsets committed, idle partitions, back-pressure, and a broker outage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rdkafka::Offset;
use riskstream_common::Config;
use riskstream_kafka::{Assignment, EmbeddedBroker, LabelStore, Observers};
use riskstream_pipeline::{PipelineError, StatusBoard, Summary};
use riskstream_rules::{RuleCompiler, RuleTable};
use riskstream_testkit as testkit;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const BUNDLE: &str = include_str!("../../../config/rules/default.yaml");

/// A broker with the pipeline's topics (`partitions` transactions partitions).
fn broker(partitions: i32) -> Result<EmbeddedBroker, Box<dyn std::error::Error + Send + Sync>> {
    let mut topics = testkit::PIPELINE_TOPICS.to_vec();
    topics[0].1 = partitions;
    testkit::broker(&topics)
}

fn config(
    broker: &EmbeddedBroker,
    extra: &str,
) -> Result<Config, Box<dyn std::error::Error + Send + Sync>> {
    let toml = format!(
        r#"
[kafka]
brokers = "{}"
group_id = "test"
commit_interval = "200ms"
{extra}
[kafka.properties]
"reconnect.backoff.max.ms" = "500"
"#,
        broker.bootstrap_servers()
    );
    Ok(Config::from_toml_over_defaults(&toml)?)
}

fn rules(config: &Config) -> Result<Arc<RuleTable>, Box<dyn std::error::Error + Send + Sync>> {
    let compiled = RuleCompiler::new(&config.event_schema()?).compile_text(BUNDLE, 1)?;
    Ok(Arc::new(RuleTable::new(compiled)))
}

/// A running pipeline and the switch that stops it.
struct Running {
    stop: Arc<AtomicBool>,
    status: Arc<StatusBoard>,
    thread: JoinHandle<Result<Summary, PipelineError>>,
    metrics: Snapshotter,
    totals: BTreeMap<String, u64>,
}

impl Running {
    fn start(
        config: &Config,
        assignment: Assignment,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let rules = rules(config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(StatusBoard::new(&config.kafka.topics.transactions));
        let recorder = DebuggingRecorder::new();
        let metrics = recorder.snapshotter();
        let thread = {
            let (config, stop) = (config.clone(), stop.clone());
            let observers = Observers {
                status: Some(Arc::clone(&status)),
                ..Observers::default()
            };
            std::thread::spawn(move || {
                metrics::with_local_recorder(&recorder, || {
                    let labels = Arc::new(LabelStore::new(1000));
                    riskstream_kafka::run_observed(
                        &config,
                        rules,
                        assignment,
                        stop,
                        Some(labels),
                        observers,
                    )
                })
            })
        };
        Ok(Self {
            stop,
            status,
            thread,
            metrics,
            totals: BTreeMap::new(),
        })
    }

    /// Waits until the pipeline has emitted at least `n` verdicts.
    fn wait_verdicts(&self, n: u64) -> TestResult {
        testkit::wait_until(&format!("{n} verdicts"), Duration::from_secs(60), || {
            self.status.snapshot().verdicts >= n
        })
    }

    /// Waits until the pipeline owns at least one partition.
    fn wait_assigned(&self) -> TestResult {
        testkit::wait_until("partitions assigned", Duration::from_secs(60), || {
            self.status
                .snapshot()
                .partitions
                .values()
                .any(|p| p.assigned)
        })
    }

    /// The total of counter `name` (over its labels) so far. Snapshots hand out what was
    /// counted since the previous one, so totals are kept here.
    fn counter(&mut self, name: &str) -> u64 {
        for (key, _, _, value) in self.metrics.snapshot().into_vec() {
            if let DebugValue::Counter(v) = value {
                *self.totals.entry(key.key().name().to_string()).or_default() += v;
            }
        }
        self.totals.get(name).copied().unwrap_or(0)
    }

    fn stop(self) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
        self.stop.store(true, Ordering::Release);
        let summary = self
            .thread
            .join()
            .map_err(|_| "the pipeline thread panicked")??;
        Ok(summary)
    }
}

fn producer(
    broker: &EmbeddedBroker,
) -> Result<testkit::EventProducer, Box<dyn std::error::Error + Send + Sync>> {
    testkit::producer(&broker.bootstrap_servers())
}

/// Produces `events` as (partition, payload) and waits for their acknowledgement.
fn produce(producer: &testkit::EventProducer, events: &[(i32, String)]) -> TestResult {
    testkit::produce(producer, "transactions", events)
}

fn event(id: &str, ts_ms: i64, amount: f64) -> String {
    testkit::event(id, ts_ms, amount)
}

/// Everything the pipeline wrote: verdicts by tx id (with their count), and dead letters and
/// late events as (reason, source offset).
#[derive(Debug, Default)]
struct Outputs {
    verdicts: BTreeMap<String, usize>,
    dead: Vec<(String, String, Vec<u8>)>,
    late: Vec<(String, String)>,
}

/// Reads the output topics from the beginning until `expected` messages arrived (or 90 s),
/// then to their ends as they are then (duplicates written by then included).
fn read_outputs(
    broker: &EmbeddedBroker,
    expected: usize,
) -> Result<Outputs, Box<dyn std::error::Error + Send + Sync>> {
    let records = testkit::read_until(
        &broker.bootstrap_servers(),
        &["verdicts", "dlq", "late"],
        false,
        Duration::from_secs(90),
        |records| records.len() >= expected,
    )?;
    let mut out = Outputs::default();
    for record in records {
        match record.topic.as_str() {
            "verdicts" => *out.verdicts.entry(record.key_str()).or_default() += 1,
            "dlq" => out.dead.push((
                record.header("reason"),
                record.header("source_offset"),
                record.payload.clone(),
            )),
            _ => out
                .late
                .push((record.header("reason"), record.header("source_offset"))),
        }
    }
    Ok(out)
}

/// Committed offsets of group `test` per transactions partition.
fn committed(
    broker: &EmbeddedBroker,
    partitions: i32,
) -> Result<Vec<i64>, Box<dyn std::error::Error + Send + Sync>> {
    testkit::committed(
        &broker.bootstrap_servers(),
        "test",
        "transactions",
        partitions,
    )
}

fn now_ms() -> i64 {
    testkit::now_ms()
}

#[test]
fn every_valid_event_gets_one_verdict_and_bad_ones_reach_the_dlq_with_reasons() -> TestResult {
    let broker = broker(4)?;
    let config = config(&broker, "")?;
    let start = now_ms() - 60_000;
    let mut events = Vec::new();
    let mut malformed = BTreeMap::new();
    for i in 0..2000i64 {
        let partition = (i % 4) as i32;
        let payload = match i % 97 {
            13 => format!(
                r#"{{"tx_id":"tx-{i}","ts":{},"customer_id":"c1","terminal_id":"t1","amount":null,"tx_type":"CP"}}"#,
                start + i
            ),
            29 => format!("{{\"tx_id\":\"tx-{i}\",\"ts\":"),
            41 => format!(
                r#"{{"tx_id":"tx-{i}","ts":{},"customer_id":"c1","terminal_id":"t1","amount":"ten","tx_type":"CP"}}"#,
                start + i
            ),
            _ => event(&format!("tx-{i}"), start + i * 10, 10.0 + (i % 300) as f64),
        };
        if matches!(i % 97, 13 | 29 | 41) {
            malformed.insert(payload.clone(), i % 97);
        }
        events.push((partition, payload));
    }
    produce(&producer(&broker)?, &events)?;
    let running = Running::start(&config, Assignment::Group)?;
    let out = read_outputs(&broker, events.len())?;
    let summary = running.stop()?;

    let valid = events.len() - malformed.len();
    assert_eq!(out.verdicts.len(), valid, "one verdict per valid event");
    assert!(out.verdicts.values().all(|n| *n == 1), "no duplicates");
    assert!(out.late.is_empty());
    assert_eq!(out.dead.len(), malformed.len());
    for (reason, offset, payload) in &out.dead {
        let payload = String::from_utf8_lossy(payload).into_owned();
        let kind = malformed
            .get(&payload)
            .ok_or("a dead letter that was not malformed")?;
        let expected = match kind {
            13 => "null_field",
            29 => "invalid_json",
            _ => "wrong_type",
        };
        assert_eq!(reason, expected, "{payload}");
        assert!(
            offset.parse::<i64>().is_ok(),
            "source offset header: {offset}"
        );
    }
    assert_eq!(summary.verdicts as usize, valid);
    // At shutdown every partition's offset is committed past its last event.
    assert_eq!(committed(&broker, 4)?, vec![500, 500, 500, 500]);
    Ok(())
}

#[test]
fn an_idle_partition_does_not_hold_the_watermark_back() -> TestResult {
    // The same stream twice: partition 1 sends one event and falls silent while partition 0
    // moves 100 s ahead; then partition 0 sends an event 90 s old. With a 1 s idle timeout the
    // silent partition stops holding the watermark and the old event is too late; with an hour
    // it holds it back and the event is scored.
    let outcome = |idle: &str| -> Result<Outputs, Box<dyn std::error::Error + Send + Sync>> {
        let broker = broker(2)?;
        let config = config(
            &broker,
            &format!("[time]\nidle_timeout = \"{idle}\"\nallowed_lateness = \"1s\"\nmax_out_of_orderness = \"1s\"\n"),
        )?;
        let t0 = now_ms() - 600_000;
        let producer = producer(&broker)?;
        let running = Running::start(
            &config,
            Assignment::Fixed(vec![(0, Offset::Beginning), (1, Offset::Beginning)]),
        )?;
        produce(
            &producer,
            &[(1, event("p1-a", t0, 5.0)), (0, event("p0-a", t0, 5.0))],
        )?;
        // Both first events are scored before partition 0 runs ahead.
        running.wait_verdicts(2)?;
        let ahead: Vec<_> = (1..=10)
            .map(|i| (0, event(&format!("p0-{i}"), t0 + i * 10_000, 5.0)))
            .collect();
        produce(&producer, &ahead)?;
        running.wait_verdicts(12)?;
        // The scenario itself: partition 1 stays silent for longer than the 1 s idle
        // timeout (processing time) before the old event comes.
        std::thread::sleep(Duration::from_millis(1500));
        produce(&producer, &[(0, event("p0-old", t0 + 10_000, 5.0))])?;
        let out = read_outputs(&broker, 13)?;
        running.stop()?;
        Ok(out)
    };
    let idle = outcome("1s")?;
    assert_eq!(idle.late.len(), 1, "{idle:?}");
    assert_eq!(idle.late[0].0, "too_late");
    assert!(!idle.verdicts.contains_key("p0-old"));
    let held = outcome("1h")?;
    assert!(held.late.is_empty(), "{held:?}");
    assert_eq!(held.verdicts.get("p0-old"), Some(&1));
    Ok(())
}

#[test]
fn a_slow_verdict_sink_pauses_the_consumer_and_loses_nothing() -> TestResult {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = broker(2)?;
    // Small batches and a small producer queue, so that back-pressure reaches the consumer.
    let config = config(
        &broker,
        "max_unacked = 200\n[pipeline]\nbatch_max_events = 100\n",
    )?;
    let start = now_ms() - 60_000;
    let events: Vec<_> = (0..6000i64)
        .map(|i| ((i % 2) as i32, event(&format!("s-{i}"), start + i, 20.0)))
        .collect();
    produce(&producer(&broker)?, &events)?;
    // Every produce request fails a few times with a retriable error before it succeeds: the
    // verdict sink crawls.
    let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2000];
    broker
        .cluster()
        .request_errors(RDKafkaApiKey::Produce, &errors);
    let mut running = Running::start(
        &config,
        Assignment::Fixed(vec![(0, Offset::Beginning), (1, Offset::Beginning)]),
    )?;
    // While the sink crawls, what has been read but not acknowledged stays bounded: the
    // channels (two batches each way, one being scored, one being filled) and the producer
    // queue.
    let bound = 6 * 100 + 200;
    let mut max_ahead = 0u64;
    let mut consumed = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        consumed = running.counter("riskstream_kafka_consumed_total");
        let produced = running.counter("riskstream_kafka_produced_total");
        max_ahead = max_ahead.max(consumed.saturating_sub(produced));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        consumed < events.len() as u64,
        "the sink was not slow: {consumed} consumed"
    );
    assert!(
        max_ahead <= bound,
        "{max_ahead} events read ahead of the sink"
    );
    assert!(running.counter("riskstream_kafka_consumer_pauses_total") > 0);
    broker
        .cluster()
        .clear_request_errors(RDKafkaApiKey::Produce);
    let out = read_outputs(&broker, events.len())?;
    running.stop()?;
    assert_eq!(out.verdicts.len(), events.len());
    assert!(
        out.verdicts.values().all(|n| *n == 1),
        "pausing duplicated a verdict"
    );
    Ok(())
}

#[test]
fn a_broker_outage_is_waited_out_without_losing_an_event() -> TestResult {
    let broker = broker(2)?;
    let config = config(&broker, "")?;
    let start = now_ms() - 60_000;
    let running = Running::start(
        &config,
        Assignment::Fixed(vec![(0, Offset::Beginning), (1, Offset::Beginning)]),
    )?;
    // Events keep arriving before, during and after the outage (the test's producer waits it
    // out too).
    let feeder = {
        let producer = producer(&broker)?;
        std::thread::spawn(move || -> Result<(), String> {
            for chunk in 0..40i64 {
                let events: Vec<_> = (chunk * 50..(chunk + 1) * 50)
                    .map(|i| ((i % 2) as i32, event(&format!("o-{i}"), start + i, 20.0)))
                    .collect();
                produce(&producer, &events).map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })
    };
    // Scoring is under way when the broker goes, for the 3 s the scenario is about.
    running.wait_verdicts(100)?;
    broker.down(-1)?;
    std::thread::sleep(Duration::from_secs(3));
    broker.up(-1)?;
    feeder.join().map_err(|_| "the feeder panicked")??;
    let out = read_outputs(&broker, 2000)?;
    running.stop()?;
    let expected: BTreeSet<String> = (0..2000).map(|i| format!("o-{i}")).collect();
    let got: BTreeSet<String> = out.verdicts.keys().cloned().collect();
    assert_eq!(got, expected, "missing verdicts after the outage");
    assert!(
        out.verdicts.values().all(|n| *n == 1),
        "duplicated verdicts"
    );
    assert_eq!(committed(&broker, 2)?, vec![1000, 1000]);
    Ok(())
}

#[test]
fn a_second_instance_takes_over_partitions_and_no_event_goes_without_a_verdict() -> TestResult {
    let broker = broker(4)?;
    // A member that left is noticed within seconds rather than librdkafka's default 45 s.
    let config = config(
        &broker,
        "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )?;
    let start = now_ms() - 60_000;
    let producer = producer(&broker)?;
    let batch = |from: i64, to: i64| -> Vec<(i32, String)> {
        (from..to)
            .map(|i| ((i % 4) as i32, event(&format!("r-{i}"), start + i, 20.0)))
            .collect()
    };
    produce(&producer, &batch(0, 2000))?;
    let first = Running::start(&config, Assignment::Group)?;
    // The first instance joins and scores the first half alone.
    first.wait_verdicts(2000)?;
    let second = Running::start(&config, Assignment::Group)?;
    second.wait_assigned()?;
    produce(&producer, &batch(2000, 4000))?;
    let out = read_outputs(&broker, 4000)?;
    let a = first.stop()?;
    let b = second.stop()?;

    let expected: BTreeSet<String> = (0..4000).map(|i| format!("r-{i}")).collect();
    let got: BTreeSet<String> = out.verdicts.keys().cloned().collect();
    assert_eq!(
        got, expected,
        "events without a verdict after the rebalance"
    );
    // Both instances scored: the partitions were split between them.
    assert!(
        a.verdicts > 0 && b.verdicts > 0,
        "{} / {}",
        a.verdicts,
        b.verdicts
    );
    // Offsets end committed where the partitions end, whoever owned them last.
    assert_eq!(committed(&broker, 4)?, vec![1000, 1000, 1000, 1000]);
    Ok(())
}

//! Broker faults during a run, against librdkafka's mock cluster in process: every broker taken
//! down for longer than the idle timeout and brought back, and partition leaders moved between
//! brokers. Events arrive at 2,000 a second in event-time order throughout; afterwards every
//! event has exactly one verdict, none is late (neither to the late topic nor scored late), and
//! the test prints how long after the broker's return the first verdict came and the scoring
//! rate while catching up.
#![allow(clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use riskstream_common::Config;
use riskstream_kafka::{Assignment, EmbeddedBroker};
use riskstream_rules::{RuleCompiler, RuleTable};
use riskstream_testkit::send;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PARTITIONS: i32 = 8;
const RATE: u64 = 2_000;
const BUNDLE: &str = "\
features:
  - {name: n_1h, entity: customer_id, agg: count, window: 1h}
rules:
  - {id: busy, when: \"n_1h > 50\", score: 40}
decision: {review_at: 30, block_at: 70}
";

fn now_ms() -> i64 {
    riskstream_pipeline::source::now_ms()
}

/// A cluster of `brokers` with the pipeline's topics, each partition on every broker.
fn cluster(brokers: i32) -> Result<EmbeddedBroker, Box<dyn std::error::Error>> {
    let broker = EmbeddedBroker::start(brokers)?;
    for (topic, partitions) in [
        ("transactions", PARTITIONS),
        ("verdicts", 4),
        ("late", 1),
        ("dlq", 1),
    ] {
        broker.cluster().create_topic(topic, partitions, brokers)?;
    }
    Ok(broker)
}

/// Produces events stamped with their production time, `RATE` a second for `seconds`, over
/// every partition; returns how many. The producer waits out any outage.
fn feed(address: String, seconds: u64) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .set("reconnect.backoff.max.ms", "500")
            .create()
            .expect("producer");
        let started = Instant::now();
        let n = (RATE * seconds) as usize;
        for i in 0..n {
            let due = Duration::from_secs_f64(i as f64 / RATE as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            let json = format!(
                r#"{{"tx_id":"f-{i}","ts":{},"customer_id":"c{}","terminal_id":"t1","amount":12.5,"tx_type":"CP"}}"#,
                now_ms(),
                i % 500
            );
            send(
                &producer,
                "transactions",
                (i % PARTITIONS as usize) as i32,
                &json,
            );
        }
        producer.flush(Duration::from_secs(120)).expect("flush");
        n
    })
}

/// Verdicts (count, late flag, processed_at) by event id, and messages on the late topic.
struct Outputs {
    verdicts: HashMap<String, Vec<(bool, i64)>>,
    late_topic: usize,
}

fn read_outputs(address: &str, n: usize) -> Result<Outputs, Box<dyn std::error::Error>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", "fault-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..4 {
        list.add_partition_offset("verdicts", p, Offset::Beginning)?;
    }
    list.add_partition_offset("late", 0, Offset::Beginning)?;
    consumer.assign(&list)?;
    let mut out = Outputs {
        verdicts: HashMap::new(),
        late_topic: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settle: Option<Instant> = None;
    while Instant::now() < deadline && settle.is_none_or(|s| Instant::now() < s) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        if m.topic() == "late" {
            out.late_topic += 1;
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let at = chrono::DateTime::parse_from_rfc3339(v["processed_at"].as_str().unwrap_or(""))?
            .timestamp_millis();
        out.verdicts
            .entry(v["tx_id"].as_str().unwrap_or("").to_string())
            .or_default()
            .push((v["late"].as_bool().unwrap_or(true), at));
        if out.verdicts.len() >= n && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_secs(1));
        }
    }
    Ok(out)
}

/// Runs the pipeline over `broker` while `fault` acts on it (given the broker; it returns the
/// wall-clock time the fault ended), then checks the outputs and reports recovery.
fn run_through(
    broker: &EmbeddedBroker,
    what: &str,
    fault: impl FnOnce(&EmbeddedBroker) -> i64,
) -> TestResult {
    let config = Config::from_toml_over_defaults(&format!(
        "[kafka]\nbrokers = \"{}\"\ngroup_id = \"faults\"\n\
         [kafka.consumer]\n\"fetch.wait.max.ms\" = \"2\"\n\
         [kafka.properties]\n\"reconnect.backoff.max.ms\" = \"500\"\n\
         [time]\nallowed_lateness = \"5s\"\n",
        broker.bootstrap_servers()
    ))?;
    let compiled = RuleCompiler::new(&config.event_schema()?).compile_text(BUNDLE, 1)?;
    let rules = Arc::new(RuleTable::new(compiled));
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = {
        let (config, stop) = (config.clone(), Arc::clone(&stop));
        let assignment =
            Assignment::Fixed((0..PARTITIONS).map(|p| (p, Offset::Beginning)).collect());
        std::thread::spawn(move || riskstream_kafka::run(&config, rules, assignment, stop, None))
    };
    let feeder = feed(broker.bootstrap_servers(), 25);
    let ended_at = fault(broker);
    let n = feeder.join().map_err(|_| "the feeder panicked")?;
    let out = read_outputs(&broker.bootstrap_servers(), n)?;
    stop.store(true, Ordering::Release);
    pipeline.join().map_err(|_| "the pipeline panicked")??;

    let missing = (0..n)
        .filter(|i| !out.verdicts.contains_key(&format!("f-{i}")))
        .count();
    assert_eq!(
        missing, 0,
        "{what}: {missing} of {n} events without a verdict"
    );
    let repeated = out.verdicts.values().filter(|v| v.len() > 1).count();
    assert_eq!(repeated, 0, "{what}: events with more than one verdict");
    assert_eq!(out.late_topic, 0, "{what}: events sent to the late topic");
    let scored_late = out.verdicts.values().filter(|v| v[0].0).count();
    assert_eq!(scored_late, 0, "{what}: events scored as late");

    let mut after: Vec<i64> = out
        .verdicts
        .values()
        .map(|v| v[0].1)
        .filter(|at| *at >= ended_at)
        .collect();
    after.sort_unstable();
    if let Some(&first) = after.first() {
        let in_2s = after.iter().filter(|at| **at < first + 2_000).count();
        eprintln!(
            "{what}: first verdict {} ms after the fault ended; {:.0} events/s over the next 2 s",
            first - ended_at,
            in_2s as f64 / 2.0
        );
    }
    Ok(())
}

#[test]
fn every_broker_down_longer_than_the_idle_timeout_loses_nothing_and_makes_nothing_late(
) -> TestResult {
    let broker = cluster(1)?;
    run_through(&broker, "broker down 12 s", |broker| {
        std::thread::sleep(Duration::from_secs(4));
        broker.down(-1).expect("down");
        std::thread::sleep(Duration::from_secs(12));
        broker.up(-1).expect("up");
        now_ms()
    })
}

#[test]
fn partition_leaders_moved_during_a_run_lose_nothing_and_make_nothing_late() -> TestResult {
    let broker = cluster(3)?;
    run_through(&broker, "leaders moved", |broker| {
        let mut moved_at = now_ms();
        for leader in [2, 3, 1] {
            std::thread::sleep(Duration::from_secs(4));
            for (topic, partitions) in [("transactions", PARTITIONS), ("verdicts", 4)] {
                for p in 0..partitions {
                    broker
                        .cluster()
                        .partition_leader(topic, p, Some(leader))
                        .expect("leader moved");
                }
            }
            moved_at = now_ms();
        }
        moved_at
    })
}

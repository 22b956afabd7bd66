//! Crash recovery end to end: the embedded broker in a process of its own (`riskstream broker`),
//! `riskstream run` killed with SIGKILL at random moments more than twenty times while events
//! keep arriving, restarted each time, then left to finish. Every event must get a verdict, and
//! every verdict — repeated ones included — must carry the feature values of an uninterrupted
//! run (`riskstream score` over the same events): the state restored from a checkpoint is
//! exactly the state at its offsets. With `exactly_once`, a `read_committed` reader must see
//! exactly one verdict per event: what a killed instance sent in its open transaction is aborted
//! when its successor fences it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use riskstream_testkit::send_record;

use common::{assert_same_features, free_port, riskstream, signal, spawn_run, Broker};

const KILLS: usize = 21;
const CUSTOMERS: u64 = 300;
/// Events produced per second while the instance is being killed.
const RATE: u64 = 2_000;
const START_MS: i64 = 1_767_225_600_000; // 2026-01-01

const BUNDLE: &str = "\
features:
  - {name: n_1h, entity: customer_id, agg: count, window: 1h}
  - {name: sum_1h, entity: customer_id, agg: sum, of: amount, window: 1h}
  - {name: max_1d, entity: customer_id, agg: max, of: amount, window: 1d}
  - {name: avg_10m, entity: terminal_id, agg: avg, of: amount, window: 10m}
rules:
  - {id: busy, when: \"n_1h > 20\", score: 40}
  - {id: spike, when: \"amount > 3 * avg_10m\", score: 30}
decision: {review_at: 30, block_at: 70}
";

fn event(i: u64) -> (String, String) {
    let customer = format!("c{}", (i * 7919) % CUSTOMERS);
    // A customer's terminal is its own: events are keyed (partitioned) by customer, and only an
    // entity whose events share a partition has one order in every run.
    let terminal = format!("t{}", (i * 7919) % CUSTOMERS);
    let amount = 5.0 + ((i * 37) % 400) as f64 + if i % 97 == 0 { 900.0 } else { 0.0 };
    let ts = chrono::DateTime::from_timestamp_millis(START_MS + i as i64 * 1_500)
        .expect("time")
        .format("%Y-%m-%dT%H:%M:%S%.3fZ");
    let json = format!(
        "{{\"tx_id\":\"tx-{i}\",\"ts\":\"{ts}\",\"customer_id\":\"{customer}\",\"terminal_id\":\"{terminal}\",\"amount\":{amount},\"tx_type\":\"card\"}}"
    );
    (customer, json)
}

/// Produces events keyed by customer (so a customer's events keep their order in one
/// partition) at `RATE` until stopped; every event also goes to `file`, in order.
fn produce(address: &str, file: &Path, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut out = std::fs::File::create(file).expect("events file");
    let started = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        let due = (started.elapsed().as_secs_f64() * RATE as f64) as u64;
        while i < due {
            let (key, json) = event(i);
            send_record(
                &producer,
                BaseRecord::to("transactions").key(&key).payload(&json),
            );
            writeln!(out, "{json}").expect("write");
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    count.store(i, Ordering::Release);
}

/// Every verdict on the verdicts topic, as a `read_committed` consumer sees them: tx_id →
/// the features of each verdict for it. Reads until every partition is at its end and nothing
/// new arrived for a while.
fn read_verdicts(address: &str) -> HashMap<String, Vec<serde_json::Value>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", "crash-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some("verdicts"), Duration::from_secs(10))
        .expect("metadata");
    let mut list = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition_offset("verdicts", p.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    let mut verdicts: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).expect("verdict json");
            let id = v["tx_id"].as_str().expect("tx_id").to_string();
            verdicts.entry(id).or_default().push(v["features"].clone());
            quiet_since = Instant::now();
        }
    }
    verdicts
}

/// A temporary directory with the test bundle in it, and a broker process.
fn set_up() -> (tempfile::TempDir, std::path::PathBuf, Broker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle.yaml");
    std::fs::write(&bundle, BUNDLE).expect("bundle");
    let broker_config = dir.path().join("broker.toml");
    std::fs::write(&broker_config, "").expect("config");
    let broker = Broker::start(&broker_config);
    (dir, bundle, broker)
}

fn crash_and_recover(delivery: &str) {
    let (dir, bundle, broker) = set_up();
    let config = dir.path().join("riskstream.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"crash-{delivery}\"\ndelivery = \"{delivery}\"\n\
             [kafka.consumer]\n\"session.timeout.ms\" = \"3000\"\n\"heartbeat.interval.ms\" = \"300\"\n\
             [state]\ndir = \"{}\"\n[checkpoint]\ninterval = \"300ms\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[time]\nidle_timeout = \"1s\"\n",
            broker.address,
            dir.path().join("state").display(),
        ),
    )
    .expect("config");
    let events = dir.path().join("events.jsonl");
    let log = dir.path().join("run.log");

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let (address, events, stop, produced) = (
            broker.address.clone(),
            events.clone(),
            Arc::clone(&stop),
            Arc::clone(&produced),
        );
        std::thread::spawn(move || produce(&address, &events, stop, produced))
    };

    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);
    for _ in 0..KILLS {
        let mut child = spawn_run(&config, &bundle, &log);
        // A restarted instance waits about 3 s for the group to drop its killed predecessor
        // (`session.timeout.ms`); it is killed anywhere from before it gets partitions to a
        // few seconds of scoring and checkpoints later.
        std::thread::sleep(Duration::from_millis(rng.random_range(1_500..7_000)));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
    stop.store(true, Ordering::Release);
    producer.join().expect("producer");
    let n = produced.load(Ordering::Acquire);
    assert!(n > 5_000, "only {n} events produced");

    // The last instance runs until every event has its verdict, then stops cleanly.
    let mut last = spawn_run(&config, &bundle, &log);
    let deadline = Instant::now() + Duration::from_secs(180);
    let verdicts = loop {
        let verdicts = read_verdicts(&broker.address);
        if verdicts.len() as u64 >= n || Instant::now() > deadline {
            break verdicts;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    signal(&last, "TERM");
    let status = last.wait().expect("stopped");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the last instance failed:\n{log_text}");
    let restored = log_text.matches("state restored from checkpoint").count();
    assert!(
        restored >= KILLS / 2,
        "only {restored} restores logged:\n{log_text}"
    );

    // What the checkpoints CLI shows of what is left: the retained checkpoints, the newest
    // with every file stored.
    let cli = |args: &[&str]| {
        let out = riskstream()
            .arg("--config")
            .arg(&config)
            .args(["checkpoints"])
            .args(args)
            .output()
            .expect("riskstream checkpoints");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, listed) = cli(&["list"]);
    assert!(ok, "{listed}");
    assert!(listed.contains("3 checkpoint(s)"), "{listed}");
    let (ok, inspected) = cli(&["inspect"]);
    assert!(ok, "{inspected}");
    assert!(inspected.contains("stored with their sizes"), "{inspected}");
    assert!(
        inspected.contains(&format!("\"delivery\": \"{delivery}\"")),
        "{inspected}"
    );

    // The uninterrupted run, over a state of its own.
    let reference_out = dir.path().join("reference.jsonl");
    let reference_config = dir.path().join("reference.toml");
    std::fs::write(&reference_config, "[time]\nidle_timeout = \"1s\"\n").expect("config");
    let scored = riskstream()
        .arg("--config")
        .arg(&reference_config)
        .args(["score", "--bundle"])
        .arg(&bundle)
        .arg("--input")
        .arg(&events)
        .arg("--output")
        .arg(&reference_out)
        .status()
        .expect("score");
    assert!(scored.success());
    let reference: BTreeMap<String, serde_json::Value> = std::fs::read_to_string(&reference_out)
        .expect("reference")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["tx_id"].as_str().expect("id").to_string(),
                v["features"].clone(),
            )
        })
        .collect();
    assert_eq!(reference.len() as u64, n);

    let missing: Vec<&String> = reference
        .keys()
        .filter(|id| !verdicts.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{delivery}: {} of {n} events have no verdict, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_same_features(
        delivery,
        verdicts
            .iter()
            .flat_map(|(id, seen)| seen.iter().map(move |features| (id, features))),
        |id| reference.get(id),
    );
    let repeated: usize = verdicts.values().map(|v| v.len() - 1).sum();
    if delivery == "exactly_once" {
        // Whatever a killed instance had sent in its open transaction was aborted when its
        // successor took over the transactional id; a read_committed reader sees each verdict
        // of a committed transaction, and each event is in exactly one of those.
        let twice: Vec<(&String, usize)> = verdicts
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(id, v)| (id, v.len()))
            .collect();
        assert!(
            twice.is_empty(),
            "exactly_once: {} events have more than one committed verdict ({repeated} extra), e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
    }
    eprintln!(
        "{delivery}: {n} events, {KILLS} kills, {restored} restores, {} verdicts ({repeated} repeated)",
        n as usize + repeated
    );
}

#[test]
fn at_least_once_survives_repeated_sigkills_with_exact_state() {
    crash_and_recover("at_least_once");
}

#[test]
fn exactly_once_survives_repeated_sigkills_with_exact_state() {
    crash_and_recover("exactly_once");
}

/// `riskstream checkpoints create` asks a running instance for a checkpoint through its admin
/// API, with the configured token, and prints the manifest; with nothing listening, or without
/// the token, it fails and says why.
#[test]
fn checkpoints_create_asks_a_running_instance_for_a_checkpoint() {
    let (dir, bundle, broker) = set_up();
    let port = free_port();
    let write_config = |name: &str, token: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[kafka]\nbrokers = \"{}\"\ngroup_id = \"cli\"\n\
                 [state]\ndir = \"{}\"\n[checkpoint]\ninterval = \"1h\"\n\
                 [admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{token}\"\n",
                broker.address,
                dir.path().join("state").display(),
            ),
        )
        .expect("config");
        path
    };
    let config = write_config("riskstream.toml", "cli-token");
    let without_token = write_config("no-token.toml", "");
    let create = |config: &Path| {
        let out = riskstream()
            .arg("--config")
            .arg(config)
            .args(["checkpoints", "create"])
            .output()
            .expect("riskstream checkpoints create");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, _, stderr) = create(&config);
    assert!(!ok);
    assert!(
        stderr.contains("cannot reach the admin API"),
        "nothing listens yet: {stderr}"
    );

    let address = broker.address.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let (events, stop, produced) = (
            dir.path().join("events.jsonl"),
            Arc::clone(&stop),
            Arc::clone(&produced),
        );
        std::thread::spawn(move || produce(&address, &events, stop, produced))
    };
    let mut instance = spawn_run(&config, &bundle, &dir.path().join("run.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ok, stdout, stderr) = loop {
        let attempt = create(&config);
        if attempt.0 || Instant::now() > deadline {
            break attempt;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    stop.store(true, Ordering::Release);
    producer.join().expect("producer");
    assert!(ok, "{stdout}{stderr}");
    let manifest: serde_json::Value = serde_json::from_str(stdout.trim()).expect("manifest json");
    assert!(manifest["id"].as_u64().is_some(), "{manifest}");
    assert!(manifest["offsets"].is_object(), "{manifest}");

    let (ok, stdout, _) = create(&without_token);
    assert!(!ok, "accepted without the token: {stdout}");
    assert!(stdout.contains("unauthorized"), "{stdout}");

    signal(&instance, "TERM");
    assert!(instance.wait().expect("stopped").success());
}

//! The commands the container deployment uses besides `run`: `riskstream generate` (the
//! compose pipeline's traffic) against a real Kafka-protocol broker, through a broker stall,
//! and `riskstream health` (the image's HEALTHCHECK) against a live instance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{free_port, riskstream, wait_exit, Broker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Every record of `topic` from its beginning, as (key, payload), until `n` are read.
fn read_topic(address: &str, topic: &str, n: usize) -> Vec<(String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", format!("generate-test-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .expect("metadata");
    let mut list = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            out.push((key, payload));
        }
    }
    // Anything beyond `n` would be a duplicate: read on briefly to see it.
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            out.push((key, String::new()));
        }
    }
    out
}

/// The counts in generate's final line: "generated N events (F fraud, M malformed on purpose)
/// and L labels; D records acknowledged, X failed".
fn summary_numbers(log: &str) -> Vec<u64> {
    let line = log
        .lines()
        .find(|l| l.starts_with("generated "))
        .unwrap_or_else(|| panic!("no summary line in:\n{log}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("number"))
        .collect()
}

#[test]
fn generate_waits_out_a_stalled_broker_and_delivers_every_event_and_label() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[kafka.topics]\nlabels = \"labels\"\n").expect("config");
    let broker = Broker::start(&config);
    // Stalled before the generator connects: nothing can be delivered until it resumes.
    broker.stall();
    let log_path = dir.path().join("generate.log");
    let mut child = riskstream()
        .arg("--config")
        .arg(&config)
        .args([
            "generate",
            "--count",
            "400",
            "--rate",
            "4000",
            "--seed",
            "3",
            "--id-prefix",
            "t-",
        ])
        .env("RISKSTREAM__KAFKA__BROKERS", &broker.address)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("generate starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("generating")
    {
        assert!(Instant::now() < deadline, "generate never started");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "generate exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "generate finished although the broker could acknowledge nothing:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    broker.resume();
    let status = wait_exit(&mut child, Duration::from_secs(90)).expect("generate exits");
    let mut log = String::new();
    std::fs::File::open(&log_path)
        .expect("log")
        .read_to_string(&mut log)
        .expect("read log");
    assert!(status.success(), "generate failed ({status}):\n{log}");
    let numbers = summary_numbers(&log);
    let [events, frauds, malformed, labels, acknowledged, failed] = numbers[..] else {
        panic!("unexpected summary: {numbers:?}\n{log}");
    };
    assert_eq!(events, 400);
    assert_eq!(failed, 0);
    assert_eq!(labels, events - malformed, "a label per well-formed event");
    assert_eq!(acknowledged, events + labels);

    let transactions = read_topic(&broker.address, "transactions", 400);
    assert_eq!(transactions.len(), 400, "every event once on the topic");
    let mut ids: HashMap<String, bool> = HashMap::new();
    let mut well_formed = 0;
    for (key, payload) in &transactions {
        assert!(key.starts_with("t-"), "event id {key} lacks the prefix");
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(payload) {
            if event["amount"].is_f64() {
                assert_eq!(event["tx_id"].as_str(), Some(key.as_str()));
                assert!(event["ts"].as_i64().is_some(), "event time in {payload}");
                well_formed += 1;
            }
        }
        assert!(ids.insert(key.clone(), false).is_none(), "{key} twice");
    }
    assert_eq!(well_formed, events - malformed);

    let label_records = read_topic(&broker.address, "labels", labels as usize);
    assert_eq!(label_records.len() as u64, labels, "every label once");
    let mut fraud_labels = 0;
    for (key, payload) in &label_records {
        let label: serde_json::Value = serde_json::from_str(payload).expect("label JSON");
        assert_eq!(label["tx_id"].as_str(), Some(key.as_str()));
        let seen = ids
            .get_mut(key)
            .unwrap_or_else(|| panic!("label for unknown {key}"));
        assert!(!*seen, "two labels for {key}");
        *seen = true;
        fraud_labels += label["fraud"].as_u64().expect("fraud 0 or 1");
    }
    assert_eq!(
        fraud_labels, frauds,
        "fraud labels match the reported frauds"
    );
}

#[test]
fn health_answers_for_liveness_and_readiness_and_fails_without_an_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_port = free_port();
    // No broker at all: the instance is alive but waits for the cluster, so not ready.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
            free_port()
        ),
    )
    .expect("config");
    let mut instance = riskstream()
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run starts");
    let address = format!("127.0.0.1:{admin_port}");
    let health = |args: &[&str]| {
        riskstream()
            .arg("health")
            .args(["--admin", &address])
            .args(args)
            .output()
            .expect("health runs")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !health(&[]).status.success() {
        assert!(Instant::now() < deadline, "/healthz never answered 200");
        assert!(
            instance.try_wait().expect("try_wait").is_none(),
            "run exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = health(&["--ready"]);
    assert!(!ready.status.success(), "ready without a Kafka cluster");
    let stderr = String::from_utf8_lossy(&ready.stderr);
    assert!(
        stderr.contains("/readyz answered 503") && stderr.contains("rules are not loaded"),
        "{stderr}"
    );
    // The container form: the unspecified address of `admin.listen = 0.0.0.0:PORT`.
    let unspecified = riskstream()
        .args(["health", "--admin", &format!("0.0.0.0:{admin_port}")])
        .output()
        .expect("health runs");
    assert!(
        unspecified.status.success(),
        "0.0.0.0 is reached on loopback"
    );

    let _ = instance.kill();
    let _ = instance.wait();
    let gone = health(&[]);
    assert!(!gone.status.success(), "healthy with no instance");
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(stderr.contains("cannot reach the admin API"), "{stderr}");
}

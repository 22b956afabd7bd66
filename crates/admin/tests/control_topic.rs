//! Rule hot reload through the admin API and the control topic, over a real Kafka-protocol
//! broker: updates under load never split a batch, never go backwards, and reach every instance.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use riskstream_common::{DeadLetter, RawBatch};
use riskstream_kafka::{Assignment, DeliveryTracker, EmbeddedBroker, KafkaSink, KafkaSource};
use riskstream_pipeline::{Pipeline, Sink, SinkError, VerdictBatch};

/// The real Kafka sink, noting the rules versions of every batch it is handed.
struct BatchVersions {
    inner: KafkaSink,
    batches: Arc<Mutex<Vec<BTreeSet<u64>>>>,
}

impl Sink for BatchVersions {
    fn verdicts(&mut self, verdicts: &VerdictBatch) -> Result<(), SinkError> {
        let versions: BTreeSet<u64> = verdicts
            .iter()
            .filter_map(|(_, json, _)| {
                serde_json::from_slice::<serde_json::Value>(json)
                    .ok()
                    .and_then(|v| v["rules_version"].as_u64())
            })
            .collect();
        if !verdicts.is_empty() {
            self.batches
                .lock()
                .map_err(|_| SinkError::Stream {
                    name: "test".into(),
                    message: "poisoned".into(),
                })?
                .push(versions);
        }
        self.inner.verdicts(verdicts)
    }

    fn dead_letters(
        &mut self,
        source: &str,
        raw: &RawBatch,
        dead: &[DeadLetter],
    ) -> Result<(), SinkError> {
        self.inner.dead_letters(source, raw, dead)
    }

    fn late(&mut self, source: &str, raw: &RawBatch, late: &[DeadLetter]) -> Result<(), SinkError> {
        self.inner.late(source, raw, late)
    }

    fn end_batch(&mut self, raw: &RawBatch) -> Result<(), SinkError> {
        self.inner.end_batch(raw)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.inner.flush()
    }
}

fn threshold(version: u64) -> f64 {
    100.0 + version as f64
}

#[test]
fn a_hundred_updates_under_load_give_every_event_one_verdict_of_one_published_version() -> TestResult
{
    let broker = broker()?;
    let config = config(&broker, "")?;
    let plane = riskstream_admin::ControlPlane::start(&config, Some(&bundle(101)), None, None)?;
    let base = format!("http://{}", plane.address());
    assert_eq!(plane.control.version(), 1);

    // The pipeline, assembled as `run` does, with the sink noting each batch's versions.
    let batches = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = {
        let (config, stop, batches) = (config.clone(), stop.clone(), batches.clone());
        let rules = plane.control.table();
        std::thread::spawn(move || -> Result<_, riskstream_pipeline::PipelineError> {
            let tracker = Arc::new(DeliveryTracker::new());
            let mut sink = BatchVersions {
                inner: KafkaSink::new(&config.kafka, tracker.clone())?,
                batches,
            };
            let mut source = KafkaSource::new(
                &config.kafka,
                config.pipeline.linger,
                tracker,
                Assignment::Group,
                stop,
            )?;
            let mut pipeline = Pipeline::new(&config, rules, "transactions")?;
            riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink)
        })
    };

    // A continuous stream: about 4K events/s over 4 partitions until the updates are done.
    let producing = Arc::new(AtomicBool::new(true));
    let produced = Arc::new(AtomicU64::new(0));
    let feeder = {
        let producer = producer(&broker)?;
        let (producing, produced) = (producing.clone(), produced.clone());
        std::thread::spawn(move || -> TestResult<Vec<(String, f64)>> {
            let mut sent = Vec::new();
            let mut seq = 0u64;
            while producing.load(Ordering::Acquire) {
                for p in 0..TRANSACTIONS_PARTITIONS {
                    let id = format!("p{p}-{seq:07}");
                    let amount = 50.0 + ((seq * 37 + p as u64 * 11) % 200) as f64;
                    send(&producer, p, &event(&id, now_ms(), amount));
                    sent.push((id, amount));
                }
                seq += 1;
                produced.store(sent.len() as u64, Ordering::Release);
                std::thread::sleep(Duration::from_millis(1));
            }
            flush(&producer)?;
            Ok(sent)
        })
    };

    // Wait until scoring has begun, then publish 100 updates back to back.
    let client = http()?;
    let started = Instant::now();
    let scoring = || batches.lock().map(|b| !b.is_empty()).unwrap_or(false);
    while !scoring() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(scoring(), "the pipeline scored nothing within 30 s");
    let mut published = vec![1u64];
    for i in 0..100u64 {
        let expected = 1 + i;
        let (status, body) = put_rules(
            &client,
            &base,
            &bundle(threshold(expected + 1) as u32),
            Some(expected),
            None,
        )?;
        assert_eq!(status, 200, "update {i}: {body}");
        assert_eq!(body["version"], expected + 1, "{body}");
        published.push(expected + 1);
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    producing.store(false, Ordering::Release);
    let sent = feeder.join().map_err(|_| "feeder panicked")??;

    let verdicts = read_verdicts(&broker, sent.len())?;
    stop.store(true, Ordering::Release);
    pipeline.join().map_err(|_| "pipeline panicked")??;

    // Every event exactly one verdict, of a published version, decided by that version.
    let published: BTreeSet<u64> = published.into_iter().collect();
    let mut by_partition: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for (id, amount) in &sent {
        let list = verdicts.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(list.len(), 1, "{id}: {} verdicts", list.len());
        let verdict = &list[0];
        let version = verdict["rules_version"]
            .as_u64()
            .ok_or("no rules_version")?;
        assert!(
            published.contains(&version),
            "{id}: version {version} was never published"
        );
        let expected = if *amount > threshold(version) {
            "review"
        } else {
            "allow"
        };
        assert_eq!(
            verdict["decision"], expected,
            "{id} amount {amount} v{version}: {verdict}"
        );
        let partition = id.split('-').next().unwrap_or_default().to_string();
        by_partition
            .entry(partition)
            .or_default()
            .push((id.clone(), version));
    }
    // Within each partition, versions never go backwards.
    for (partition, mut list) in by_partition {
        list.sort();
        for pair in list.windows(2) {
            assert!(
                pair[0].1 <= pair[1].1,
                "partition {partition}: {} has v{} after {} had v{}",
                pair[1].0,
                pair[1].1,
                pair[0].0,
                pair[0].1
            );
        }
    }
    // No batch mixes versions.
    let batches = batches.lock().map_err(|_| "poisoned")?;
    assert!(!batches.is_empty());
    for (i, versions) in batches.iter().enumerate() {
        assert_eq!(versions.len(), 1, "batch {i} mixes versions {versions:?}");
    }
    // The updates happened while events were scored, not before or after all of them.
    let seen: BTreeSet<u64> = batches.iter().flatten().copied().collect();
    assert!(
        seen.len() >= 10,
        "only versions {seen:?} scored events: the updates did not overlap the stream"
    );
    assert_eq!(plane.control.version(), 101);
    Ok(())
}

#[test]
fn an_update_through_one_instance_reaches_both_and_concurrent_updates_have_one_winner() -> TestResult
{
    let broker = broker()?;
    let a = Instance::start(
        &config(&broker, "instance_id = \"a\"")?,
        &bundle(101),
        false,
    )?;
    // The second instance finds the topic seeded: it runs the first's version 1.
    let b = Instance::start(
        &config(&broker, "instance_id = \"b\"")?,
        &bundle(999),
        false,
    )?;
    let client = http()?;
    for instance in [&a, &b] {
        let (_, rules) = get_json(&client, &instance.base, "/api/v1/rules")?;
        assert_eq!(rules["version"], 1);
        assert_eq!(rules["origin"], "a", "{rules}");
    }

    // Through a; both run version 2 with the same bundle.
    let (status, body) = put_rules(&client, &a.base, &bundle(150), Some(1), None)?;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, rules) = get_json(&client, &b.base, "/api/v1/rules")?;
        if rules["version"] == 2 {
            assert_eq!(rules["bundle"], bundle(150));
            break;
        }
        assert!(Instant::now() < deadline, "b still runs {rules}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.rules().version(), 2);
    assert_eq!(b.rules().version(), 2);

    // Both instances receive an update replacing version 2 at once: exactly one wins, the
    // other gets 409, and both end on the winner's bundle.
    let updates: Vec<(String, String)> = [(&a, 160), (&b, 170), (&a, 180), (&b, 190)]
        .into_iter()
        .map(|(instance, threshold)| (instance.base.clone(), bundle(threshold)))
        .collect();
    let results = concurrent_puts(&client, &updates, 2, None)?;
    let winners: Vec<_> = results.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert!(
        results.iter().all(|(s, _)| *s == 200 || *s == 409),
        "{results:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.rules().version() != 3 || b.rules().version() != 3 {
        assert!(Instant::now() < deadline, "instances did not converge");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, ra) = get_json(&client, &a.base, "/api/v1/rules")?;
    let (_, rb) = get_json(&client, &b.base, "/api/v1/rules")?;
    assert_eq!(ra["bundle"], rb["bundle"]);

    // Both report the same version in their status, and score with it.
    let producer = producer(&broker)?;
    for p in 0..TRANSACTIONS_PARTITIONS {
        send(&producer, p, &event(&format!("after-{p}"), now_ms(), 500.0));
    }
    flush(&producer)?;
    let verdicts = read_verdicts(&broker, TRANSACTIONS_PARTITIONS as usize)?;
    for p in 0..TRANSACTIONS_PARTITIONS {
        let v = verdicts
            .get(&format!("after-{p}"))
            .and_then(|l| l.first())
            .ok_or("missing verdict")?;
        assert_eq!(v["rules_version"], 3, "{v}");
    }
    for instance in [&a, &b] {
        let (_, status) = get_json(&client, &instance.base, "/api/v1/status")?;
        assert_eq!(status["rules"]["version"], 3, "{status}");
    }
    a.stop()?;
    b.stop()?;
    Ok(())
}

/// An instance whose cluster is down, then up without the control topic, then given it (as a
/// deployment's topic job does): the admin API answers from the start, `/readyz` says what it
/// waits for at each step, and the rules load once the topic is there.
#[test]
fn rules_load_once_the_cluster_and_the_control_topic_are_there() -> TestResult {
    let broker = EmbeddedBroker::start(1)?;
    broker.create_topic("transactions", 2)?;
    let config = config(&broker, "")?;
    broker.down(-1)?;
    let admin = riskstream_admin::AdminPlane::open(&config, None, None)?;
    let base = format!("http://{}", admin.address());
    let status = Arc::clone(admin.status());
    let stop = Arc::new(AtomicBool::new(false));
    let loading = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || admin.load_rules(Some(&bundle(101)), &stop))
    };
    let http = reqwest::blocking::Client::new();
    let waiting_for = |expected: &str| -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = http.get(format!("{base}/readyz")).send()?;
            let code = response.status().as_u16();
            let body: serde_json::Value = response.json()?;
            if code == 503 && body["waiting_for"].to_string().contains(expected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/readyz never waited for `{expected}`: {code} {body}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    waiting_for("the Kafka cluster at")?;
    let rules = http.get(format!("{base}/api/v1/rules")).send()?;
    assert_eq!(rules.status().as_u16(), 503);
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()?
            .status()
            .as_u16(),
        200
    );
    broker.up(-1)?;
    // The embedded broker does not implement CreateTopics: the topic appears when created here.
    waiting_for("does not exist yet")?;
    broker.create_topic("riskstream.rules", 1)?;
    let plane = loading.join().map_err(|_| "load_rules panicked")??;
    let plane = plane.ok_or("load_rules stopped")?;
    assert_eq!(plane.control.version(), 1);
    assert!(status.snapshot().waiting_for.is_none());
    let rules = http.get(format!("{base}/api/v1/rules")).send()?;
    assert_eq!(rules.status().as_u16(), 200);
    stop.store(true, Ordering::Release);
    Ok(())
}

/// A stop while the cluster is away ends the wait within a second.
#[test]
fn a_stop_ends_the_wait_for_the_cluster() -> TestResult {
    let broker = EmbeddedBroker::start(1)?;
    let config = config(&broker, "")?;
    broker.down(-1)?;
    let admin = riskstream_admin::AdminPlane::open(&config, None, None)?;
    let status = Arc::clone(admin.status());
    let stop = Arc::new(AtomicBool::new(false));
    let loading = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || admin.load_rules(Some(&bundle(101)), &stop))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.snapshot().waiting_for.is_none() {
        assert!(Instant::now() < deadline, "never reported waiting");
        std::thread::sleep(Duration::from_millis(50));
    }
    let asked = Instant::now();
    stop.store(true, Ordering::Release);
    let outcome = loading.join().map_err(|_| "load_rules panicked")??;
    assert!(outcome.is_none(), "stopped, not loaded");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    Ok(())
}

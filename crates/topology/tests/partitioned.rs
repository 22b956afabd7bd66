//! The partitioned topology against a real Kafka-protocol broker (librdkafka's mock cluster, in
//! process): the same events scored by the single topology and by the partitioned one give the
//! same verdicts, feature by feature, with one instance and with instances joining and leaving
//! while events flow.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use riskstream_common::Config;
use riskstream_kafka::EmbeddedBroker;
use riskstream_pipeline::{JsonLinesSink, JsonLinesSource, Pipeline};
use riskstream_rules::{RuleCompiler, RuleTable};
use riskstream_testkit::{self as testkit, TestResult};
use riskstream_topology::Running;
use serde_json::Value;

const BUNDLE: &str = include_str!("../../../config/rules/default.yaml");

/// Internal partitions in these tests (64 by default; fewer keep the mock broker quick).
const PARTITIONS: i32 = 6;

fn broker() -> TestResult<EmbeddedBroker> {
    let mut topics = testkit::PIPELINE_TOPICS.to_vec();
    // One transactions partition: the single topology's arrival order is then the order in
    // which every entity partition receives its events, as the definition needs.
    topics[0].1 = 1;
    // The embedded broker cannot create topics through the admin API: the internal ones are
    // created here, as an operator may create them beforehand on any cluster.
    for internal in [
        "scale.by-customer_id",
        "scale.by-terminal_id",
        "scale.gather",
    ] {
        topics.push((internal, PARTITIONS));
    }
    testkit::broker(&topics)
}

fn config(broker: &EmbeddedBroker, state: Option<&std::path::Path>) -> TestResult<Config> {
    let state = state
        .map(|d| {
            format!(
                "[state]\ndir = {:?}\nflush_interval = \"200ms\"\n",
                d.display().to_string()
            )
        })
        .unwrap_or_default();
    let toml = format!(
        r#"
[pipeline]
topology = "partitioned"
partitions = {PARTITIONS}
batch_max_events = 64
[verdict]
features = "all"
[time]
allowed_lateness = "1d"
{state}
[kafka]
brokers = "{}"
group_id = "scale"
[kafka.properties]
"reconnect.backoff.max.ms" = "500"
# The embedded broker waits a whole session for a member to rejoin a rebalance.
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"#,
        broker.bootstrap_servers()
    );
    Ok(Config::from_toml_over_defaults(&toml)?)
}

fn rules(config: &Config) -> TestResult<Arc<RuleTable>> {
    let compiled = RuleCompiler::new(&config.event_schema()?).compile_text(BUNDLE, 1)?;
    Ok(Arc::new(RuleTable::new(compiled)))
}

/// `n` payment events over 23 customers and 7 terminals, a second apart from a day ago, every
/// tenth a few seconds out of order, plus one malformed record.
fn events(n: usize) -> Vec<String> {
    let start = testkit::now_ms() - 86_400_000;
    let mut out: Vec<String> = (0..n)
        .map(|i| {
            let ts = start + i as i64 * 1000 - if i % 10 == 9 { 4_000 } else { 0 };
            format!(
                r#"{{"tx_id":"e{i}","ts":{ts},"customer_id":"c{}","terminal_id":"t{}","amount":{},"tx_type":"{}"}}"#,
                (i * 7) % 23,
                (i * 3) % 7,
                10.0 + (i % 97) as f64 * 13.5,
                if i % 4 == 0 { "CNP" } else { "CP" }
            )
        })
        .collect();
    out.insert(n / 2, r#"{"tx_id":"bad","ts":"yesterday"}"#.to_string());
    out
}

/// Verdicts of the single topology over `events` (the reference), by event id.
fn reference(config: &Config, events: &[String]) -> TestResult<BTreeMap<String, Value>> {
    let dir = tempfile::tempdir()?;
    let mut single = config.clone();
    single.state.dir = None;
    let mut pipeline = Pipeline::new(&single, rules(&single)?, "transactions")?;
    let text = events.join("\n") + "\n";
    let mut source = JsonLinesSource::from_reader("transactions", std::io::Cursor::new(text));
    let verdicts = dir.path().join("verdicts.jsonl");
    let mut sink = JsonLinesSink::create(
        &verdicts,
        &dir.path().join("dlq.jsonl"),
        &dir.path().join("late.jsonl"),
    )?;
    riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink)?;
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(&verdicts)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        out.insert(v["tx_id"].as_str().unwrap_or_default().to_string(), v);
    }
    Ok(out)
}

/// Everything of a verdict but when and how fast it was made.
fn comparable(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("processed_at");
        o.remove("latency_ms");
    }
    v
}

fn start(config: &Config) -> TestResult<(Running, Arc<AtomicBool>)> {
    // What the stages log shows with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,librdkafka=warn")
        .try_init();
    let stop = Arc::new(AtomicBool::new(false));
    let running = riskstream_topology::start(config, rules(config)?, Arc::clone(&stop))?;
    Ok((running, stop))
}

fn stop(running: Running) -> TestResult {
    running.request_stop();
    running.wait()?;
    Ok(())
}

/// Reads the verdicts topic until every id of `expected` has a verdict.
fn verdicts(broker: &EmbeddedBroker, expected: &BTreeMap<String, Value>) -> TestResult<Vec<Value>> {
    let records = testkit::read_until(
        &broker.bootstrap_servers(),
        &["verdicts"],
        false,
        Duration::from_secs(120),
        |records| {
            let ids: std::collections::BTreeSet<String> =
                records.iter().map(|r| r.key_str()).collect();
            expected.keys().all(|id| ids.contains(id))
        },
    )?;
    records.iter().map(|r| r.json()).collect()
}

/// Every verdict equals the reference's for its event; every event of the reference has one.
fn assert_same(reference: &BTreeMap<String, Value>, verdicts: &[Value]) -> TestResult {
    let mut seen = std::collections::BTreeSet::new();
    for v in verdicts {
        let id = v["tx_id"].as_str().unwrap_or_default().to_string();
        let Some(expected) = reference.get(&id) else {
            return Err(format!("a verdict for {id}, which the reference did not score").into());
        };
        assert_eq!(comparable(v), comparable(expected), "verdict of {id}");
        seen.insert(id);
    }
    let missing: Vec<&String> = reference.keys().filter(|id| !seen.contains(*id)).collect();
    assert!(missing.is_empty(), "events without a verdict: {missing:?}");
    Ok(())
}

#[test]
fn one_partitioned_instance_scores_like_the_single_topology() -> TestResult {
    let broker = broker()?;
    let state = tempfile::tempdir()?;
    let config = config(&broker, Some(state.path()))?;
    let events = events(400);
    let reference = reference(&config, &events)?;
    assert_eq!(reference.len(), 400);

    let (running, _stop) = start(&config)?;
    let plan = running.plan().clone();
    assert_eq!(
        plan.kinds
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>(),
        ["customer_id", "terminal_id"]
    );
    let producer = testkit::producer(&broker.bootstrap_servers())?;
    let sent: Vec<(i32, String)> = events.iter().map(|e| (0, e.clone())).collect();
    testkit::produce(&producer, "transactions", &sent)?;
    let verdicts = verdicts(&broker, &reference)?;
    stop(running)?;
    assert_same(&reference, &verdicts)?;

    // The malformed record went to the DLQ with its reason, as in the single topology.
    let dlq = testkit::read_until(
        &broker.bootstrap_servers(),
        &["dlq"],
        false,
        Duration::from_secs(30),
        |r| !r.is_empty(),
    )?;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, br#"{"tx_id":"bad","ts":"yesterday"}"#);
    assert!(!dlq[0].header("reason").is_empty());

    // Internal topics were created with the configured partition count, and the state of
    // every entity partition records the offset it covers.
    for kind in &plan.kinds {
        let dir = state.path().join(format!("by-{}", kind.name));
        let partitions = std::fs::read_dir(&dir)?.count();
        assert!(partitions > 0, "no partition state under {}", dir.display());
    }
    Ok(())
}

#[test]
fn instances_joining_and_leaving_keep_every_feature_exact() -> TestResult {
    let broker = broker()?;
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let configs: Vec<Config> = dirs
        .iter()
        .map(|d| config(&broker, Some(d.path())))
        .collect::<TestResult<_>>()?;
    let events = events(600);
    let reference = reference(&configs[0], &events)?;
    let producer = testkit::producer(&broker.bootstrap_servers())?;
    let send = |range: std::ops::Range<usize>| {
        let sent: Vec<(i32, String)> = events[range].iter().map(|e| (0, e.clone())).collect();
        testkit::produce(&producer, "transactions", &sent)
    };
    let ids_in = |range: std::ops::Range<usize>| -> BTreeMap<String, Value> {
        events[range]
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|e| {
                let id = e["tx_id"].as_str()?.to_string();
                reference.get(&id).map(|v| (id, v.clone()))
            })
            .collect()
    };

    // One instance scores the first third.
    let (a, _) = start(&configs[0])?;
    send(0..200)?;
    let first = ids_in(0..200);
    verdicts(&broker, &first)?;

    // Two more join: partitions move to them while the second third flows.
    let (b, _) = start(&configs[1])?;
    let (c, _) = start(&configs[2])?;
    send(200..400)?;
    let second = ids_in(0..400);
    verdicts(&broker, &second)?;

    // The first leaves; the others take its partitions over (with state they never had).
    stop(a)?;
    send(400..events.len())?;
    let all = verdicts(&broker, &reference)?;
    stop(b)?;
    stop(c)?;
    assert_same(&reference, &all)
}

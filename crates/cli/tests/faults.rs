//! Broker, disk and pause faults, end to end, with `riskstream run` and the embedded broker in
//! processes of their own and the shared sample stream (58,904 events, up to 4 days out of
//! order, scored with 5 days of allowed lateness):
//!
//! - started before the broker exists, an instance waits (healthy, not ready, saying why),
//!   reads the control topic once the cluster answers and scores every event; SIGTERM while
//!   it waits ends it at once with status 0;
//! - a 48 s pause of the whole input, and the broker stopped dead (SIGSTOP) for 40 s, send no
//!   event to `late`, and every event has exactly one verdict (`read_committed`, under
//!   `at_least_once` and `exactly_once`);
//! - a full disk fails `score` with a non-zero status naming the directory, and stops `run`
//!   from consuming (not ready, saying why) once checkpoints keep failing; after space is freed
//!   and a restart, every feature value equals an uninterrupted run's;
//! - an admin API reachable from other hosts refuses to start without a token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use riskstream_testkit::send_record;

use common::{assert_same_features, free_port, riskstream, signal, spawn_run, wait_exit, Broker};

/// The shared sample stream (`../shared/data/synccfd-small`).
const SAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/data/synccfd-small/transactions.jsonl"
);

/// A bundle of customer features only: with events keyed by customer, each customer's events
/// keep their file order in one partition, so every feature value is the same as in a
/// `riskstream score` of the file.
const BUNDLE: &str = "\
features:
  - {name: n_1d, entity: customer_id, agg: count, window: 1d}
  - {name: sum_7d, entity: customer_id, agg: sum, of: amount, window: 7d}
  - {name: avg_30d, entity: customer_id, agg: avg, of: amount, window: 30d}
  - {name: max_1d, entity: customer_id, agg: max, of: amount, window: 1d}
rules:
  - {id: busy, when: \"n_1d > 6\", score: 40}
  - {id: big, when: \"amount > 3 * avg_30d\", score: 30}
decision: {review_at: 30, block_at: 70}
";

/// One event of the sample: its id, its customer (the Kafka key) and its JSON line.
struct Event {
    id: String,
    customer: String,
    json: String,
}

/// The sample stream, in file order. Missing data fails the test: it is not skipped.
fn sample() -> Vec<Event> {
    let text = std::fs::read_to_string(SAMPLE).unwrap_or_else(|e| {
        panic!("the shared sample {SAMPLE} is missing ({e}): these tests need it")
    });
    let events: Vec<Event> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("sample json");
            Event {
                id: v["tx_id"].as_str().expect("tx_id").to_string(),
                customer: v["customer_id"].as_str().expect("customer_id").to_string(),
                json: line.to_string(),
            }
        })
        .collect();
    assert_eq!(events.len(), 58_904, "the shared sample changed");
    events
}

fn producer(address: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "0")
        .set("reconnect.backoff.max.ms", "500")
        .create()
        .expect("producer")
}

/// Produces `events` keyed by customer, at most `rate` a second (0: as fast as it goes).
fn produce(producer: &ThreadedProducer<DefaultProducerContext>, events: &[Event], rate: u64) {
    let started = Instant::now();
    for (i, e) in events.iter().enumerate() {
        if rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        send_record(
            producer,
            BaseRecord::to("transactions")
                .key(&e.customer)
                .payload(&e.json),
        );
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
}

/// Everything on the output topics, as a `read_committed` consumer sees it.
#[derive(Default)]
struct Outputs {
    /// Per event id, each verdict's features and `processed_at` (ms since the epoch).
    verdicts: HashMap<String, Vec<(serde_json::Value, i64)>>,
    late: usize,
    dlq: usize,
}

impl Outputs {
    fn repeated(&self) -> Vec<(&String, usize)> {
        self.verdicts
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(id, v)| (id, v.len()))
            .collect()
    }
}

/// A reader of the verdicts, late and DLQ topics from their beginning.
struct Reader {
    consumer: BaseConsumer,
    out: Outputs,
}

impl Reader {
    fn new(address: &str) -> Reader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", address)
            .set("group.id", "faults-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for topic in ["verdicts", "late", "dlq"] {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(30))
                .expect("metadata");
            for p in metadata.topics()[0].partitions() {
                list.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        consumer.assign(&list).expect("assign");
        Reader {
            consumer,
            out: Outputs::default(),
        }
    }

    /// Reads until `n` events have a verdict, failing after `timeout`.
    fn wait_verdicts(&mut self, n: usize, timeout: Duration) {
        assert_eq!(
            self.until(n, timeout).verdicts.len(),
            n,
            "events with a verdict"
        );
    }

    /// Reads until `n` events have a verdict (and a second more, for repeats), or `timeout`.
    fn until(&mut self, n: usize, timeout: Duration) -> &Outputs {
        let deadline = Instant::now() + timeout;
        let mut settle: Option<Instant> = None;
        while Instant::now() < deadline && settle.is_none_or(|s| Instant::now() < s) {
            let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            match m.topic() {
                "verdicts" => {
                    let v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap_or_default()).expect("verdict");
                    let at = chrono::DateTime::parse_from_rfc3339(
                        v["processed_at"].as_str().expect("processed_at"),
                    )
                    .expect("processed_at time")
                    .timestamp_millis();
                    let id = v["tx_id"].as_str().expect("tx_id").to_string();
                    self.out
                        .verdicts
                        .entry(id)
                        .or_default()
                        .push((v["features"].clone(), at));
                }
                "late" => self.out.late += 1,
                _ => self.out.dlq += 1,
            }
            if self.out.verdicts.len() >= n && settle.is_none() {
                settle = Some(Instant::now() + Duration::from_secs(1));
            }
        }
        &self.out
    }
}

/// `riskstream run`, its admin API and its log.
struct Instance {
    child: Child,
    admin: String,
    log: PathBuf,
    http: reqwest::blocking::Client,
}

impl Instance {
    fn start(config: &Path, bundle: &Path, log: &Path, admin_port: u16) -> Instance {
        let child = spawn_run(config, bundle, log);
        Instance {
            child,
            admin: format!("http://127.0.0.1:{admin_port}"),
            log: log.to_path_buf(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
        }
    }

    /// `GET path` on the admin API: status and JSON body, or `None` while nothing answers.
    fn get(&self, path: &str) -> Option<(u16, serde_json::Value)> {
        let response = self.http.get(format!("{}{path}", self.admin)).send().ok()?;
        let status = response.status().as_u16();
        let text = response.text().ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        ))
    }

    /// Waits up to `timeout` for `check` to hold, failing with `what` and the log.
    fn wait_for(&mut self, what: &str, timeout: Duration, mut check: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{what}: the instance exited ({status}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `timeout` for `/readyz` to answer 200.
    fn wait_ready(&mut self, what: &str, timeout: Duration) {
        self.wait_for(what, timeout, |i| {
            matches!(i.get("/readyz"), Some((200, _)))
        });
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and how long the instance took to exit (at most `timeout`).
    fn terminate(mut self, timeout: Duration) -> (std::process::ExitStatus, Duration, String) {
        let sent = Instant::now();
        signal(&self.child, "TERM");
        let status = wait_exit(&mut self.child, timeout).unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!(
                "still running {timeout:?} after SIGTERM:\n{}",
                self.log_text()
            )
        });
        (status, sent.elapsed(), self.log_text())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test adds to the configuration [`write_config`] writes: lines of `[kafka]`, lines of
/// `[kafka.consumer]`, and whole sections.
#[derive(Default)]
struct Extra<'a> {
    kafka: &'a str,
    consumer: &'a str,
    sections: &'a str,
}

/// A configuration for `run` against `brokers`, with the sample's lateness, the admin API on
/// `admin_port`, and `extra`.
fn write_config(dir: &Path, name: &str, brokers: &str, admin_port: u16, extra: Extra) -> PathBuf {
    let Extra {
        kafka,
        consumer,
        sections,
    } = extra;
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"faults-{name}\"\n{kafka}\
             [kafka.consumer]\n\"fetch.wait.max.ms\" = \"2\"\n{consumer}\
             [kafka.properties]\n\"reconnect.backoff.max.ms\" = \"500\"\n\
             [time]\nallowed_lateness = \"5d\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{sections}"
        ),
    )
    .expect("config");
    path
}

fn set_up() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle.yaml");
    std::fs::write(&bundle, BUNDLE).expect("bundle");
    std::fs::write(dir.path().join("broker.toml"), "").expect("broker config");
    (dir, bundle)
}

/// Forwards connections to a port to `target` (a broker's bootstrap address), so that a
/// broker can appear at an address an instance was given before it existed.
fn forward(listener: TcpListener, target: String) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                ),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

/// Every event has exactly one verdict and none went to `late` or the DLQ.
fn assert_every_event_scored_once(out: &Outputs, events: &[Event], what: &str) {
    let missing: Vec<&str> = events
        .iter()
        .filter(|e| !out.verdicts.contains_key(&e.id))
        .map(|e| e.id.as_str())
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} events have no verdict, e.g. {missing:?}",
        events.len() - out.verdicts.len().min(events.len()),
        events.len()
    );
    let repeated = out.repeated();
    assert!(
        repeated.is_empty(),
        "{what}: {} events have more than one verdict, e.g. {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(5)]
    );
    assert_eq!(out.late, 0, "{what}: events sent to `late`");
    assert_eq!(out.dlq, 0, "{what}: events sent to the DLQ");
}

#[test]
fn started_before_the_broker_it_waits_then_scores_every_event() {
    let events = sample();
    let (dir, bundle) = set_up();
    // The address the instance is given; nothing listens there yet.
    let listener_port = free_port();
    let admin_port = free_port();
    let config = write_config(
        dir.path(),
        "before.toml",
        &format!("127.0.0.1:{listener_port}"),
        admin_port,
        Extra::default(),
    );
    let mut instance = Instance::start(&config, &bundle, &dir.path().join("run.log"), admin_port);
    instance.wait_for(
        "healthy and not ready while the broker is down",
        Duration::from_secs(60),
        |i| {
            let health = i.get("/healthz");
            let ready = i.get("/readyz");
            matches!(health, Some((200, _)))
                && ready.is_some_and(|(status, body)| {
                    status == 503 && body["waiting_for"].to_string().contains("Kafka cluster")
                })
        },
    );
    let (status, body) = instance.get("/api/v1/rules").expect("answers");
    assert_eq!(status, 503, "rules before they are loaded: {body}");
    assert_eq!(body["error"], "rules_not_loaded", "{body}");

    // The broker comes up with its topics (as a compose or Kubernetes set-up creates them).
    let broker = Broker::start(&dir.path().join("broker.toml"));
    forward(
        TcpListener::bind(("127.0.0.1", listener_port)).expect("the instance's broker port"),
        broker.address.clone(),
    );
    instance.wait_ready("ready once the broker is there", Duration::from_secs(120));
    produce(&producer(&broker.address), &events, 0);
    let mut reader = Reader::new(&broker.address);
    let out = reader.until(events.len(), Duration::from_secs(240));
    assert_every_event_scored_once(out, &events, "started before the broker");
    let (status, _, log) = instance.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("waiting for the control topic"), "{log}");
}

#[test]
fn sigterm_while_waiting_for_the_broker_ends_the_instance_at_once() {
    let (dir, bundle) = set_up();
    let admin_port = free_port();
    let config = write_config(
        dir.path(),
        "wait.toml",
        &format!("127.0.0.1:{}", free_port()),
        admin_port,
        Extra::default(),
    );
    let mut instance = Instance::start(&config, &bundle, &dir.path().join("run.log"), admin_port);
    instance.wait_for("waiting for the broker", Duration::from_secs(60), |i| {
        matches!(i.get("/readyz"), Some((503, _)))
    });
    // Let it wait through a few backoff rounds first.
    instance.wait_for("the wait logged", Duration::from_secs(30), |i| {
        i.log_text().contains("waiting for the control topic")
    });
    let (status, took, log) = instance.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}:\n{log}");
    assert!(took < Duration::from_secs(2), "took {took:?}:\n{log}");
}

#[test]
fn a_pause_of_the_whole_input_makes_no_event_late() {
    let events = sample();
    let (dir, bundle) = set_up();
    let broker = Broker::start(&dir.path().join("broker.toml"));
    let admin_port = free_port();
    let config = write_config(
        dir.path(),
        "pause.toml",
        &broker.address,
        admin_port,
        Extra::default(),
    );
    let mut instance = Instance::start(&config, &bundle, &dir.path().join("run.log"), admin_port);
    instance.wait_ready("ready", Duration::from_secs(60));
    let producer = producer(&broker.address);
    let mut reader = Reader::new(&broker.address);
    produce(&producer, &events[..30_000], 0);
    reader.wait_verdicts(30_000, Duration::from_secs(120));
    // The fault under test: nothing arrives for 48 s (longer than the 10 s idle timeout).
    std::thread::sleep(Duration::from_secs(48));
    produce(&producer, &events[30_000..], 0);
    let out = reader.until(events.len(), Duration::from_secs(180));
    assert_every_event_scored_once(out, &events, "48 s pause");
    let (status, _, log) = instance.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{log}");
}

/// Events flow at 2,000 a second; 8 s in, the broker process is stopped with SIGSTOP for
/// 40 s, then continued. Prints the time from the broker's return to the first verdict
/// scored after it, and the scoring rate over the following 5 s.
fn broker_stall(delivery: &str) {
    let events = Arc::new(sample());
    let (dir, bundle) = set_up();
    let broker = Broker::start(&dir.path().join("broker.toml"));
    let admin_port = free_port();
    let config = write_config(
        dir.path(),
        &format!("stall-{delivery}.toml"),
        &broker.address,
        admin_port,
        Extra {
            kafka: &format!("delivery = \"{delivery}\"\n"),
            sections: &format!(
                "[state]\ndir = \"{}\"\n[checkpoint]\ninterval = \"2s\"\n\
                 [shutdown]\ntimeout = \"60s\"\n",
                dir.path().join("state").display()
            ),
            ..Extra::default()
        },
    );
    let mut instance = Instance::start(&config, &bundle, &dir.path().join("run.log"), admin_port);
    instance.wait_ready("ready", Duration::from_secs(60));
    let feeder = {
        let (address, events) = (broker.address.clone(), Arc::clone(&events));
        std::thread::spawn(move || produce(&producer(&address), &events, 2_000))
    };
    std::thread::sleep(Duration::from_secs(8));
    broker.stall();
    std::thread::sleep(Duration::from_secs(40));
    broker.resume();
    let resumed_at = chrono::Utc::now().timestamp_millis();
    feeder.join().expect("feeder");
    let mut reader = Reader::new(&broker.address);
    let out = reader.until(events.len(), Duration::from_secs(240));
    assert_every_event_scored_once(out, &events, &format!("{delivery}, 40 s broker stall"));
    let mut after: Vec<i64> = out
        .verdicts
        .values()
        .flat_map(|v| v.iter().map(|(_, at)| *at))
        .filter(|at| *at >= resumed_at)
        .collect();
    after.sort_unstable();
    let first = *after.first().expect("verdicts after the stall");
    let in_5s = after.iter().filter(|at| **at < first + 5_000).count();
    eprintln!(
        "{delivery}: first verdict {} ms after the broker's return; {:.0} events/s over the next 5 s; {} events scored after the return",
        first - resumed_at,
        in_5s as f64 / 5.0,
        after.len()
    );
    let (status, _, log) = instance.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{log}");
}

#[test]
fn a_broker_stalled_for_40s_loses_nothing_and_makes_nothing_late_at_least_once() {
    broker_stall("at_least_once");
}

#[test]
fn a_broker_stalled_for_40s_loses_nothing_and_makes_nothing_late_exactly_once() {
    broker_stall("exactly_once");
}

/// A small tmpfs at a directory of its own, unmounted when dropped. Mounting needs root
/// (CI runs as root); without it the disk-full tests fail rather than pass untested.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "cannot mount a {size} tmpfs at {} (the disk-full tests need root)",
            dir.display()
        );
        Tmpfs { dir }
    }

    /// Fills the file system: writes `path` until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let block = vec![0xa5u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        // The last partial block.
        while file.write_all(&block[..512]).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn score_on_a_full_disk_fails_naming_the_directory() {
    let (dir, bundle) = set_up();
    let disk = Tmpfs::mount(dir.path().join("disk"), "300k");
    let state = disk.dir.join("state");
    let out = riskstream()
        .env("RISKSTREAM__TIME__ALLOWED_LATENESS", "5d")
        .args(["score", "--bundle"])
        .arg(&bundle)
        .arg("--input")
        .arg(SAMPLE)
        .arg("--output")
        .arg(dir.path().join("verdicts.jsonl"))
        .arg("--state")
        .arg(&state)
        .output()
        .expect("score");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "score succeeded on a full disk: {stderr}"
    );
    assert!(
        stderr.contains(&state.display().to_string()),
        "the message names the state directory: {stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
}

/// `riskstream score` of `events` with `bundle`: each event's features.
fn reference_features(
    dir: &Path,
    bundle: &Path,
    events: &[Event],
) -> HashMap<String, serde_json::Value> {
    let input = dir.join("reference-in.jsonl");
    let output = dir.join("reference-out.jsonl");
    let text: String = events.iter().map(|e| format!("{}\n", e.json)).collect();
    std::fs::write(&input, text).expect("reference input");
    let status = riskstream()
        .env("RISKSTREAM__TIME__ALLOWED_LATENESS", "5d")
        .args(["score", "--bundle"])
        .arg(bundle)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .stderr(Stdio::null())
        .status()
        .expect("score");
    assert!(status.success());
    std::fs::read_to_string(&output)
        .expect("reference output")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("verdict");
            (
                v["tx_id"].as_str().expect("id").to_string(),
                v["features"].clone(),
            )
        })
        .collect()
}

/// The events scored so far (`/api/v1/status`).
fn scored(instance: &Instance) -> Option<u64> {
    instance
        .get("/api/v1/status")
        .and_then(|(_, s)| s["pipeline"]["events"].as_u64())
}

/// Waits for `/readyz` to answer 503 with `reason` among what it waits for.
fn wait_not_ready(instance: &mut Instance, reason: &str) {
    instance.wait_for(
        &format!("not ready: {reason}"),
        Duration::from_secs(120),
        |i| {
            i.get("/readyz").is_some_and(|(status, body)| {
                status == 503 && body["waiting_for"].to_string().contains(reason)
            })
        },
    );
}

/// Nothing more is scored over two seconds, and not everything was.
fn assert_consumption_stopped(instance: &Instance, total: usize) {
    let before = scored(instance);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(scored(instance), before, "still consuming");
    assert!(
        (before.unwrap_or(0) as usize) < total,
        "everything was scored before the stop"
    );
}

#[test]
fn run_on_a_full_disk_stops_consuming_and_recovers_exactly_after_a_restart() {
    let events = sample();
    let (dir, bundle) = set_up();
    let state_disk = Tmpfs::mount(dir.path().join("state-disk"), "64m");
    let checkpoint_disk = Tmpfs::mount(dir.path().join("checkpoint-disk"), "16m");
    let broker = Broker::start(&dir.path().join("broker.toml"));
    let admin_port = free_port();
    let config = write_config(
        dir.path(),
        "disk.toml",
        &broker.address,
        admin_port,
        Extra {
            // A restart after a failed stop waits for the group to drop the old member.
            consumer: "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
            sections: &format!(
                "[state]\ndir = \"{}\"\n[checkpoint]\nurl = \"{}\"\ninterval = \"500ms\"\n\
                 tolerable_failures = 3\n[shutdown]\ntimeout = \"5s\"\n",
                state_disk.dir.join("state").display(),
                checkpoint_disk.dir.join("checkpoints").display(),
            ),
            ..Extra::default()
        },
    );
    let log = dir.path().join("run.log");
    let mut instance = Instance::start(&config, &bundle, &log, admin_port);
    instance.wait_ready("ready", Duration::from_secs(60));
    let producer = producer(&broker.address);
    let mut reader = Reader::new(&broker.address);
    produce(&producer, &events[..15_000], 0);
    reader.wait_verdicts(15_000, Duration::from_secs(120));

    // The checkpoint storage fills up: checkpoints fail, are retried, and after three in a
    // row the instance stops consuming and says why.
    let filler = checkpoint_disk.fill();
    produce(&producer, &events[15_000..16_000], 0);
    wait_not_ready(&mut instance, "checkpoints failed in a row");
    produce(&producer, &events[16_000..30_000], 0);
    let (_, status) = instance.get("/api/v1/status").expect("status");
    let failing = &status["checkpoints"];
    assert!(
        failing["failed_in_a_row"].as_u64().is_some_and(|n| n >= 3),
        "{status}"
    );
    assert!(
        failing["last_good_age_seconds"].as_f64().is_some(),
        "{status}"
    );
    assert!(
        failing["last_failure"]
            .to_string()
            .contains("No space left on device"),
        "{status}"
    );
    assert_consumption_stopped(&instance, 30_000);
    let metrics = instance
        .http
        .get(format!("{}/metrics", instance.admin))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(
        metrics.contains("riskstream_checkpoint_age_seconds"),
        "{metrics}"
    );
    // Space comes back: the next checkpoint succeeds and consumption resumes by itself.
    std::fs::remove_file(filler).expect("free space");
    instance.wait_ready("ready again", Duration::from_secs(60));
    reader.wait_verdicts(30_000, Duration::from_secs(120));

    // Now the state store's own disk fills up: input stops for good.
    let filler = state_disk.fill();
    produce(&producer, &events[30_000..31_000], 0);
    wait_not_ready(&mut instance, "the state store cannot be written");
    produce(&producer, &events[31_000..], 0);
    assert_consumption_stopped(&instance, events.len());
    let (status, _, log_text) = instance.terminate(Duration::from_secs(30));
    assert!(
        !status.success(),
        "a broken state store stops with a failure: {log_text}"
    );

    // Space is freed; a restart restores the last good checkpoint and finishes.
    std::fs::remove_file(filler).expect("free space");
    let mut instance = Instance::start(&config, &bundle, &log, admin_port);
    instance.wait_ready("ready after the restart", Duration::from_secs(60));
    let out = reader.until(events.len(), Duration::from_secs(240));
    let missing = events
        .iter()
        .filter(|e| !out.verdicts.contains_key(&e.id))
        .count();
    assert_eq!(missing, 0, "events without a verdict after the restart");
    assert_eq!(out.late, 0);
    let reference = reference_features(dir.path(), &bundle, &events);
    assert_same_features(
        "after a full disk and a restart",
        out.verdicts
            .iter()
            .flat_map(|(id, seen)| seen.iter().map(move |(features, _)| (id, features))),
        |id| reference.get(id),
    );
    let (status, _, log) = instance.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("state restored from checkpoint"), "{log}");
}

#[test]
fn an_admin_api_reachable_from_other_hosts_needs_a_token() {
    let (dir, bundle) = set_up();
    let nowhere = format!("127.0.0.1:{}", free_port());
    let open_config = |name: &str, extra: &str| {
        let port = free_port();
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[kafka]\nbrokers = \"{nowhere}\"\n[admin]\nlisten = \"0.0.0.0:{port}\"\n{extra}"
            ),
        )
        .expect("config");
        (path, port)
    };

    // No token: refused, naming the settings that fix it.
    let (config, _) = open_config("open.toml", "");
    let out = riskstream()
        .arg("--config")
        .arg(&config)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started open on 0.0.0.0: {stderr}");
    assert!(
        stderr.contains("admin.token") && stderr.contains("admin.token_file"),
        "{stderr}"
    );

    // A token from a file (a mounted secret): starts, and mutations need it.
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "from-a-secret\n").expect("token file");
    let (config, port) = open_config(
        "token-file.toml",
        &format!("token_file = \"{}\"\n", token_file.display()),
    );
    let mut instance = Instance::start(&config, &bundle, &dir.path().join("token.log"), port);
    instance.wait_for("serving with a token", Duration::from_secs(30), |i| {
        matches!(i.get("/healthz"), Some((200, _)))
    });
    let put = |token: Option<&str>| {
        let mut request = instance
            .http
            .put(format!("{}/api/v1/rules", instance.admin))
            .header("If-Match", "\"1\"")
            .body(BUNDLE);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().expect("put").status().as_u16()
    };
    assert_eq!(put(None), 401);
    assert_eq!(put(Some("wrong")), 401);
    // The right token gets past authorization (the rules are not loaded: no broker).
    assert_eq!(put(Some("from-a-secret")), 503);
    let (status, _, log) = instance.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}:\n{log}");

    // Open on purpose.
    let (config, port) = open_config("allowed.toml", "allow_unauthenticated = true\n");
    let mut instance = Instance::start(&config, &bundle, &dir.path().join("open.log"), port);
    instance.wait_for("serving open on purpose", Duration::from_secs(30), |i| {
        matches!(i.get("/healthz"), Some((200, _)))
    });
    let (status, _, log) = instance.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("allow_unauthenticated"), "{log}");
}

//! End-to-end benchmark of the Kafka path through the embedded broker, on workload W1.
//!
//! ```text
//! kafka_bench raw       W1.jsonl   # ceiling: a bare librdkafka consumer reading the messages
//! kafka_bench saturate  W1.jsonl   # all events preloaded; pipeline throughput until all acked
//! kafka_bench latency   W1.jsonl [RATE] [SECONDS] [PARTITIONS]  # steady rate; produce-to-verdict latency
//! kafka_bench saturate-reloading W1.jsonl  # saturate while rules are updated 20 times a second
//! kafka_bench reload    W1.jsonl [RATE] [SECONDS]  # steady rate; a PUT every 200 ms; PUT response to first verdict
//! kafka_bench saturate-partitioned W1.jsonl [INSTANCES]  # the partitioned topology, preloaded
//! ```
//!
//! `saturate-partitioned` runs `INSTANCES` (default 1) partitioned-topology instances in this
//! process, each with its own state, over internal topics of `KAFKA_BENCH_INTERNAL_PARTITIONS`
//! (default 16) partitions, until the verdicts topic holds a verdict per event.
//!
//! The reload modes run the control plane as `riskstream run` does: the control topic on the
//! same broker, the admin API on a loopback port, updates as HTTP `PUT /api/v1/rules`.
//!
//! Partitions: 64 for `raw` and `saturate` (the embedded broker keeps at most 5 MB per partition,
//! and the whole file must fit), 4 by default for `latency` and `reload`. The embedded broker finds a fetch
//! offset by walking a partition's message sets from the oldest (librdkafka's mock cluster keeps
//! no offset index), so at a steady rate its cost grows with the square of the partition count:
//! with 64 partitions at 50K events/s that walk alone took a core, with 8 it took a quarter of
//! the machine's CPU time, and it competes with the pipeline for the two cores (p99 16–192 ms
//! with 8 partitions against 15 ms with 4, runs minutes apart). A real broker indexes offsets.
//!
//! `scripts/bench-kafka.sh` builds it in release mode and runs all three.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use riskstream_admin::ControlPlane;
use riskstream_common::Config;
use riskstream_kafka::{Assignment, EmbeddedBroker};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The embedded broker keeps at most 5 MB per partition: spread a million events wide.
const PRELOAD_PARTITIONS: i32 = 64;
/// Partitions of the latency run, unless given.
const LATENCY_PARTITIONS: i32 = 4;
const BUNDLE: &str = include_str!("../../w1/bundle.yaml");

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let input = args
        .get(2)
        .ok_or("usage: kafka_bench raw|saturate|latency W1.jsonl [RATE] [SECONDS] [PARTITIONS]")?;
    let events: Vec<Vec<u8>> = std::fs::read(input)?
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let partitions = match mode {
        "latency" | "reload" => args
            .get(5)
            .and_then(|a| a.parse().ok())
            .unwrap_or(LATENCY_PARTITIONS),
        _ => PRELOAD_PARTITIONS,
    };
    let bench = Bench {
        broker: EmbeddedBroker::start(1)?,
        partitions,
    };
    for topic in ["transactions", "verdicts", "dlq", "late"] {
        bench.broker.create_topic(topic, partitions)?;
    }
    bench.broker.create_topic("riskstream.rules", 1)?;
    match mode {
        "raw" => {
            bench.preload(&events)?;
            bench.raw(events.len(), false)?;
            bench.raw(events.len(), true)
        }
        "saturate" | "saturate-reloading" => {
            bench.preload(&events)?;
            bench.saturate(events.len(), mode == "saturate-reloading")
        }
        "saturate-partitioned" => {
            let instances: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1);
            bench.preload(&events)?;
            bench.saturate_partitioned(events.len(), instances)
        }
        "latency" | "reload" => {
            let rate: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(50_000);
            let seconds: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(16);
            bench.latency(&events, rate, seconds, mode == "reload")
        }
        _ => Err(
            "mode: raw | saturate | saturate-reloading | saturate-partitioned | latency | reload"
                .into(),
        ),
    }
}

/// The embedded broker and the partition count of its topics.
struct Bench {
    broker: EmbeddedBroker,
    partitions: i32,
}

fn producer(
    broker: &EmbeddedBroker,
    linger_ms: &str,
) -> Result<ThreadedProducer<rdkafka::producer::DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("compression.type", "lz4")
        .set("linger.ms", linger_ms)
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

fn send(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    partition: i32,
    payload: &[u8],
) {
    let mut record = BaseRecord::<(), [u8]>::to("transactions")
        .partition(partition)
        .payload(payload);
    while let Err((_, back)) = producer.send(record) {
        record = back;
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What the latency reader takes from a verdict (the rest is skipped unparsed, so that the
/// reader keeps up with the pipeline on a shared core).
#[derive(serde::Deserialize)]
struct Timing<'a> {
    processed_at: &'a str,
    /// Ingest (the input message's timestamp) to scored.
    latency_ms: i64,
    rules_version: u64,
}

/// `PUT /api/v1/rules` replacing `version` with W1's bundle at another high-amount threshold;
/// the new version and when the response arrived (ms since the epoch).
fn put(client: &reqwest::blocking::Client, base: &str, version: u64) -> Result<(u64, i64)> {
    let bundle = BUNDLE.replace(
        "amount > 220\"",
        &format!("amount > {}\"", 220 + version % 7),
    );
    let response = client
        .put(format!("{base}/api/v1/rules"))
        .header("if-match", format!("\"{version}\""))
        .body(bundle)
        .send()?;
    let at = chrono::Utc::now().timestamp_millis();
    if !response.status().is_success() {
        return Err(format!("PUT answered {}: {}", response.status(), response.text()?).into());
    }
    Ok((version + 1, at))
}

/// The pipeline thread and its outcome.
type PipelineThread = std::thread::JoinHandle<
    std::result::Result<riskstream_pipeline::Summary, riskstream_pipeline::PipelineError>,
>;

impl Bench {
    /// Produces every event (round-robin over partitions, so each partition stays in file order).
    fn preload(&self, events: &[Vec<u8>]) -> Result<()> {
        let started = Instant::now();
        let producer = producer(&self.broker, "20")?;
        for (i, e) in events.iter().enumerate() {
            send(&producer, i as i32 % self.partitions, e);
        }
        producer.flush(Duration::from_secs(300))?;
        eprintln!(
            "preloaded {} events in {:.1} s",
            events.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Reads every message with a bare consumer: librdkafka's defaults, or riskstream's consumer
    /// settings (`ours`).
    fn raw(&self, n: usize, ours: bool) -> Result<()> {
        let consumer: BaseConsumer = if ours {
            let mut c = riskstream_kafka::client_config(
                &self.config()?.kafka,
                riskstream_kafka::Role::Consumer,
            );
            c.set("group.id", "raw-ours");
            c.create()?
        } else {
            ClientConfig::new()
                .set("bootstrap.servers", self.broker.bootstrap_servers())
                .set("group.id", "raw")
                .create()?
        };
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition_offset("transactions", p, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        let started = Instant::now();
        let mut count = 0usize;
        let mut bytes = 0usize;
        let mut idle = Instant::now();
        while count < n && idle.elapsed() < Duration::from_secs(5) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                if m.topic() != "transactions" {
                    continue;
                }
                bytes += m.payload_len();
                count += 1;
                idle = Instant::now();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "raw consume ({}): {count} of {n} messages ({:.0} MB) in {secs:.2} s = {:.0} messages/s",
            if ours {
                "riskstream's consumer settings"
            } else {
                "librdkafka defaults"
            },
            bytes as f64 / 1e6,
            count as f64 / secs
        );
        Ok(())
    }

    /// The defaults, `RISKSTREAM__…` overrides from the environment, W1's time bound, the broker.
    fn config(&self) -> Result<Config> {
        if std::env::var_os("RISKSTREAM__TIME__MAX_OUT_OF_ORDERNESS").is_none() {
            std::env::set_var("RISKSTREAM__TIME__MAX_OUT_OF_ORDERNESS", "2s");
        }
        // KAFKA_BENCH_CONFIG: a configuration file layered over the defaults (client settings).
        let file = std::env::var_os("KAFKA_BENCH_CONFIG").map(std::path::PathBuf::from);
        let mut config = Config::load(file.as_deref())?;
        self.broker.connect(&mut config.kafka);
        config.kafka.group_id = "bench".into();
        config.kafka.commit_interval = Duration::from_millis(100);
        config.admin.listen = "127.0.0.1:0".into();
        // KAFKA_BENCH_DELIVERY=exactly_once: transactions committed with checkpoints (into a
        // temporary directory, every `KAFKA_BENCH_CHECKPOINT_INTERVAL_MS`, default 10 s).
        if std::env::var("KAFKA_BENCH_DELIVERY").as_deref() == Ok("exactly_once") {
            config.kafka.delivery = riskstream_common::Delivery::ExactlyOnce;
            let dir = std::env::temp_dir().join(format!("kafka-bench-{}", std::process::id()));
            config.checkpoint.url = dir.join("checkpoints").display().to_string();
            config.state.dir = Some(dir.join("state"));
            let interval = std::env::var("KAFKA_BENCH_CHECKPOINT_INTERVAL_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000);
            config.checkpoint.interval = Duration::from_millis(interval);
        }
        Ok(config)
    }

    fn start_pipeline(
        &self,
        config: &Config,
    ) -> Result<(Arc<AtomicBool>, PipelineThread, ControlPlane)> {
        let plane = ControlPlane::start(config, Some(BUNDLE), None, None)?;
        let rules = plane.control.table();
        let observers = plane.observers();
        let stop = Arc::new(AtomicBool::new(false));
        let assignment = Assignment::Fixed(
            (0..self.partitions)
                .map(|p| (p, Offset::Beginning))
                .collect(),
        );
        let handle = {
            let (config, stop) = (config.clone(), stop.clone());
            std::thread::spawn(move || {
                riskstream_kafka::run_observed(&config, rules, assignment, stop, None, observers)
            })
        };
        Ok((stop, handle, plane))
    }

    /// Offsets the bench group has committed, summed over partitions.
    fn committed(&self, consumer: &BaseConsumer) -> i64 {
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition("transactions", p);
        }
        consumer
            .committed_offsets(list, Duration::from_secs(5))
            .map(|l| {
                l.elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    fn saturate(&self, n: usize, reloading: bool) -> Result<()> {
        let config = self.config()?;
        let watcher: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap_servers())
            .set("group.id", "bench")
            .create()?;
        let started = Instant::now();
        let (stop, handle, plane) = self.start_pipeline(&config)?;
        let updating = Arc::new(AtomicBool::new(reloading));
        let updater = {
            let base = format!("http://{}", plane.address());
            let updating = updating.clone();
            std::thread::spawn(move || -> std::result::Result<u64, String> {
                let client = reqwest::blocking::Client::new();
                let mut version = 1;
                while updating.load(Ordering::Acquire) {
                    version = put(&client, &base, version).map_err(|e| e.to_string())?.0;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(version - 1)
            })
        };
        // Done once every event's output is acknowledged and its offset committed.
        while self.committed(&watcher) < n as i64 && !handle.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = started.elapsed().as_secs_f64();
        updating.store(false, Ordering::Release);
        let updates = updater.join().map_err(|_| "updater panicked")??;
        stop.store(true, Ordering::Release);
        let summary = handle.join().map_err(|_| "pipeline panicked")??;
        println!(
            "saturation{}: {n} events scored, verdicts acknowledged and offsets committed in {secs:.2} s = {:.0} events/s",
            if reloading { format!(" with {updates} rules updates ({:.1}/s)", updates as f64 / secs) } else { String::new() },
            n as f64 / secs
        );
        println!("{summary}");
        Ok(())
    }

    /// The partitioned topology over the preloaded events: `instances` instances in this process,
    /// until the verdicts topic holds one verdict per event.
    fn saturate_partitioned(&self, n: usize, instances: usize) -> Result<()> {
        let mut config = self.config()?;
        config.pipeline.topology = riskstream_common::Topology::Partitioned;
        config.pipeline.partitions = std::env::var("KAFKA_BENCH_INTERNAL_PARTITIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let plane = ControlPlane::start(&config, Some(BUNDLE), None, None)?;
        let plan = riskstream_topology::Plan::new(&config, &plane.control.table().load());
        for topic in plan.topics() {
            self.broker
                .create_topic(topic, config.pipeline.partitions)?;
        }
        let watcher: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap_servers())
            .create()?;
        let verdicts = || -> i64 {
            (0..self.partitions)
                .filter_map(|p| {
                    watcher
                        .fetch_watermarks("verdicts", p, Duration::from_secs(5))
                        .ok()
                })
                .map(|(low, high)| high - low)
                .sum()
        };
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let dirs: Vec<tempfile::TempDir> = (0..instances)
            .map(|_| tempfile::tempdir())
            .collect::<std::result::Result<_, _>>()?;
        let running = dirs
            .iter()
            .map(|dir| {
                let mut config = config.clone();
                config.state.dir = Some(dir.path().to_path_buf());
                riskstream_topology::start(&config, plane.control.table(), Arc::clone(&stop))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        while verdicts() < n as i64 && !running.iter().any(|r| r.any_finished()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = started.elapsed().as_secs_f64();
        let scored = verdicts();
        stop.store(true, Ordering::Release);
        for r in running {
            r.wait()?;
        }
        println!(
            "partitioned topology, {instances} instance(s), {} internal partitions: {scored} verdicts for {n} events in {secs:.2} s = {:.0} events/s",
            config.pipeline.partitions,
            n as f64 / secs
        );
        Ok(())
    }

    fn latency(&self, events: &[Vec<u8>], rate: u64, seconds: u64, reloads: bool) -> Result<()> {
        let warmup = Duration::from_secs(3);
        let needed = rate * (warmup.as_secs() + seconds);
        if needed > events.len() as u64 {
            // Replaying the file again would send its event times again: every event late.
            return Err(format!(
                "{rate} events/s for {seconds} s (plus {} s warm-up) needs {needed} events; the input has {}: generate a larger one",
                warmup.as_secs(),
                events.len()
            )
            .into());
        }
        let config = self.config()?;
        let exactly_once = config.kafka.delivery == riskstream_common::Delivery::ExactlyOnce;
        let metrics = if exactly_once {
            Some(riskstream_admin::telemetry::prometheus()?)
        } else {
            None
        };
        let (stop, handle, plane) = self.start_pipeline(&config)?;
        // With `reloads`: a PUT every 200 ms after the warm-up, noting when each answered.
        let answered: Arc<std::sync::Mutex<Vec<(u64, i64)>>> = Arc::default();
        let updater = reloads.then(|| {
            let base = format!("http://{}", plane.address());
            let answered = answered.clone();
            let until = warmup + Duration::from_secs(seconds);
            std::thread::spawn(move || -> std::result::Result<(), String> {
                let started = Instant::now();
                std::thread::sleep(warmup);
                let client = reqwest::blocking::Client::new();
                let mut version = 1;
                while started.elapsed() < until {
                    let (next, at) = put(&client, &base, version).map_err(|e| e.to_string())?;
                    if let Ok(mut answered) = answered.lock() {
                        answered.push((next, at));
                    }
                    version = next;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(())
            })
        });
        let produced = Arc::new(AtomicU64::new(0));
        let feeding = Arc::new(AtomicBool::new(true));
        // The feeder replays W1 at a steady rate; each message's timestamp is its send time.
        let feeder = {
            // KAFKA_BENCH_FEEDER_LINGER_MS: the feeder's batching delay (part of the latency);
            // by default librdkafka's own, 5 ms.
            let linger = std::env::var("KAFKA_BENCH_FEEDER_LINGER_MS").unwrap_or("5".into());
            let producer = producer(&self.broker, &linger)?;
            let events: Vec<Vec<u8>> = events.to_vec();
            let (produced, feeding) = (produced.clone(), feeding.clone());
            let partitions = self.partitions;
            let total = warmup + Duration::from_secs(seconds);
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut sent = 0u64;
                while started.elapsed() < total {
                    let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                    while let Some(e) = events.get(sent as usize).filter(|_| sent < due) {
                        send(&producer, sent as i32 % partitions, e);
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                let _ = producer.flush(Duration::from_secs(30));
                produced.store(sent, Ordering::Release);
                feeding.store(false, Ordering::Release);
            })
        };
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap_servers())
            .set("group.id", "latency")
            .set(
                "fetch.wait.max.ms",
                riskstream_kafka::broker::FETCH_WAIT_MAX_MS,
            )
            .create()?;
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition_offset("verdicts", p, Offset::Beginning)?;
        }
        reader.assign(&list)?;
        let started = Instant::now();
        let mut latencies: Vec<u32> = Vec::new();
        // The verdicts' own `latency_ms`: produce to scored (before the verdict is produced).
        let mut scored: Vec<u32> = Vec::new();
        let mut seen = 0u64;
        // The worst latency read back in each second of the run, to tell stalls from queueing.
        let mut worst: Vec<u32> = Vec::new();
        // The first verdict of each version: when it was scored (ms since the epoch).
        let mut first_scored: std::collections::BTreeMap<u64, i64> = Default::default();
        loop {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
                seen += 1;
                let payload = m.payload().unwrap_or_default();
                let timing: Timing = serde_json::from_slice(payload)?;
                let at = chrono::DateTime::parse_from_rfc3339(timing.processed_at)?;
                first_scored
                    .entry(timing.rules_version)
                    .and_modify(|t| *t = (*t).min(at.timestamp_millis()))
                    .or_insert(at.timestamp_millis());
                let ingest = at.timestamp_millis() - timing.latency_ms;
                let latency = (chrono::Utc::now().timestamp_millis() - ingest).max(0) as u32;
                let second = started.elapsed().as_secs() as usize;
                if worst.len() <= second {
                    worst.resize(second + 1, 0);
                }
                worst[second] = worst[second].max(latency);
                if started.elapsed() > warmup {
                    latencies.push(latency);
                    scored.push(timing.latency_ms.max(0) as u32);
                }
            }
            if !feeding.load(Ordering::Acquire) && seen >= produced.load(Ordering::Acquire) {
                break;
            }
            if started.elapsed() > warmup + Duration::from_secs(seconds + 30) {
                break;
            }
        }
        feeder.join().map_err(|_| "feeder panicked")?;
        if let Some(updater) = updater {
            updater.join().map_err(|_| "updater panicked")??;
        }
        stop.store(true, Ordering::Release);
        handle.join().map_err(|_| "pipeline panicked")??;
        if let Some(metrics) = metrics {
            // What exactly-once adds before a read_committed consumer sees a verdict: from its
            // batch's production to the commit of its transaction. (The read-back latency below
            // includes it: the reader is read_committed, librdkafka's default.)
            println!(
                "exactly_once, checkpoint every {:?}: batch produced to transaction committed (s):",
                config.checkpoint.interval
            );
            for line in metrics.render().lines() {
                if line.starts_with("riskstream_kafka_commit_wait_seconds")
                    || line.starts_with("riskstream_checkpoint_duration_seconds")
                    || line.starts_with("riskstream_kafka_transactions_total")
                {
                    println!("  {line}");
                }
            }
        }
        if reloads {
            let answered = answered.lock().map_err(|_| "poisoned")?;
            let mut delays: Vec<u32> = answered
                .iter()
                .filter_map(|(v, at)| first_scored.get(v).map(|s| (s - at).max(0) as u32))
                .collect();
            delays.sort_unstable();
            println!(
                "reload: {} updates through PUT; PUT response to the first verdict of the new version: p50 {} ms, p99 {} ms, max {} ms ({} versions never scored an event)",
                answered.len(),
                quantile(&delays, 0.5),
                quantile(&delays, 0.99),
                quantile(&delays, 1.0),
                answered.len() - delays.len()
            );
        }
        scored.sort_unstable();
        latencies.sort_unstable();
        let (qs, q) = (|q| quantile(&scored, q), |q| quantile(&latencies, q));
        println!(
            "  produce to scored (the verdicts' latency_ms): p50 {} ms, p99 {} ms, max {} ms",
            qs(0.5),
            qs(0.99),
            qs(1.0)
        );
        println!("  worst latency in each second (ms): {worst:?}");
        println!(
            "latency at {rate} events/s for {seconds} s (after {} s warm-up), produce to verdict read back, {} verdicts: p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
            warmup.as_secs(),
            latencies.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            q(1.0)
        );
        if latencies.is_empty() && config.kafka.delivery == riskstream_common::Delivery::ExactlyOnce
        {
            println!(
                "  no verdict read back: a transaction larger than what the embedded broker keeps of a partition (5 MB) loses its first records before it commits; shorten the checkpoint interval or add partitions"
            );
        }
        Ok(())
    }
}

/// The `q` quantile of sorted values (0 when there are none).
fn quantile(sorted: &[u32], q: f64) -> u32 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0)
}

//! `riskstream demo`: the whole system in one process, no external services. An embedded
//! Kafka-protocol broker, the built-in traffic generator producing payments (and their labels)
//! at a steady rate, the Kafka pipeline scoring them with the default bundle, and a reporter
//! reading the verdicts back: a status line every second and a summary at the end, with
//! precision and recall against the generator's ground truth.
//!
//! It owns orchestration and reporting only; the pipeline is the one `riskstream run` runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use riskstream_common::Config;
use riskstream_kafka::EmbeddedBroker;
use riskstream_runtime::{Instance, Options};

use crate::generate::send;
use crate::generator::{Generator, Scenario};

/// How long the demo waits for its instance to read the embedded broker's control topic.
const RULES_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of one demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Option<Duration>,
    /// Events per second the generator aims at.
    pub rate: u64,
    /// Simulated time per wall-clock time.
    pub speed: f64,
    pub seed: u64,
    /// Partitions of the transactions topic.
    pub partitions: i32,
}

/// Which rules speak for which scenario, for per-scenario precision: the share of events a
/// scenario's rules flagged that were fraud.
fn scenario_rules(s: Scenario) -> &'static [&'static str] {
    match s {
        Scenario::Genuine => &[],
        Scenario::HighAmount => &["high_amount", "very_high_amount"],
        Scenario::CompromisedTerminal => &["terminal_burst"],
        Scenario::CardDetailsStolen => &["cnp_shipped_elsewhere", "large_cnp_shipped_elsewhere"],
        Scenario::CardStolen => &["amount_spike", "daily_velocity"],
    }
}

/// Truth shared by the generator (writes) and the reporter (reads).
#[derive(Default)]
struct Truth {
    /// Fraud events not yet seen as verdicts, by tx id.
    fraud: HashMap<String, Scenario>,
}

/// Runs the demo; `shutdown` ends it early (Ctrl-C).
pub fn run(
    mut config: Config,
    bundle: &str,
    options: DemoOptions,
    shutdown: Arc<AtomicBool>,
) -> Result<()> {
    let broker = EmbeddedBroker::start(1)?;
    let topics = config.kafka.topics.clone();
    let labels_topic = if topics.labels.is_empty() {
        "labels".to_string()
    } else {
        topics.labels.clone()
    };
    broker.create_topic(&topics.transactions, options.partitions)?;
    broker.create_topic(&topics.verdicts, options.partitions)?;
    broker.create_topic(&topics.dlq, 2)?;
    broker.create_topic(&topics.late, 2)?;
    broker.create_topic(&labels_topic, 4)?;
    broker.create_topic(&topics.rules, 1)?;
    broker.connect(&mut config.kafka);
    config.kafka.topics.labels = labels_topic.clone();
    config.kafka.group_id = "riskstream-demo".into();
    eprintln!(
        "embedded broker at {}; topics {}, {}, {}, {}, {}",
        config.kafka.brokers,
        topics.transactions,
        topics.verdicts,
        topics.dlq,
        topics.late,
        labels_topic
    );

    // The demo should run anywhere: when `admin.listen` is taken, any free loopback port will do.
    if std::net::TcpListener::bind(&config.admin.listen).is_err() {
        eprintln!(
            "admin.listen {} is in use; the demo's admin API takes a free loopback port instead",
            config.admin.listen
        );
        config.admin.listen = "127.0.0.1:0".into();
    }
    // The instance, exactly as `riskstream run` runs it.
    let instance = Instance::start(
        &config,
        Options {
            seed: Some(bundle.to_string()),
            metrics: riskstream_admin::telemetry::prometheus().ok(),
            ..Options::default()
        },
    )?;
    instance
        .wait_rules(RULES_TIMEOUT)
        .context("the demo's instance did not load its rules")?;
    eprintln!(
        "admin API at http://{} (rules: GET/PUT /api/v1/rules, metrics: /metrics)",
        instance.address()
    );

    // The generator, paced to the rate and held back while the pipeline lags.
    let truth = Arc::new(Mutex::new(Truth::default()));
    let produced = Arc::new(AtomicU64::new(0));
    let outputs = Arc::new(AtomicU64::new(0));
    let generator_stop = Arc::new(AtomicBool::new(false));
    let mut fraud_total: BTreeMap<Scenario, u64> = BTreeMap::new();
    let generator = {
        let config = config.clone();
        let truth = truth.clone();
        let produced = produced.clone();
        let outputs = outputs.clone();
        let stop = generator_stop.clone();
        let labels_topic = labels_topic.clone();
        let options = options.clone();
        std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || {
                generate(
                    &config,
                    &labels_topic,
                    &options,
                    &truth,
                    &produced,
                    &outputs,
                    &stop,
                )
            })?
    };

    let mut report = Reporter::new(&config, options.partitions)?;
    let reader = Reporter::outputs_reader(&config, options.partitions)?;
    let started = Instant::now();
    let mut next_tick = started + Duration::from_secs(1);
    let deadline = options.duration.map(|d| started + d);
    eprintln!(
        "generating {} events/s; status every second (Ctrl-C stops)",
        options.rate
    );
    loop {
        report.poll(&reader, &truth, &outputs, Duration::from_millis(20));
        let now = Instant::now();
        if now >= next_tick {
            report.status_line(started.elapsed(), produced.load(Ordering::Relaxed));
            next_tick += Duration::from_secs(1);
        }
        if deadline.is_some_and(|d| now >= d) || shutdown.load(Ordering::Acquire) {
            break;
        }
        if generator.is_finished() || instance.is_finished() {
            break;
        }
    }
    // Stop producing, let the pipeline finish what was produced, then stop it.
    generator_stop.store(true, Ordering::Release);
    let generated = generator
        .join()
        .map_err(|_| anyhow::anyhow!("the generator panicked"))??;
    for (s, n) in generated {
        fraud_total.insert(s, n);
    }
    let drain_until = Instant::now() + Duration::from_secs(20);
    while outputs.load(Ordering::Relaxed) < produced.load(Ordering::Relaxed)
        && Instant::now() < drain_until
        && !instance.is_finished()
    {
        report.poll(&reader, &truth, &outputs, Duration::from_millis(20));
    }
    let labels = Arc::clone(instance.labels());
    let summary = instance
        .stop()
        .context("the pipeline stopped")?
        .context("the pipeline stopped before its rules were loaded")?;
    report.poll(&reader, &truth, &outputs, Duration::from_millis(200));
    let (valid_labels, invalid_labels, fraud_labels) = labels.counts();
    eprintln!();
    eprintln!("pipeline summary:\n{summary}");
    eprintln!("labels consumed: {valid_labels} ({fraud_labels} fraud), invalid {invalid_labels}");
    report.summary(
        started.elapsed(),
        produced.load(Ordering::Relaxed),
        &fraud_total,
    );
    // The instance (stopped above, its clients gone) before the broker it talked to.
    drop(broker);
    Ok(())
}

/// Produces events and labels until `stop`; returns how many fraud events of each scenario.
fn generate(
    config: &Config,
    labels_topic: &str,
    options: &DemoOptions,
    truth: &Mutex<Truth>,
    produced: &AtomicU64,
    outputs: &AtomicU64,
    stop: &AtomicBool,
) -> Result<BTreeMap<Scenario, u64>> {
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("compression.type", "lz4")
        // Batches of 10 ms: tiny produce requests to many partitions swamp the embedded broker.
        .set("linger.ms", "10")
        .set("acks", "all")
        .create()
        .context("cannot create the generator's producer")?;
    let start_ms = riskstream_pipeline::source::now_ms()
        - options.duration.map_or(400.0 * 86_400_000.0, |d| {
            d.as_secs_f64() * 1000.0 * options.speed
        }) as i64
        - 86_400_000;
    let mut generator = Generator::new(options.rate as f64, options.speed, start_ms, options.seed);
    eprintln!(
        "generator: {} customers, simulated time {}x the clock",
        generator.customers(),
        options.speed
    );
    let mut frauds: BTreeMap<Scenario, u64> = BTreeMap::new();
    let started = Instant::now();
    /// Events produced and not yet scored above which the generator waits: the embedded
    /// broker keeps a bounded backlog per partition.
    const MAX_BACKLOG: u64 = 150_000;
    let mut sent: u64 = 0;
    let mut label = String::with_capacity(96);
    while !stop.load(Ordering::Acquire) {
        let due = (started.elapsed().as_secs_f64() * options.rate as f64) as u64;
        if sent >= due || sent.saturating_sub(outputs.load(Ordering::Relaxed)) > MAX_BACKLOG {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for _ in 0..(due - sent).min(1000) {
            let event = generator.next_event();
            if event.scenario != Scenario::Genuine && !event.malformed {
                *frauds.entry(event.scenario).or_default() += 1;
                lock(truth)
                    .fraud
                    .insert(event.tx_id.to_string(), event.scenario);
            }
            let record = BaseRecord::to(&config.kafka.topics.transactions)
                .key(event.tx_id)
                .payload(event.json);
            send(&producer, record, stop)?;
            if !event.malformed {
                event.label(&mut label);
                let record = BaseRecord::to(labels_topic)
                    .key(event.tx_id)
                    .payload(label.as_str());
                send(&producer, record, stop)?;
            }
            sent += 1;
            produced.store(sent, Ordering::Relaxed);
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .context("the generator's events were not all acknowledged")?;
    Ok(frauds)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads verdicts, dead letters and late events back and keeps the scores.
struct Reporter {
    lag_consumer: BaseConsumer,
    verdicts_topic: String,
    transactions_topic: String,
    partitions: i32,
    verdicts: u64,
    decisions: [u64; 3],
    dead: BTreeMap<String, u64>,
    late: u64,
    /// End-to-end latency (generator's produce → verdict read back), ms: this second, all.
    second: Vec<u32>,
    all: Vec<u64>,
    scenarios: BTreeMap<Scenario, Confusion>,
    flagged_fraud: BTreeMap<Scenario, u64>,
    /// Fraud events seen as verdicts, per scenario.
    seen_fraud: BTreeMap<Scenario, u64>,
    last_verdicts: u64,
    last_lag: i64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Confusion {
    /// Events a scenario's rules fired on, and how many of them were fraud.
    fired: u64,
    fired_fraud: u64,
}

#[derive(serde::Deserialize)]
struct VerdictView<'a> {
    #[serde(borrow)]
    tx_id: std::borrow::Cow<'a, str>,
    decision: &'a str,
    fired: Vec<FiredView<'a>>,
    processed_at: &'a str,
    latency_ms: i64,
}

#[derive(serde::Deserialize)]
struct FiredView<'a> {
    rule_id: &'a str,
    mode: &'a str,
}

/// Client settings of the reporter's consumers: the embedded broker, no commits.
fn reporter_client(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", "riskstream-demo-reporter")
        .set("enable.auto.commit", "false")
        .set(
            "fetch.wait.max.ms",
            riskstream_kafka::broker::FETCH_WAIT_MAX_MS,
        );
    client
}

impl Reporter {
    fn new(config: &Config, partitions: i32) -> Result<Self> {
        let topics = &config.kafka.topics;
        let lag_consumer: BaseConsumer = reporter_client(config)
            .set("group.id", &config.kafka.group_id)
            .create()?;
        Ok(Self {
            lag_consumer,
            verdicts_topic: topics.verdicts.clone(),
            transactions_topic: topics.transactions.clone(),
            partitions,
            verdicts: 0,
            decisions: [0; 3],
            dead: BTreeMap::new(),
            late: 0,
            second: Vec::new(),
            all: vec![0; 10_001],
            scenarios: BTreeMap::new(),
            flagged_fraud: BTreeMap::new(),
            seen_fraud: BTreeMap::new(),
            last_verdicts: 0,
            last_lag: 0,
        })
    }

    /// A consumer of the verdicts, DLQ and late topics from their beginning.
    fn outputs_reader(config: &Config, partitions: i32) -> Result<BaseConsumer> {
        let consumer: BaseConsumer = reporter_client(config).create()?;
        let mut list = TopicPartitionList::new();
        let topics = &config.kafka.topics;
        for p in 0..partitions {
            list.add_partition_offset(&topics.verdicts, p, Offset::Beginning)?;
        }
        for topic in [&topics.dlq, &topics.late] {
            for p in 0..2 {
                list.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&list)?;
        Ok(consumer)
    }

    fn poll(
        &mut self,
        consumer: &BaseConsumer,
        truth: &Mutex<Truth>,
        outputs: &AtomicU64,
        budget: Duration,
    ) {
        let until = Instant::now() + budget;
        while let Some(message) = consumer.poll(until.saturating_duration_since(Instant::now())) {
            let Ok(message) = message else { continue };
            outputs.fetch_add(1, Ordering::Relaxed);
            if message.topic() == self.verdicts_topic {
                self.verdict(message.payload().unwrap_or_default(), truth);
            } else {
                let reason = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "reason"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_else(|| "unknown".into());
                if reason == "too_late" {
                    self.late += 1;
                } else {
                    *self.dead.entry(reason).or_default() += 1;
                }
            }
            if Instant::now() >= until {
                break;
            }
        }
    }

    fn verdict(&mut self, payload: &[u8], truth: &Mutex<Truth>) {
        let Ok(v) = serde_json::from_slice::<VerdictView<'_>>(payload) else {
            return;
        };
        self.verdicts += 1;
        let decision = match v.decision {
            "allow" => 0,
            "review" => 1,
            _ => 2,
        };
        self.decisions[decision] += 1;
        if let Ok(at) = chrono::DateTime::parse_from_rfc3339(v.processed_at) {
            let ingest = at.timestamp_millis() - v.latency_ms;
            let latency = (riskstream_pipeline::source::now_ms() - ingest).clamp(0, 10_000);
            self.second.push(latency as u32);
            self.all[latency as usize] += 1;
        }
        let scenario = lock(truth)
            .fraud
            .remove(v.tx_id.as_ref())
            .unwrap_or(Scenario::Genuine);
        let fraud = scenario != Scenario::Genuine;
        if fraud {
            *self.seen_fraud.entry(scenario).or_default() += 1;
        }
        if fraud && decision > 0 {
            *self.flagged_fraud.entry(scenario).or_default() += 1;
        }
        for s in Scenario::FRAUD {
            let rules = scenario_rules(s);
            if v.fired
                .iter()
                .any(|f| f.mode == "active" && rules.contains(&f.rule_id))
            {
                let c = self.scenarios.entry(s).or_default();
                c.fired += 1;
                c.fired_fraud += u64::from(fraud);
            }
        }
    }

    /// Events in the transactions topic the pipeline's group has not committed yet.
    fn consumer_lag(&mut self) -> i64 {
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition(&self.transactions_topic, p);
        }
        let Ok(committed) = self
            .lag_consumer
            .committed_offsets(list, Duration::from_millis(200))
        else {
            return self.last_lag;
        };
        let mut lag = 0;
        for e in committed.elements() {
            let Ok((_, high)) = self.lag_consumer.fetch_watermarks(
                &self.transactions_topic,
                e.partition(),
                Duration::from_millis(200),
            ) else {
                return self.last_lag;
            };
            let done = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            lag += (high - done).max(0);
        }
        self.last_lag = lag;
        lag
    }

    fn status_line(&mut self, elapsed: Duration, produced: u64) {
        let rate = self.verdicts - self.last_verdicts;
        self.last_verdicts = self.verdicts;
        self.second.sort_unstable();
        let pct = |v: &[u32], q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let (p50, p99) = (pct(&self.second, 0.5), pct(&self.second, 0.99));
        self.second.clear();
        let lag = self.consumer_lag();
        let [allow, review, block] = self.decisions;
        let mut pr = String::new();
        for s in Scenario::FRAUD {
            let (p, r) = self.precision_recall(s);
            pr.push_str(&format!(" {}:{}/{}", short(s), fmt_ratio(p), fmt_ratio(r)));
        }
        eprintln!(
            "[{:>4}s] {rate:>6} ev/s  produced {produced}  lag {lag}  p50 {p50} ms  p99 {p99} ms  allow {allow} review {review} block {block}  dlq {}  late {}  P/R{pr}",
            elapsed.as_secs(),
            self.dead.values().sum::<u64>(),
            self.late,
        );
    }

    /// Precision of the scenario's rules, and recall of its frauds among those scored so far
    /// (flagged = review or block).
    fn precision_recall(&self, s: Scenario) -> (Option<f64>, Option<f64>) {
        let c = self.scenarios.get(&s).copied().unwrap_or_default();
        let precision = (c.fired > 0).then(|| c.fired_fraud as f64 / c.fired as f64);
        let flagged = self.flagged_fraud.get(&s).copied().unwrap_or(0);
        let seen = self.seen_fraud.get(&s).copied().unwrap_or(0);
        let recall = (seen > 0).then(|| flagged as f64 / seen as f64);
        (precision, recall)
    }

    fn summary(&self, elapsed: Duration, produced: u64, totals: &BTreeMap<Scenario, u64>) {
        let n: u64 = self.all.iter().sum();
        let quantile = |q: f64| {
            let target = (n as f64 * q).ceil() as u64;
            let mut seen = 0;
            for (ms, count) in self.all.iter().enumerate() {
                seen += count;
                if seen >= target.max(1) {
                    return ms;
                }
            }
            0
        };
        let [allow, review, block] = self.decisions;
        println!("riskstream demo summary");
        println!(
            "  events produced {produced} in {:.1} s; verdicts {} (allow {allow}, review {review}, block {block}); dead letters {} {:?}; late {}",
            elapsed.as_secs_f64(),
            self.verdicts,
            self.dead.values().sum::<u64>(),
            self.dead,
            self.late
        );
        println!(
            "  event-to-verdict latency (produce to verdict read back): p50 {} ms, p99 {} ms, max {} ms",
            quantile(0.5),
            quantile(0.99),
            quantile(1.0)
        );
        println!("  scenario               frauds  scored  flagged  recall  precision (of the rules for it)");
        for s in Scenario::FRAUD {
            let total = totals.get(&s).copied().unwrap_or(0);
            let seen = self.seen_fraud.get(&s).copied().unwrap_or(0);
            let flagged = self.flagged_fraud.get(&s).copied().unwrap_or(0);
            let (precision, recall) = self.precision_recall(s);
            println!(
                "  {:<22} {total:>6}  {seen:>6}  {flagged:>7}  {:>6}  {:>9}  ({})",
                s.name(),
                fmt_ratio(recall),
                fmt_ratio(precision),
                scenario_rules(s).join(", ")
            );
        }
        let fraud: u64 = self.seen_fraud.values().sum();
        let flagged_fraud: u64 = self.flagged_fraud.values().sum();
        let flagged = review + block;
        println!(
            "  overall: recall {} precision {} (flagged = review or block)",
            fmt_ratio((fraud > 0).then(|| flagged_fraud as f64 / fraud as f64)),
            fmt_ratio((flagged > 0).then(|| flagged_fraud as f64 / flagged as f64)),
        );
    }
}

fn short(s: Scenario) -> &'static str {
    match s {
        Scenario::Genuine => "genuine",
        Scenario::HighAmount => "amount",
        Scenario::CompromisedTerminal => "terminal",
        Scenario::CardDetailsStolen => "details",
        Scenario::CardStolen => "card",
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}"))
}

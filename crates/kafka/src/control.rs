//! The control topic: the one source of truth for rule bundles across a deployment.
//!
//! Every update is a record on the single-partition, compacted `kafka.topics.rules` topic:
//! `{version, replaces, request_id, origin, published_at, comment, bundle}`. Every instance
//! consumes the topic from its start and applies the records in log order with the same rule:
//! a record applies when it `replaces` the version running at that point of the log and its
//! bundle compiles; otherwise it is a conflict (or a rejection) and changes nothing. Because all
//! instances read the same log and decide alike, they agree on every version, and two updates
//! naming the same `If-Match` can never both win: the log orders them and only the first
//! replaces the version it names.
//!
//! [`RulesControl::start`] reads the topic to its end before it returns (seeding it with a given
//! bundle when it is empty), so an instance scores nothing before it runs the newest bundle.
//! A follower thread then applies new records as they arrive and swaps the [`RuleTable`].
//! [`RulesControl::publish`] appends a record and waits until this instance's follower has
//! decided it.
//!
//! What it must not do: apply a bundle that did not come through the topic, or block an async
//! runtime (every call that waits is blocking; run it where blocking is allowed).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use riskstream_common::KafkaConfig;
use riskstream_rules::{BundleError, CompiledBundle, RuleCompiler, RuleTable};
use serde::{Deserialize, Serialize};

use crate::errors::{self, Backoff, WatchedContext};
use crate::{client_config, Role};

/// The control topic could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control topic {topic}: {message}")]
    Kafka { topic: String, message: String },
    #[error("control topic {topic} has {partitions} partitions; it must have exactly 1 (the log order decides between concurrent updates)")]
    Partitions { topic: String, partitions: usize },
    #[error("control topic {topic} holds no rule bundle and none was given to seed it")]
    Empty { topic: String },
    #[error("the bundle seeding control topic {topic} was rejected: {source}")]
    Seed {
        topic: String,
        #[source]
        source: BundleError,
    },
    #[error("control topic {topic} did not confirm the update within {timeout:?}; it may still apply (check GET /api/v1/rules)")]
    Timeout { topic: String, timeout: Duration },
    #[error("rules control is shutting down")]
    Closed,
}

/// One record of the control topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ControlRecord {
    /// The version this record becomes when it applies (`replaces + 1`).
    version: u64,
    /// The version it must replace to apply.
    replaces: u64,
    request_id: String,
    origin: String,
    /// Milliseconds since the epoch.
    published_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    /// The bundle document (YAML or JSON text), as submitted.
    bundle: String,
}

impl ControlRecord {
    /// An update replacing version `replaces`, published now.
    fn new(
        replaces: u64,
        request_id: String,
        origin: &str,
        comment: Option<String>,
        bundle: &str,
    ) -> Self {
        Self {
            version: replaces + 1,
            replaces,
            request_id,
            origin: origin.to_string(),
            published_at: now_ms(),
            comment,
            bundle: bundle.to_string(),
        }
    }
}

/// A version that applied: the bundle text and where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct RulesVersion {
    pub version: u64,
    /// Milliseconds since the epoch, by the publishing instance's clock.
    pub published_at: i64,
    /// The instance that published it.
    pub origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The bundle document as submitted.
    pub bundle: String,
    /// Offset of its record in the control topic.
    pub offset: i64,
}

/// What became of a published update.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It is now the running version.
    Applied(u64),
    /// It named a version that was no longer running; nothing changed.
    Conflict { expected: u64, current: u64 },
    /// Its bundle did not compile here; nothing changed.
    Rejected(BundleError),
}

struct Shared {
    topic: String,
    table: Arc<RuleTable>,
    compiler: RuleCompiler,
    versions: Mutex<BTreeMap<u64, Arc<RulesVersion>>>,
    waiters: Mutex<HashMap<String, Waiter>>,
    metrics: ControlMetrics,
}

/// A `publish` waiting for its record to be decided, with the bundle it already compiled.
struct Waiter {
    outcome: mpsc::Sender<Outcome>,
    compiled: Option<CompiledBundle>,
}

struct ControlMetrics {
    version: Gauge,
    applied: Counter,
    conflicts: Counter,
    rejected: Counter,
    invalid: Counter,
}

impl ControlMetrics {
    fn new() -> Self {
        Self {
            version: metrics::gauge!("riskstream_rules_version"),
            applied: metrics::counter!("riskstream_rules_reloads_total", "outcome" => "applied"),
            conflicts: metrics::counter!("riskstream_rules_reloads_total", "outcome" => "conflict"),
            rejected: metrics::counter!("riskstream_rules_reloads_total", "outcome" => "rejected"),
            invalid: metrics::counter!("riskstream_rules_reloads_total", "outcome" => "invalid_record"),
        }
    }
}

/// This instance's view of the control topic: the rule table it feeds, every applied version,
/// and the producer that publishes updates.
pub struct RulesControl {
    shared: Arc<Shared>,
    producer: ThreadedProducer<WatchedContext>,
    origin: String,
    sequence: AtomicU64,
    shutdown: Arc<AtomicBool>,
    follower: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RulesControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesControl")
            .field("topic", &self.shared.topic)
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

/// How long one poll of the control topic waits.
const POLL: Duration = Duration::from_millis(50);
/// How often a start that cannot reach the broker says so.
const STARTUP_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a start waits for its seed bundle to come back before sending it again.
const SEED_RESEND: Duration = Duration::from_secs(30);
/// How long one metadata or watermark request of a waiting start may take (short, so that a
/// stop is seen at once).
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// The control topic's consumer.
type ControlConsumer = BaseConsumer<WatchedContext>;

impl RulesControl {
    /// Creates the control topic if it is missing, reads it to its end, seeds it with `seed`
    /// (a bundle document) when it holds no version, and starts following it. Waits for the
    /// broker as long as it takes; returns once the newest bundle runs. `origin` names this
    /// instance in the versions it publishes.
    pub fn start(
        config: &KafkaConfig,
        compiler: RuleCompiler,
        seed: Option<&str>,
        origin: &str,
    ) -> Result<Arc<Self>, ControlError> {
        Self::start_until(
            config,
            compiler,
            seed,
            origin,
            &AtomicBool::new(false),
            &|_| {},
        )?
        .ok_or(ControlError::Closed)
    }

    /// [`Self::start`], giving up when `stop` is set (`None`; seen within about a second
    /// whatever it is waiting for). While the cluster does not answer or the topic is not
    /// there yet, `waiting` is told why (and `None` once the rules are loaded). Errors that
    /// librdkafka retries itself are logged, counted and waited out; only a fatal one
    /// (configuration, authentication, an unsupported broker) is returned.
    pub fn start_until(
        config: &KafkaConfig,
        compiler: RuleCompiler,
        seed: Option<&str>,
        origin: &str,
        stop: &AtomicBool,
        waiting: &dyn Fn(Option<String>),
    ) -> Result<Option<Arc<Self>>, ControlError> {
        let topic = config.topics.rules.clone();
        let kafka_error = |e: rdkafka::error::KafkaError| ControlError::Kafka {
            topic: topic.clone(),
            message: e.to_string(),
        };
        let mut consumer_config = client_config(config, Role::Consumer);
        consumer_config
            .set("group.id", format!("{}-rules-{origin}", config.group_id))
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10");
        let consumer: ControlConsumer = consumer_config
            .create_with_context(WatchedContext {
                name: "control topic",
            })
            .map_err(kafka_error)?;
        let mut partition = TopicPartitionList::new();
        partition
            .add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(kafka_error)?;
        let Some(end) = wait_for_end(config, &consumer, &topic, stop, waiting)? else {
            return Ok(None);
        };
        consumer.assign(&partition).map_err(kafka_error)?;

        let mut producer_config: ClientConfig = client_config(config, Role::Producer);
        producer_config
            .set("linger.ms", "0")
            .set("compression.type", "none")
            .set("message.timeout.ms", "30000");
        let producer: ThreadedProducer<WatchedContext> = producer_config
            .create_with_context(WatchedContext {
                name: "control topic producer",
            })
            .map_err(kafka_error)?;

        // Read what is there, deciding each record as the follower will.
        let mut log = Log::default();
        let mut idle_since = Instant::now();
        while log.next_offset < end {
            if stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            if log.read_next(&consumer, &topic, &compiler)? {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > STARTUP_LOG_EVERY {
                // Nothing readable up to the end (e.g. offsets without a record, such as
                // transaction markers): the consumer's position says whether it got there.
                if read_position(&consumer, &topic).is_some_and(|p| p >= end) {
                    break;
                }
                tracing::warn!(%topic, at = log.next_offset, end, "still reading the control topic");
                waiting(Some(format!(
                    "reading control topic {topic}: at offset {} of {end}",
                    log.next_offset
                )));
                idle_since = Instant::now();
            }
        }
        let sequence = AtomicU64::new(0);
        match (&log.latest, seed) {
            (Some(_), _) => {}
            (None, None) => return Err(ControlError::Empty { topic }),
            (None, Some(seed)) => {
                // Another instance may seed at the same moment: whichever record comes first
                // in the log applies, and this one then runs that bundle instead.
                let record = ControlRecord::new(
                    0,
                    format!("{origin}-seed-{}", now_ms()),
                    origin,
                    Some("seeded from the bundle given at start".into()),
                    seed,
                );
                send(&producer, &topic, &record)?;
                // Sent again should it be lost in an outage (a copy that lands after the first
                // conflicts with it and changes nothing).
                let mut sent_at = Instant::now();
                while !log.seen.contains_key(&record.request_id) {
                    if stop.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    if sent_at.elapsed() > SEED_RESEND {
                        waiting(Some(format!(
                            "seeding control topic {topic}: the broker has not confirmed the first bundle yet"
                        )));
                        send(&producer, &topic, &record)?;
                        sent_at = Instant::now();
                    }
                    log.read_next(&consumer, &topic, &compiler)?;
                }
                if let (None, Some(Outcome::Rejected(source))) =
                    (&log.latest, log.seen.get(&record.request_id))
                {
                    return Err(ControlError::Seed {
                        topic,
                        source: source.clone(),
                    });
                }
            }
        }
        let Some(compiled) = log.latest else {
            return Err(ControlError::Empty { topic });
        };
        tracing::info!(%topic, version = compiled.version(), versions = log.versions.len(), "rules loaded from the control topic");
        waiting(None);
        let metrics = ControlMetrics::new();
        metrics.version.set(compiled.version() as f64);
        let shared = Arc::new(Shared {
            topic: topic.clone(),
            table: Arc::new(RuleTable::new(compiled)),
            compiler,
            versions: Mutex::new(log.versions),
            waiters: Mutex::new(HashMap::new()),
            metrics,
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let follower = {
            let shared = Arc::clone(&shared);
            let shutdown = Arc::clone(&shutdown);
            std::thread::Builder::new()
                .name("rules-control".into())
                .spawn(move || follow(&shared, &consumer, &shutdown))
                .map_err(|e| ControlError::Kafka {
                    topic: topic.clone(),
                    message: format!("cannot start the follower thread: {e}"),
                })?
        };
        Ok(Some(Arc::new(Self {
            shared,
            producer,
            origin: origin.to_string(),
            sequence,
            shutdown,
            follower: Mutex::new(Some(follower)),
        })))
    }

    /// The rule table this control feeds: hand it to the pipeline.
    pub fn table(&self) -> Arc<RuleTable> {
        Arc::clone(&self.shared.table)
    }

    /// The running version.
    pub fn version(&self) -> u64 {
        self.shared.table.version()
    }

    /// The compiler bundles are checked with (the event schema of this deployment).
    pub fn compiler(&self) -> &RuleCompiler {
        &self.shared.compiler
    }

    /// Every applied version, oldest first.
    pub fn versions(&self) -> Vec<Arc<RulesVersion>> {
        lock(&self.shared.versions).values().cloned().collect()
    }

    /// One applied version.
    pub fn get(&self, version: u64) -> Option<Arc<RulesVersion>> {
        lock(&self.shared.versions).get(&version).cloned()
    }

    /// Checks `bundle` as the version after the running one, without publishing it.
    pub fn validate(&self, bundle: &str) -> Result<CompiledBundle, BundleError> {
        self.shared
            .compiler
            .compile_text(bundle, self.version() + 1)
    }

    /// Checks `bundle` against the event schema, publishes it to replace version `expected`
    /// and waits (at most `timeout`) until this instance's follower has decided it. A stale
    /// `expected` or an invalid bundle is answered at once, without publishing. Blocking.
    pub fn publish(
        &self,
        bundle: &str,
        expected: u64,
        comment: Option<String>,
        timeout: Duration,
    ) -> Result<Outcome, ControlError> {
        let current = self.version();
        if expected != current {
            // Already stale here; the log would refuse it too.
            return Ok(Outcome::Conflict { expected, current });
        }
        // Compiled once: the follower applies this very bundle when the record comes back.
        let compiled = match self.shared.compiler.compile_text(bundle, expected + 1) {
            Ok(compiled) => compiled,
            Err(e) => return Ok(Outcome::Rejected(e)),
        };
        let record = ControlRecord::new(
            expected,
            format!(
                "{}-{}-{}",
                self.origin,
                now_ms(),
                self.sequence.fetch_add(1, Ordering::Relaxed)
            ),
            &self.origin,
            comment,
            bundle,
        );
        let request_id = record.request_id.clone();
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.waiters).insert(
            request_id.clone(),
            Waiter {
                outcome: tx,
                compiled: Some(compiled),
            },
        );
        let sent = send(&self.producer, &self.shared.topic, &record);
        let outcome = sent.and_then(|()| {
            rx.recv_timeout(timeout).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => ControlError::Timeout {
                    topic: self.shared.topic.clone(),
                    timeout,
                },
                mpsc::RecvTimeoutError::Disconnected => ControlError::Closed,
            })
        });
        lock(&self.shared.waiters).remove(&request_id);
        outcome
    }

    /// Stops following the topic (the table keeps its last bundle).
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(thread) = lock(&self.follower).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RulesControl {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The start-up read of the log: what applied, and every record's outcome.
#[derive(Default)]
struct Log {
    versions: BTreeMap<u64, Arc<RulesVersion>>,
    /// The newest version that applied, compiled.
    latest: Option<CompiledBundle>,
    /// Outcomes by request id (to find the seed's).
    seen: HashMap<String, Outcome>,
    next_offset: i64,
}

impl Log {
    /// Reads and decides the next record, if one arrives within a poll.
    /// Errors the cluster may recover from are counted and logged and read as nothing
    /// arriving; a fatal one is returned.
    fn read_next(
        &mut self,
        consumer: &ControlConsumer,
        topic: &str,
        compiler: &RuleCompiler,
    ) -> Result<bool, ControlError> {
        let message = match poll(consumer) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(false),
            Err(e) => {
                if let Some(fatal) = errors::record("control topic", &e, "") {
                    return Err(ControlError::Kafka {
                        topic: topic.to_string(),
                        message: fatal,
                    });
                }
                std::thread::sleep(POLL);
                return Ok(false);
            }
        };
        self.next_offset = message.offset() + 1;
        let current = self.versions.keys().next_back().copied().unwrap_or(0);
        let (record, outcome) = match decide(
            compiler,
            current,
            message.payload(),
            message.offset(),
            |_| None,
        ) {
            Decided::Invalid => return Ok(true),
            Decided::Conflict(record, outcome) | Decided::Rejected(record, outcome) => {
                (record, outcome)
            }
            Decided::Applied(record, version, compiled) => {
                self.versions.insert(version.version, Arc::new(version));
                let outcome = Outcome::Applied(compiled.version());
                self.latest = Some(*compiled);
                (record, outcome)
            }
        };
        self.seen.insert(record.request_id, outcome);
        Ok(true)
    }
}

enum Decided {
    Invalid,
    Conflict(ControlRecord, Outcome),
    Rejected(ControlRecord, Outcome),
    Applied(ControlRecord, RulesVersion, Box<CompiledBundle>),
}

/// The one rule every instance applies to a record, given the version running before it.
fn decide(
    compiler: &RuleCompiler,
    current: u64,
    payload: Option<&[u8]>,
    offset: i64,
    precompiled: impl FnOnce(&str) -> Option<CompiledBundle>,
) -> Decided {
    let record: ControlRecord = match payload.map(serde_json::from_slice) {
        Some(Ok(record)) => record,
        Some(Err(e)) => {
            tracing::warn!(offset, error = %e, "control record is not a rules update; skipped");
            return Decided::Invalid;
        }
        None => return Decided::Invalid, // a tombstone
    };
    if record.replaces != current || record.version != current + 1 {
        let outcome = Outcome::Conflict {
            expected: record.replaces,
            current,
        };
        return Decided::Conflict(record, outcome);
    }
    let compiled = match precompiled(&record.request_id) {
        Some(compiled) if compiled.version() == record.version => Ok(compiled),
        _ => compiler.compile_text(&record.bundle, record.version),
    };
    match compiled {
        Ok(compiled) => {
            let version = RulesVersion {
                version: record.version,
                published_at: record.published_at,
                origin: record.origin.clone(),
                comment: record.comment.clone(),
                bundle: record.bundle.clone(),
                offset,
            };
            Decided::Applied(record, version, Box::new(compiled))
        }
        Err(e) => {
            tracing::warn!(offset, request = %record.request_id, error = %e, "control record rejected");
            Decided::Rejected(record, Outcome::Rejected(e))
        }
    }
}

/// The follower: applies new records until `shutdown`.
fn follow(shared: &Shared, consumer: &ControlConsumer, shutdown: &AtomicBool) {
    while !shutdown.load(Ordering::Acquire) {
        let message = match poll(consumer) {
            Ok(Some(message)) => message,
            Ok(None) => continue,
            Err(e) => {
                // Fatal or not, the running bundle stays; the pipeline stops on a fatal one.
                errors::record("control topic", &e, "");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let current = shared.table.version();
        let decided = {
            let _span = tracing::info_span!("rules_reload", offset = message.offset()).entered();
            decide(
                &shared.compiler,
                current,
                message.payload(),
                message.offset(),
                |request| {
                    lock(&shared.waiters)
                        .get_mut(request)
                        .and_then(|w| w.compiled.take())
                },
            )
        };
        let (record, outcome) = match decided {
            Decided::Invalid => {
                shared.metrics.invalid.increment(1);
                continue;
            }
            Decided::Conflict(record, outcome) => {
                shared.metrics.conflicts.increment(1);
                (record, outcome)
            }
            Decided::Rejected(record, outcome) => {
                shared.metrics.rejected.increment(1);
                (record, outcome)
            }
            Decided::Applied(record, version, compiled) => {
                let number = compiled.version();
                lock(&shared.versions).insert(number, Arc::new(version));
                if let Err(e) = shared.table.publish(Arc::from(compiled)) {
                    // Unreachable while the log is the only writer; say so if it happens.
                    tracing::error!(error = %e, "rule table refused a version from the control topic");
                }
                shared.metrics.applied.increment(1);
                shared.metrics.version.set(number as f64);
                tracing::info!(version = number, origin = %record.origin, "rules reloaded");
                (record, Outcome::Applied(number))
            }
        };
        if let Some(waiter) = lock(&shared.waiters).remove(&record.request_id) {
            let _ = waiter.outcome.send(outcome);
        }
    }
}

/// One message of the control topic, or `None` after [`POLL`] without one.
fn poll(
    consumer: &ControlConsumer,
) -> Result<Option<rdkafka::message::BorrowedMessage<'_>>, rdkafka::error::KafkaError> {
    consumer.poll(POLL).transpose()
}

/// The consumer's position in the control topic's partition.
fn read_position(consumer: &ControlConsumer, topic: &str) -> Option<i64> {
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The end offset of the control topic's partition, once the cluster answers and the topic
/// exists (created here when the cluster says it does not); `None` when `stop` was set first.
fn wait_for_end(
    config: &KafkaConfig,
    consumer: &ControlConsumer,
    topic: &str,
    stop: &AtomicBool,
    waiting: &dyn Fn(Option<String>),
) -> Result<Option<i64>, ControlError> {
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    let mut backoff = Backoff::default();
    loop {
        if let Some(fatal) = errors::fatal_error() {
            return Err(ControlError::Kafka {
                topic: topic.to_string(),
                message: fatal.to_string(),
            });
        }
        let why = match probe_end(consumer, topic) {
            Ok(Probe::End(high)) => return Ok(Some(high)),
            Ok(Probe::Missing) => {
                create_topic(config, topic);
                format!("control topic {topic} does not exist yet: creating it")
            }
            Ok(Probe::Partitions(partitions)) => {
                return Err(ControlError::Partitions {
                    topic: topic.to_string(),
                    partitions,
                })
            }
            Err(e) => {
                if let Some(fatal) = errors::record("control topic", &e, "") {
                    return Err(ControlError::Kafka {
                        topic: topic.to_string(),
                        message: fatal,
                    });
                }
                format!(
                    "the Kafka cluster at {} (control topic {topic}): {e}",
                    config.brokers
                )
            }
        };
        waiting(Some(why.clone()));
        if last_log.is_none_or(|at| at.elapsed() >= STARTUP_LOG_EVERY) {
            tracing::warn!(%topic, waited = ?started.elapsed(), "waiting for the control topic: {why}");
            last_log = Some(Instant::now());
        }
        if !backoff.wait(stop) {
            return Ok(None);
        }
    }
}

/// What the cluster says about the control topic.
enum Probe {
    End(i64),
    Missing,
    Partitions(usize),
}

fn probe_end(consumer: &ControlConsumer, topic: &str) -> Result<Probe, rdkafka::error::KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), PROBE_TIMEOUT)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Probe::Missing);
    };
    if let Some(e) = t.error() {
        let code = rdkafka::error::RDKafkaErrorCode::from(e);
        return match code {
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                Ok(Probe::Missing)
            }
            _ => Err(rdkafka::error::KafkaError::MetadataFetch(code)),
        };
    }
    match t.partitions().len() {
        0 => Ok(Probe::Missing),
        1 => {
            let (_, high) = consumer.fetch_watermarks(topic, 0, PROBE_TIMEOUT)?;
            Ok(Probe::End(high))
        }
        n => Ok(Probe::Partitions(n)),
    }
}

/// Creates the control topic (one partition, compacted). A cluster that refuses is told
/// about in the log; the topic may have been created meanwhile or be auto-created.
fn create_topic(config: &KafkaConfig, topic: &str) {
    let admin: AdminClient<_> = match client_config(config, Role::Producer).create() {
        Ok(admin) => admin,
        Err(e) => {
            tracing::warn!(%topic, error = %e, "cannot create an admin client to create the control topic");
            return;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a runtime to create the control topic");
            return;
        }
    };
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    // Short, so that a stop is seen while the cluster is not answering; retried meanwhile.
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(1)))
        .request_timeout(Some(Duration::from_secs(2)));
    match runtime.block_on(admin.create_topics([&new], &options)) {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(_) => tracing::info!(%topic, "control topic created"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        tracing::warn!(%topic, error = %code, "cannot create the control topic")
                    }
                }
            }
        }
        Err(e) => tracing::warn!(%topic, error = %e, "cannot create the control topic"),
    }
}

fn send(
    producer: &ThreadedProducer<WatchedContext>,
    topic: &str,
    record: &ControlRecord,
) -> Result<(), ControlError> {
    let payload = serde_json::to_vec(record).map_err(|e| ControlError::Kafka {
        topic: topic.to_string(),
        message: format!("cannot encode the update: {e}"),
    })?;
    producer
        .send(
            BaseRecord::to(topic)
                .partition(0)
                .key(record.request_id.as_bytes())
                .payload(&payload),
        )
        .map_err(|(e, _)| ControlError::Kafka {
            topic: topic.to_string(),
            message: e.to_string(),
        })?;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

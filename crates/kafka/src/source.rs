//! The transactions consumer: a consumer-group member (or a fixed assignment) that fills raw
//! batches with messages and their partition/offset, pauses its partitions while the pipeline
//! is full, reports revoked partitions, and commits offsets the [`DeliveryTracker`] reports as
//! acknowledged — periodically, when partitions are revoked, and at shutdown.
//!
//! What it must not do: decode, buffer beyond one batch, or commit an offset whose outputs the
//! broker has not acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::Counter;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use riskstream_common::{KafkaConfig, Position, RawBatch};
use riskstream_pipeline::source::now_ms;
use riskstream_pipeline::{Source, SourceError, SourceState, StatusBoard};

use crate::acks::DeliveryTracker;
use crate::{client_config, Role};

/// Rebalance handling, shared with librdkafka's callbacks.
pub struct SourceContext {
    topic: String,
    tracker: Arc<DeliveryTracker>,
    revoked: Mutex<Vec<i32>>,
    assigned: Mutex<Vec<i32>>,
    /// Set by a rebalance: `fill` returns what it has so that revocations stay in order.
    rebalanced: AtomicBool,
    /// While set, newly assigned partitions are paused too.
    paused: AtomicBool,
    /// Where positions and lag go (from librdkafka's statistics, once a second).
    status: OnceLock<Arc<StatusBoard>>,
    /// Partitions the last statistics showed with records at the broker beyond the
    /// consumer's position, or without a leader: whatever the consumer saw last, they are
    /// not idle.
    lagging: Mutex<BTreeSet<i32>>,
    /// Offsets to start partitions at when first assigned (a restored checkpoint's), instead
    /// of the group's committed ones.
    start_offsets: Mutex<BTreeMap<i32, i64>>,
    /// Whether this source commits offsets (not with exactly-once delivery, where they go in
    /// the sink's transactions).
    commits: AtomicBool,
    /// With checkpoints, offsets are committed as the newest checkpoint records them (it
    /// exists only once the outputs before them are acknowledged): the group's offsets and the
    /// restored state then always agree.
    checkpoints: OnceLock<riskstream_checkpoint::Checkpointer>,
    /// The group's assignment strategy is cooperative (`cooperative-sticky`): rebalances
    /// assign and revoke incrementally. Known from the configuration, because asking the
    /// consumer (`rd_kafka_rebalance_protocol`) from the rebalance callback can block for
    /// ever once the consumer is closing (librdkafka issue 4041; it hung a test's shutdown).
    cooperative: bool,
}

impl SourceContext {
    /// What may be committed now: the newest checkpoint's offsets, or without checkpoints the
    /// acknowledged ones.
    fn committable(&self) -> Vec<(i32, i64)> {
        match self.checkpoints.get() {
            Some(c) => c
                .latest_offsets()
                .map(|o| o.into_iter().collect())
                .unwrap_or_default(),
            None => self.tracker.committable(),
        }
    }
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.global_error(error, reason);
    }

    /// librdkafka's statistics (`statistics.interval.ms`): positions, end offsets and lag per
    /// partition, into the consumer lag gauge and the status board.
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let known = |offset: i64| Some(offset).filter(|o| *o >= 0);
        let mut seen = Vec::new();
        let mut lagging = BTreeSet::new();
        for (&id, p) in &topic.partitions {
            // -1 is librdkafka's internal unassigned partition; unowned ones report nothing new.
            if id < 0 || !p.desired {
                continue;
            }
            let position = known(p.app_offset).or(known(p.committed_offset));
            let high = known(p.hi_offset);
            let lag = match (high, position) {
                (Some(high), Some(position)) => Some((high - position).max(0)),
                _ => known(p.consumer_lag),
            };
            if let Some(lag) = lag {
                metrics::gauge!("riskstream_consumer_lag", "topic" => self.topic.clone(), "partition" => id.to_string())
                    .set(lag as f64);
            }
            if lag.is_some_and(|l| l > 0) || p.leader < 0 {
                lagging.insert(id);
            }
            seen.push((id, position, known(p.committed_offset), high, lag));
        }
        *lock(&self.lagging) = lagging;
        if let Some(status) = self.status.get() {
            status.update(|s| {
                for (id, position, committed, high, lag) in seen {
                    let partition = s.partitions.entry(id).or_default();
                    partition.position = position;
                    partition.committed = committed;
                    partition.high_watermark = high;
                    partition.lag = lag;
                }
            });
        }
    }
}

impl SourceContext {
    /// librdkafka's global errors (all brokers down, authentication): counted, logged, and a
    /// fatal one remembered so that `fill` stops the pipeline.
    fn global_error(&self, error: KafkaError, reason: &str) {
        crate::errors::record("transactions consumer", &error, reason);
    }
}

impl ConsumerContext for SourceContext {
    /// librdkafka's own rebalance handling, except that partitions with a start offset (from a
    /// restored checkpoint) start there.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut starts = lock(&self.start_offsets);
                let partitions: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                for p in partitions {
                    if let Some(offset) = starts.remove(&p) {
                        if let Err(e) =
                            tpl.set_partition_offset(&self.topic, p, Offset::Offset(offset))
                        {
                            tracing::warn!(partition = p, error = %e, "cannot start at the checkpoint's offset");
                        } else {
                            tracing::info!(
                                partition = p,
                                offset,
                                "starting at the checkpoint's offset"
                            );
                        }
                    }
                }
                drop(starts);
                Rebalance::Assign(tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => {
                let e = KafkaError::Rebalance(other.into());
                self.pre_rebalance(consumer, &Rebalance::Error(e.clone()));
                self.post_rebalance(consumer, &Rebalance::Error(e));
                return;
            }
        };
        self.pre_rebalance(consumer, &rebalance);
        let applied = match (&rebalance, self.cooperative) {
            (Rebalance::Assign(list), true) => consumer.incremental_assign(list),
            (Rebalance::Assign(list), false) => consumer.assign(list),
            (Rebalance::Revoke(list), true) => consumer.incremental_unassign(list),
            _ => consumer.unassign(),
        };
        if let Err(e) = applied {
            tracing::error!(error = %e, "cannot apply the group's assignment");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<i32> = list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            // Commit what is acknowledged before the partitions go to another member; what is
            // still in flight is consumed again there (at-least-once).
            let mut offsets = self.tracker.revoke(&partitions);
            if self.checkpoints.get().is_some() {
                offsets = self.committable();
                offsets.retain(|(p, _)| partitions.contains(p));
            }
            if !offsets.is_empty() && self.commits.load(Ordering::Acquire) {
                if let Err(e) = commit(consumer, &self.topic, &offsets, CommitMode::Sync) {
                    tracing::warn!(error = %e, "commit on revocation failed; the new owner re-reads from the last commit");
                }
            }
            tracing::info!(topic = %self.topic, ?partitions, "partitions revoked");
            metrics::counter!("riskstream_rebalances_total", "event" => "revoked").increment(1);
            metrics::counter!("riskstream_rebalance_partitions_total", "event" => "revoked")
                .increment(partitions.len() as u64);
            lock(&self.revoked).extend(partitions);
            self.rebalanced.store(true, Ordering::Release);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions: Vec<i32> = list
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                tracing::info!(topic = %self.topic, ?partitions, "partitions assigned");
                metrics::counter!("riskstream_rebalances_total", "event" => "assigned")
                    .increment(1);
                metrics::counter!("riskstream_rebalance_partitions_total", "event" => "assigned")
                    .increment(partitions.len() as u64);
                self.tracker.assign(&partitions);
                lock(&self.assigned).extend(&partitions);
                if self.paused.load(Ordering::Acquire) {
                    if let Err(e) = consumer.pause(list) {
                        tracing::warn!(error = %e, "cannot pause newly assigned partitions");
                    }
                }
                self.rebalanced.store(true, Ordering::Release);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                metrics::counter!("riskstream_rebalances_total", "event" => "error").increment(1);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    offsets: &[(i32, i64)],
    mode: CommitMode,
) -> Result<(), KafkaError> {
    let mut list = TopicPartitionList::with_capacity(offsets.len());
    for (partition, next) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    consumer.commit(&list, mode)
}

/// A message's position and ingestion time. Latency is measured from the message's Kafka
/// timestamp (when its producer or the broker stamped it), never from a time ahead of our clock.
/// `clock` is the wall clock as last read: it is read again only for a message stamped after it,
/// so that a busy consumer does not read the clock once per message.
fn origin(message: &impl Message, clock: &mut i64) -> (Position, i64) {
    let position = Position {
        partition: message.partition(),
        offset: message.offset(),
    };
    let ingest = match message.timestamp().to_millis() {
        Some(t) if t <= *clock => t,
        stamped => {
            *clock = now_ms();
            stamped.filter(|t| *t <= *clock).unwrap_or(*clock)
        }
    };
    (position, ingest)
}

/// Messages of the transactions topic as raw records.
pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    topic: String,
    linger: Duration,
    commit_interval: Duration,
    last_commit: Instant,
    /// Offsets last committed, to skip commits that would change nothing.
    committed: Vec<(i32, i64)>,
    shutdown: Arc<AtomicBool>,
    metrics: SourceMetrics,
    /// Messages that arrived while holding (before a pause took effect): first in the next batch.
    carry: Vec<(Vec<u8>, Position, i64)>,
    /// Since when the pipeline has been full (see [`Source::hold`]).
    held_since: Option<Instant>,
    /// Partitions owned, and those the consumer has read to their end (partition EOF) since
    /// their last message: the others have records waiting.
    owned: BTreeSet<i32>,
    at_end: BTreeSet<i32>,
}

/// How long a closing source waits for the group to take its partitions back.
const LEAVE_GROUP_WAIT: Duration = Duration::from_secs(10);
/// How long the pipeline stays full before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_millis(250);

struct SourceMetrics {
    consumed: Counter,
    errors: Counter,
    pauses: Counter,
    commits: Counter,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// How the source gets its partitions.
#[derive(Debug, Clone)]
pub enum Assignment {
    /// Join `kafka.group_id` and take what the group assigns (production).
    Group,
    /// Read exactly these partitions from the given offsets, without group membership (tests,
    /// tools). Offsets are still committed under the group id.
    Fixed(Vec<(i32, Offset)>),
}

impl KafkaSource {
    /// A consumer of `config.topics.transactions`. `linger` is the longest a batch waits to
    /// fill; the source reports itself exhausted once `shutdown` is set.
    pub fn new(
        config: &KafkaConfig,
        linger: Duration,
        tracker: Arc<DeliveryTracker>,
        assignment: Assignment,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Self, SourceError> {
        let topic = config.topics.transactions.clone();
        let mut client = client_config(config, Role::Consumer);
        if client.get("statistics.interval.ms").is_none() {
            client.set("statistics.interval.ms", "1000");
        }
        let cooperative = client
            .get("partition.assignment.strategy")
            .is_some_and(|s| s.contains("cooperative-sticky"));
        let context = SourceContext {
            topic: topic.clone(),
            tracker: tracker.clone(),
            revoked: Mutex::new(Vec::new()),
            assigned: Mutex::new(Vec::new()),
            rebalanced: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            status: OnceLock::new(),
            lagging: Mutex::new(BTreeSet::new()),
            start_offsets: Mutex::new(BTreeMap::new()),
            commits: AtomicBool::new(true),
            checkpoints: OnceLock::new(),
            cooperative,
        };
        let stream_error = |e: KafkaError| SourceError::Stream {
            name: topic.clone(),
            message: e.to_string(),
        };
        let consumer: BaseConsumer<SourceContext> =
            client.create_with_context(context).map_err(stream_error)?;
        match assignment {
            Assignment::Group => consumer.subscribe(&[&topic]).map_err(stream_error)?,
            Assignment::Fixed(partitions) => {
                let mut list = TopicPartitionList::new();
                for (p, offset) in &partitions {
                    list.add_partition_offset(&topic, *p, *offset)
                        .map_err(stream_error)?;
                }
                consumer.assign(&list).map_err(stream_error)?;
                let ids: Vec<i32> = partitions.iter().map(|(p, _)| *p).collect();
                tracker.assign(&ids);
                lock(&consumer.context().assigned).extend(ids);
            }
        }
        let label = topic.clone();
        Ok(Self {
            consumer,
            topic,
            linger,
            commit_interval: config.commit_interval,
            last_commit: Instant::now(),
            committed: Vec::new(),
            shutdown,
            metrics: SourceMetrics {
                consumed: metrics::counter!("riskstream_kafka_consumed_total", "topic" => label.clone()),
                errors: metrics::counter!("riskstream_kafka_consumer_errors_total", "topic" => label.clone()),
                pauses: metrics::counter!("riskstream_kafka_consumer_pauses_total", "topic" => label.clone()),
                commits: metrics::counter!("riskstream_kafka_offset_commits_total", "topic" => label),
            },
            carry: Vec::new(),
            held_since: None,
            owned: BTreeSet::new(),
            at_end: BTreeSet::new(),
        })
    }

    /// Reports positions and lag per partition to `status` (once a second).
    pub fn report_to(&self, status: Arc<StatusBoard>) {
        let _ = self.consumer.context().status.set(status);
    }

    /// Starts partitions at `offsets` (a restored checkpoint's) rather than where the group
    /// committed: a partition assigned already is moved there now, the others when the group
    /// first assigns them.
    pub fn start_at(&mut self, offsets: &BTreeMap<i32, i64>) -> Result<(), SourceError> {
        let assignment = self.consumer.assignment().map_err(|e| self.error(e))?;
        let mut later = offsets.clone();
        let mut now = TopicPartitionList::new();
        for element in assignment.elements_for_topic(&self.topic) {
            let p = element.partition();
            let offset = later.remove(&p).map_or(element.offset(), Offset::Offset);
            now.add_partition_offset(&self.topic, p, offset)
                .map_err(|e| self.error(e))?;
        }
        if now.count() > 0 {
            self.consumer.assign(&now).map_err(|e| self.error(e))?;
        }
        *lock(&self.context().start_offsets) = later;
        Ok(())
    }

    /// Commits offsets as `checkpointer`'s newest checkpoint records them, not as outputs are
    /// acknowledged.
    pub fn commit_with(&mut self, checkpointer: riskstream_checkpoint::Checkpointer) {
        let _ = self.context().checkpoints.set(checkpointer);
    }

    /// Leaves offsets to the sink's transactions (exactly-once): this source commits none.
    pub fn without_commits(&mut self) {
        self.context().commits.store(false, Ordering::Release);
    }

    /// The consumer group's metadata, for offsets sent in a transaction.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// The underlying consumer (lag and position queries).
    pub fn consumer(&self) -> &BaseConsumer<SourceContext> {
        &self.consumer
    }

    /// Leaves the consumer group while the consumer is still open: unsubscribes and polls
    /// until the group has taken the partitions back (at most [`LEAVE_GROUP_WAIT`]). Left to
    /// the consumer's close, the revocation's callback calls into a closing consumer, and
    /// librdkafka can block there for ever (issues 4041 and 4884; a test's shutdown hung so).
    fn leave_group(&mut self) {
        if self.consumer.subscription().is_ok_and(|s| s.count() == 0) {
            return;
        }
        self.consumer.unsubscribe();
        let deadline = Instant::now() + LEAVE_GROUP_WAIT;
        while Instant::now() < deadline {
            if self.consumer.assignment().is_ok_and(|a| a.count() == 0) {
                return;
            }
            // Serves the revocation; a record fetched before it is not scored (its offset
            // is not committed: the next owner reads it).
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
        tracing::warn!(topic = %self.topic, "the consumer group did not take the partitions back within {LEAVE_GROUP_WAIT:?}; closing anyway");
    }

    fn context(&self) -> &SourceContext {
        self.consumer.context()
    }

    /// Commits the acknowledged offsets if they moved (asynchronously unless `mode` says).
    fn commit_acknowledged(&mut self, mode: CommitMode) -> Result<(), KafkaError> {
        if !self.context().commits.load(Ordering::Acquire) {
            return Ok(());
        }
        let offsets = self.context().committable();
        self.last_commit = Instant::now();
        if offsets.is_empty() || offsets == self.committed {
            return Ok(());
        }
        commit(&self.consumer, &self.topic, &offsets, mode)?;
        self.metrics.commits.increment(1);
        self.committed = offsets;
        Ok(())
    }

    /// Counts and logs a consumer error (an outage reports the same one many times a
    /// second: logged every few seconds); a fatal one stops the pipeline.
    fn log_error(&mut self, e: &KafkaError) -> Result<(), SourceError> {
        self.metrics.errors.increment(1);
        match crate::errors::record("transactions consumer", e, "") {
            Some(fatal) => Err(SourceError::Stream {
                name: self.topic.clone(),
                message: fatal,
            }),
            None => Ok(()),
        }
    }

    /// A fatal error any Kafka client of this process met (authentication, configuration).
    fn check_fatal(&self) -> Result<(), SourceError> {
        match crate::errors::fatal_error() {
            Some(fatal) => Err(SourceError::Stream {
                name: self.topic.clone(),
                message: fatal.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn set_paused(&mut self, paused: bool) -> Result<(), SourceError> {
        if self.context().paused.swap(paused, Ordering::AcqRel) == paused {
            return Ok(());
        }
        let assignment = self.consumer.assignment().map_err(|e| self.error(e))?;
        let result = if paused {
            self.metrics.pauses.increment(1);
            tracing::debug!(topic = %self.topic, "pipeline full: pausing partitions");
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        result.map_err(|e| self.error(e))
    }

    fn error(&self, e: KafkaError) -> SourceError {
        SourceError::Stream {
            name: self.topic.clone(),
            message: e.to_string(),
        }
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.topic
    }

    fn fill(&mut self, batch: &mut RawBatch, max: usize) -> Result<SourceState, SourceError> {
        /// How long an empty poll waits before `fill` returns to let the driver look around.
        const IDLE_POLL: Duration = Duration::from_millis(100);
        /// Messages taken between looks at the linger deadline (one clock read each).
        const DEADLINE_EVERY: usize = 32;
        let mut deadline: Option<Instant> = None;
        let mut clock = now_ms();
        for (payload, position, ingest) in self.carry.drain(..) {
            batch.push(&payload, position, ingest);
            deadline.get_or_insert_with(|| Instant::now() + self.linger);
        }
        while batch.len() < max {
            if self.shutdown.load(Ordering::Acquire) {
                return Ok(SourceState::Exhausted);
            }
            let timeout = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => IDLE_POLL,
            };
            match self.consumer.poll(timeout) {
                Some(Ok(message)) => {
                    let (position, ingest) = origin(&message, &mut clock);
                    self.at_end.remove(&position.partition);
                    batch.push(message.payload().unwrap_or_default(), position, ingest);
                    deadline.get_or_insert_with(|| Instant::now() + self.linger);
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    self.at_end.insert(partition);
                }
                Some(Err(e)) => self.log_error(&e)?,
                // Idle (nothing arrived within IDLE_POLL), or the linger deadline has passed.
                None => {
                    self.check_fatal()?;
                    break;
                }
            }
            if self.context().rebalanced.swap(false, Ordering::AcqRel) {
                break;
            }
            if batch.len() % DEADLINE_EVERY == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        self.metrics.consumed.increment(batch.len() as u64);
        if self.last_commit.elapsed() >= self.commit_interval {
            if let Err(e) = self.commit_acknowledged(CommitMode::Async) {
                self.log_error(&e)?;
            }
        }
        Ok(SourceState::Open)
    }

    fn hold(&mut self, timeout: Duration) -> Result<(), SourceError> {
        // A scorer that is momentarily full is the normal state of a busy pipeline: wait
        // without polling (librdkafka's prefetch queue is bounded). Pausing purges that queue
        // and re-fetches on resume, so it is kept for a pipeline that stays full.
        let held_since = *self.held_since.get_or_insert_with(Instant::now);
        if held_since.elapsed() < PAUSE_AFTER {
            std::thread::sleep(timeout);
            return Ok(());
        }
        self.set_paused(true)?;
        // Paused partitions deliver nothing; polling keeps the group session and serves
        // rebalances. A message can only come from a partition assigned in between; it is
        // paused by the rebalance callback, and librdkafka re-fetches from its position.
        match self.consumer.poll(timeout) {
            Some(Ok(message)) => {
                let (position, ingest) = origin(&message, &mut now_ms());
                let payload = message.payload().unwrap_or_default().to_vec();
                self.at_end.remove(&position.partition);
                self.carry.push((payload, position, ingest));
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                self.at_end.insert(partition);
            }
            Some(Err(e)) => self.log_error(&e)?,
            None => self.check_fatal()?,
        }
        if self.last_commit.elapsed() >= self.commit_interval {
            if let Err(e) = self.commit_acknowledged(CommitMode::Async) {
                self.log_error(&e)?;
            }
        }
        Ok(())
    }

    fn release(&mut self) -> Result<(), SourceError> {
        self.held_since = None;
        self.set_paused(false)
    }

    fn take_revoked(&mut self) -> Vec<i32> {
        let revoked = std::mem::take(&mut *lock(&self.context().revoked));
        for p in &revoked {
            self.owned.remove(p);
            self.at_end.remove(p);
        }
        revoked
    }

    fn take_assigned(&mut self) -> Vec<i32> {
        let assigned = std::mem::take(&mut *lock(&self.context().assigned));
        self.owned.extend(&assigned);
        assigned
    }

    /// Owned partitions not read to their end since their last message, or which the last
    /// statistics showed behind the broker's end or without a leader.
    fn backlogged(&self) -> Vec<i32> {
        let lagging = lock(&self.context().lagging);
        self.owned
            .iter()
            .filter(|p| !self.at_end.contains(p) || lagging.contains(p))
            .copied()
            .collect()
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    fn close(&mut self) -> Result<(), SourceError> {
        self.commit_acknowledged(CommitMode::Sync)
            .map_err(|e| self.error(e))?;
        tracing::info!(topic = %self.topic, offsets = ?self.committed, "offsets committed at shutdown");
        self.leave_group();
        Ok(())
    }
}

//! What every stage shares: a consumer in the stage's own group whose rebalances the stage
//! answers (where an assigned partition starts, what to do before one is revoked), and a
//! producer whose sends a stage flushes before it commits what it consumed.
//!
//! What it must not do: decide what a stage computes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use riskstream_common::KafkaConfig;
use riskstream_kafka::{client_config, errors, Role};

use crate::TopologyError;

/// How a stage answers its group's rebalances. Called from inside the consumer's poll, on the
/// stage's own thread.
pub trait Rebalanced: Send + Sync {
    /// `partitions` were assigned: where each starts (`None`: the group's committed offset).
    fn assigned(
        &self,
        consumer: &BaseConsumer<StageContext>,
        partitions: &[i32],
    ) -> Vec<(i32, Option<i64>)>;
    /// `partitions` are being revoked: whatever must be kept must be written now.
    fn revoked(&self, consumer: &BaseConsumer<StageContext>, partitions: &[i32]);
}

/// The consumer's context: rebalances go to the stage.
pub struct StageContext {
    name: &'static str,
    topic: String,
    cooperative: bool,
    handler: Arc<dyn Rebalanced>,
}

impl ClientContext for StageContext {
    fn error(&self, error: KafkaError, reason: &str) {
        errors::record(self.name, &error, reason);
    }
}

impl ConsumerContext for StageContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let applied = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for (p, start) in self.handler.assigned(consumer, &partitions) {
                    if let Some(offset) = start {
                        if let Err(e) =
                            tpl.set_partition_offset(&self.topic, p, Offset::Offset(offset))
                        {
                            tracing::warn!(stage = self.name, partition = p, error = %e, "cannot start at the partition state's offset");
                        }
                    }
                }
                tracing::info!(stage = self.name, topic = %self.topic, ?partitions, "partitions assigned");
                metrics::counter!("riskstream_rebalances_total", "event" => "assigned", "stage" => self.name).increment(1);
                metrics::counter!("riskstream_rebalance_partitions_total", "event" => "assigned", "stage" => self.name)
                    .increment(partitions.len() as u64);
                if self.cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.handler.revoked(consumer, &partitions);
                tracing::info!(stage = self.name, topic = %self.topic, ?partitions, "partitions revoked");
                metrics::counter!("riskstream_rebalances_total", "event" => "revoked", "stage" => self.name).increment(1);
                metrics::counter!("riskstream_rebalance_partitions_total", "event" => "revoked", "stage" => self.name)
                    .increment(partitions.len() as u64);
                if self.cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(stage = self.name, error = ?other, "rebalance error");
                metrics::counter!("riskstream_rebalances_total", "event" => "error", "stage" => self.name).increment(1);
                return;
            }
        };
        if let Err(e) = applied {
            tracing::error!(stage = self.name, error = %e, "cannot apply the group's assignment");
        }
    }
}

/// One message as a stage keeps it after the poll.
#[derive(Debug)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    /// The message's Kafka timestamp (ms), when it has one.
    pub timestamp: Option<i64>,
    pub payload: Vec<u8>,
}

/// A stage's consumer: one topic, one group, cooperative rebalances.
pub struct StageConsumer {
    name: &'static str,
    topic: String,
    consumer: BaseConsumer<StageContext>,
}

impl StageConsumer {
    /// Subscribes to `topic` in group `group`, rebalances answered by `handler`.
    pub fn subscribe(
        config: &KafkaConfig,
        name: &'static str,
        group: &str,
        topic: &str,
        handler: Arc<dyn Rebalanced>,
    ) -> Result<Self, TopologyError> {
        let mut client = client_config(config, Role::Consumer);
        client
            .set("group.id", group)
            .set("enable.partition.eof", "false");
        // Only moved partitions pause at a rebalance, unless the operator chose otherwise.
        if client.get("partition.assignment.strategy").is_none() {
            client.set("partition.assignment.strategy", "cooperative-sticky");
        }
        let cooperative = client
            .get("partition.assignment.strategy")
            .is_some_and(|s| s.contains("cooperative"));
        let context = StageContext {
            name,
            topic: topic.to_string(),
            cooperative,
            handler,
        };
        let kafka = |e: KafkaError| TopologyError::Kafka {
            what: format!("the {name} stage's consumer of {topic}"),
            message: e.to_string(),
        };
        let consumer: BaseConsumer<StageContext> =
            client.create_with_context(context).map_err(kafka)?;
        consumer.subscribe(&[topic]).map_err(kafka)?;
        Ok(Self {
            name,
            topic: topic.to_string(),
            consumer,
        })
    }

    /// Polls up to `max` messages: waits at most `wait` for the first, then `linger` more for
    /// the rest. Transient errors are logged and waited out; a fatal one is returned.
    pub fn poll(
        &self,
        max: usize,
        wait: Duration,
        linger: Duration,
        out: &mut Vec<Received>,
    ) -> Result<(), TopologyError> {
        let mut deadline: Option<Instant> = None;
        while out.len() < max {
            let timeout = match deadline {
                None => wait,
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            match self.consumer.poll(timeout) {
                None => break,
                Some(Ok(m)) => {
                    out.push(received(&m));
                    deadline.get_or_insert_with(|| Instant::now() + linger);
                }
                Some(Err(e)) => {
                    if let Some(fatal) = errors::record(self.name, &e, "") {
                        return Err(TopologyError::Kafka {
                            what: format!("the {} stage's consumer of {}", self.name, self.topic),
                            message: fatal,
                        });
                    }
                    if deadline.is_none() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Commits `offsets` (partition, next offset to read), synchronously. A failure is logged:
    /// the next commit covers it, and a new owner re-reads from the last one that succeeded.
    pub fn commit(&self, offsets: impl IntoIterator<Item = (i32, i64)>) {
        commit(&self.consumer, &self.topic, offsets);
    }

    /// Commits `offsets` with a metadata string each (partition, next offset, metadata), as
    /// [`Self::commit`] does.
    pub fn commit_with_metadata(&self, offsets: impl IntoIterator<Item = (i32, i64, String)>) {
        let mut list = TopicPartitionList::new();
        for (p, next, metadata) in offsets {
            let mut elem = list.add_partition(&self.topic, p);
            if let Err(e) = elem.set_offset(Offset::Offset(next)) {
                tracing::warn!(stage = self.name, partition = p, error = %e, "cannot list an offset to commit");
            }
            elem.set_metadata(metadata);
        }
        if list.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Sync) {
            tracing::warn!(stage = self.name, error = %e, "offset commit failed; the next one covers it");
        }
    }

    /// The metadata the group committed with `partitions`' offsets (`None` where there is none).
    pub fn committed_metadata(&self, partitions: &[i32]) -> Vec<(i32, Option<String>)> {
        let mut list = TopicPartitionList::new();
        for &p in partitions {
            list.add_partition(&self.topic, p);
        }
        match self
            .consumer
            .committed_offsets(list, Duration::from_secs(10))
        {
            Ok(list) => partitions
                .iter()
                .map(|&p| {
                    let metadata = list
                        .find_partition(&self.topic, p)
                        .map(|e| e.metadata().to_string())
                        .filter(|m| !m.is_empty());
                    (p, metadata)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(stage = self.name, error = %e, "cannot read the group's committed offsets");
                partitions.iter().map(|&p| (p, None)).collect()
            }
        }
    }

    /// Leaves the group (the stage's partitions are revoked through [`Rebalanced::revoked`]
    /// first), waiting at most `timeout`.
    pub fn leave(&self, timeout: Duration) {
        self.consumer.unsubscribe();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let assigned = self.consumer.assignment().map(|a| a.count()).unwrap_or(0);
            if assigned == 0 {
                return;
            }
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
        tracing::warn!(
            stage = self.name,
            "left the group without every partition revoked"
        );
    }
}

/// Commits `offsets` of `topic` (partition, next offset to read) synchronously, also from
/// inside a rebalance; a failure is logged (the next commit covers it, and a new owner re-reads
/// from the last one that succeeded).
pub fn commit(
    consumer: &BaseConsumer<StageContext>,
    topic: &str,
    offsets: impl IntoIterator<Item = (i32, i64)>,
) {
    let mut list = TopicPartitionList::new();
    for (p, next) in offsets {
        if let Err(e) = list.add_partition_offset(topic, p, Offset::Offset(next)) {
            tracing::warn!(%topic, partition = p, error = %e, "cannot list an offset to commit");
        }
    }
    if list.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
        tracing::warn!(%topic, error = %e, "offset commit failed; the next one covers it");
    }
}

/// The group's committed offsets of `partitions` of the consumer's topic (`None` where there is
/// none), asked from inside a rebalance.
pub fn committed(
    consumer: &BaseConsumer<StageContext>,
    topic: &str,
    partitions: &[i32],
) -> Vec<(i32, Option<i64>)> {
    let mut list = TopicPartitionList::new();
    for &p in partitions {
        list.add_partition(topic, p);
    }
    match consumer.committed_offsets(list, Duration::from_secs(10)) {
        Ok(list) => partitions
            .iter()
            .map(|&p| {
                let offset = list
                    .find_partition(topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                (p, offset)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(%topic, error = %e, "cannot read the group's committed offsets");
            partitions.iter().map(|&p| (p, None)).collect()
        }
    }
}

fn received(m: &BorrowedMessage<'_>) -> Received {
    Received {
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

/// Counts deliveries that failed for good.
pub struct DeliveryContext {
    name: &'static str,
    failures: AtomicU64,
    last: Mutex<Option<String>>,
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        errors::record(self.name, &error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            self.failures.fetch_add(1, Ordering::AcqRel);
            let why = format!("delivery to {} failed: {e}", m.topic());
            tracing::error!(stage = self.name, "{why}");
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
    }
}

/// A stage's producer: sends wait while the queue is full, [`Self::flush`] waits until every
/// send is delivered (a broker outage is waited out) and fails if any was lost.
pub struct StageProducer {
    name: &'static str,
    producer: ThreadedProducer<DeliveryContext>,
}

impl StageProducer {
    pub fn new(config: &KafkaConfig, name: &'static str) -> Result<Self, TopologyError> {
        let context = DeliveryContext {
            name,
            failures: AtomicU64::new(0),
            last: Mutex::new(None),
        };
        let producer = client_config(config, Role::Producer)
            .create_with_context(context)
            .map_err(|e| TopologyError::Kafka {
                what: format!("the {name} stage's producer"),
                message: e.to_string(),
            })?;
        Ok(Self { name, producer })
    }

    /// Sends `payload` to `partition` of `topic`.
    pub fn send(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), TopologyError> {
        let mut record = BaseRecord::to(topic).partition(partition).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // The producer's own thread drains the queue meanwhile.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    return Err(TopologyError::Kafka {
                        what: format!("the {} stage's producer to {topic}", self.name),
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    /// Sends the rows of `batch` to their `destinations` among `topic`'s partitions (rows
    /// without one stay), one message per partition and at most [`crate::wire::MAX_ROWS`] rows.
    pub fn send_rows(
        &self,
        topic: &str,
        batch: &arrow::array::RecordBatch,
        destinations: &[Option<i32>],
        header: crate::wire::Header,
        buf: &mut Vec<u8>,
    ) -> Result<(), TopologyError> {
        for (partition, rows) in crate::wire::split_by_partition(destinations) {
            let part = crate::wire::take_rows(batch, &rows)?;
            crate::wire::encode(buf, header, &part).map_err(|e| TopologyError::Kafka {
                what: format!("encoding a message for {topic}"),
                message: e.to_string(),
            })?;
            self.send(topic, partition, None, buf)?;
        }
        Ok(())
    }

    /// Waits until everything sent is delivered; while the cluster is away, until `stop`.
    pub fn flush(&self, stop: &AtomicBool) -> Result<(), TopologyError> {
        loop {
            match self.producer.flush(Duration::from_secs(1)) {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(stage = self.name, error = %e, "waiting for the cluster to take the stage's outputs");
                    if stop.load(Ordering::Acquire) && self.producer.in_flight_count() > 0 {
                        return Err(TopologyError::Kafka {
                            what: format!("the {} stage's producer", self.name),
                            message: format!("stopped with outputs undelivered: {e}"),
                        });
                    }
                }
            }
        }
        let context = self.producer.context();
        if context.failures.swap(0, Ordering::AcqRel) > 0 {
            let why = context
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default();
            return Err(TopologyError::Kafka {
                what: format!("the {} stage's producer", self.name),
                message: why,
            });
        }
        Ok(())
    }
}

/// Partitions assigned and revoked since the stage last looked, for stages that act on them
/// between polls.
#[derive(Default)]
pub struct Moves {
    pub assigned: Mutex<Vec<i32>>,
    pub revoked: Mutex<Vec<i32>>,
}

impl Rebalanced for Moves {
    fn assigned(
        &self,
        _: &BaseConsumer<StageContext>,
        partitions: &[i32],
    ) -> Vec<(i32, Option<i64>)> {
        lock(&self.assigned).extend_from_slice(partitions);
        partitions.iter().map(|&p| (p, None)).collect()
    }

    fn revoked(&self, _: &BaseConsumer<StageContext>, partitions: &[i32]) {
        lock(&self.revoked).extend_from_slice(partitions);
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

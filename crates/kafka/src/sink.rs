//! The Kafka sink: verdicts to the verdicts topic (keyed by event id), dead letters and late
//! events to their topics as the original bytes with reason headers.
//!
//! Every message carries its batch's ticket; delivery reports feed the [`DeliveryTracker`], from
//! which the source commits offsets (at-least-once). The sink never retries on its own: the
//! producer retries transient errors indefinitely (idempotent, `acks=all`); a permanent failure
//! stops the pipeline with its offsets uncommitted.
//!
//! With exactly-once delivery the producer is transactional: everything produced between two
//! checkpoints is one transaction, committed with the consumer offsets of the second
//! ([`Sink::commit`]). Its `transactional.id` is stable per instance, so a restarted instance
//! fences its predecessor and the broker aborts what that one left open.

use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use riskstream_common::{DeadLetter, KafkaConfig, RawBatch};
use riskstream_pipeline::{Sink, SinkError, VerdictBatch};

use crate::acks::{DeliveryTracker, TicketId};
use crate::{client_config, Role};

/// Routes delivery reports to the tracker.
pub struct DeliveryContext {
    tracker: Arc<DeliveryTracker>,
    failures: Counter,
}

impl ClientContext for DeliveryContext {
    /// Global errors (all brokers down, authentication) are counted and logged; a fatal one
    /// fails the next batch.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::errors::record("verdicts producer", &error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        let ticket = TicketId(ticket as u64);
        match result {
            Ok(_) => self.tracker.delivered(ticket, Ok(())),
            Err((e, message)) => {
                use rdkafka::Message;
                self.failures.increment(1);
                tracing::error!(topic = message.topic(), error = %e, "delivery failed");
                self.tracker.delivered(
                    ticket,
                    Err(format!("delivery to {} failed: {e}", message.topic())),
                );
            }
        }
    }
}

/// Verdicts, dead letters and late events to Kafka.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryContext>,
    tracker: Arc<DeliveryTracker>,
    verdicts_topic: String,
    dlq_topic: String,
    late_topic: String,
    /// Ticket of the batch being emitted.
    current: Option<TicketId>,
    produced: [Counter; 3],
    /// Exactly-once: the transaction's settings.
    transactions: Option<Transactions>,
}

/// A transactional producer's settings and counters.
struct Transactions {
    /// The topic whose consumer offsets go in each transaction.
    source_topic: String,
    group: ConsumerGroupMetadata,
    timeout: Duration,
    committed: Counter,
    aborted: Counter,
    /// When each batch of the open transaction was handed to the producer.
    batches: Vec<std::time::Instant>,
    /// From a batch's production to its transaction's commit: what exactly-once adds to the
    /// time until a `read_committed` consumer sees a verdict.
    commit_wait: metrics::Histogram,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("verdicts_topic", &self.verdicts_topic)
            .finish_non_exhaustive()
    }
}

/// How long `flush` waits for outstanding acknowledgements before it reports them missing.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// One attempt at initialising transactions (retried while the cluster is away).
const INIT_ATTEMPT: Duration = Duration::from_secs(2);

impl KafkaSink {
    /// A producer for `config`'s cluster and topics, reporting deliveries to `tracker`.
    pub fn new(config: &KafkaConfig, tracker: Arc<DeliveryTracker>) -> Result<Self, SinkError> {
        Self::create(config, tracker, None)
    }

    /// A transactional producer (exactly-once) with `transactional_id`: fences any earlier
    /// producer with that id (the broker aborts its open transaction) and begins the first
    /// transaction. `group` is the transactions consumer's group, whose offsets each
    /// transaction commits.
    ///
    /// Waits for the cluster as long as it takes (an unreachable coordinator is retried);
    /// `None` when `stop` is set first.
    pub fn transactional(
        config: &KafkaConfig,
        tracker: Arc<DeliveryTracker>,
        transactional_id: &str,
        group: ConsumerGroupMetadata,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<Self>, SinkError> {
        let transactions = Transactions {
            source_topic: config.topics.transactions.clone(),
            group,
            timeout: config.transaction_timeout,
            committed: metrics::counter!("riskstream_kafka_transactions_total", "outcome" => "committed"),
            aborted: metrics::counter!("riskstream_kafka_transactions_total", "outcome" => "aborted"),
            batches: Vec::new(),
            commit_wait: metrics::histogram!("riskstream_kafka_commit_wait_seconds"),
        };
        let sink = Self::create(config, tracker, Some((transactional_id, transactions)))?;
        let mut backoff = crate::errors::Backoff::default();
        loop {
            // Short attempts, so that a stop is seen while the cluster is away.
            match sink.producer.init_transactions(INIT_ATTEMPT) {
                Ok(()) => break,
                Err(e) => {
                    if let Some(fatal) = crate::errors::record("verdicts producer", &e, "") {
                        return Err(SinkError::Stream {
                            name: sink.verdicts_topic.clone(),
                            message: fatal,
                        });
                    }
                    if !backoff.wait(stop) {
                        return Ok(None);
                    }
                }
            }
        }
        sink.producer
            .begin_transaction()
            .map_err(|e| stream_error(&sink.verdicts_topic, e))?;
        tracing::info!(
            transactional_id,
            "transactional producer ready; earlier instances fenced"
        );
        Ok(Some(sink))
    }

    fn create(
        config: &KafkaConfig,
        tracker: Arc<DeliveryTracker>,
        transactional: Option<(&str, Transactions)>,
    ) -> Result<Self, SinkError> {
        let context = DeliveryContext {
            tracker: tracker.clone(),
            failures: metrics::counter!("riskstream_kafka_delivery_failures_total"),
        };
        let mut client = client_config(config, Role::Producer);
        if let Some((id, _)) = &transactional {
            let timeout = config.transaction_timeout.as_millis().to_string();
            // A transactional producer cannot wait forever for a message: it must be
            // delivered or failed within the transaction's life.
            client
                .set("transactional.id", *id)
                .set("transaction.timeout.ms", &timeout)
                .set("message.timeout.ms", &timeout);
        }
        let producer = client
            .create_with_context(context)
            .map_err(|e| stream_error(&config.topics.verdicts, e))?;
        let topic_counter = |t: &str| metrics::counter!("riskstream_kafka_produced_total", "topic" => t.to_string());
        Ok(Self {
            produced: [
                topic_counter(&config.topics.verdicts),
                topic_counter(&config.topics.dlq),
                topic_counter(&config.topics.late),
            ],
            producer,
            tracker,
            verdicts_topic: config.topics.verdicts.clone(),
            dlq_topic: config.topics.dlq.clone(),
            late_topic: config.topics.late.clone(),
            current: None,
            transactions: transactional.map(|(_, t)| t),
        })
    }

    /// The ticket of the batch being emitted; fails once a delivery has failed permanently
    /// (checked once per call, not per message).
    fn ticket(&mut self) -> Result<TicketId, SinkError> {
        if let Some(message) = self
            .tracker
            .failure()
            .or_else(|| crate::errors::fatal_error().map(str::to_string))
        {
            return Err(SinkError::Stream {
                name: self.verdicts_topic.clone(),
                message,
            });
        }
        Ok(*self.current.get_or_insert_with(|| self.tracker.open()))
    }

    /// Hands one message to the producer, waiting while its queue is full. The caller has
    /// counted it with [`DeliveryTracker::sent`].
    fn send(
        &self,
        ticket: TicketId,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), SinkError> {
        let mut record = BaseRecord::with_opaque_to(topic, ticket.0 as usize).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The producer's queue is bounded: wait for acknowledgements to drain it.
                    // The scorer backs up behind us and the source pauses.
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(stream_error(topic, e)),
            }
        }
    }

    /// Sends `n` messages of `ticket` made by `message(i)`, counting them in the tracker once;
    /// those not handed over after an error are uncounted.
    fn send_all<'m>(
        &self,
        ticket: TicketId,
        n: usize,
        mut message: impl FnMut(usize) -> Message<'m>,
    ) -> Result<(), SinkError> {
        self.tracker.sent(ticket, n);
        for i in 0..n {
            let m = message(i);
            if let Err(e) = self.send(ticket, m.topic, m.key, m.payload, m.headers) {
                self.tracker.unsent(ticket, n - i);
                return Err(e);
            }
        }
        Ok(())
    }

    fn letters(
        &mut self,
        kind: Letters,
        source: &str,
        raw: &RawBatch,
        letters: &[DeadLetter],
    ) -> Result<(), SinkError> {
        let ticket = self.ticket()?;
        let (topic, counter) = match kind {
            Letters::Dead => (&self.dlq_topic, &self.produced[1]),
            Letters::Late => (&self.late_topic, &self.produced[2]),
        };
        self.send_all(ticket, letters.len(), |i| {
            let d = &letters[i];
            let position = raw.position(d.record);
            let headers = OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: "reason",
                    value: Some(d.reason.as_str()),
                })
                .insert(Header {
                    key: "detail",
                    value: Some(d.detail.as_str()),
                })
                .insert(Header {
                    key: "source_topic",
                    value: Some(source),
                })
                .insert(Header {
                    key: "source_partition",
                    value: Some(position.partition.to_string().as_str()),
                })
                .insert(Header {
                    key: "source_offset",
                    value: Some(position.offset.to_string().as_str()),
                });
            Message {
                topic,
                key: None,
                payload: raw.record(d.record),
                headers: Some(headers),
            }
        })?;
        counter.increment(letters.len() as u64);
        Ok(())
    }
}

/// Which side output a batch of letters goes to.
#[derive(Debug, Clone, Copy)]
enum Letters {
    Dead,
    Late,
}

/// One message for [`KafkaSink::send_all`].
struct Message<'a> {
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: Option<OwnedHeaders>,
}

impl Sink for KafkaSink {
    fn verdicts(&mut self, verdicts: &VerdictBatch) -> Result<(), SinkError> {
        let ticket = self.ticket()?;
        self.send_all(ticket, verdicts.len(), |i| {
            let (key, payload, _) = verdicts.get(i);
            Message {
                topic: &self.verdicts_topic,
                key: Some(key),
                payload,
                headers: None,
            }
        })?;
        self.produced[0].increment(verdicts.len() as u64);
        Ok(())
    }

    fn dead_letters(
        &mut self,
        source: &str,
        raw: &RawBatch,
        dead: &[DeadLetter],
    ) -> Result<(), SinkError> {
        self.letters(Letters::Dead, source, raw, dead)
    }

    fn late(&mut self, source: &str, raw: &RawBatch, late: &[DeadLetter]) -> Result<(), SinkError> {
        self.letters(Letters::Late, source, raw, late)
    }

    fn end_batch(&mut self, raw: &RawBatch) -> Result<(), SinkError> {
        if let Some(t) = &mut self.transactions {
            t.batches.push(std::time::Instant::now());
        }
        let ticket = self.ticket()?;
        self.tracker.seal(ticket, raw.positions());
        self.current = None;
        Ok(())
    }

    /// Waits until the broker acknowledged every message sent.
    fn commit(&mut self, offsets: &std::collections::BTreeMap<i32, i64>) -> Result<(), SinkError> {
        let Some(t) = &mut self.transactions else {
            return Ok(());
        };
        let err = |e| stream_error(&self.verdicts_topic, e);
        let mut list = TopicPartitionList::new();
        for (&p, &offset) in offsets {
            list.add_partition_offset(&t.source_topic, p, Offset::Offset(offset))
                .map_err(err)?;
        }
        let committed = self
            .producer
            .send_offsets_to_transaction(&list, &t.group, t.timeout)
            .and_then(|()| self.producer.commit_transaction(t.timeout));
        if let Err(e) = committed {
            t.aborted.increment(1);
            if let Err(abort) = self.producer.abort_transaction(t.timeout) {
                tracing::error!(error = %abort, "cannot abort the transaction either");
            }
            return Err(err(e));
        }
        t.committed.increment(1);
        let now = std::time::Instant::now();
        for sent in t.batches.drain(..) {
            t.commit_wait.record((now - sent).as_secs_f64());
        }
        self.producer.begin_transaction().map_err(err)?;
        // Everything produced so far is delivered: the tracker's failures would have failed
        // the commit.
        match self.tracker.failure() {
            Some(message) => Err(SinkError::Stream {
                name: self.verdicts_topic.clone(),
                message,
            }),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.producer
            .flush(FLUSH_TIMEOUT)
            .map_err(|e| stream_error(&self.verdicts_topic, e))?;
        match self.tracker.failure() {
            Some(message) => Err(SinkError::Stream {
                name: self.verdicts_topic.clone(),
                message,
            }),
            None => Ok(()),
        }
    }
}

fn stream_error(topic: &str, e: KafkaError) -> SinkError {
    SinkError::Stream {
        name: topic.to_string(),
        message: e.to_string(),
    }
}

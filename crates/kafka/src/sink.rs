//! The Kafka sink: verdicts to the verdicts topic (keyed by event id), dead letters and late
//! events to their topics as the original bytes with reason headers.
//!
//! Every message carries its batch's ticket; delivery reports feed the [`DeliveryTracker`], from
//! which the source commits offsets (at-least-once). The sink never retries on its own: the
//! producer retries transient errors indefinitely (idempotent, `acks=all`); a permanent failure
//! stops the pipeline with its offsets uncommitted.

use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use riskstream_common::{DeadLetter, KafkaConfig, RawBatch};
use riskstream_pipeline::{Sink, SinkError, VerdictBatch};

use crate::acks::{DeliveryTracker, TicketId};
use crate::{client_config, Role};

/// Routes delivery reports to the tracker.
pub struct DeliveryContext {
    tracker: Arc<DeliveryTracker>,
    failures: Counter,
}

impl ClientContext for DeliveryContext {}

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

impl KafkaSink {
    /// A producer for `config`'s cluster and topics, reporting deliveries to `tracker`.
    pub fn new(config: &KafkaConfig, tracker: Arc<DeliveryTracker>) -> Result<Self, SinkError> {
        let context = DeliveryContext {
            tracker: tracker.clone(),
            failures: metrics::counter!("riskstream_kafka_delivery_failures_total"),
        };
        let producer = client_config(config, Role::Producer)
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
        })
    }

    /// The ticket of the batch being emitted; fails once a delivery has failed permanently
    /// (checked once per call, not per message).
    fn ticket(&mut self) -> Result<TicketId, SinkError> {
        if let Some(message) = self.tracker.failure() {
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
        let ticket = self.ticket()?;
        self.tracker.seal(ticket, raw.positions());
        self.current = None;
        Ok(())
    }

    /// Waits until the broker acknowledged every message sent.
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

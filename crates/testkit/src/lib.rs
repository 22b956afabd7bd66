//! Helpers the crates' tests share: a Kafka-protocol broker with the pipeline's topics
//! (librdkafka's mock cluster, in process), a producer of payment events, a reader of topics
//! from their beginning, and waiting for a condition with a deadline instead of for a time.
//!
//! What it must not do: stand in for a component under test. Everything here talks to the
//! real broker with real clients; a test's assertions stay in the test.

use std::error::Error;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
pub use riskstream_kafka::EmbeddedBroker;

pub type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

/// The pipeline's topics with the partition counts the tests assume.
pub const PIPELINE_TOPICS: &[(&str, i32)] = &[
    ("transactions", 4),
    ("verdicts", 4),
    ("dlq", 1),
    ("late", 1),
    ("labels", 1),
];

/// How often waiting looks again.
const POLL: Duration = Duration::from_millis(10);

/// A one-broker cluster with `topics` (name, partitions).
pub fn broker(topics: &[(&str, i32)]) -> TestResult<EmbeddedBroker> {
    let broker = EmbeddedBroker::start(1)?;
    for (topic, partitions) in topics {
        broker.create_topic(topic, *partitions)?;
    }
    Ok(broker)
}

/// Waits until `condition` holds, looking every 10 ms; an error naming `what` after `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> TestResult {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: not so after {timeout:?}").into());
        }
        std::thread::sleep(POLL);
    }
}

/// Milliseconds since the epoch, as the pipeline's clock has it.
pub fn now_ms() -> i64 {
    riskstream_pipeline::source::now_ms()
}

/// A payment event of the default schema (a customer out of seven, one terminal, card present).
pub fn event(id: &str, ts_ms: i64, amount: f64) -> String {
    format!(
        r#"{{"tx_id":"{id}","ts":{ts_ms},"customer_id":"c{}","terminal_id":"t1","amount":{amount},"tx_type":"CP"}}"#,
        id.len() % 7
    )
}

pub type EventProducer = ThreadedProducer<DefaultProducerContext>;

/// A producer that retries for ever (a test's broker outage is waited out).
pub fn producer(bootstrap: &str) -> TestResult<EventProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "0")
        .set("linger.ms", "2")
        .set("reconnect.backoff.max.ms", "500")
        .create()?)
}

/// Queues `payload` for `topic`'s `partition`, waiting while the producer's queue is full.
pub fn send(producer: &EventProducer, topic: &str, partition: i32, payload: &str) {
    send_record(
        producer,
        BaseRecord::<(), str>::to(topic)
            .partition(partition)
            .payload(payload),
    );
}

/// Queues `record`, waiting while the producer's queue is full.
pub fn send_record<K, P>(producer: &EventProducer, mut record: BaseRecord<'_, K, P>)
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                // The queue drains as the broker acknowledges: a pacing pause, not a wait
                // for something to have happened.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Sends `events` (partition, payload) to `topic` and waits until the broker has them all.
pub fn produce(producer: &EventProducer, topic: &str, events: &[(i32, String)]) -> TestResult {
    for (partition, payload) in events {
        send(producer, topic, *partition, payload);
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// One record read from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }

    /// A header's value as text (empty when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    pub fn json(&self) -> TestResult<serde_json::Value> {
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// Reads `topics` (every partition) from their beginning until `done` says the records so far
/// suffice, then on to the end of every partition as it is at that moment (so that
/// duplicates already written are seen too). Fails after `timeout` if `done` never holds.
/// `read_committed`: only records of committed transactions.
pub fn read_until(
    bootstrap: &str,
    topics: &[&str],
    read_committed: bool,
    timeout: Duration,
    mut done: impl FnMut(&[Record]) -> bool,
) -> TestResult<Vec<Record>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "riskstream-testkit-reader")
        .set("enable.auto.commit", "false")
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()?;
    let mut list = TopicPartitionList::new();
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                list.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                partitions.push((topic.to_string(), p.id()));
            }
        }
    }
    if partitions.is_empty() {
        return Err(format!("no partitions in {topics:?}").into());
    }
    consumer.assign(&list)?;
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    // Per partition, the offset to read up to once `done` holds.
    let mut ends: Option<Vec<((String, i32), i64)>> = None;
    let mut next: std::collections::HashMap<(String, i32), i64> = Default::default();
    loop {
        if ends.is_none() && done(&records) {
            let mut at = Vec::new();
            for (topic, partition) in &partitions {
                let (_, high) =
                    consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10))?;
                at.push(((topic.clone(), *partition), high));
            }
            ends = Some(at);
        }
        if let Some(ends) = &ends {
            // With read_committed, the end of a partition may be a transaction marker that
            // is never delivered: the position (the next offset to fetch) tells.
            let position = consumer.position()?;
            let reached = ends.iter().all(|((topic, partition), high)| {
                let read = next.get(&(topic.clone(), *partition)).copied().unwrap_or(0);
                let fetched = position
                    .find_partition(topic, *partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(0);
                read.max(fetched) >= *high
            });
            if reached {
                return Ok(records);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "reading {topics:?}: {} records after {timeout:?}, not yet what was expected",
                records.len()
            )
            .into());
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        next.insert(
            (message.topic().to_string(), message.partition()),
            message.offset() + 1,
        );
        records.push(Record {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().unwrap_or_default().to_vec(),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
}

/// Reads `topics` from their beginning to their end as they are now.
pub fn read_to_end(
    bootstrap: &str,
    topics: &[&str],
    read_committed: bool,
) -> TestResult<Vec<Record>> {
    read_until(
        bootstrap,
        topics,
        read_committed,
        Duration::from_secs(60),
        |_| true,
    )
}

/// Committed offsets of consumer group `group` per partition of `topic` (-1: none).
pub fn committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> TestResult<Vec<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect())
}

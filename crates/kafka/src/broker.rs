//! The embedded Kafka-protocol broker: librdkafka's mock cluster, in process. `riskstream demo`
//! runs the pipeline against it and `riskstream broker` serves it to other processes.
//!
//! It speaks the real protocol (produce, fetch, consumer groups, offsets, transactions), so the
//! clients exercised against it are the ones used against a real cluster. Its transactions
//! come from the vendored `rdkafka-sys` (`vendor/rdkafka-sys/RISKSTREAM.md`): commit and abort
//! markers, the last stable offset and aborted transactions for `read_committed` consumers,
//! offsets committed with the transaction, and a restarted `transactional.id` fencing its
//! predecessor and aborting what it left open; transaction timeouts are not enforced. It keeps at most
//! 5 MB and 100,000 message sets per partition (a librdkafka limit): give topics enough
//! partitions and pace producers by consumer lag. Nothing else here may rely on that limit.
//!
//! It answers a fetch that found no data only after the fetch's whole `fetch.wait.max.ms`, even
//! when data arrives meanwhile (a real broker answers as soon as there is some): a caught-up
//! consumer waits that long for each new message. [`EmbeddedBroker::connect`] shortens it.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use riskstream_common::KafkaConfig;

/// `fetch.wait.max.ms` for consumers of the embedded broker (see the module doc).
pub const FETCH_WAIT_MAX_MS: &str = "2";

/// The embedded broker could not be started or configured.
#[derive(Debug, thiserror::Error)]
#[error("embedded broker: {0}")]
pub struct BrokerError(String);

/// An in-process Kafka-protocol cluster; stops when dropped.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap", &self.bootstrap_servers())
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers on loopback ports.
    pub fn start(brokers: i32) -> Result<Self, BrokerError> {
        let cluster = MockCluster::new(brokers).map_err(|e| BrokerError(e.to_string()))?;
        Ok(Self { cluster })
    }

    /// The bootstrap address clients connect to.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Points `kafka` at this broker, with consumers waiting at most [`FETCH_WAIT_MAX_MS`] for
    /// an empty fetch (unless `kafka.consumer` sets it).
    pub fn connect(&self, kafka: &mut KafkaConfig) {
        kafka.brokers = self.bootstrap_servers();
        kafka
            .consumer
            .entry("fetch.wait.max.ms".into())
            .or_insert_with(|| FETCH_WAIT_MAX_MS.into());
    }

    /// Creates `topic` with `partitions` partitions (replication 1).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BrokerError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(|e| BrokerError(format!("cannot create topic {topic}: {e}")))
    }

    /// Takes broker `id` (or all, with -1) down: connections are refused until [`Self::up`].
    pub fn down(&self, id: i32) -> Result<(), BrokerError> {
        self.cluster
            .broker_down(id)
            .map_err(|e| BrokerError(e.to_string()))
    }

    /// Brings broker `id` (or all, with -1) back.
    pub fn up(&self, id: i32) -> Result<(), BrokerError> {
        self.cluster
            .broker_up(id)
            .map_err(|e| BrokerError(e.to_string()))
    }

    /// The mock cluster itself, for fault injection in tests (request errors, round-trip time).
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

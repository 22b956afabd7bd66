//! Kafka client errors: which ones are waited out and which end the instance.
//!
//! librdkafka reconnects, refreshes metadata and retries requests by itself; what it reports
//! meanwhile (a transport failure, all brokers down, a leader not available, a topic not known
//! yet because it is being created, a request timed out) says that the cluster is not there
//! *yet*. Those are logged (at most every few seconds per kind), counted in
//! `riskstream_kafka_errors_total{kind}` and waited out. What no retry can fix — a bootstrap
//! address that does not parse, an authentication or authorization failure, a broker too old
//! for the protocol, a fatal producer error — ends the instance with a message saying what to fix.
//!
//! What it must not do: decide anything but the kind and the severity of an error; the clients
//! decide how they wait.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

/// What an error says about the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// The `kind` label of `riskstream_kafka_errors_total`.
    pub kind: &'static str,
    /// No retry can fix it: the instance must stop and a person change its configuration.
    pub fatal: bool,
}

/// Every `kind` that [`classify`] gives.
pub const KINDS: [&str; 11] = [
    "transport",
    "leader_not_available",
    "unknown_topic",
    "timeout",
    "queue_full",
    "transaction_retriable",
    "other",
    "config",
    "authentication",
    "unsupported_broker",
    "fatal",
];

/// Registers `riskstream_kafka_errors_total` at zero for every kind, so that while the cluster is
/// healthy a dashboard or an alert sees a rate of 0 instead of no series at all.
pub fn register_metrics() {
    for kind in KINDS {
        metrics::counter!("riskstream_kafka_errors_total", "kind" => kind).increment(0);
    }
}

/// The kind and severity of `error`.
pub fn classify(error: &KafkaError) -> Classified {
    use RDKafkaErrorCode as C;
    let transient = |kind| Classified { kind, fatal: false };
    let fatal = |kind| Classified { kind, fatal: true };
    if let KafkaError::Transaction(e) = error {
        if e.is_fatal() {
            return fatal("fatal");
        }
        if e.is_retriable() {
            return transient("transaction_retriable");
        }
    }
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => return fatal("config"),
        KafkaError::MessageConsumptionFatal(_) => return fatal("fatal"),
        _ => {}
    }
    let Some(code) = error.rdkafka_error_code() else {
        return transient("other");
    };
    match code {
        C::BrokerTransportFailure | C::AllBrokersDown | C::Resolve | C::BrokerNotAvailable => {
            transient("transport")
        }
        C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NotCoordinator
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::RebalanceInProgress
        | C::PreferredLeaderNotAvailable => transient("leader_not_available"),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => {
            transient("unknown_topic")
        }
        C::OperationTimedOut | C::RequestTimedOut | C::MessageTimedOut | C::TimedOutQueue => {
            transient("timeout")
        }
        C::QueueFull => transient("queue_full"),
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SSL => fatal("authentication"),
        C::UnsupportedVersion | C::UnsupportedFeature | C::UnsupportedForMessageFormat => {
            fatal("unsupported_broker")
        }
        C::InvalidArgument | C::Conflict => fatal("config"),
        C::Fatal => fatal("fatal"),
        _ => transient("other"),
    }
}

/// What to tell a person about a fatal error.
fn advice(kind: &str) -> &'static str {
    match kind {
        "authentication" => "check the credentials and ACLs in [kafka.properties] (security.protocol, sasl.*, ssl.*)",
        "unsupported_broker" => "the broker does not support what riskstream needs (Kafka 2.5 or newer)",
        "config" => "check kafka.brokers (host:port[,host:port]) and the librdkafka settings in [kafka.*]",
        _ => "see the librdkafka error above",
    }
}

/// The first fatal error any Kafka client of this process met, with what to fix.
static FATAL: OnceLock<String> = OnceLock::new();

/// The first fatal error any Kafka client of this process reported, if one did: every client
/// loop stops when it sees one.
pub fn fatal_error() -> Option<&'static str> {
    FATAL.get().map(String::as_str)
}

/// Counts and logs `error`, met by `client`; a fatal one is remembered for [`fatal_error`] and
/// returned as the message to stop with.
pub fn record(client: &str, error: &KafkaError, reason: &str) -> Option<String> {
    // Reaching a partition's end is news, not an error (librdkafka reports it as one).
    if matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
    {
        return None;
    }
    let classified = classify(error);
    metrics::counter!("riskstream_kafka_errors_total", "kind" => classified.kind).increment(1);
    if classified.fatal {
        let message = format!(
            "{client}: {error}{}{reason}: {}",
            if reason.is_empty() { "" } else { ": " },
            advice(classified.kind)
        );
        tracing::error!(client, kind = classified.kind, "{message}");
        let _ = FATAL.set(message.clone());
        return Some(message);
    }
    if should_log(client, classified.kind) {
        tracing::warn!(client, kind = classified.kind, error = %error, reason, "Kafka not available (retrying)");
    }
    None
}

/// At most one log line per client and kind every [`LOG_EVERY`]: an outage reports the same
/// error many times a second.
fn should_log(client: &str, kind: &'static str) -> bool {
    static LAST: Mutex<Vec<(String, &'static str, Instant)>> = Mutex::new(Vec::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match last.iter_mut().find(|(c, k, _)| c == client && *k == kind) {
        Some((_, _, at)) if at.elapsed() < LOG_EVERY => false,
        Some((_, _, at)) => {
            *at = Instant::now();
            true
        }
        None => {
            last.push((client.to_string(), kind, Instant::now()));
            true
        }
    }
}

const LOG_EVERY: Duration = Duration::from_secs(5);

/// A client context that counts and logs librdkafka's global errors (instead of logging each
/// one at `error` level) and remembers fatal ones. `name` says which client it is.
#[derive(Debug, Clone)]
pub struct WatchedContext {
    pub name: &'static str,
}

impl ClientContext for WatchedContext {
    fn error(&self, error: KafkaError, reason: &str) {
        record(self.name, &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for WatchedContext {}

impl rdkafka::producer::ProducerContext for WatchedContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Backoff for a client waiting for the cluster: doubles from 100 ms up to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        wait
    }

    /// Waits [`Self::next_wait`], in short steps so that `stop` is seen within 100 ms;
    /// `false` when it was set.
    pub fn wait(&mut self, stop: &std::sync::atomic::AtomicBool) -> bool {
        let until = Instant::now() + self.next_wait();
        while Instant::now() < until {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
        !stop.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_waited_out_and_misconfiguration_is_not() {
        use RDKafkaErrorCode as C;
        for code in [
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::OperationTimedOut,
            C::Resolve,
        ] {
            let c = classify(&KafkaError::MessageConsumption(code));
            assert!(!c.fatal, "{code:?} must be waited out");
        }
        for code in [
            C::Authentication,
            C::SaslAuthenticationFailed,
            C::TopicAuthorizationFailed,
            C::UnsupportedVersion,
            C::Fatal,
        ] {
            let c = classify(&KafkaError::Global(code));
            assert!(c.fatal, "{code:?} must end the instance");
        }
        assert!(classify(&KafkaError::ClientCreation("bad".into())).fatal);
        // Every kind given is one registered at start.
        for error in [
            KafkaError::MessageConsumption(C::BrokerTransportFailure),
            KafkaError::MessageConsumption(C::LeaderNotAvailable),
            KafkaError::MessageConsumption(C::UnknownTopic),
            KafkaError::MessageConsumption(C::RequestTimedOut),
            KafkaError::MessageConsumption(C::QueueFull),
            KafkaError::MessageConsumption(C::Unknown),
            KafkaError::Global(C::SaslAuthenticationFailed),
            KafkaError::Global(C::UnsupportedVersion),
            KafkaError::Global(C::InvalidArgument),
            KafkaError::Global(C::Fatal),
            KafkaError::Canceled,
        ] {
            let kind = classify(&error).kind;
            assert!(KINDS.contains(&kind), "{kind} is not in KINDS");
        }
        assert_eq!(
            classify(&KafkaError::MessageConsumption(C::BrokerTransportFailure)).kind,
            "transport"
        );
    }
}

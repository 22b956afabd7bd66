//! The labels consumer: feedback events `{"tx_id": …, "fraud": true|false|0|1, …}` from the
//! optional labels topic, validated, counted and kept (the newest per transaction, bounded) so
//! that label-driven features and backtests can use them.
//!
//! It runs on its own thread and never touches the scoring path.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use riskstream_common::KafkaConfig;

use crate::{client_config, Role};

/// One validated label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub tx_id: String,
    pub fraud: bool,
}

/// Why a label message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("field `tx_id` is missing or not a non-empty string")]
    TxId,
    #[error("field `fraud` is missing or not a boolean, 0 or 1")]
    Fraud,
}

impl Label {
    /// Parses and validates one label message.
    pub fn parse(bytes: &[u8]) -> Result<Self, LabelError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| LabelError::NotJson(e.to_string()))?;
        let object = value
            .as_object()
            .ok_or_else(|| LabelError::NotJson("not an object".into()))?;
        let tx_id = object
            .get("tx_id")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or(LabelError::TxId)?;
        let fraud = match object.get("fraud") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(v) if v.as_u64() == Some(0) => false,
            Some(v) if v.as_u64() == Some(1) => true,
            _ => return Err(LabelError::Fraud),
        };
        Ok(Self {
            tx_id: tx_id.to_string(),
            fraud,
        })
    }
}

/// The newest label per transaction, at most `capacity` transactions (oldest dropped first).
#[derive(Debug)]
pub struct LabelStore {
    capacity: usize,
    inner: Mutex<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    by_tx: HashMap<String, bool>,
    order: VecDeque<String>,
    valid: u64,
    invalid: u64,
    fraud: u64,
}

impl LabelStore {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(StoreInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one label message; returns why it was rejected, if it was.
    pub fn record(&self, bytes: &[u8]) -> Result<(), LabelError> {
        let label = Label::parse(bytes);
        let mut inner = self.lock();
        let label = match label {
            Ok(l) => l,
            Err(e) => {
                inner.invalid += 1;
                return Err(e);
            }
        };
        inner.valid += 1;
        inner.fraud += u64::from(label.fraud);
        if inner
            .by_tx
            .insert(label.tx_id.clone(), label.fraud)
            .is_none()
        {
            inner.order.push_back(label.tx_id);
            while inner.order.len() > self.capacity {
                if let Some(old) = inner.order.pop_front() {
                    inner.by_tx.remove(&old);
                }
            }
        }
        Ok(())
    }

    /// The label of `tx_id`, if one was received (and not yet dropped).
    pub fn get(&self, tx_id: &str) -> Option<bool> {
        self.lock().by_tx.get(tx_id).copied()
    }

    /// Valid labels, invalid messages, and valid labels marking fraud, so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let inner = self.lock();
        (inner.valid, inner.invalid, inner.fraud)
    }

    /// Labels currently kept.
    pub fn len(&self) -> usize {
        self.lock().by_tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A thread consuming the labels topic into a [`LabelStore`] until `shutdown` is set.
#[derive(Debug)]
pub struct LabelsConsumer {
    thread: JoinHandle<()>,
}

impl LabelsConsumer {
    /// Subscribes to `topic` as group `<kafka.group_id>-labels` (committing automatically:
    /// labels are idempotent) and starts consuming.
    pub fn start(
        config: &KafkaConfig,
        topic: &str,
        store: Arc<LabelStore>,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let mut client = client_config(config, Role::Consumer);
        client
            .set("group.id", format!("{}-labels", config.group_id))
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "true");
        let consumer: BaseConsumer = client.create()?;
        consumer.subscribe(&[topic])?;
        let topic = topic.to_string();
        let valid = metrics::counter!("riskstream_labels_total", "outcome" => "valid");
        let invalid = metrics::counter!("riskstream_labels_total", "outcome" => "invalid");
        let thread = std::thread::Builder::new()
            .name("labels".into())
            .spawn(move || {
                while !shutdown.load(Ordering::Acquire) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => match store.record(m.payload().unwrap_or_default()) {
                            Ok(()) => valid.increment(1),
                            Err(e) => {
                                invalid.increment(1);
                                tracing::debug!(%topic, partition = m.partition(), offset = m.offset(), error = %e, "invalid label");
                            }
                        },
                        Some(Err(e)) => {
                            // Waited out; a fatal error stops the pipeline, which stops this.
                            crate::errors::record("labels consumer", &e, "");
                        }
                        None => {}
                    }
                }
            })
            .map_err(|e| {
                rdkafka::error::KafkaError::ClientCreation(format!("cannot start labels thread: {e}"))
            })?;
        Ok(Self { thread })
    }

    /// Waits for the thread to end (after `shutdown` was set).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_validated_and_kept_bounded() {
        let store = LabelStore::new(2);
        assert!(store
            .record(br#"{"tx_id":"a","fraud":1,"scenario":3}"#)
            .is_ok());
        assert!(store.record(br#"{"tx_id":"b","fraud":false}"#).is_ok());
        assert_eq!(store.record(br#"{"tx_id":"c"}"#), Err(LabelError::Fraud));
        assert_eq!(store.record(br#"{"fraud":true}"#), Err(LabelError::TxId));
        assert!(matches!(store.record(b"nope"), Err(LabelError::NotJson(_))));
        assert_eq!(
            store.record(br#"{"tx_id":"d","fraud":2}"#),
            Err(LabelError::Fraud)
        );
        assert!(store.record(br#"{"tx_id":"e","fraud":true}"#).is_ok());
        assert_eq!(store.counts(), (3, 4, 2));
        // Capacity 2: the oldest label went.
        assert_eq!(store.get("a"), None);
        assert_eq!(store.get("b"), Some(false));
        assert_eq!(store.get("e"), Some(true));
        assert_eq!(store.len(), 2);
    }
}

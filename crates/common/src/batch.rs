//! Raw records on their way into the pipeline, and records that leave it as dead letters.
//!
//! A [`RawBatch`] is filled by a source (file, Kafka) and read by the decoder. It keeps every
//! record's bytes in one contiguous buffer that is cleared and reused batch after batch, so
//! reading events allocates per batch, never per event.

use std::fmt;

use crate::Position;

/// Up to a micro-batch of raw records with their positions and ingestion times.
#[derive(Debug, Default, Clone)]
pub struct RawBatch {
    data: Vec<u8>,
    ends: Vec<usize>,
    positions: Vec<Position>,
    ingest_ms: Vec<i64>,
}

impl RawBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties the batch, keeping its allocations for the next one.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
        self.positions.clear();
        self.ingest_ms.clear();
    }

    /// Appends one record. `ingest_ms` is when the record entered riskstream (or, for Kafka, when
    /// the broker stamped it), in epoch milliseconds; verdict latency is measured from it.
    pub fn push(&mut self, record: &[u8], position: Position, ingest_ms: i64) {
        self.data.extend_from_slice(record);
        self.ends.push(self.data.len());
        self.positions.push(position);
        self.ingest_ms.push(ingest_ms);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Total bytes of all records.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// The bytes of record `i`.
    pub fn record(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    pub fn position(&self, i: usize) -> Position {
        self.positions[i]
    }

    pub fn ingest_ms(&self, i: usize) -> i64 {
        self.ingest_ms[i]
    }

    /// The positions of all records, in order.
    pub fn positions(&self) -> &[Position] {
        &self.positions
    }
}

/// Why a record was routed to the dead-letter output. The string form is a stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// Larger than `schema.max_event_bytes`.
    Oversized,
    /// Not parseable as JSON (including empty records and trailing garbage).
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// A required field is absent.
    MissingField,
    /// A required field is `null`.
    NullField,
    /// A field has a JSON type its declared type cannot take.
    WrongType,
    /// A field has the right JSON type but a value that cannot be converted (e.g. a bad date).
    InvalidValue,
    /// The event time lies further in the future than `max_future_skew` allows (policy `dlq`).
    FutureTimestamp,
    /// The event time is below the watermark by more than `allowed_lateness` (late output).
    TooLate,
}

impl DeadReason {
    pub const ALL: [DeadReason; 9] = [
        DeadReason::Oversized,
        DeadReason::InvalidJson,
        DeadReason::NotAnObject,
        DeadReason::MissingField,
        DeadReason::NullField,
        DeadReason::WrongType,
        DeadReason::InvalidValue,
        DeadReason::FutureTimestamp,
        DeadReason::TooLate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Oversized => "oversized",
            DeadReason::InvalidJson => "invalid_json",
            DeadReason::NotAnObject => "not_an_object",
            DeadReason::MissingField => "missing_field",
            DeadReason::NullField => "null_field",
            DeadReason::WrongType => "wrong_type",
            DeadReason::InvalidValue => "invalid_value",
            DeadReason::FutureTimestamp => "future_timestamp",
            DeadReason::TooLate => "too_late",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that could not be scored: which record of its [`RawBatch`], why, and in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Index of the record in its raw batch (its bytes and position are read from there).
    pub record: usize,
    pub reason: DeadReason,
    /// A sentence a person can act on, e.g. "required field `amount` is null".
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_kept_apart_and_reuse_the_buffer() {
        let mut raw = RawBatch::new();
        let pos = |o| Position {
            partition: 0,
            offset: o,
        };
        raw.push(b"{\"a\":1}", pos(1), 10);
        raw.push(b"", pos(2), 11);
        raw.push(b"xyz", pos(3), 12);
        assert_eq!(raw.len(), 3);
        assert_eq!(raw.record(0), b"{\"a\":1}");
        assert_eq!(raw.record(1), b"");
        assert_eq!(raw.record(2), b"xyz");
        assert_eq!(raw.position(2), pos(3));
        assert_eq!(raw.ingest_ms(1), 11);
        let capacity = raw.data.capacity();
        raw.clear();
        assert!(raw.is_empty());
        raw.push(b"abc", pos(4), 13);
        assert_eq!(raw.record(0), b"abc");
        assert_eq!(raw.data.capacity(), capacity);
    }
}

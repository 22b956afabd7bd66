//! Decode: raw JSON records → an Arrow [`RecordBatch`] in the configured event schema.
//!
//! This stage owns the answer to bad input. Every record that is oversized, not JSON, not an
//! object, misses a required field, carries `null` there, or has a value of the wrong type
//! becomes a [`DeadLetter`] with a reason a person can act on; the other records of the batch
//! are decoded as usual. It must not drop a record silently, and it must not stop on bad input.
//!
//! # How
//!
//! The happy path hands the whole micro-batch to one `arrow-json` decoder (vectorised, no
//! per-event allocation). Only when that fails does the decoder split the batch into chunks of
//! 64 records, and the chunks that fail into single records, so a batch with a few bad records
//! costs about two extra decodes of each good record. A lone failing record is then diagnosed
//! with `serde_json` to name the field and the problem; the diagnosis never runs on good records.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::json::reader::{Decoder, ReaderBuilder};
use riskstream_common::{DeadLetter, DeadReason, EventSchema, FieldType, RawBatch};
use serde_json::Value;

/// Size of the chunks a failing batch is split into before single records are tried.
const ISOLATION_CHUNK: usize = 64;

/// Failures of the decoder itself (not of the input, which becomes dead letters).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Building the Arrow decoder or assembling a batch failed: a bug, not bad input.
    #[error("internal decoder error (please report): {0}")]
    Internal(#[from] ArrowError),
}

/// The outcome of decoding one raw batch.
#[derive(Debug)]
pub struct Decoded {
    /// The decoded events, in the order of their raw records.
    pub batch: RecordBatch,
    /// For each row of `batch`, the index of its record in the raw batch.
    pub rows: Vec<u32>,
    /// The records that could not be decoded, in raw order.
    pub dead: Vec<DeadLetter>,
}

/// Turns [`RawBatch`]es into [`Decoded`] batches. Reused across batches; not shared by threads.
pub struct EventDecoder {
    schema: EventSchema,
    capacity: usize,
    /// The reusable arrow-json decoder; `None` after a failed attempt left it in an unknown state.
    decoder: Option<Decoder>,
}

impl std::fmt::Debug for EventDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventDecoder")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

enum Attempt {
    Decoded(RecordBatch),
    Failed(String),
}

impl EventDecoder {
    /// A decoder for `schema` that decodes up to `capacity` records per internal step.
    pub fn new(schema: &EventSchema, capacity: usize) -> Result<Self, DecodeError> {
        let mut this = Self {
            schema: schema.clone(),
            capacity: capacity.max(1),
            decoder: None,
        };
        this.decoder = Some(this.build()?);
        Ok(this)
    }

    /// The most records decoded in one internal step (the micro-batch size).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The Arrow schema of decoded batches.
    pub fn schema(&self) -> &SchemaRef {
        self.schema.arrow()
    }

    fn build(&self) -> Result<Decoder, DecodeError> {
        Ok(ReaderBuilder::new(Arc::clone(self.schema.arrow()))
            .with_batch_size(self.capacity)
            .with_strict_mode(false)
            .build_decoder()?)
    }

    /// Decodes every record of `raw`; bad records become dead letters.
    pub fn decode(&mut self, raw: &RawBatch) -> Result<Decoded, DecodeError> {
        let max = self.schema.max_event_bytes();
        let mut dead = Vec::new();
        let mut candidates: Vec<u32> = Vec::with_capacity(raw.len());
        for i in 0..raw.len() {
            let len = raw.record(i).len();
            if len > max {
                dead.push(DeadLetter {
                    record: i,
                    reason: DeadReason::Oversized,
                    detail: format!(
                        "record is {len} bytes; the limit is {max} (schema.max_event_bytes)"
                    ),
                });
            } else {
                candidates.push(i as u32);
            }
        }

        let mut parts = Vec::new();
        let mut rows = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(self.capacity) {
            self.decode_isolating(raw, chunk, &mut parts, &mut rows, &mut dead)?;
        }
        dead.sort_by_key(|d| d.record);

        let batch = match parts.as_slice() {
            [] => RecordBatch::new_empty(Arc::clone(self.schema.arrow())),
            [one] => one.clone(),
            _ => concat_batches(self.schema.arrow(), &parts)?,
        };
        Ok(Decoded { batch, rows, dead })
    }

    /// Decodes `idx` as one batch, or splits it until every failing record stands alone.
    fn decode_isolating(
        &mut self,
        raw: &RawBatch,
        idx: &[u32],
        parts: &mut Vec<RecordBatch>,
        rows: &mut Vec<u32>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), DecodeError> {
        if idx.is_empty() {
            return Ok(());
        }
        match self.attempt(raw, idx)? {
            Attempt::Decoded(batch) => {
                parts.push(batch);
                rows.extend_from_slice(idx);
            }
            Attempt::Failed(arrow_error) if idx.len() == 1 => {
                let record = idx[0] as usize;
                let (reason, detail) = self.diagnose(raw.record(record), &arrow_error);
                dead.push(DeadLetter {
                    record,
                    reason,
                    detail,
                });
            }
            Attempt::Failed(_) => {
                // Two levels: chunks of ISOLATION_CHUNK, then single records of the chunks that
                // fail. With bad records spread thinly this re-decodes each good record about
                // twice, far less than halving would.
                let chunk = if idx.len() > ISOLATION_CHUNK {
                    ISOLATION_CHUNK
                } else {
                    1
                };
                for part in idx.chunks(chunk) {
                    self.decode_isolating(raw, part, parts, rows, dead)?;
                }
            }
        }
        Ok(())
    }

    /// One decode of the records `idx`: all of them, or a failure (the decoder is then discarded).
    fn attempt(&mut self, raw: &RawBatch, idx: &[u32]) -> Result<Attempt, DecodeError> {
        let mut decoder = match self.decoder.take() {
            Some(d) => d,
            None => self.build()?,
        };
        for &i in idx {
            let record = raw.record(i as usize);
            let before = decoder.len();
            match decoder.decode(record) {
                Ok(read) if read == record.len() => {}
                Ok(_) => return Ok(Attempt::Failed("record not fully consumed".into())),
                Err(e) => return Ok(Attempt::Failed(e.to_string())),
            }
            // Exactly one complete JSON value per record: this catches truncated records and
            // several values on one line, which would otherwise shift rows against positions.
            if decoder.has_partial_record() || decoder.len() != before + 1 {
                return Ok(Attempt::Failed("not exactly one JSON value".into()));
            }
        }
        match decoder.flush() {
            Ok(Some(batch)) => {
                self.decoder = Some(decoder);
                Ok(Attempt::Decoded(batch))
            }
            Ok(None) => Ok(Attempt::Failed("no rows decoded".into())),
            Err(e) => Ok(Attempt::Failed(e.to_string())),
        }
    }

    /// Names the problem with a single record that arrow-json refused. Runs on bad records only.
    fn diagnose(&self, record: &[u8], arrow_error: &str) -> (DeadReason, String) {
        let text = std::str::from_utf8(record).map(str::trim);
        if let Ok("") = text {
            return (DeadReason::InvalidJson, "record is empty".to_string());
        }
        let value: Value = match serde_json::from_slice(record) {
            Ok(v) => v,
            Err(e) => return (DeadReason::InvalidJson, format!("invalid JSON: {e}")),
        };
        let Value::Object(object) = value else {
            return (
                DeadReason::NotAnObject,
                format!("expected a JSON object, found {}", describe(&value)),
            );
        };
        for field in self.schema.fields() {
            match object.get(&field.name) {
                None if field.required => {
                    return (
                        DeadReason::MissingField,
                        format!("required field `{}` is missing", field.name),
                    )
                }
                Some(Value::Null) if field.required => {
                    return (
                        DeadReason::NullField,
                        format!("required field `{}` is null", field.name),
                    )
                }
                Some(v) if !v.is_null() && !json_fits(field.ty, v) => {
                    return (
                        DeadReason::WrongType,
                        format!(
                            "field `{}` must be {}, found {}",
                            field.name,
                            field.ty.expected_json(),
                            describe(v)
                        ),
                    )
                }
                _ => {}
            }
        }
        (
            DeadReason::InvalidValue,
            format!("a field value cannot be converted: {arrow_error}"),
        )
    }
}

/// Whether a JSON value has a shape the declared type accepts (values are checked by arrow-json).
fn json_fits(ty: FieldType, v: &Value) -> bool {
    match ty {
        FieldType::String => v.is_string(),
        FieldType::Boolean => v.is_boolean(),
        FieldType::Int64 => {
            v.is_i64() || v.as_str().is_some_and(|s| s.trim().parse::<i64>().is_ok())
        }
        FieldType::Float64 => {
            v.is_number() || v.as_str().is_some_and(|s| s.trim().parse::<f64>().is_ok())
        }
        FieldType::Timestamp => v.is_string() || v.is_i64(),
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    const MAX: usize = 40;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.chars().count() > MAX => {
            format!("string \"{}…\"", s.chars().take(MAX).collect::<String>())
        }
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

//! Sinks: where verdicts and dead letters go. A sink writes; it does not score or decide.
//!
//! The JSON-lines sink here writes verdicts to one file (or stdout) and dead letters to another.
//! A Kafka sink implements the same trait with the verdicts, DLQ and late topics.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use base64::Engine;
use riskstream_common::{DeadLetter, RawBatch};

use crate::verdict::VerdictBatch;

/// A sink could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {name}: {source}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
    /// A streaming sink failed (its message names the broker or client problem).
    #[error("sink {name}: {message}")]
    Stream { name: String, message: String },
}

/// A consumer of verdicts and dead letters.
pub trait Sink {
    /// Emits the verdicts of one batch.
    fn verdicts(&mut self, verdicts: &VerdictBatch) -> Result<(), SinkError>;

    /// Emits dead letters; `raw` holds their original bytes and positions, `source` names the
    /// input they came from.
    fn dead_letters(
        &mut self,
        source: &str,
        raw: &RawBatch,
        dead: &[DeadLetter],
    ) -> Result<(), SinkError>;

    /// Emits events too late to score (the late output), with the same fields as dead letters.
    fn late(&mut self, source: &str, raw: &RawBatch, late: &[DeadLetter]) -> Result<(), SinkError>;

    /// Everything `raw` produced has been emitted: verdicts, dead letters and late events. A
    /// sink that acknowledges asynchronously (Kafka) tracks from here when the batch's source
    /// positions may be committed.
    fn end_batch(&mut self, raw: &RawBatch) -> Result<(), SinkError> {
        let _ = raw;
        Ok(())
    }

    /// Makes everything emitted so far durable (or at least handed to the OS).
    fn flush(&mut self) -> Result<(), SinkError>;

    /// Exactly-once: makes every output since the last commit visible together with the
    /// source `offsets` (per partition, the first record not covered), atomically. Sinks
    /// without transactions have nothing to do.
    fn commit(&mut self, offsets: &std::collections::BTreeMap<i32, i64>) -> Result<(), SinkError> {
        let _ = offsets;
        Ok(())
    }
}

/// Verdicts and dead letters as JSON lines.
pub struct JsonLinesSink {
    verdicts: Output,
    dlq: Output,
    late: Output,
    scratch: Vec<u8>,
}

/// One named output file.
struct Output {
    name: String,
    writer: Box<dyn Write + Send>,
}

impl Output {
    fn create(path: &Path) -> Result<Self, SinkError> {
        Ok(Self {
            name: path.display().to_string(),
            writer: open(path)?,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.writer
            .write_all(bytes)
            .map_err(|source| SinkError::Io {
                name: self.name.clone(),
                source,
            })
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.writer.flush().map_err(|source| SinkError::Io {
            name: self.name.clone(),
            source,
        })
    }
}

impl std::fmt::Debug for JsonLinesSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLinesSink")
            .field("verdicts", &self.verdicts.name)
            .field("dlq", &self.dlq.name)
            .field("late", &self.late.name)
            .finish()
    }
}

impl JsonLinesSink {
    /// Creates (truncates) the verdict file (`-` meaning stdout), the dead-letter file and the
    /// late-event file.
    pub fn create(verdicts: &Path, dlq: &Path, late: &Path) -> Result<Self, SinkError> {
        Ok(Self {
            verdicts: Output::create(verdicts)?,
            dlq: Output::create(dlq)?,
            late: Output::create(late)?,
            scratch: Vec::new(),
        })
    }
}

fn open(path: &Path) -> Result<Box<dyn Write + Send>, SinkError> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(BufWriter::with_capacity(1 << 20, io::stdout())));
    }
    let file = File::create(path).map_err(|source| SinkError::Io {
        name: path.display().to_string(),
        source,
    })?;
    Ok(Box::new(BufWriter::with_capacity(1 << 20, file)))
}

impl Sink for JsonLinesSink {
    fn verdicts(&mut self, verdicts: &VerdictBatch) -> Result<(), SinkError> {
        self.verdicts.write(verdicts.as_json_lines())
    }

    fn dead_letters(
        &mut self,
        source: &str,
        raw: &RawBatch,
        dead: &[DeadLetter],
    ) -> Result<(), SinkError> {
        self.scratch.clear();
        for d in dead {
            encode_dead_letter(&mut self.scratch, source, raw, d);
        }
        self.dlq.write(&self.scratch)
    }

    fn late(&mut self, source: &str, raw: &RawBatch, late: &[DeadLetter]) -> Result<(), SinkError> {
        self.scratch.clear();
        for d in late {
            encode_dead_letter(&mut self.scratch, source, raw, d);
        }
        self.late.write(&self.scratch)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.verdicts.flush()?;
        self.dlq.flush()?;
        self.late.flush()
    }
}

/// One dead letter as a JSON line: reason, detail, origin and the original bytes (`raw` as text
/// when it is UTF-8, otherwise `raw_base64`).
pub fn encode_dead_letter(buf: &mut Vec<u8>, source: &str, raw: &RawBatch, dead: &DeadLetter) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        reason: &'a str,
        detail: &'a str,
        source: &'a str,
        partition: i32,
        offset: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        raw: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        raw_base64: Option<String>,
    }
    let bytes = raw.record(dead.record);
    let position = raw.position(dead.record);
    let text = std::str::from_utf8(bytes).ok();
    let line = Line {
        reason: dead.reason.as_str(),
        detail: &dead.detail,
        source,
        partition: position.partition,
        offset: position.offset,
        raw: text,
        raw_base64: match text {
            Some(_) => None,
            None => Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        },
    };
    // Serialising plain strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &line);
    buf.push(b'\n');
}

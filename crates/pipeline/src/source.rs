//! Sources: where raw records come from. A source fills [`RawBatch`]es; it does not decode.
//!
//! The same [`Pipeline`](crate::Pipeline) runs over any source: the JSON-lines file source here,
//! Kafka partitions elsewhere.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use riskstream_common::{Position, RawBatch};

/// A source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {name}: {source}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
    /// A streaming source failed (its message names the broker or client problem).
    #[error("source {name}: {message}")]
    Stream { name: String, message: String },
}

/// Whether a source may produce more records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    Open,
    Exhausted,
}

/// A producer of raw records.
pub trait Source {
    /// A name for logs and dead-letter entries (a path, a topic).
    fn name(&self) -> &str;

    /// Appends up to `max` records to `batch`.
    ///
    /// Returns [`SourceState::Exhausted`] once the input has ended (the batch may still hold the
    /// last records); a streaming source returns `Open` with what arrived within its linger time.
    fn fill(&mut self, batch: &mut RawBatch, max: usize) -> Result<SourceState, SourceError>;

    /// Downstream stages are full and `fill` will not be called until they drain: a streaming
    /// source stops fetching (pauses its partitions) but keeps its protocol alive (group
    /// heartbeats, rebalances) for up to `timeout`. A file source simply waits.
    fn hold(&mut self, timeout: std::time::Duration) -> Result<(), SourceError> {
        std::thread::sleep(timeout);
        Ok(())
    }

    /// Downstream has room again after [`Self::hold`]: resume fetching.
    fn release(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Partitions taken away from this source since the last call (a consumer-group
    /// rebalance). Records of them already returned by `fill` are still processed; the
    /// pipeline then forgets their watermarks.
    fn take_revoked(&mut self) -> Vec<i32> {
        Vec::new()
    }

    /// Partitions given to this source since the last call (after those revoked). They hold
    /// the watermark from now until they deliver an event or go idle.
    fn take_assigned(&mut self) -> Vec<i32> {
        Vec::new()
    }

    /// Partitions known to have records waiting that `fill` has not returned yet (a consumer
    /// behind the end of its partitions). They are not idle, however long since their last
    /// event: the watermark keeps waiting for them.
    fn backlogged(&self) -> Vec<i32> {
        Vec::new()
    }

    /// Whether the source has been asked to stop (a signal): a pipeline that is not taking
    /// input (its checkpoints failing) ends instead of holding the source.
    fn stopping(&self) -> bool {
        false
    }

    /// Called once after the run ended and the sink flushed every output: a source that
    /// tracks acknowledged progress records it (Kafka commits its offsets).
    fn close(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

/// JSON lines from a file or standard input; one record per non-blank line.
///
/// Positions are partition 0 and the 1-based line number, so a dead letter names the line.
pub struct JsonLinesSource {
    name: String,
    reader: Box<dyn BufRead + Send>,
    line: Vec<u8>,
    line_no: i64,
}

impl std::fmt::Debug for JsonLinesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLinesSource")
            .field("name", &self.name)
            .field("line_no", &self.line_no)
            .finish()
    }
}

impl JsonLinesSource {
    /// Opens `path`, or standard input for `-`.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let name = path.display().to_string();
        let reader: Box<dyn Read + Send> = if name == "-" {
            Box::new(io::stdin())
        } else {
            Box::new(File::open(path).map_err(|source| SourceError::Io {
                name: name.clone(),
                source,
            })?)
        };
        Ok(Self::from_reader(name, reader))
    }

    /// Reads JSON lines from any reader.
    pub fn from_reader(name: impl Into<String>, reader: impl Read + Send + 'static) -> Self {
        Self {
            name: name.into(),
            reader: Box::new(BufReader::with_capacity(1 << 20, reader)),
            line: Vec::with_capacity(4096),
            line_no: 0,
        }
    }
}

impl Source for JsonLinesSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fill(&mut self, batch: &mut RawBatch, max: usize) -> Result<SourceState, SourceError> {
        let now = now_ms();
        while batch.len() < max {
            self.line.clear();
            let read = self
                .reader
                .read_until(b'\n', &mut self.line)
                .map_err(|source| SourceError::Io {
                    name: self.name.clone(),
                    source,
                })?;
            if read == 0 {
                return Ok(SourceState::Exhausted);
            }
            self.line_no += 1;
            let record = trim_line_end(&self.line);
            if record.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            batch.push(
                record,
                Position {
                    partition: 0,
                    offset: self.line_no,
                },
                now,
            );
        }
        Ok(SourceState::Open)
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Wall-clock time in epoch milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_records_with_line_numbers() -> Result<(), SourceError> {
        let input = "{\"a\":1}\r\n\n   \n{\"a\":2}\n{\"a\":3}";
        let mut source = JsonLinesSource::from_reader("mem", io::Cursor::new(input));
        let mut batch = RawBatch::new();
        assert_eq!(source.fill(&mut batch, 2)?, SourceState::Open);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.record(0), b"{\"a\":1}");
        assert_eq!(batch.position(1).offset, 4);
        batch.clear();
        assert_eq!(source.fill(&mut batch, 10)?, SourceState::Exhausted);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch.record(0), b"{\"a\":3}");
        assert_eq!(batch.position(0).offset, 5);
        Ok(())
    }
}

//! The internal messages of the partitioned topology and where they go.
//!
//! A message is a short header (magic, format, kind, producer, watermark, entity kind) followed
//! by one Arrow IPC stream holding one record batch: events (ingest → entity stages and the
//! gather topic) or partial features (entity stage → gather topic). Events of a batch that go to
//! the same partition travel together, at most [`MAX_ROWS`] to a message. Partitions are chosen
//! as Kafka's default partitioner does (murmur2 of the key bytes), so that a key's partition is
//! the same for every producer, in every version.
//!
//! What it must not do: interpret the rows (the stages do).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int16Type, Int32Type, Int64Type, Int8Type};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::util::display::array_value_to_string;

/// First bytes of every internal message.
const MAGIC: [u8; 2] = *b"rs";
/// Format of the header and body; a message of another format is refused.
pub const FORMAT: u8 = 1;
/// Header: magic (2), format (1), kind (1), producer (8), watermark (8), entity kind (2).
const HEADER: usize = 22;
/// Most rows in one message (an IPC batch of W2 events is about 80 KB at this size, well under
/// the 1 MB a Kafka cluster accepts by default).
pub const MAX_ROWS: usize = 256;
/// The watermark field of a header when there is none yet.
const NO_WATERMARK: i64 = i64::MIN;

/// What an internal message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Events after the time stage, with their ingest columns.
    Events,
    /// Partial features of one entity kind, by event id.
    Partial,
}

/// The header of an internal message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The ingest instance that sent the events (for watermarks per producer).
    pub producer: u64,
    /// The sending ingest's operator watermark when the batch began.
    pub watermark: Option<i64>,
    /// Partials: the index of their entity kind in the plan.
    pub entity: u16,
}

/// An internal message that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("an internal message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("not an internal riskstream message (magic {0:?})")]
    Magic([u8; 2]),
    #[error("internal message format {0} is not {FORMAT}: instances of different versions share the topics")]
    Format(u8),
    #[error("unknown internal message kind {0}")]
    Kind(u8),
    #[error("the message body is not one Arrow IPC record batch: {0}")]
    Body(String),
}

/// Appends `header` and `batch` as one message to `out` (cleared first).
pub fn encode(out: &mut Vec<u8>, header: Header, batch: &RecordBatch) -> Result<(), WireError> {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.push(match header.kind {
        Kind::Events => 1,
        Kind::Partial => 2,
    });
    out.extend_from_slice(&header.producer.to_le_bytes());
    out.extend_from_slice(&header.watermark.unwrap_or(NO_WATERMARK).to_le_bytes());
    out.extend_from_slice(&header.entity.to_le_bytes());
    let body = |e: arrow::error::ArrowError| WireError::Body(e.to_string());
    let mut writer = StreamWriter::try_new(&mut *out, &batch.schema()).map_err(body)?;
    writer.write(batch).map_err(body)?;
    writer.finish().map_err(body)?;
    Ok(())
}

/// Reads one message.
pub fn decode(bytes: &[u8]) -> Result<(Header, RecordBatch), WireError> {
    if bytes.len() < HEADER {
        return Err(WireError::Short(bytes.len()));
    }
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    if bytes[2] != FORMAT {
        return Err(WireError::Format(bytes[2]));
    }
    let kind = match bytes[3] {
        1 => Kind::Events,
        2 => Kind::Partial,
        other => return Err(WireError::Kind(other)),
    };
    let word = |at: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        b
    };
    let watermark = i64::from_le_bytes(word(12));
    let header = Header {
        kind,
        producer: u64::from_le_bytes(word(4)),
        watermark: (watermark != NO_WATERMARK).then_some(watermark),
        entity: u16::from_le_bytes([bytes[20], bytes[21]]),
    };
    let body = |e: arrow::error::ArrowError| WireError::Body(e.to_string());
    let mut reader = StreamReader::try_new(&bytes[HEADER..], None).map_err(body)?;
    let batch = reader
        .next()
        .ok_or_else(|| WireError::Body("no record batch".into()))?
        .map_err(body)?;
    Ok((header, batch))
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() == 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `key` among `partitions`, as Kafka's default partitioner picks it.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// Writes the key bytes of a row over key columns: a composite key's parts joined by 0x1f,
/// numbers in decimal.
pub struct KeyWriter<'a> {
    columns: Vec<KeyColumn<'a>>,
}

enum KeyColumn<'a> {
    Utf8(&'a arrow::array::StringArray),
    Int(&'a dyn Array, fn(&dyn Array, usize) -> i64),
    /// Any other type, by its display form (slower: a string per row).
    Other(&'a dyn Array),
}

impl<'a> KeyWriter<'a> {
    pub fn new(columns: &'a [ArrayRef]) -> Self {
        let columns = columns
            .iter()
            .map(|c| match c.data_type() {
                DataType::Utf8 => KeyColumn::Utf8(c.as_string::<i32>()),
                DataType::Int64 => {
                    KeyColumn::Int(c.as_ref(), |a, i| a.as_primitive::<Int64Type>().value(i))
                }
                DataType::Int32 => KeyColumn::Int(c.as_ref(), |a, i| {
                    a.as_primitive::<Int32Type>().value(i) as i64
                }),
                DataType::Int16 => KeyColumn::Int(c.as_ref(), |a, i| {
                    a.as_primitive::<Int16Type>().value(i) as i64
                }),
                DataType::Int8 => KeyColumn::Int(c.as_ref(), |a, i| {
                    a.as_primitive::<Int8Type>().value(i) as i64
                }),
                _ => KeyColumn::Other(c.as_ref()),
            })
            .collect();
        Self { columns }
    }

    /// The key of `row` into `out`; `false` when the row has none (a NULL part).
    pub fn write(&self, row: usize, out: &mut Vec<u8>) -> bool {
        use std::io::Write;
        out.clear();
        for (i, column) in self.columns.iter().enumerate() {
            if i > 0 {
                out.push(0x1f);
            }
            match column {
                KeyColumn::Utf8(a) => {
                    if a.is_null(row) {
                        return false;
                    }
                    out.extend_from_slice(a.value(row).as_bytes());
                }
                KeyColumn::Int(a, value) => {
                    if a.is_null(row) {
                        return false;
                    }
                    let _ = write!(out, "{}", value(*a, row));
                }
                KeyColumn::Other(a) => {
                    if a.is_null(row) {
                        return false;
                    }
                    match array_value_to_string(*a, row) {
                        Ok(text) => out.extend_from_slice(text.as_bytes()),
                        Err(_) => return false,
                    }
                }
            }
        }
        true
    }
}

/// The partition of every row's key over `columns` among `partitions` (`None`: the row has no
/// key).
pub fn partitions_by_key(columns: &[ArrayRef], rows: usize, partitions: i32) -> Vec<Option<i32>> {
    let keys = KeyWriter::new(columns);
    let mut key = Vec::new();
    (0..rows)
        .map(|row| {
            keys.write(row, &mut key)
                .then(|| partition_of(&key, partitions))
        })
        .collect()
}

/// The gather topic's partition of every row, by its event id in `ids`. Every row goes
/// somewhere: events without an id were dead-lettered before they got here, and a row without
/// one goes to partition 0 rather than be lost.
pub fn partitions_by_id(ids: &ArrayRef, rows: usize, partitions: i32) -> Vec<Option<i32>> {
    partitions_by_key(std::slice::from_ref(ids), rows, partitions)
        .into_iter()
        .map(|p| Some(p.unwrap_or(0)))
        .collect()
}

/// Groups the rows of a batch by destination partition, keeping their order, and cuts every
/// group into messages of at most [`MAX_ROWS`] rows: `(partition, row indexes)`.
pub fn split_by_partition(destinations: &[Option<i32>]) -> Vec<(i32, Vec<u32>)> {
    let mut groups: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
    for (row, p) in destinations.iter().enumerate() {
        if let Some(p) = p {
            groups.entry(*p).or_default().push(row as u32);
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    for (p, rows) in groups {
        for chunk in rows.chunks(MAX_ROWS) {
            out.push((p, chunk.to_vec()));
        }
    }
    out
}

/// The rows `rows` of `batch`, in that order.
pub fn take_rows(
    batch: &RecordBatch,
    rows: &[u32],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let indices = arrow::array::UInt32Array::from(rows.to_vec());
    let columns = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c.as_ref(), &indices, None))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(&batch.schema()), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's UtilsTest.testMurmur2 vectors (as signed 32-bit ints).
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()) as i32, expected, "{input}");
        }
    }

    #[test]
    fn partitions_stay_in_range_and_spread() {
        let mut seen = [0usize; 8];
        for i in 0..8000 {
            let p = partition_of(format!("customer-{i}").as_bytes(), 8);
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c"])),
                Arc::new(Float64Array::from(vec![Some(1.5), None, Some(-2.0)])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_message_round_trips() {
        let header = Header {
            kind: Kind::Partial,
            producer: 42,
            watermark: Some(1_700_000_000_000),
            entity: 3,
        };
        let mut bytes = Vec::new();
        encode(&mut bytes, header, &batch()).unwrap();
        let (read, decoded) = decode(&bytes).unwrap();
        assert_eq!(read, header);
        assert_eq!(decoded, batch());

        let none = Header {
            watermark: None,
            ..header
        };
        encode(&mut bytes, none, &batch()).unwrap();
        assert_eq!(decode(&bytes).unwrap().0.watermark, None);
    }

    #[test]
    fn damaged_messages_are_refused_with_a_reason() {
        let mut bytes = Vec::new();
        let header = Header {
            kind: Kind::Events,
            producer: 1,
            watermark: None,
            entity: 0,
        };
        encode(&mut bytes, header, &batch()).unwrap();
        assert!(matches!(decode(&bytes[..10]), Err(WireError::Short(10))));
        let mut other = bytes.clone();
        other[2] = 9;
        assert!(matches!(decode(&other), Err(WireError::Format(9))));
        let mut other = bytes.clone();
        other[0] = b'{';
        assert!(matches!(decode(&other), Err(WireError::Magic(_))));
        let truncated = &bytes[..bytes.len() - 20];
        assert!(matches!(decode(truncated), Err(WireError::Body(_))));
    }

    #[test]
    fn keys_join_parts_and_nulls_mean_no_key() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("c1"), None])),
            Arc::new(arrow::array::Int64Array::from(vec![Some(7), Some(8)])),
        ];
        let writer = KeyWriter::new(&columns);
        let mut out = Vec::new();
        assert!(writer.write(0, &mut out));
        assert_eq!(out, b"c1\x1f7");
        assert!(!writer.write(1, &mut out));
    }

    #[test]
    fn rows_split_by_partition_in_order_and_size() {
        let destinations: Vec<Option<i32>> = (0..600)
            .map(|i| if i % 3 == 0 { None } else { Some(i % 2) })
            .collect();
        let groups = split_by_partition(&destinations);
        let total: usize = groups.iter().map(|(_, r)| r.len()).sum();
        assert_eq!(total, 400);
        assert!(groups.iter().all(|(_, r)| r.len() <= MAX_ROWS));
        for (p, rows) in &groups {
            assert!(rows.windows(2).all(|w| w[0] < w[1]));
            assert!(rows.iter().all(|&r| destinations[r as usize] == Some(*p)));
        }
    }
}

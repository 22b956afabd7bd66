//! Verdicts: one JSON object per scored event (DESIGN.md section 6), keyed by the event id.
//!
//! ```json
//! {"tx_id":"tx-1","event_time":"2025-01-01T00:00:23.000Z","decision":"review","score":60.0,
//!  "fired":[{"rule_id":"high_amount","score":60.0,"mode":"active"}],"features":{…},
//!  "rules_version":3,"late":false,"time_corrected":false,
//!  "processed_at":"2025-01-01T00:00:23.004Z","latency_ms":4}
//! ```
//!
//! Which features a verdict lists is `verdict.features` ([`FeatureSelection`]): by default the
//! ones the fired rules read. Encoding writes straight into one reusable buffer per batch (no
//! per-event allocation), and its cost follows the features a verdict lists, not the bundle's.

use std::io::Write;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampMillisecondType};
use arrow::util::display::ArrayFormatter;
use chrono::{DateTime, Datelike, Timelike};
use riskstream_common::{Position, RawBatch, VerdictFeatures};
use riskstream_rules::{CompiledBundle, Evaluated};

/// The verdicts of one batch: JSON payloads and keys in two contiguous buffers.
#[derive(Debug, Default)]
pub struct VerdictBatch {
    /// Newline-terminated JSON verdicts.
    lines: Vec<u8>,
    line_ends: Vec<usize>,
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    positions: Vec<Position>,
}

impl VerdictBatch {
    pub fn clear(&mut self) {
        self.lines.clear();
        self.line_ends.clear();
        self.keys.clear();
        self.key_ends.clear();
        self.positions.clear();
    }

    pub fn len(&self) -> usize {
        self.line_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.line_ends.is_empty()
    }

    /// All verdicts as JSON lines, ready to append to a file.
    pub fn as_json_lines(&self) -> &[u8] {
        &self.lines
    }

    /// Verdict `i`: its key (the event id), its JSON payload (no newline), its source position.
    pub fn get(&self, i: usize) -> (&[u8], &[u8], Position) {
        let (ks, ls) = if i == 0 {
            (0, 0)
        } else {
            (self.key_ends[i - 1], self.line_ends[i - 1])
        };
        (
            &self.keys[ks..self.key_ends[i]],
            &self.lines[ls..self.line_ends[i] - 1],
            self.positions[i],
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], Position)> {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// `verdict.features` resolved against one bundle (names to columns), and the scratch space of
/// the per-verdict selection; re-resolved when the bundle changes.
#[derive(Debug)]
pub struct FeatureSelection {
    setting: VerdictFeatures,
    /// The bundle version `listed` was resolved for.
    resolved_for: Option<u64>,
    /// `All`, `None`, `List`: the features every verdict lists, as indexes among the feature
    /// columns, ascending.
    listed: Vec<usize>,
    /// `Fired`: per feature, the row that last selected it (so each is listed once per row
    /// without clearing anything between rows).
    marks: Vec<u32>,
    /// `Fired`: the features of the current row.
    row: Vec<usize>,
}

impl FeatureSelection {
    pub fn new(setting: VerdictFeatures) -> Self {
        Self {
            setting,
            resolved_for: None,
            listed: Vec::new(),
            marks: Vec::new(),
            row: Vec::new(),
        }
    }

    /// Resolves the setting for `bundle` (once per bundle version).
    fn prepare(&mut self, bundle: &CompiledBundle) {
        if self.resolved_for == Some(bundle.version()) {
            return;
        }
        self.resolved_for = Some(bundle.version());
        let (_, names) = bundle.feature_columns();
        let names: Vec<&str> = names.collect();
        self.marks = vec![u32::MAX; names.len()];
        self.listed.clear();
        if self.setting == VerdictFeatures::All {
            self.listed.extend(0..names.len());
        }
        if let VerdictFeatures::List(wanted) = &self.setting {
            for want in wanted {
                match names.iter().position(|n| n == want) {
                    Some(i) => self.listed.push(i),
                    None => tracing::warn!(
                        feature = %want,
                        rules_version = bundle.version(),
                        "verdict.features names a feature this bundle does not have; verdicts leave it out"
                    ),
                }
            }
            self.listed.sort_unstable();
            self.listed.dedup();
        }
    }

    /// The features to list for `row`, ascending.
    fn for_row(
        &mut self,
        bundle: &CompiledBundle,
        scores: &riskstream_rules::Scores,
        row: usize,
    ) -> &[usize] {
        match self.setting {
            VerdictFeatures::All | VerdictFeatures::None | VerdictFeatures::List(_) => &self.listed,
            VerdictFeatures::Fired => {
                self.row.clear();
                let mark = row as u32;
                for hit in scores.hits.iter().filter(|h| h.fired.value(row)) {
                    for &f in bundle.rule_features(hit.rule) {
                        if self.marks[f] != mark {
                            self.marks[f] = mark;
                            self.row.push(f);
                        }
                    }
                }
                self.row.sort_unstable();
                &self.row
            }
        }
    }
}

/// Per-row time flags from the time stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeFlags<'a> {
    /// Rows whose event time was below the watermark (scored within `allowed_lateness`).
    pub late: Option<&'a [bool]>,
    /// Rows whose future-skewed event time was clamped to the processing time.
    pub time_corrected: Option<&'a [bool]>,
}

/// Writes the verdicts of a scored batch into `out` (cleared first).
///
/// `rows[i]` is the raw record index of row `i` (for its position and ingestion time);
/// `id_column` and `time_column` index the event id and event time in the scoring batch.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    out: &mut VerdictBatch,
    selection: &mut FeatureSelection,
    bundle: &CompiledBundle,
    evaluated: &Evaluated,
    raw: &RawBatch,
    rows: &[u32],
    id_column: usize,
    time_column: usize,
    flags: TimeFlags<'_>,
    processed_at_ms: i64,
) {
    out.clear();
    let batch = &evaluated.batch;
    let scores = &evaluated.scores;
    let mut processed_at = Vec::with_capacity(32);
    write_rfc3339(&mut processed_at, processed_at_ms);
    let ids = batch.column(id_column);
    let times = batch
        .column(time_column)
        .as_primitive_opt::<TimestampMillisecondType>();
    let (first_feature, names) = bundle.feature_columns();
    let features: Vec<(&str, &ArrayRef)> = names.zip(&batch.columns()[first_feature..]).collect();
    selection.prepare(bundle);
    // A new batch: rows restart at 0, so the marks of the last one must not match.
    selection.marks.fill(u32::MAX);
    let mut buf = std::mem::take(&mut out.lines);
    debug_assert_eq!(rows.len(), batch.num_rows());
    for (row, &raw_index) in rows.iter().enumerate() {
        let raw_index = raw_index as usize;
        // Key: the event id.
        write_plain(&mut out.keys, ids, row);
        out.key_ends.push(out.keys.len());
        out.positions.push(raw.position(raw_index));

        buf.extend_from_slice(b"{\"tx_id\":");
        write_value(&mut buf, ids, row);
        buf.extend_from_slice(b",\"event_time\":");
        match times {
            Some(t) if t.is_valid(row) => write_rfc3339(&mut buf, t.value(row)),
            _ => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(b",\"decision\":\"");
        buf.extend_from_slice(scores.decision[row].as_str().as_bytes());
        buf.extend_from_slice(b"\",\"score\":");
        write_f64(&mut buf, scores.total[row]);
        buf.extend_from_slice(b",\"fired\":[");
        let mut first = true;
        for hit in scores.hits.iter().filter(|h| h.fired.value(row)) {
            if !first {
                buf.push(b',');
            }
            first = false;
            let (id, mode) = bundle.rule(hit.rule);
            buf.extend_from_slice(b"{\"rule_id\":");
            write_str(&mut buf, id);
            buf.extend_from_slice(b",\"score\":");
            write_f64(&mut buf, hit.score(row));
            buf.extend_from_slice(b",\"mode\":\"");
            buf.extend_from_slice(mode.as_str().as_bytes());
            buf.extend_from_slice(b"\"}");
        }
        buf.extend_from_slice(b"],\"features\":{");
        for (i, &f) in selection.for_row(bundle, scores, row).iter().enumerate() {
            let (name, column) = features[f];
            if i > 0 {
                buf.push(b',');
            }
            write_str(&mut buf, name);
            buf.push(b':');
            write_value(&mut buf, column, row);
        }
        let _ = write!(buf, "}},\"rules_version\":{}", scores.version);
        buf.extend_from_slice(b",\"late\":");
        buf.extend_from_slice(flag(flags.late, row));
        buf.extend_from_slice(b",\"time_corrected\":");
        buf.extend_from_slice(flag(flags.time_corrected, row));
        buf.extend_from_slice(b",\"processed_at\":");
        buf.extend_from_slice(&processed_at);
        let latency = (processed_at_ms - raw.ingest_ms(raw_index)).max(0);
        let _ = writeln!(buf, ",\"latency_ms\":{latency}}}");
        out.line_ends.push(buf.len());
    }
    out.lines = buf;
}

fn flag(flags: Option<&[bool]>, row: usize) -> &'static [u8] {
    match flags.and_then(|f| f.get(row)) {
        Some(true) => b"true",
        _ => b"false",
    }
}

/// Epoch milliseconds as a quoted RFC 3339 UTC string with millisecond precision, written
/// without allocating (`"2025-01-01T00:00:13.000Z"`).
pub fn write_rfc3339(buf: &mut Vec<u8>, ms: i64) {
    match DateTime::from_timestamp_millis(ms) {
        Some(t) => {
            let _ = write!(
                buf,
                "\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\"",
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.timestamp_subsec_millis()
            );
        }
        None => {
            let _ = write!(buf, "{ms}");
        }
    }
}

fn write_str(buf: &mut Vec<u8>, s: &str) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

fn write_f64(buf: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = serde_json::to_writer(&mut *buf, &v);
    } else {
        buf.extend_from_slice(b"null");
    }
}

/// One array value as JSON.
fn write_value(buf: &mut Vec<u8>, array: &ArrayRef, row: usize) {
    if array.is_null(row) {
        buf.extend_from_slice(b"null");
        return;
    }
    match array.data_type() {
        DataType::Utf8 => write_str(buf, array.as_string::<i32>().value(row)),
        DataType::Int64 => {
            let _ = write!(buf, "{}", array.as_primitive::<Int64Type>().value(row));
        }
        DataType::Float64 => write_f64(buf, array.as_primitive::<Float64Type>().value(row)),
        DataType::Boolean => buf.extend_from_slice(if array.as_boolean().value(row) {
            b"true"
        } else {
            b"false"
        }),
        DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, _) => write_rfc3339(
            buf,
            array.as_primitive::<TimestampMillisecondType>().value(row),
        ),
        _ => match ArrayFormatter::try_new(array.as_ref(), &Default::default()) {
            Ok(f) => write_str(buf, &f.value(row).to_string()),
            Err(_) => buf.extend_from_slice(b"null"),
        },
    }
}

/// One array value as plain bytes (for message keys).
fn write_plain(buf: &mut Vec<u8>, array: &ArrayRef, row: usize) {
    match array.data_type() {
        DataType::Utf8 => buf.extend_from_slice(array.as_string::<i32>().value(row).as_bytes()),
        DataType::Int64 => {
            let _ = write!(buf, "{}", array.as_primitive::<Int64Type>().value(row));
        }
        _ => {
            if let Ok(f) = ArrayFormatter::try_new(array.as_ref(), &Default::default()) {
                let _ = write!(buf, "{}", f.value(row));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let mut buf = Vec::new();
        write_rfc3339(&mut buf, 1_735_689_613_005);
        assert_eq!(buf, b"\"2025-01-01T00:00:13.005Z\"");
        buf.clear();
        write_rfc3339(&mut buf, -1);
        assert_eq!(buf, b"\"1969-12-31T23:59:59.999Z\"");
    }
}

//! The feature operator: one pass over a batch, one column per windowed feature.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow::error::ArrowError;
use riskstream_rules::{Agg, CompiledBundle, CompiledWindowFeature};

use crate::window::{Entry, KeyWindow, Summary};

/// The operator could not compute a batch: a bug or a schema the bundle was not compiled for.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("feature `{feature}`: {source}")]
    Arrow {
        feature: String,
        #[source]
        source: ArrowError,
    },
    #[error("event times ({times}) do not match the batch ({rows} rows)")]
    TimesMismatch { times: usize, rows: usize },
}

/// Sizes of the operator's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    /// (feature, key) windows held.
    pub windows: usize,
    /// Events held across all windows.
    pub events: usize,
}

/// Identity of a feature's state: its definition, so a changed definition starts afresh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FeatureId(String);

impl FeatureId {
    fn of(f: &CompiledWindowFeature) -> Self {
        FeatureId(format!("{}|{:?}", f.name, f.spec))
    }
}

/// State of one feature definition: a window per entity key.
#[derive(Debug, Default)]
struct FeatureState {
    keys: HashMap<Box<[u8]>, KeyWindow>,
}

/// Computes windowed feature columns batch by batch and keeps their state.
#[derive(Debug, Default)]
pub struct FeatureOperator {
    features: HashMap<FeatureId, FeatureState>,
    /// Processing sequence: orders events with equal event time.
    seq: u64,
    key: Vec<u8>,
}

impl FeatureOperator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the windowed feature columns of `bundle` to `events`, in arrival order, folding
    /// every event into state. `event_time[i]` is the (possibly corrected) time of row `i`.
    pub fn compute(
        &mut self,
        bundle: &CompiledBundle,
        events: &RecordBatch,
        event_time: &[i64],
    ) -> Result<RecordBatch, FeatureError> {
        let features = bundle.window_features();
        if features.is_empty() {
            return Ok(events.clone());
        }
        if event_time.len() != events.num_rows() {
            return Err(FeatureError::TimesMismatch {
                times: event_time.len(),
                rows: events.num_rows(),
            });
        }
        let mut columns = events.columns().to_vec();
        for feature in features {
            columns.push(self.compute_one(feature, events, event_time)?);
        }
        RecordBatch::try_new(Arc::clone(bundle.input_schema()), columns).map_err(|source| {
            FeatureError::Arrow {
                feature: "*".into(),
                source,
            }
        })
    }

    fn compute_one(
        &mut self,
        feature: &CompiledWindowFeature,
        events: &RecordBatch,
        event_time: &[i64],
    ) -> Result<ArrayRef, FeatureError> {
        let arrow_err = |source| FeatureError::Arrow {
            feature: feature.name.clone(),
            source,
        };
        let n = events.num_rows();
        let window = feature.window_ms();
        let pane = KeyWindow::pane_ms(window);
        let agg = feature.spec.agg;
        let filter = feature.filter_mask(events);
        let values = match feature.of_column {
            Some(i) => Some(values_of(events.column(i), agg).map_err(arrow_err)?),
            None => None,
        };
        let keys: Vec<&ArrayRef> = feature
            .entity_columns
            .iter()
            .map(|&i| events.column(i))
            .collect();
        let state = self.features.entry(FeatureId::of(feature)).or_default();

        let mut ints: Vec<Option<i64>> = Vec::new();
        let mut floats: Vec<Option<f64>> = Vec::new();
        let int_output = matches!(agg, Agg::Count | Agg::CountDistinct);
        if int_output {
            ints.reserve(n);
        } else {
            floats.reserve(n);
        }
        for (row, &t) in event_time.iter().enumerate() {
            self.seq += 1;
            if !entity_key(&keys, row, &mut self.key) {
                // No key, no entity: the feature is NULL and nothing is folded.
                push(&mut ints, &mut floats, int_output, None, None);
                continue;
            }
            let window_state = match state.keys.get_mut(self.key.as_slice()) {
                Some(w) => w,
                None => state
                    .keys
                    .entry(self.key.clone().into_boxed_slice())
                    .or_default(),
            };
            let previous = (agg == Agg::SecondsSinceLast)
                .then(|| window_state.last(window, t))
                .flatten();
            let passes = filter.as_ref().is_none_or(|m| m.value(row));
            let value = match &values {
                Some(v) if v.is_null(row) => None,
                Some(v) => Some(v.value(row)),
                None => Some(0.0),
            };
            if let (true, Some(value)) = (passes, value) {
                window_state.insert(
                    pane,
                    Entry {
                        ts: t,
                        seq: self.seq,
                        value,
                    },
                );
            }
            match agg {
                Agg::Count => ints.push(Some(window_state.summary(pane, window, t).count as i64)),
                Agg::CountDistinct => {
                    ints.push(Some(window_state.count_distinct(pane, window, t) as i64))
                }
                Agg::Sum => floats.push(sum(&window_state.summary(pane, window, t))),
                Agg::Avg => floats.push(window_state.summary(pane, window, t).avg()),
                Agg::Min => floats.push(window_state.summary(pane, window, t).min()),
                Agg::Max => floats.push(window_state.summary(pane, window, t).max()),
                Agg::Stddev => floats.push(window_state.summary(pane, window, t).stddev()),
                Agg::Last => floats.push(window_state.last(window, t).map(|e| e.value)),
                Agg::SecondsSinceLast => floats.push(previous.map(|e| (t - e.ts) as f64 / 1000.0)),
            }
        }
        Ok(if int_output {
            Arc::new(Int64Array::from(ints))
        } else {
            Arc::new(Float64Array::from(floats))
        })
    }

    /// Drops state that no event still to come can reach: panes older than
    /// `watermark − allowed_lateness − window`, and keys left without panes.
    pub fn evict(&mut self, bundle: &CompiledBundle, watermark: i64, allowed_lateness_ms: i64) {
        let live: HashMap<FeatureId, i64> = bundle
            .window_features()
            .iter()
            .map(|f| (FeatureId::of(f), f.window_ms()))
            .collect();
        // State of features the running bundle no longer declares is dropped too.
        self.features.retain(|id, _| live.contains_key(id));
        for (id, state) in &mut self.features {
            let window = live.get(id).copied().unwrap_or_default();
            let pane = KeyWindow::pane_ms(window);
            let horizon = watermark - allowed_lateness_ms - window;
            state.keys.retain(|_, w| {
                w.evict(pane, horizon);
                !w.is_empty()
            });
        }
    }

    /// How much state the operator holds.
    pub fn stats(&self) -> StateStats {
        let mut stats = StateStats::default();
        for state in self.features.values() {
            stats.windows += state.keys.len();
            stats.events += state.keys.values().map(KeyWindow::len).sum::<usize>();
        }
        stats
    }
}

fn push(
    ints: &mut Vec<Option<i64>>,
    floats: &mut Vec<Option<f64>>,
    int_output: bool,
    i: Option<i64>,
    f: Option<f64>,
) {
    if int_output {
        ints.push(i);
    } else {
        floats.push(f);
    }
}

/// SQL `SUM`: NULL over an empty set.
fn sum(s: &Summary) -> Option<f64> {
    (s.count > 0).then_some(s.sum)
}

/// The aggregated values as f64: numbers as they are; for `count_distinct` over other types a
/// 64-bit hash of the value stands in for it.
fn values_of(column: &ArrayRef, agg: Agg) -> Result<Float64Array, ArrowError> {
    if column.data_type().is_numeric() {
        return Ok(cast(column, &DataType::Float64)?
            .as_primitive::<Float64Type>()
            .clone());
    }
    if agg != Agg::CountDistinct {
        return Err(ArrowError::InvalidArgumentError(format!(
            "cannot aggregate {} values",
            column.data_type()
        )));
    }
    let text = cast(column, &DataType::Utf8)?;
    let text = text.as_string::<i32>();
    Ok((0..text.len())
        .map(|i| {
            text.is_valid(i).then(|| {
                let mut h = DefaultHasher::new();
                text.value(i).hash(&mut h);
                f64::from_bits(h.finish())
            })
        })
        .collect())
}

/// Writes the entity key of `row` into `key`; false when a key field is NULL.
fn entity_key(columns: &[&ArrayRef], row: usize, key: &mut Vec<u8>) -> bool {
    key.clear();
    for (i, column) in columns.iter().enumerate() {
        if column.is_null(row) {
            return false;
        }
        if i > 0 {
            key.push(0x1f);
        }
        match column.data_type() {
            DataType::Utf8 => {
                key.extend_from_slice(column.as_string::<i32>().value(row).as_bytes())
            }
            DataType::Int64 => {
                key.extend_from_slice(&column.as_primitive::<Int64Type>().value(row).to_be_bytes())
            }
            DataType::Boolean => key.push(column.as_boolean().value(row) as u8),
            _ => {
                if let Ok(f) = arrow::util::display::ArrayFormatter::try_new(
                    column.as_ref(),
                    &Default::default(),
                ) {
                    key.extend_from_slice(f.value(row).to_string().as_bytes());
                }
            }
        }
    }
    true
}

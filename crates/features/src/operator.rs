//! The feature operator: one pass over a batch, one column per windowed feature.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow::error::ArrowError;
use metrics::Counter;
use riskstream_rules::{Agg, CompiledBundle, CompiledWindowFeature};
use riskstream_state::{Cf, StateError, StateStore};

use crate::window::{Entry, KeyWindow, Summary};

/// The operator could not compute a batch: a bug or a schema the bundle was not compiled for.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("feature state for key `{key}` cannot be decoded; the state directory is corrupt or from an incompatible version")]
    Corrupt { key: String },
    #[error("internal error: a window vanished from the cache (please report)")]
    CacheInvariant,
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
    /// (feature, key) windows stored.
    pub windows: usize,
    /// Events held across all windows.
    pub events: usize,
}

/// Identity of a feature's state: a stable hash of its definition, so a reload that keeps a
/// feature keeps its state and a changed definition starts afresh. It prefixes the state keys.
fn feature_id(f: &CompiledWindowFeature) -> [u8; 8] {
    fnv1a(format!("{}|{:?}", f.name, f.spec).as_bytes()).to_be_bytes()
}

/// FNV-1a: stable across builds, platforms and Rust versions (unlike the std hasher), which
/// matters for anything persisted in the state store.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A window held in the cache.
#[derive(Debug)]
struct Cached {
    window: KeyWindow,
    /// Changed since it was last written to the store (its key is then in `dirty`).
    dirty: bool,
    /// The batch that last touched it (for choosing what to drop when over the memory cap).
    last_used: u64,
    /// What this entry counts for in `cache_bytes`, as of the last flush.
    bytes: usize,
}

impl Cached {
    fn size(key: &[u8], window: &KeyWindow) -> usize {
        key.len() + window.approx_bytes()
    }
}

const SEQ_KEY: &[u8] = b"features/seq";

/// Computes windowed feature columns batch by batch; keeps their state in RocksDB behind a
/// bounded cache of hot windows.
///
/// Every [`compute`](Self::compute) ends with one write batch holding the windows the batch
/// changed, so the store always reflects whole batches. The cache holds windows keyed by feature
/// id and entity key; when it grows past `cache_max_bytes` the windows least recently used are
/// dropped (they are clean: everything was written).
pub struct FeatureOperator {
    store: Arc<StateStore>,
    cache: HashMap<Box<[u8]>, Cached>,
    /// Keys of the windows changed since the last flush, back to back in one buffer: a flush
    /// costs what the batch changed, not what the cache holds.
    dirty: Vec<u8>,
    dirty_ends: Vec<usize>,
    cache_bytes: usize,
    cache_max_bytes: usize,
    /// Processing sequence: orders events with equal event time; survives restarts.
    seq: u64,
    batch_no: u64,
    key: Vec<u8>,
    scratch: Vec<u8>,
    /// Reused by `count_distinct` queries.
    distinct: Vec<u64>,
    /// Where the next eviction sweep of the store starts.
    sweep_cursor: Vec<u8>,
    cache_misses: Counter,
    windows_written: Counter,
}

impl std::fmt::Debug for FeatureOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureOperator")
            .field("store", &self.store)
            .field("cached", &self.cache.len())
            .field("cache_bytes", &self.cache_bytes)
            .finish()
    }
}

impl FeatureOperator {
    /// An operator over `store`, continuing from the state it holds.
    pub fn open(store: Arc<StateStore>, cache_max_bytes: usize) -> Result<Self, FeatureError> {
        let seq = store
            .get(Cf::Meta, SEQ_KEY)?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0);
        Ok(Self {
            store,
            cache: HashMap::new(),
            dirty: Vec::new(),
            dirty_ends: Vec::new(),
            cache_bytes: 0,
            cache_max_bytes,
            seq,
            batch_no: 0,
            key: Vec::new(),
            scratch: Vec::new(),
            distinct: Vec::new(),
            sweep_cursor: Vec::new(),
            cache_misses: metrics::counter!("riskstream_state_cache_misses_total"),
            windows_written: metrics::counter!("riskstream_state_windows_written_total"),
        })
    }

    /// The store behind the operator.
    pub fn store(&self) -> &Arc<StateStore> {
        &self.store
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
        self.batch_no += 1;
        let mut columns = events.columns().to_vec();
        for feature in features {
            columns.push(self.compute_one(feature, events, event_time)?);
        }
        let batch =
            RecordBatch::try_new(Arc::clone(bundle.input_schema()), columns).map_err(|source| {
                FeatureError::Arrow {
                    feature: "*".into(),
                    source,
                }
            })?;
        Ok(batch)
    }

    /// Writes every changed window and `meta` entries in one write batch, then trims the cache
    /// to its memory cap. Call once per micro-batch, after [`Self::compute`].
    pub fn flush(&mut self, meta: &[(&[u8], &[u8])]) -> Result<(), FeatureError> {
        let mut batch = self.store.batch();
        let written = self.dirty_ends.len() as u64;
        let mut start = 0;
        for &end in &self.dirty_ends {
            let key = &self.dirty[start..end];
            start = end;
            let Some(cached) = self.cache.get_mut(key) else {
                continue;
            };
            if cached.window.is_empty() {
                batch.delete(Cf::Features, key)?;
            } else {
                self.scratch.clear();
                cached.window.encode(&mut self.scratch);
                batch.put(Cf::Features, key, &self.scratch)?;
            }
            cached.dirty = false;
            let size = Cached::size(key, &cached.window);
            self.cache_bytes = self.cache_bytes + size - cached.bytes;
            cached.bytes = size;
        }
        self.dirty.clear();
        self.dirty_ends.clear();
        batch.put(Cf::Meta, SEQ_KEY, &self.seq.to_le_bytes())?;
        for (k, v) in meta {
            batch.put(Cf::Meta, k, v)?;
        }
        self.store.write(batch)?;
        self.windows_written.increment(written);
        self.trim_cache();
        Ok(())
    }

    /// Drops the least recently used windows until the cache is at 75 % of its cap. Runs after
    /// a flush, so every window is clean and dropping loses nothing.
    fn trim_cache(&mut self) {
        if self.cache_bytes <= self.cache_max_bytes {
            return;
        }
        let target = self.cache_max_bytes / 4 * 3;
        let mut by_age: Vec<(u64, usize)> = self
            .cache
            .values()
            .map(|c| (c.last_used, c.bytes))
            .collect();
        by_age.sort_unstable();
        let mut bytes = self.cache_bytes;
        let mut cutoff = None;
        for (age, size) in by_age {
            if bytes <= target {
                break;
            }
            bytes -= size;
            cutoff = Some(age);
        }
        if let Some(cutoff) = cutoff {
            self.cache.retain(|_, c| c.last_used > cutoff);
        }
        self.cache_bytes = self.cache.values().map(|c| c.bytes).sum();
    }

    /// Loads the window for `key` into the cache (from the store on a miss).
    fn load(&mut self, key: &[u8]) -> Result<(), FeatureError> {
        if let Some(c) = self.cache.get_mut(key) {
            c.last_used = self.batch_no;
            return Ok(());
        }
        self.cache_misses.increment(1);
        let window = match self.store.get_with(Cf::Features, key, KeyWindow::decode)? {
            Some(Some(window)) => window,
            Some(None) => {
                return Err(FeatureError::Corrupt {
                    key: String::from_utf8_lossy(&key[8..]).into_owned(),
                })
            }
            None => KeyWindow::default(),
        };
        let bytes = Cached::size(key, &window);
        self.cache_bytes += bytes;
        self.cache.insert(
            key.into(),
            Cached {
                window,
                dirty: false,
                last_used: self.batch_no,
                bytes,
            },
        );
        Ok(())
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
        let id = feature_id(feature);

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
            self.key.clear();
            self.key.extend_from_slice(&id);
            if !entity_key(&keys, row, &mut self.key) {
                // No key, no entity: the feature is NULL and nothing is folded.
                push(&mut ints, &mut floats, int_output, None, None);
                continue;
            }
            let key = std::mem::take(&mut self.key);
            self.load(&key)?;
            let cached = self
                .cache
                .get_mut(key.as_slice())
                .ok_or(FeatureError::CacheInvariant)?;
            self.key = key;
            let window_state = &mut cached.window;
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
                if !cached.dirty {
                    cached.dirty = true;
                    self.dirty.extend_from_slice(&self.key);
                    self.dirty_ends.push(self.dirty.len());
                }
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
                    ints.push(Some(
                        window_state.count_distinct(pane, window, t, &mut self.distinct) as i64,
                    ))
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
    /// `watermark − allowed_lateness − window`, windows left empty, and the state of features the
    /// running bundle no longer declares. Each call sweeps the cached windows and the next
    /// `store_keys` windows of the store (wrapping around), so its cost is bounded however large
    /// the state; returns the events dropped.
    pub fn evict(
        &mut self,
        bundle: &CompiledBundle,
        watermark: i64,
        allowed_lateness_ms: i64,
        store_keys: usize,
    ) -> Result<usize, FeatureError> {
        let live: HashMap<[u8; 8], i64> = bundle
            .window_features()
            .iter()
            .map(|f| (feature_id(f), f.window_ms()))
            .collect();
        let horizon = |id: &[u8]| -> Option<(i64, i64)> {
            let id: [u8; 8] = id.get(..8)?.try_into().ok()?;
            let window = *live.get(&id)?;
            Some((
                KeyWindow::pane_ms(window),
                watermark - allowed_lateness_ms - window,
            ))
        };
        let mut dropped = 0;
        let mut batch = self.store.batch();
        // The next slice of windows in the store (those in the cache are handled below).
        let slice = self
            .store
            .scan_from(Cf::Features, &self.sweep_cursor, store_keys)?;
        self.sweep_cursor = match slice.last() {
            // Continue just after the last key seen; start over when the slice came up short.
            Some((last, _)) if slice.len() == store_keys => {
                let mut next = last.to_vec();
                next.push(0);
                next
            }
            _ => Vec::new(),
        };
        for (key, bytes) in slice {
            if self.cache.contains_key(&key) {
                continue;
            }
            match (horizon(&key), KeyWindow::decode(&bytes)) {
                (Some((pane, h)), Some(mut w)) => {
                    let n = w.evict(pane, h);
                    if n > 0 {
                        dropped += n;
                        if w.is_empty() {
                            batch.delete(Cf::Features, &key)?;
                        } else {
                            self.scratch.clear();
                            w.encode(&mut self.scratch);
                            batch.put(Cf::Features, &key, &self.scratch)?;
                        }
                    }
                }
                // A feature no longer declared (or unreadable leftovers): drop it.
                _ => batch.delete(Cf::Features, &key)?,
            }
        }
        self.store.write(batch)?;
        // Windows in the cache: evicted there, written by the flush below.
        for (key, cached) in &mut self.cache {
            let changed = match horizon(key) {
                Some((pane, h)) => {
                    let n = cached.window.evict(pane, h);
                    dropped += n;
                    n > 0
                }
                None => {
                    cached.window = KeyWindow::default();
                    true
                }
            };
            if changed && !cached.dirty {
                cached.dirty = true;
                self.dirty.extend_from_slice(key);
                self.dirty_ends.push(self.dirty.len());
            }
        }
        self.flush(&[])?;
        self.cache.retain(|_, c| !c.window.is_empty());
        self.cache_bytes = self.cache.values().map(|c| c.bytes).sum();
        Ok(dropped)
    }

    /// How much state the operator holds (walks the store).
    pub fn stats(&self) -> Result<StateStats, FeatureError> {
        let mut stats = StateStats::default();
        for (key, bytes) in self.store.scan_prefix(Cf::Features, &[])? {
            stats.windows += 1;
            stats.events += match self.cache.get(&key) {
                Some(c) => c.window.len(),
                None => KeyWindow::decode(&bytes).map_or(0, |w| w.len()),
            };
        }
        Ok(stats)
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
            text.is_valid(i)
                .then(|| f64::from_bits(fnv1a(text.value(i).as_bytes())))
        })
        .collect())
}

/// Appends the entity key of `row` to `key`; false when a key field is NULL.
fn entity_key(columns: &[&ArrayRef], row: usize, key: &mut Vec<u8>) -> bool {
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

//! The feature operator: one pass over a batch, one column per windowed feature.
//!
//! Features that share an entity (the same key fields) are kept together: for one key, the
//! windows of all of them form one record, found with one cache lookup and stored as one RocksDB
//! value. The cache in front of the store is write-back: a batch changes windows in memory, and
//! changed records go to the store, one write batch at a time, when the cache must make room,
//! when [`FeatureOperator::flush`] is called (the pipeline does so periodically, before a
//! checkpoint and at shutdown), never record by record.
//!
//! With a large state most of an event's cost is waiting on memory for its key's record, so the
//! operator computes a batch's keys first and asks the CPU for the records of the events a few
//! rows ahead while it computes the current ones.
//!
//! A batch is computed on several threads (`pipeline.feature_threads`): each takes, a part of
//! the cache at a time, the rows whose keys live there, and writes their values into buffers of
//! its own; the columns are gathered from them at the end. Keys are independent and each key's
//! events are folded in arrival order, so the values are the same on any number of threads.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow::error::ArrowError;
use hashbrown::HashMap;
use metrics::Counter;
use rayon::prelude::*;
use riskstream_rules::{Agg, CompiledBundle, CompiledWindowFeature};
use riskstream_state::{AfterWrite, Cf, PendingWrite, StateBatch, StateError, StateStore};

use crate::cache::{allocated, prefetch, CachePart, ShardedCache, StateKey};
use crate::layout::{fnv1a, Entity, Layout, Log, Reader, Window};
use crate::log::EventLog;
use crate::window::{Summary, NO_VALUE};

/// The operator could not compute a batch: a bug or a schema the bundle was not compiled for.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("feature state for key `{key}` cannot be decoded; the state directory is corrupt or from an incompatible version")]
    Corrupt { key: String },
    #[error("feature `{feature}`: {source}")]
    Arrow {
        feature: String,
        #[source]
        source: ArrowError,
    },
    #[error("cannot start {threads} feature threads ({reason}); lower pipeline.feature_threads")]
    Threads { threads: usize, reason: String },
    #[error("event times ({times}) do not match the batch ({rows} rows)")]
    TimesMismatch { times: usize, rows: usize },
}

/// Sizes of the operator's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Entity keys with state (one record per entity field set and key).
    pub keys: usize,
    /// Events held across all windows.
    pub events: usize,
    /// Records held in the cache.
    pub cached: usize,
    /// Of those, records changed since they were last written to the store.
    pub dirty: usize,
}

/// The state of one entity key: its logs (see [`crate::layout`]), each tagged with its id (a
/// reload may add, drop or reorder them).
///
/// The logs are shared copy-on-write: a flush hands the writer thread a snapshot of every
/// changed record (a reference count, not a copy), and a record that a later batch changes
/// while the writer still reads it is copied then, the only copy made.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    logs: Arc<[([u8; 8], EventLog)]>,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            logs: Arc::from(Vec::new()),
        }
    }
}

impl Record {
    /// 5: one log per entity and filter (4 was one window per length, filter and field).
    const FORMAT: u8 = 5;

    /// The logs, for changing (one copy-on-write check for all of them): `logs` first, in that
    /// order and with their fields, then any others a reload left behind (until a sweep drops
    /// them). Reordered only when the layout changed or a log is new.
    fn logs_mut(&mut self, logs: &[Log]) -> &mut [([u8; 8], EventLog)] {
        let in_order = logs.len() <= self.logs.len()
            && logs
                .iter()
                .zip(self.logs.iter())
                .all(|(want, (id, have))| *id == want.id && have.has_fields(&want.field_ids));
        if !in_order {
            let mut rest = self.logs.to_vec();
            let mut out = Vec::with_capacity(logs.len() + rest.len());
            for want in logs {
                let log = match rest.iter().position(|(id, _)| *id == want.id) {
                    Some(at) => {
                        let log = rest.remove(at).1;
                        if log.has_fields(&want.field_ids) {
                            log
                        } else {
                            log.with_fields(&want.field_ids)
                        }
                    }
                    None => EventLog::new(&want.field_ids),
                };
                out.push((want.id, log));
            }
            out.extend(rest);
            self.logs = out.into();
        }
        Arc::make_mut(&mut self.logs)
    }

    /// The logs as they are, for changing.
    fn all_mut(&mut self) -> &mut [([u8; 8], EventLog)] {
        Arc::make_mut(&mut self.logs)
    }

    /// Drops the logs `keep` rejects; whether any went.
    fn retain(&mut self, keep: impl Fn(&[u8; 8]) -> bool) -> bool {
        if self.logs.iter().all(|(id, _)| keep(id)) {
            return false;
        }
        let logs: Vec<_> = self
            .logs
            .iter()
            .filter(|(id, _)| keep(id))
            .cloned()
            .collect();
        self.logs = logs.into();
        true
    }

    fn is_empty(&self) -> bool {
        self.logs.iter().all(|(_, l)| l.is_empty())
    }

    /// Starts loading the logs into the CPU's caches.
    fn prefetch(&self) {
        prefetch(self.logs.as_ptr());
    }

    /// Starts loading what the logs' next inserts and queries read (the logs themselves
    /// should be in cache by now: [`Self::prefetch`]).
    fn prefetch_events(&self) {
        for (_, log) in self.logs.iter() {
            log.prefetch();
        }
    }

    fn events(&self) -> usize {
        self.logs.iter().map(|(_, l)| l.len()).sum()
    }

    fn approx_bytes(&self) -> usize {
        // The shared slice: two reference counts, then the logs.
        allocated(16 + self.logs.len() * std::mem::size_of::<([u8; 8], EventLog)>())
            + self
                .logs
                .iter()
                .map(|(_, l)| l.approx_bytes())
                .sum::<usize>()
    }

    /// Format byte, log count, then per log its id and encoding. Empty logs are left out.
    fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(Self::FORMAT);
        let live = self.logs.iter().filter(|(_, l)| !l.is_empty());
        out.extend_from_slice(&(live.clone().count() as u16).to_le_bytes());
        for (id, log) in live {
            out.extend_from_slice(id);
            log.encode(out);
        }
    }

    /// About the length of [`Self::encode`]'s output.
    fn encoded_len_hint(&self) -> usize {
        3 + self
            .logs
            .iter()
            .map(|(_, l)| 8 + l.encoded_len_hint())
            .sum::<usize>()
    }

    fn decode(mut bytes: &[u8]) -> Option<Record> {
        let (&format, rest) = bytes.split_first()?;
        let (count, rest) = rest.split_first_chunk::<2>()?;
        if format != Self::FORMAT {
            return None;
        }
        bytes = rest;
        let count = u16::from_le_bytes(*count) as usize;
        let mut logs = Vec::with_capacity(count.min(bytes.len() / 10));
        for _ in 0..count {
            let (id, rest) = bytes.split_first_chunk::<8>()?;
            bytes = rest;
            logs.push((*id, EventLog::decode_from(&mut bytes)?));
        }
        bytes.is_empty().then_some(Record { logs: logs.into() })
    }
}

/// A record held in the cache.
#[derive(Debug)]
struct Cached {
    record: Record,
    /// Changed since it was last written to the store.
    dirty: bool,
    /// The batch that last touched it (for choosing what to drop when over the memory cap).
    last_used: u64,
    /// What this entry counts for in `cache_bytes`.
    bytes: usize,
    /// The last flush that has taken this record's changes (see [`Collecting`]).
    collected: u64,
}

impl Cached {
    /// `record`, as the store holds it, for `key`, used by batch `batch_no`.
    fn new(key: &[u8], record: Record, batch_no: u64) -> Self {
        Self {
            bytes: entry_bytes(key, &record),
            record,
            dirty: false,
            last_used: batch_no,
            // Unchanged: nothing for a flush to take (and one in progress marks it on load).
            collected: 0,
        }
    }
}

/// A flush in progress. It stands for the state at the moment it began, but taking a snapshot
/// of every changed record at once stopped scoring for tens of milliseconds (a reference-count
/// increment per record, each a cache miss). Instead the snapshot is collected a few cache
/// shards per batch, and a record that a batch is about to change before its shard's turn is
/// collected first, as it was: copy on first write, one flush (an epoch) at a time.
struct Collecting {
    snapshots: Snapshots,
    /// Shards before this one have been swept.
    next_shard: usize,
    meta: Vec<(Vec<u8>, Vec<u8>)>,
    /// Runs on the writer thread once the flush is applied (a checkpoint).
    after: Option<AfterWrite>,
}

/// The records one flush has taken so far (by the sweep, or by one worker of a batch).
struct Snapshots {
    /// The flush's number; a record with `collected` below it has not been taken yet.
    epoch: u64,
    /// In chunks of [`SNAPSHOT_CHUNK`]: one list of 200K snapshots grew by copying megabytes,
    /// up to 20 ms inside one batch.
    chunks: Vec<Vec<(StateKey, Record)>>,
}

/// Snapshots per chunk of a flush's list.
const SNAPSHOT_CHUNK: usize = 4096;

impl Snapshots {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            chunks: Vec::new(),
        }
    }

    /// Takes `cached`'s changes into this flush unless it already has them; call before
    /// changing a record while this flush is being collected. Whether it took a snapshot.
    fn take(&mut self, key: &[u8], cached: &mut Cached) -> bool {
        if cached.collected >= self.epoch {
            return false;
        }
        cached.collected = self.epoch;
        if !cached.dirty {
            return false;
        }
        let snapshot = (StateKey::from(key), cached.record.clone());
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < SNAPSHOT_CHUNK => chunk.push(snapshot),
            _ => {
                let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK);
                chunk.push(snapshot);
                self.chunks.push(chunk);
            }
        }
        cached.dirty = false;
        true
    }
}

/// Changed records a batch takes for a flush in progress (about a millisecond's work; at least
/// one cache shard): 200K changed records take a hundred batches.
const COLLECT_PER_BATCH: usize = 2048;

/// What one cache entry holds: its slot, its key if not inline, its record.
fn entry_bytes(key: &[u8], record: &Record) -> usize {
    ShardedCache::<Cached>::SLOT_BYTES + StateKey::heap_bytes(key.len()) + record.approx_bytes()
}

/// The operator's record cache against `state.cache_max_bytes`, as it counts it: records'
/// allocations by size class, their slots and the tables' free slots (not the allocator's
/// free pages, RocksDB's memtables and block cache, or batches in flight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: usize,
    /// The most it held at the end of a batch.
    pub peak_bytes: usize,
    pub max_bytes: usize,
    pub records: usize,
    /// Records written out and dropped to stay under the cap.
    pub dropped: u64,
}

/// Computes windowed feature columns batch by batch; keeps their state in RocksDB behind a
/// bounded write-back cache of hot records.
///
/// The store reflects whole batches: records are written only between batches, a cache trim
/// writes the records it drops in one write batch, and [`flush`](Self::flush) writes every
/// changed record together with the caller's progress metadata in one write batch. What the
/// store holds after a flush is exactly the state after the last computed batch.
pub struct FeatureOperator {
    store: Arc<StateStore>,
    cache: ShardedCache<Cached>,
    cache_bytes: usize,
    cache_max_bytes: usize,
    /// The most the cache held at the end of a batch (entries and free slots).
    cache_peak_bytes: usize,
    /// Records the cache wrote out and dropped to stay under its cap.
    cache_dropped: u64,
    batch_no: u64,
    /// Per entity of the last batch: its rows' keys.
    keys: Vec<BatchKeys>,
    /// The threads a batch's features are computed on, if more than the caller's
    /// ([`Self::with_threads`]).
    pool: Option<rayon::ThreadPool>,
    /// Bundles with fewer windowed features than this are computed on the caller's thread
    /// ([`Self::with_min_parallel_features`]).
    min_parallel: usize,
    /// Per thread, its share of the last batch.
    shares: Vec<Share>,
    /// Per entity of the last batch, per row: which share has it.
    places: Vec<Vec<Place>>,
    /// The value buffers of the last batch's feature columns, for the next batch's.
    spare: Vec<Buffer>,
    scratch: Vec<u8>,
    /// Where the next eviction sweep of the store starts.
    sweep_cursor: Vec<u8>,
    /// The store may hold records the cache does not (left by an earlier run, or written out
    /// when the cache made room): only then do eviction sweeps walk the store, and only then
    /// does a key the cache lacks need a read of the store.
    store_only: bool,
    /// In the current pass of store sweeps, such a record was seen or the cache made room.
    store_only_seen: bool,
    /// Where the next eviction sweep of the cache starts (a position in iteration order).
    cache_cursor: usize,
    cache_misses: Counter,
    records_written: Counter,
    cache_gauge: metrics::Gauge,
    evicted: Counter,
    /// The write of the last flush, while RocksDB applies it.
    pending: Option<PendingWrite>,
    /// A flush being collected, before its write starts.
    collecting: Option<Collecting>,
    /// When each window began to fill: the earliest event time of the batch that first
    /// computed it (by window id; persisted with every flush under [`STARTED_PREFIX`]).
    started: BTreeMap<[u8; 8], i64>,
    /// The bundle version `started` was last pruned for.
    started_for: u64,
    /// Flushes begun.
    epoch: u64,
}

impl Drop for FeatureOperator {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("feature state written since the last completed flush is lost: {e}");
        }
    }
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

/// What a log takes from a batch, prepared once per batch: which rows pass its filter, and its
/// fields' values.
struct LogInput<'a> {
    log: &'a Log<'a>,
    filter: Option<BooleanBuffer>,
    values: Vec<Float64Array>,
    /// Some window has a `seconds_since_last` reader (read before the event is added).
    since_last: bool,
}

/// Buffers that queries reuse from event to event.
#[derive(Default)]
struct QueryScratch {
    /// A row's field values.
    values: Vec<f64>,
    /// A log's summaries per length and field, and its events per length.
    sums: Vec<Summary>,
    counts: Vec<u64>,
    /// Values for `count_distinct`, and a log's distinct counts per field and length.
    distinct: Vec<u64>,
    seen: hashbrown::HashSet<u64>,
    distinct_counts: Vec<u64>,
}

/// Where a batch's windowed feature values go: each worker writes the values of its rows into
/// buffers of its own, column by column, and each column is put together from them once the
/// batch is computed. (Appending to 200 Arrow builders row by row was a sixth of the scorer's
/// time on W2.)
struct Outputs {
    /// Per feature: its entity and its column among the entity's ([`Reader::column`]);
    /// `None`: no log reads it.
    place_of: Vec<Option<(usize, usize)>>,
    /// Per feature: whether its column holds integers.
    ints: Vec<bool>,
    /// Per entity: how many columns its features have.
    widths: Vec<usize>,
}

/// Whether a feature aggregated by `agg` has an integer column (else floats).
fn int_column(agg: Agg) -> bool {
    matches!(agg, Agg::Count | Agg::CountDistinct)
}

/// A value slot with no value (NULL): a NaN no computation makes (nor [`NO_VALUE`]), and
/// as an integer far beyond any count.
const NULL_BITS: u64 = 0x7ff8_6e75_6c6c_6e75;

/// Batches smaller than this are computed on the calling thread alone (waking the pool's
/// threads costs microseconds, a W2 event about ten).
const PARALLEL_MIN_ROWS: usize = 64;

/// Parts of the cache per thread: threads take parts as they finish their last, so that one
/// the OS sets aside for the reader or the writer holds up the batch by one part at most.
const PARTS_PER_THREAD: usize = 8;

impl Outputs {
    fn new(layout: &Layout, features: &[CompiledWindowFeature]) -> Self {
        let mut place_of = vec![None; features.len()];
        let mut widths = Vec::with_capacity(layout.entities.len());
        for (e, entity) in layout.entities.iter().enumerate() {
            let readers = entity
                .logs
                .iter()
                .flat_map(|l| &l.windows)
                .flat_map(|w| &w.readers);
            let mut width = 0;
            for reader in readers {
                place_of[reader.feature] = Some((e, reader.column));
                width += 1;
            }
            widths.push(width);
        }
        Self {
            place_of,
            ints: features.iter().map(|f| int_column(f.spec.agg)).collect(),
            widths,
        }
    }

    /// Feature `feature`'s column, gathered from the workers' values into `spare` (a buffer
    /// of an earlier batch's); `places` tells, per entity and row, which worker has the row.
    fn column(
        &self,
        feature: usize,
        shares: &[Share],
        places: &[Vec<Place>],
        rows: usize,
        spare: Vec<u64>,
    ) -> ArrayRef {
        let int = self.ints[feature];
        let mut bits = spare;
        bits.clear();
        let Some((entity, column)) = self.place_of[feature] else {
            // A feature no log reads (none today) is NULL throughout.
            bits.resize(rows, NULL_BITS);
            return finish_column(bits, rows, int);
        };
        // Each worker's values of this column, in its rows' order: read front to back.
        let from: Vec<&[u64]> = shares
            .iter()
            .map(|share| {
                let n = share.rows[entity].len();
                let start = column * n;
                &share.values[entity][start..start + n]
            })
            .collect();
        let mut nulls = 0;
        bits.extend(places[entity].iter().map(|place| {
            let value = match place.get() {
                Some((share, index)) => from[share][index],
                None => NULL_BITS,
            };
            nulls += usize::from(value == NULL_BITS);
            value
        }));
        finish_column(bits, nulls, int)
    }
}

/// A column of value slots, `nulls` of them [`NULL_BITS`], as an Arrow array, without a copy.
fn finish_column(mut bits: Vec<u64>, nulls: usize, int: bool) -> ArrayRef {
    let nulls = (nulls > 0).then(|| {
        let valid = BooleanBuffer::collect_bool(bits.len(), |i| bits[i] != NULL_BITS);
        // Under a NULL the value is zero, as Arrow's builders leave it.
        for b in bits.iter_mut().filter(|b| **b == NULL_BITS) {
            *b = 0;
        }
        NullBuffer::new(valid)
    });
    let len = bits.len();
    let values = Buffer::from_vec(bits);
    if int {
        Arc::new(Int64Array::new(ScalarBuffer::new(values, 0, len), nulls))
    } else {
        Arc::new(Float64Array::new(ScalarBuffer::new(values, 0, len), nulls))
    }
}

/// The values buffer of a column [`finish_column`] made.
fn values_buffer(column: &ArrayRef) -> Option<Buffer> {
    match column.data_type() {
        DataType::Int64 => Some(column.as_primitive::<Int64Type>().values().inner().clone()),
        DataType::Float64 => Some(
            column
                .as_primitive::<Float64Type>()
                .values()
                .inner()
                .clone(),
        ),
        _ => None,
    }
}

/// Which worker computed a row of one entity and where among its rows; none when the row has
/// no key for it.
#[derive(Clone, Copy)]
struct Place {
    share: u32,
    index: u32,
}

impl Place {
    const NONE: Place = Place {
        share: u32::MAX,
        index: 0,
    };

    fn get(self) -> Option<(usize, usize)> {
        (self.share != u32::MAX).then_some((self.share as usize, self.index as usize))
    }
}

/// What every worker of a batch reads.
struct BatchInput<'b> {
    entities: &'b [Entity<'b>],
    /// Per entity, per log.
    inputs: &'b [Vec<LogInput<'b>>],
    /// Per entity.
    keys: &'b [BatchKeys],
    outputs: &'b Outputs,
    event_time: &'b [i64],
    horizon: Option<i64>,
    batch_no: u64,
    /// Where a key the cache lacks is read from (`None`: the store holds nothing the cache
    /// does not).
    store: Option<&'b StateStore>,
    misses: &'b Counter,
}

/// One worker's share of a batch: the rows whose keys are in its part of the cache, and what
/// it computed for them. Kept from batch to batch for its buffers.
#[derive(Default)]
struct Share {
    /// Per entity: this worker's rows, in arrival order.
    rows: Vec<Vec<u32>>,
    /// Per entity: its features' values ([`NULL_BITS`] for NULL) for those rows, a column
    /// after another.
    values: Vec<Vec<u64>>,
    query: QueryScratch,
    /// What the records it loaded and changed add to the cache's bytes.
    bytes: isize,
    evicted: u64,
    /// What it took for the flush being collected, if one is.
    snapshots: Option<Snapshots>,
}

impl Share {
    fn begin(&mut self, entities: usize, collecting: Option<u64>) {
        self.rows.resize_with(entities, Vec::new);
        self.values.resize_with(entities, Vec::new);
        self.rows.iter_mut().for_each(Vec::clear);
        self.bytes = 0;
        self.evicted = 0;
        self.snapshots = collecting.map(Snapshots::new);
    }

    /// Folds this worker's rows into their records in `cache` and writes their values.
    fn compute(
        &mut self,
        mut cache: CachePart<'_, Cached>,
        b: &BatchInput<'_>,
    ) -> Result<(), FeatureError> {
        for (e, entity) in b.entities.iter().enumerate() {
            let (rows, keys, inputs) = (&self.rows[e], &b.keys[e], &b.inputs[e]);
            let width = b.outputs.widths[e];
            let values = &mut self.values[e];
            values.clear();
            values.resize(rows.len() * width, NULL_BITS);
            let stride = rows.len();
            for (i, &row) in rows.iter().enumerate() {
                if i % PREFETCH_GROUP == 0 {
                    // The records of the events ahead are fetched from memory while these
                    // are computed: two groups ahead the records' logs, one group ahead
                    // (the logs in cache by then) the events and views they point to.
                    // A group's lookups run back to back, so that their misses overlap.
                    let g = PREFETCH_GROUP;
                    let (logs_from, events_from) = if i == 0 { (0, 0) } else { (i + 2 * g, i + g) };
                    prefetch_records(&cache, keys, rows, logs_from..i + 3 * g, false);
                    prefetch_records(&cache, keys, rows, events_from..i + 2 * g, true);
                }
                let row = row as usize;
                let Some((hash, key)) = keys.hashed(row) else {
                    continue;
                };
                let t = b.event_time[row];
                let cached = load(
                    &mut cache,
                    b.store,
                    (hash, key),
                    b.batch_no,
                    b.misses,
                    &mut self.bytes,
                    &mut self.snapshots,
                )?;
                let mut out = Out {
                    values,
                    stride,
                    row: i,
                };
                let logs = cached.record.logs_mut(&entity.logs);
                for (slot, input) in inputs.iter().enumerate() {
                    let log = &mut logs[slot].1;
                    if let Some(horizon) = b.horizon {
                        let reach = horizon - input.log.reach_ms;
                        if log.can_evict(reach) {
                            let dropped =
                                log.evict(reach, |at, id| input.view_horizon(horizon, at, id));
                            if dropped > 0 {
                                self.evicted += dropped as u64;
                                cached.dirty = true;
                            }
                        }
                    }
                    // `seconds_since_last` looks at the events before this one; every other
                    // aggregate includes it.
                    if input.since_last {
                        input.read_since_last(log, t, &mut out);
                    }
                    if input.fold(log, row, t, &mut self.query.values) {
                        cached.dirty = true;
                    }
                    input.read(log, t, &mut self.query, &mut out);
                }
                let bytes = entry_bytes(key, &cached.record);
                self.bytes += bytes as isize - cached.bytes as isize;
                cached.bytes = bytes;
            }
        }
        Ok(())
    }
}

/// `work` on every task, on `pool`'s threads when there is one (the caller waits); the results
/// in the tasks' order.
fn run_all<T: Send, R: Send>(
    pool: Option<&rayon::ThreadPool>,
    tasks: Vec<T>,
    work: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    match pool {
        Some(pool) => pool.install(|| tasks.into_par_iter().map(work).collect()),
        None => tasks.into_iter().map(work).collect(),
    }
}

/// One row's values of one entity's features, as its windows' readers answer: into a worker's
/// values of the entity, column `c` of row `row` at `c * stride + row`.
struct Out<'o> {
    values: &'o mut [u64],
    stride: usize,
    row: usize,
}

impl Out<'_> {
    /// Sets `reader`'s value; one of the other type than its column's is NULL.
    fn set(&mut self, reader: &Reader, int: bool, bits: Option<u64>) {
        let bits = bits
            .filter(|_| int_column(reader.agg) == int)
            .unwrap_or(NULL_BITS);
        self.values[reader.column * self.stride + self.row] = bits;
    }

    fn int(&mut self, reader: &Reader, value: Option<i64>) {
        self.set(reader, true, value.map(|v| v as u64));
    }

    fn float(&mut self, reader: &Reader, value: Option<f64>) {
        self.set(reader, false, value.map(f64::to_bits));
    }

    /// Sets `reader`'s value from a summary: `events` in the window, `summary` of its
    /// field's values (`None`: it aggregates no field).
    fn summarized(&mut self, reader: &Reader, events: u64, summary: Option<&Summary>) {
        match reader.agg {
            Agg::Count => self.int(
                reader,
                Some(if reader.counts_events {
                    events as i64
                } else {
                    summary.map_or(0, |s| s.count as i64)
                }),
            ),
            Agg::Sum => self.float(reader, summary.and_then(Summary::sum)),
            Agg::Avg => self.float(reader, summary.and_then(Summary::avg)),
            Agg::Min => self.float(reader, summary.and_then(Summary::min)),
            Agg::Max => self.float(reader, summary.and_then(Summary::max)),
            Agg::Stddev => self.float(reader, summary.and_then(Summary::stddev)),
            _ => self.set(reader, false, None),
        }
    }
}

/// Metadata keys of the moments windows began to fill: prefix + window id.
const STARTED_PREFIX: &[u8] = b"features/started/";

/// A windowed feature's warm-up: it is warming until the watermark passes `warm_at_ms`, when
/// its window holds every event it should.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Warmth {
    pub name: String,
    pub window_ms: i64,
    /// Event time from which its window holds events (`None`: not computed yet).
    pub started_ms: Option<i64>,
    pub warm_at_ms: Option<i64>,
    pub warming: bool,
}

impl Warmth {
    /// Sets `warming` for `watermark`: until the watermark reaches `warm_at_ms` (and while
    /// there is no watermark or no start yet).
    pub fn at(&mut self, watermark: Option<i64>) {
        self.warming = match (self.warm_at_ms, watermark) {
            (Some(warm_at), Some(wm)) => wm < warm_at,
            _ => true,
        };
    }
}

impl FeatureOperator {
    /// An operator over `store`, continuing from the state it holds.
    pub fn open(store: Arc<StateStore>, cache_max_bytes: usize) -> Result<Self, FeatureError> {
        let (stored, _) = store.visit_from(Cf::Features, &[], 1, |_, _| Ok::<_, StateError>(()))?;
        let started = store
            .scan_prefix(Cf::Meta, STARTED_PREFIX)?
            .into_iter()
            .filter_map(|(key, value)| {
                let id = <[u8; 8]>::try_from(key.get(STARTED_PREFIX.len()..)?).ok()?;
                let at = <[u8; 8]>::try_from(&value[..])
                    .ok()
                    .map(i64::from_le_bytes)?;
                Some((id, at))
            })
            .collect();
        Ok(Self {
            store_only: stored > 0,
            store_only_seen: false,
            store,
            cache: ShardedCache::default(),
            cache_bytes: 0,
            cache_peak_bytes: 0,
            cache_dropped: 0,
            cache_max_bytes,
            batch_no: 0,
            keys: Vec::new(),
            pool: None,
            min_parallel: 1,
            shares: Vec::new(),
            places: Vec::new(),
            spare: Vec::new(),
            scratch: Vec::new(),
            sweep_cursor: Vec::new(),
            cache_cursor: 0,
            cache_misses: metrics::counter!("riskstream_state_cache_misses_total"),
            records_written: metrics::counter!("riskstream_state_records_written_total"),
            cache_gauge: metrics::gauge!("riskstream_state_cache_bytes"),
            evicted: metrics::counter!("riskstream_state_evicted_events_total"),
            pending: None,
            collecting: None,
            epoch: 0,
            started,
            started_for: 0,
        })
    }

    /// Computes a batch's features only on the caller's thread while the bundle has fewer than
    /// `features` windowed features (see [`Self::with_threads`]): for a few cheap features,
    /// handing the work to the pool and gathering its columns cost more than they save (W1's
    /// five ran 10% slower on two threads, W2's 200 about 30% faster).
    pub fn with_min_parallel_features(mut self, features: usize) -> Self {
        self.min_parallel = features;
        self
    }

    /// Computes each batch's features on `threads` threads of the operator's own (one: on the
    /// caller's), each taking the keys of a part of the cache at a time; the values are the
    /// same for any number.
    pub fn with_threads(mut self, threads: usize) -> Result<Self, FeatureError> {
        self.pool = match threads {
            0 | 1 => None,
            n => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("features-{i}"))
                    .build()
                    .map_err(|e| FeatureError::Threads {
                        threads: n,
                        reason: e.to_string(),
                    })?,
            ),
        };
        Ok(self)
    }

    /// Which of `bundle`'s windowed features are still warming at `watermark`: a window that
    /// began to fill at `started` holds every event it should once the watermark reaches
    /// `started + window`. A feature sharing a window with an older one is as warm as it.
    pub fn warmth(&self, bundle: &CompiledBundle, watermark: Option<i64>) -> Vec<Warmth> {
        let features = bundle.window_features();
        let mut out: Vec<Warmth> = features
            .iter()
            .map(|f| Warmth {
                name: f.name.clone(),
                window_ms: f.window_ms(),
                started_ms: None,
                warm_at_ms: None,
                warming: true,
            })
            .collect();
        for window in Layout::new(features).windows() {
            let started = self.started.get(&window.id).copied();
            for reader in &window.readers {
                let w = &mut out[reader.feature];
                w.started_ms = started;
                w.warm_at_ms = started.map(|s| s + w.window_ms);
                w.at(watermark);
            }
        }
        out
    }

    /// The store behind the operator.
    pub fn store(&self) -> &Arc<StateStore> {
        &self.store
    }

    /// Appends the windowed feature columns of `bundle` to `events`, in arrival order, folding
    /// every event into state. `event_time[i]` is the (possibly corrected) time of row `i`.
    ///
    /// `horizon` is the lowest event time this batch or any later one may carry (the watermark
    /// when the batch began, minus `allowed_lateness`; `None` before the first watermark): the
    /// windows a batch touches drop their events older than `horizon − window` on the way, so a
    /// busy key's state stays within its window however rarely the sweeps of [`Self::evict`]
    /// reach it. Changes stay in the cache until [`Self::end_batch`] or [`Self::flush`].
    pub fn compute(
        &mut self,
        bundle: &CompiledBundle,
        events: &RecordBatch,
        event_time: &[i64],
        horizon: Option<i64>,
    ) -> Result<RecordBatch, FeatureError> {
        let features = bundle.window_features();
        if features.is_empty() {
            return Ok(events.clone());
        }
        let rows = events.num_rows();
        if event_time.len() != rows {
            return Err(FeatureError::TimesMismatch {
                times: event_time.len(),
                rows,
            });
        }
        self.batch_no += 1;

        let layout = Layout::new(features);
        if self.started_for != bundle.version() {
            // Windows the bundle dropped are swept away; one added again later starts afresh.
            // (Their stored start stays until a restart reads it back: a window dropped and
            // re-added across a restart is reported by its first start.)
            self.started_for = bundle.version();
            let kept: Vec<[u8; 8]> = layout.windows().map(|w| w.id).collect();
            self.started.retain(|id, _| kept.contains(id));
        }
        let earliest = event_time.iter().copied().min().unwrap_or(i64::MAX);
        for window in layout.windows() {
            self.started.entry(window.id).or_insert(earliest);
        }
        let outputs = Outputs::new(&layout, features);
        let inputs = layout
            .entities
            .iter()
            .map(|entity| {
                entity
                    .logs
                    .iter()
                    .map(|l| LogInput::new(l, events))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let entities = layout.entities.len();
        self.keys.resize_with(entities, BatchKeys::default);
        for (keys, entity) in self.keys.iter_mut().zip(&layout.entities) {
            let key_columns: Vec<&ArrayRef> =
                entity.columns.iter().map(|&i| events.column(i)).collect();
            keys.fill(&entity.id, &key_columns, rows, &self.cache);
        }

        // Each worker takes the keys of its part of the cache. Keys are independent of each
        // other and each key's events stay in arrival order, so the values do not depend on
        // how many workers share a batch.
        let (pool, workers) = match &self.pool {
            Some(pool) if rows >= PARALLEL_MIN_ROWS && features.len() >= self.min_parallel => {
                (Some(pool), pool.current_num_threads() * PARTS_PER_THREAD)
            }
            _ => (None, 1),
        };
        if self.shares.len() < workers {
            self.shares.resize_with(workers, Share::default);
        }
        let epoch = self.collecting.as_ref().map(|c| c.snapshots.epoch);
        let shares = &mut self.shares[..workers];
        for share in shares.iter_mut() {
            share.begin(entities, epoch);
        }
        self.places.resize_with(entities, Vec::new);
        for (e, (keys, places)) in self.keys.iter().zip(&mut self.places).enumerate() {
            places.clear();
            for row in 0..rows {
                places.push(match keys.hashed(row) {
                    Some((hash, _)) => {
                        let share = ShardedCache::<Cached>::part_of(hash, workers);
                        let mine = &mut shares[share].rows[e];
                        mine.push(row as u32);
                        Place {
                            share: share as u32,
                            index: mine.len() as u32 - 1,
                        }
                    }
                    None => Place::NONE,
                });
            }
        }

        let batch = BatchInput {
            entities: &layout.entities,
            inputs: &inputs,
            keys: &self.keys,
            outputs: &outputs,
            event_time,
            horizon,
            batch_no: self.batch_no,
            store: self.store_only.then_some(&*self.store),
            misses: &self.cache_misses,
        };
        let parts = self.cache.split_mut(workers);
        let tasks = parts.into_iter().zip(shares.iter_mut()).collect();
        for result in run_all(pool, tasks, |(cache, share)| share.compute(cache, &batch)) {
            result?;
        }
        let mut evicted = 0;
        for share in shares.iter_mut() {
            self.cache_bytes = self.cache_bytes.saturating_add_signed(share.bytes);
            evicted += share.evicted;
            if let (Some(collecting), Some(taken)) = (&mut self.collecting, share.snapshots.take())
            {
                collecting.snapshots.chunks.extend(taken.chunks);
            }
        }
        self.evicted.increment(evicted);

        // The values, computed row by row, become columns, in the last batch's buffers where
        // the batch is gone: 200 fresh buffers a batch were a seventh of the features' time
        // (the allocator gave their pages back to the OS and took them back zeroed).
        let mut spare: Vec<Vec<u64>> = std::mem::take(&mut self.spare)
            .into_iter()
            .filter_map(|buffer| buffer.into_vec().ok())
            .collect();
        spare.resize_with(features.len(), || Vec::with_capacity(rows));
        let (shares, places) = (&*shares, &self.places);
        let tasks = spare.into_iter().enumerate().collect();
        let columns = run_all(pool, tasks, |(feature, spare)| {
            outputs.column(feature, shares, places, rows, spare)
        });
        self.spare = columns.iter().filter_map(values_buffer).collect();
        let mut all = events.columns().to_vec();
        all.extend(columns);
        RecordBatch::try_new(Arc::clone(bundle.input_schema()), all).map_err(|source| {
            FeatureError::Arrow {
                feature: "*".into(),
                source,
            }
        })
    }

    /// Ends a batch: collects the next cache shards for a flush in progress
    /// ([`Self::flush`]), and when the cache is over its memory cap, writes the least recently used
    /// records that changed (one write batch) and drops them until the cache is at 75 % of
    /// its cap.
    pub fn end_batch(&mut self) -> Result<(), FeatureError> {
        self.collect(COLLECT_PER_BATCH)?;
        // The tables' free slots count too; a record dropped frees all it holds but its slot.
        let held = self.held_bytes();
        self.cache_peak_bytes = self.cache_peak_bytes.max(held);
        self.cache_gauge.set(held as f64);
        if held <= self.cache_max_bytes {
            return Ok(());
        }
        let target = self.cache_max_bytes / 4 * 3;
        let mut by_age: Vec<(u64, usize)> = self
            .cache
            .values()
            .map(|c| (c.last_used, c.bytes))
            .collect();
        by_age.sort_unstable();
        let mut bytes = held;
        let mut cutoff = None;
        for (age, size) in by_age {
            if bytes <= target {
                break;
            }
            bytes -= size - ShardedCache::<Cached>::SLOT_BYTES;
            cutoff = Some(age);
        }
        let Some(cutoff) = cutoff else {
            return Ok(());
        };
        // Records leave the cache only once the store holds their latest version.
        self.wait()?;
        let mut batch = self.store.batch();
        // In key order, like a flush's ([`in_key_order`]): in hash order each memtable insert
        // searched the skip list from the top, 13 % of the scorer's time on W2 with a cache a
        // tenth of its state.
        let mut leaving: Vec<(&StateKey, &mut Cached)> = self
            .cache
            .iter_mut()
            .filter(|(_, cached)| cached.last_used <= cutoff && cached.dirty)
            .collect();
        leaving.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let written = leaving.len() as u64;
        for (key, cached) in leaving {
            write_record(&mut batch, key.as_bytes(), cached, &mut self.scratch)?;
        }
        self.store.write(batch)?;
        self.records_written.increment(written);
        let before = self.cache.len();
        self.cache.retain(|_, c| c.last_used > cutoff);
        self.cache_dropped += (before - self.cache.len()) as u64;
        self.store_only = true;
        self.store_only_seen = true;
        self.cache_bytes = self.cache.values().map(|c| c.bytes).sum();
        Ok(())
    }

    /// Writes every changed record and `meta` entries in one write batch, applied in the
    /// background: once it is ([`Self::wait`]), the store holds the state as of this call.
    /// Call between batches.
    ///
    /// The call itself only marks the moment. The changed records are collected over the
    /// next batches ([`Self::end_batch`] takes a few cache shards each time, and a record a
    /// batch is about to change is taken first, as it was), so that no batch waits for all of
    /// them; then encoding and RocksDB's insert run on the writer thread. Taking a record
    /// shares it: it is copied only if a batch changes it before the writer has encoded it.
    /// The cache keeps every record it writes (emptied ones included) until the write is
    /// applied, so lookups never see an older stored version.
    pub fn flush(&mut self, meta: &[(&[u8], &[u8])]) -> Result<(), FeatureError> {
        self.flush_then(meta, None)
    }

    /// [`Self::flush`], then `after` on the writer thread once the write is applied and before
    /// anything else is written to the store: `after` sees the store exactly as of this call
    /// (a checkpoint is taken there). Records that a cache trim writes out wait for it, and an
    /// eviction sweep's rewrite of records only in the store changes nothing an event still to
    /// come can read.
    pub fn flush_then(
        &mut self,
        meta: &[(&[u8], &[u8])],
        after: Option<AfterWrite>,
    ) -> Result<(), FeatureError> {
        self.wait()?;
        self.epoch += 1;
        self.collecting = Some(Collecting {
            snapshots: Snapshots::new(self.epoch),
            next_shard: 0,
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .chain(self.started.iter().map(|(id, at)| {
                    (
                        [STARTED_PREFIX, id.as_slice()].concat(),
                        at.to_le_bytes().to_vec(),
                    )
                }))
                .collect(),
            after,
        });
        Ok(())
    }

    /// Collects everything the flush in progress has not yet taken, now, and starts its write.
    pub fn collect_now(&mut self) -> Result<(), FeatureError> {
        self.collect(usize::MAX)
    }

    /// Collects whole cache shards for the flush in progress, if any, until `budget` records
    /// have been taken (at least one shard); once all shards are, starts its write. (Whole
    /// shards: a shard's order changes when it grows, so a position inside one would not
    /// survive the next batch.)
    fn collect(&mut self, budget: usize) -> Result<(), FeatureError> {
        let Some(collecting) = &mut self.collecting else {
            return Ok(());
        };
        let mut taken = 0;
        while collecting.next_shard < self.cache.shards() && taken < budget {
            for (key, cached) in self.cache.shard_iter_mut(collecting.next_shard) {
                taken += usize::from(collecting.snapshots.take(key.as_bytes(), cached));
            }
            collecting.next_shard += 1;
        }
        if collecting.next_shard < self.cache.shards() {
            return Ok(());
        }
        let Some(Collecting {
            snapshots: Snapshots {
                chunks: snapshots, ..
            },
            meta,
            after,
            ..
        }) = self.collecting.take()
        else {
            return Ok(());
        };
        let taken: usize = snapshots.iter().map(Vec::len).sum();
        self.records_written.increment(taken as u64);
        self.pending = Some(self.store.write_in_background(
            move |batch| {
                // Room for it all up front: grown by doubling, a write batch of a whole
                // state briefly held two copies of itself, the largest part of peak RSS.
                let bytes: usize = snapshots
                    .iter()
                    .flatten()
                    .map(|(key, record)| {
                        BATCH_ENTRY_BYTES + key.as_bytes().len() + record.encoded_len_hint()
                    })
                    .sum();
                batch.reserve(
                    bytes
                        + meta
                            .iter()
                            .map(|(k, v)| k.len() + v.len() + 16)
                            .sum::<usize>(),
                );
                let mut scratch = Vec::new();
                for (key, record) in in_key_order(&snapshots) {
                    put_record(batch, key.as_bytes(), record, &mut scratch)?;
                }
                for (k, v) in &meta {
                    batch.put(Cf::Meta, k, v)?;
                }
                Ok(())
            },
            after,
        )?);
        Ok(())
    }

    /// Whether the last [`Self::flush`] is still being collected or applied (a flush now
    /// would wait for it).
    pub fn writing(&self) -> bool {
        self.collecting.is_some() || self.pending.as_ref().is_some_and(PendingWrite::running)
    }

    /// What the cache counts against its cap: its entries and the tables' free slots.
    fn held_bytes(&self) -> usize {
        self.cache_bytes + self.cache.free_slot_bytes()
    }

    /// What the cache holds against its cap.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            bytes: self.held_bytes(),
            peak_bytes: self.cache_peak_bytes,
            max_bytes: self.cache_max_bytes,
            records: self.cache.len(),
            dropped: self.cache_dropped,
        }
    }

    /// Waits for the last [`Self::flush`]: collects what it has not yet, waits for its write,
    /// then lets the cache drop the records it emptied.
    pub fn wait(&mut self) -> Result<(), FeatureError> {
        self.collect(usize::MAX)?;
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        pending.wait()?;
        let before = self.cache.len();
        self.cache.retain(|_, c| c.dirty || !c.record.is_empty());
        if self.cache.len() != before {
            self.cache_bytes = self.cache.values().map(|c| c.bytes).sum();
        }
        Ok(())
    }

    /// Drops state that no event still to come can reach: panes older than
    /// `watermark − allowed_lateness − window`, records left empty, and the state of features
    /// the running bundle no longer declares. Each call walks the next `store_keys` records of
    /// the store and of the cache (each wrapping around), so its cost is bounded however large
    /// the state; returns the events dropped. Records in the cache are changed there (written
    /// by the next trim or flush); records only in the store are rewritten in one write batch.
    pub fn evict(
        &mut self,
        bundle: &CompiledBundle,
        watermark: i64,
        allowed_lateness_ms: i64,
        store_keys: usize,
    ) -> Result<usize, FeatureError> {
        // Per live log and window, the time at or before which no event can be reached again.
        let layout = Layout::new(bundle.window_features());
        let floor = watermark - allowed_lateness_ms;
        let live: HashMap<[u8; 8], i64> =
            layout.logs().map(|l| (l.id, floor - l.reach_ms)).collect();
        let views: HashMap<[u8; 8], i64> = layout
            .windows()
            .map(|w| (w.id, floor - w.shape.window_ms))
            .collect();
        let evict_record = |record: &mut Record| -> (usize, bool) {
            let mut changed = record.retain(|id| live.contains_key(id));
            let mut dropped = 0;
            for slot in 0..record.logs.len() {
                let (id, log) = &record.logs[slot];
                let Some(&horizon) = live.get(id) else {
                    continue;
                };
                // A snapshot the writer holds is copied only when something may go.
                if !log.can_evict(horizon) {
                    continue;
                }
                let n = record.all_mut()[slot]
                    .1
                    .evict(horizon, |_, view| views.get(view).copied());
                dropped += n;
                changed |= n > 0;
            }
            (dropped, changed)
        };

        let mut dropped = 0;
        let mut batch = self.store.batch();
        // The next slice of records in the store, while it may hold records the cache does not;
        // those in the cache are handled below, and their stored values are not even decoded.
        if self.store_only {
            let cache = &self.cache;
            let scratch = &mut self.scratch;
            let seen = &mut self.store_only_seen;
            let (visited, last) = self.store.visit_from(
                Cf::Features,
                &self.sweep_cursor,
                store_keys,
                |key, bytes| -> Result<(), FeatureError> {
                    if cache.contains_key(key) {
                        return Ok(());
                    }
                    *seen = true;
                    match Record::decode(bytes) {
                        Some(mut record) => {
                            let (n, changed) = evict_record(&mut record);
                            dropped += n;
                            if changed || record.is_empty() {
                                put_record(&mut batch, key, &record, scratch)?;
                            }
                        }
                        // Unreadable leftovers (an older format): drop them.
                        None => batch.delete(Cf::Features, key)?,
                    }
                    Ok(())
                },
            )?;
            // Continue just after the last key seen; start over when the slice came up short,
            // and stop sweeping the store after a whole pass that found nothing only there.
            self.sweep_cursor = match last {
                Some(mut next) if visited == store_keys => {
                    next.push(0);
                    next
                }
                _ => {
                    self.store_only = self.store_only_seen;
                    self.store_only_seen = false;
                    Vec::new()
                }
            };
        }
        self.store.write(batch)?;
        // The next slice of the cache (positions shift as records come and go, so a record
        // may wait an extra round; none waits forever).
        if self.cache_cursor >= self.cache.len() {
            self.cache_cursor = 0;
        }
        let from = self.cache_cursor;
        self.cache_cursor += store_keys;
        for (key, cached) in self.cache.iter_mut_from(from).take(store_keys) {
            if let Some(collecting) = &mut self.collecting {
                collecting.snapshots.take(key.as_bytes(), cached);
            }
            let (n, changed) = evict_record(&mut cached.record);
            dropped += n;
            if changed {
                cached.dirty = true;
                let bytes = entry_bytes(key.as_bytes(), &cached.record);
                self.cache_bytes = self.cache_bytes + bytes - cached.bytes;
                cached.bytes = bytes;
            }
        }
        self.evicted.increment(dropped as u64);
        Ok(dropped)
    }

    /// How much state the operator holds: the cache plus the records only in the store (walks
    /// the store).
    pub fn stats(&self) -> Result<StateStats, FeatureError> {
        let mut stats = StateStats {
            cached: self.cache.len(),
            dirty: self.cache.values().filter(|c| c.dirty).count(),
            ..StateStats::default()
        };
        for cached in self.cache.values() {
            if !cached.record.is_empty() {
                stats.keys += 1;
                stats.events += cached.record.events();
            }
        }
        for (key, bytes) in self.store.scan_prefix(Cf::Features, &[])? {
            if !self.cache.contains_key(&key[..]) {
                stats.keys += 1;
                stats.events += Record::decode(&bytes).map_or(0, |r| r.events());
            }
        }
        Ok(stats)
    }
}

/// What the stored state of one log holds (see [`state_report`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogState {
    /// The log's entity and filter, e.g. `customer_id where tx_type = 'CNP'`; logs of no
    /// feature of the bundle are reported together as `(not in this bundle)`.
    pub name: String,
    /// Values kept per event (the fields its features aggregate), and its windows.
    pub fields: usize,
    pub windows: usize,
    /// Keys with events in the log, the events held, and the bytes of their encoding.
    pub keys: usize,
    pub events: usize,
    pub bytes: usize,
}

/// What a state directory holds, per log of `bundle`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StateReport {
    pub logs: Vec<LogState>,
    /// Records (one per entity key) and the bytes of their keys.
    pub records: usize,
    pub key_bytes: usize,
    /// Bytes of every stored record's value.
    pub value_bytes: usize,
}

/// Walks every feature record in `store` (written by a [`FeatureOperator`] and flushed) and
/// sums up, per log of `bundle`, the keys, events and bytes it holds.
pub fn state_report(
    store: &StateStore,
    bundle: &CompiledBundle,
) -> Result<StateReport, FeatureError> {
    let layout = Layout::new(bundle.window_features());
    let mut report = StateReport::default();
    let mut ids = Vec::new();
    for entity in &layout.entities {
        let key: Vec<&str> = entity
            .columns
            .iter()
            .map(|&i| bundle.input_schema().field(i).name().as_str())
            .collect();
        for log in &entity.logs {
            let name = match &log.source.spec.filter {
                Some(filter) => format!("{} where {filter}", key.join(", ")),
                None => key.join(", "),
            };
            ids.push(log.id);
            report.logs.push(LogState {
                name,
                fields: log.fields.len(),
                windows: log.windows.len(),
                ..LogState::default()
            });
        }
    }
    let other = report.logs.len();
    report.logs.push(LogState {
        name: "(not in this bundle)".into(),
        ..LogState::default()
    });
    let mut scratch = Vec::new();
    store.visit_from(Cf::Features, &[], usize::MAX, |key, bytes| {
        let record = Record::decode(bytes).ok_or_else(|| FeatureError::Corrupt {
            key: String::from_utf8_lossy(key.get(8..).unwrap_or_default()).into_owned(),
        })?;
        report.records += 1;
        report.key_bytes += key.len();
        report.value_bytes += bytes.len();
        for (id, log) in record.logs.iter() {
            let at = ids.iter().position(|i| i == id).unwrap_or(other);
            let entry = &mut report.logs[at];
            scratch.clear();
            log.encode(&mut scratch);
            entry.keys += 1;
            entry.events += log.len();
            entry.bytes += scratch.len();
        }
        Ok::<_, FeatureError>(())
    })?;
    if report.logs[other].keys == 0 {
        report.logs.pop();
    }
    Ok(report)
}

/// The cached record for `key`, loaded from `store` on a miss; without a store (it holds no
/// record the cache does not), a miss is a new key.
fn load<'c>(
    cache: &'c mut CachePart<'_, Cached>,
    store: Option<&StateStore>,
    (hash, key): (u64, &[u8]),
    batch_no: u64,
    misses: &Counter,
    cache_bytes: &mut isize,
    snapshots: &mut Option<Snapshots>,
) -> Result<&'c mut Cached, FeatureError> {
    let (cached, inserted) = cache.get_or_try_insert_hashed(hash, key, || {
        misses.increment(1);
        let Some(store) = store else {
            return Ok(Cached::new(key, Record::default(), batch_no));
        };
        let record = match store.get_with(Cf::Features, key, Record::decode)? {
            Some(Some(record)) => record,
            Some(None) => {
                return Err(FeatureError::Corrupt {
                    key: String::from_utf8_lossy(&key[8..]).into_owned(),
                })
            }
            None => Record::default(),
        };
        Ok(Cached::new(key, record, batch_no))
    })?;
    if inserted {
        *cache_bytes += cached.bytes as isize;
    }
    cached.last_used = batch_no;
    if let Some(snapshots) = snapshots {
        snapshots.take(key, cached);
    }
    Ok(cached)
}

/// The snapshots of a flush sorted by key. RocksDB inserts a write batch into its memtable
/// one key at a time, each from where the last one went in: in hash order each insert searched
/// the memtable from the top, and writing a million records kept a core busy for seconds; in
/// key order each goes in a step or two from the last.
fn in_key_order(
    snapshots: &[Vec<(StateKey, Record)>],
) -> impl Iterator<Item = &(StateKey, Record)> {
    // Sorted by a copy of the bytes after the entity id first, so that most comparisons stay
    // inside the array being sorted instead of following a pointer to each record.
    let mut order: Vec<([u8; 16], &(StateKey, Record))> = snapshots
        .iter()
        .flatten()
        .map(|snapshot| {
            let key = snapshot.0.as_bytes();
            let mut head = [0; 16];
            let from = key.len().min(8);
            let take = (key.len() - from).min(16);
            head[..take].copy_from_slice(&key[from..from + take]);
            (head, snapshot)
        })
        .collect();
    order.sort_unstable_by(|(a_head, a), (b_head, b)| {
        a_head
            .cmp(b_head)
            .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
    });
    order.into_iter().map(|(_, snapshot)| snapshot)
}

/// What a RocksDB write batch adds to a put's key and value: a tag, the column family and two
/// lengths as varints.
const BATCH_ENTRY_BYTES: usize = 8;

/// Puts (or, when empty, deletes) `cached` under `key` and marks it clean.
fn write_record(
    batch: &mut StateBatch<'_>,
    key: &[u8],
    cached: &mut Cached,
    scratch: &mut Vec<u8>,
) -> Result<(), FeatureError> {
    put_record(batch, key, &cached.record, scratch)?;
    cached.dirty = false;
    Ok(())
}

/// Adds `record` under `key` to `batch`; an empty record is deleted.
fn put_record(
    batch: &mut StateBatch<'_>,
    key: &[u8],
    record: &Record,
    scratch: &mut Vec<u8>,
) -> Result<(), StateError> {
    if record.is_empty() {
        batch.delete(Cf::Features, key)
    } else {
        record.encode(scratch);
        batch.put(Cf::Features, key, scratch)
    }
}

impl<'a> LogInput<'a> {
    fn new(log: &'a Log<'a>, events: &RecordBatch) -> Result<Self, FeatureError> {
        let values = log
            .fields
            .iter()
            .map(|field| {
                let source = field.source;
                // Values of other types can only be told apart, not added up.
                let agg = if field.distinct_only {
                    Agg::CountDistinct
                } else {
                    Agg::Sum
                };
                let column = source.of_column.ok_or_else(|| {
                    ArrowError::InvalidArgumentError("no field to aggregate".into())
                });
                column
                    .and_then(|i| values_of(events.column(i), agg))
                    .map_err(|e| FeatureError::Arrow {
                        feature: source.name.clone(),
                        source: e,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            log,
            filter: log.source.filter_mask(events),
            values,
            since_last: log
                .windows
                .iter()
                .flat_map(|w| &w.readers)
                .any(|r| r.agg == Agg::SecondsSinceLast),
        })
    }

    /// The horizon of the log's view `at` (`id`) when the log's events are evicted at
    /// `horizon`; `None` for a view of windows the layout no longer has.
    fn view_horizon(&self, horizon: i64, at: usize, id: &[u8; 8]) -> Option<i64> {
        let view = self.log.views.get(at).filter(|v| v.id == *id)?;
        Some(horizon - view.shape.window_ms)
    }

    /// Adds row `row` to `log` when it passes the filter; true if it did. `values` is a
    /// reusable buffer.
    fn fold(&self, log: &mut EventLog, row: usize, ts: i64, values: &mut Vec<f64>) -> bool {
        if self.filter.as_ref().is_some_and(|m| !m.value(row)) {
            return false;
        }
        values.clear();
        values.extend(self.values.iter().map(|v| {
            if v.is_null(row) {
                NO_VALUE
            } else {
                v.value(row)
            }
        }));
        log.insert(ts, values, &self.log.views);
        true
    }

    /// Appends the values of the `seconds_since_last` readers at time `t` (before the event is
    /// added).
    fn read_since_last(&self, log: &mut EventLog, t: i64, out: &mut Out) {
        let since = |last: Option<i64>| last.map(|ts| (t - ts) as f64 / 1000.0);
        let readers = |w: &'a Window| w.readers.iter().filter(|r| r.agg == Agg::SecondsSinceLast);
        match log.views(&self.log.views) {
            Some(views) => {
                for (window, view) in self.log.windows.iter().zip(views) {
                    for reader in readers(window) {
                        let last = view.last(window.shape.window_ms, t).map(|e| e.ts);
                        out.float(reader, since(last));
                    }
                }
            }
            None => {
                for window in &self.log.windows {
                    for reader in readers(window) {
                        let last = log.last(window.field, window.shape.window_ms, t);
                        out.float(reader, since(last.map(|(ts, _)| ts)));
                    }
                }
            }
        }
    }

    /// Appends the values at time `t` of every reader of the log but `seconds_since_last`.
    fn read(&self, log: &mut EventLog, t: i64, q: &mut QueryScratch, out: &mut Out) {
        let l = self.log;
        match log.views(&l.views) {
            Some(views) => {
                for (window, view) in l.windows.iter().zip(views) {
                    let len = window.shape.window_ms;
                    let answer = match window.kind() {
                        // Read before the event was added.
                        Agg::SecondsSinceLast => continue,
                        Agg::CountDistinct => {
                            Answer::Int(Some(view.count_distinct(len, t, &mut q.distinct) as i64))
                        }
                        Agg::Last => Answer::Float(view.last(len, t).map(|e| e.value)),
                        _ => {
                            let s = view.summary(window.shape, t);
                            Answer::Summary(s.events, Some(s))
                        }
                    };
                    answer.push(window, out);
                }
            }
            None => {
                if !l.lengths.is_empty() {
                    log.summaries(
                        t,
                        &l.lengths,
                        &l.summed,
                        l.moments,
                        &mut q.sums,
                        &mut q.counts,
                    );
                }
                q.distinct_counts.clear();
                for (field, lengths) in &l.distinct {
                    log.distinct_counts(*field, t, lengths, &mut q.seen, &mut q.distinct_counts);
                }
                for window in &l.windows {
                    let len = window.shape.window_ms;
                    let answer = match window.kind() {
                        // Read before the event was added.
                        Agg::SecondsSinceLast => continue,
                        Agg::CountDistinct => {
                            Answer::Int(window.field.map(|_| q.distinct_counts[window.slot] as i64))
                        }
                        Agg::Last => Answer::Float(
                            window
                                .field
                                .and_then(|f| log.last(Some(f), len, t))
                                .map(|(_, v)| v),
                        ),
                        _ => Answer::Summary(
                            q.counts[window.length],
                            window
                                .field
                                .map(|_| q.sums[window.length * l.summed.len() + window.slot]),
                        ),
                    };
                    answer.push(window, out);
                }
            }
        }
    }
}

/// What a window answers at one time, from the walk or from a view: a summary (the events in
/// the window, and its field's values), or the value of a window of its own.
enum Answer {
    Summary(u64, Option<Summary>),
    Int(Option<i64>),
    Float(Option<f64>),
}

impl Answer {
    /// Sets the value of every reader of `window`.
    fn push(&self, window: &Window, out: &mut Out) {
        for reader in &window.readers {
            match self {
                Answer::Summary(events, summary) => {
                    out.summarized(reader, *events, summary.as_ref())
                }
                Answer::Int(v) => out.int(reader, *v),
                Answer::Float(v) => out.float(reader, *v),
            }
        }
    }
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

/// Rows whose records are prefetched together (see [`prefetch_records`]).
const PREFETCH_GROUP: usize = 8;

/// Starts loading into the CPU's caches the records that `cache` holds of `rows[ahead]` (rows
/// past the end are skipped): their windows, or with `events_too` what the windows point to
/// (the windows should be in cache by then).
fn prefetch_records(
    cache: &CachePart<'_, Cached>,
    keys: &BatchKeys,
    rows: &[u32],
    ahead: std::ops::Range<usize>,
    events_too: bool,
) {
    let ahead = ahead.start.min(rows.len())..ahead.end.min(rows.len());
    for &row in &rows[ahead] {
        if let Some(cached) = keys
            .hashed(row as usize)
            .and_then(|(hash, key)| cache.get_hashed(hash, key))
        {
            if events_too {
                cached.record.prefetch_events();
            } else {
                cached.record.prefetch();
            }
        }
    }
}

/// One entity's state keys for every row of a batch, in one buffer, with their hashes.
#[derive(Default)]
struct BatchKeys {
    bytes: Vec<u8>,
    /// Row `i`'s key is `bytes[ends[i - 1]..ends[i]]`; empty when it has none (a key always
    /// holds the 8-byte entity id).
    ends: Vec<usize>,
    /// Row `i`'s key's cache hash (each key is looked up three times: twice to prefetch).
    hashes: Vec<u64>,
}

impl BatchKeys {
    /// The keys of `rows` rows: `entity` then the key fields' values.
    fn fill<V>(
        &mut self,
        entity: &[u8; 8],
        columns: &[&ArrayRef],
        rows: usize,
        cache: &ShardedCache<V>,
    ) {
        self.bytes.clear();
        self.ends.clear();
        self.hashes.clear();
        for row in 0..rows {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(entity);
            if !entity_key(columns, row, &mut self.bytes) {
                self.bytes.truncate(start);
            }
            self.ends.push(self.bytes.len());
            self.hashes.push(cache.hash(&self.bytes[start..]));
        }
    }

    /// Row `row`'s key and its hash; `None` when it has none or past the last row.
    fn hashed(&self, row: usize) -> Option<(u64, &[u8])> {
        Some((*self.hashes.get(row)?, self.get(row)?))
    }

    /// Row `row`'s key; `None` when it has none (a key field is NULL) or past the last row.
    fn get(&self, row: usize) -> Option<&[u8]> {
        let &end = self.ends.get(row)?;
        let start = row.checked_sub(1).map_or(0, |r| self.ends[r]);
        (start < end).then(|| &self.bytes[start..end])
    }
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

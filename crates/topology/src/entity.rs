//! The entity stage of one entity kind: per partition of the kind's repartition topic, folds
//! the events into that partition's own state and computes the kind's windowed features
//! exactly as the single topology does ([`FeatureOperator::compute`]), then sends the partial
//! result (event id and features) to the gather topic, partitioned by event id.
//!
//! A partition's state lives in a store of its own (`<state.dir>/by-<entity>/p<N>`), which
//! records the first input offset it does not cover. When a partition is assigned, the stage
//! opens its store and starts reading at that offset: what the group had already committed
//! is folded again without being emitted (its partials were delivered before), so the state
//! catches up before the partition emits anything. Before a partition is revoked its state is
//! written and its offset committed. An event delivered twice (an ingest that crashed before
//! committing sends it again) is recognised by its id and folded once.
//!
//! What it must not do: apply time (the ingest did), or score.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{Field, Schema, TimestampMillisecondType};
use rdkafka::consumer::BaseConsumer;
use riskstream_common::Config;
use riskstream_features::{FeatureError, FeatureOperator};
use riskstream_state::{Cf, StateStore};

use crate::ingest::RULES_VERSION;
use crate::stage::{self, lock, Rebalanced, Received, StageConsumer, StageContext, StageProducer};
use crate::wire::{self, Header, KeyWriter, Kind};
use crate::{now_ms, Bundles, Plan, TopologyError};

/// Metadata key of the first input offset a partition's state does not cover.
const OFFSET_KEY: &[u8] = b"stage/offset";
/// How long (processing time) an event id is remembered to recognise it delivered again.
const DEDUP_RETAIN_MS: i64 = 120_000;
/// The smallest feature cache a partition gets.
const MIN_PARTITION_CACHE: usize = 1 << 20;
/// Records examined per eviction sweep of a partition, and the time between sweeps.
const EVICTION_SWEEP_KEYS: usize = 512;
const EVICTION_EVERY_MS: i64 = 1_000;

/// One partition's state.
struct EntityPartition {
    operator: FeatureOperator,
    /// The first input offset not folded.
    next_offset: i64,
    /// Offsets below this were committed by the group (their partials delivered): folded
    /// again after an assignment, not emitted.
    emit_from: i64,
    /// The offset recorded with the state last written.
    written_offset: i64,
    /// Per ingest producer, its last watermark and when it came (processing time).
    watermarks: HashMap<u64, (Option<i64>, i64)>,
    /// Event ids (hashed) folded recently, and when.
    seen: HashSet<u64>,
    seen_order: VecDeque<(i64, u64)>,
    last_eviction: i64,
}

impl EntityPartition {
    /// The lowest event time any producer may still send (`None` while one has no watermark).
    fn horizon(&self, lateness_ms: i64) -> Option<i64> {
        let mut horizon: Option<i64> = None;
        for (wm, _) in self.watermarks.values() {
            let h = (*wm)? - lateness_ms;
            horizon = Some(horizon.map_or(h, |x: i64| x.min(h)));
        }
        horizon
    }
}

/// The stage's partitions, shared with the consumer's rebalance callback.
struct EntityState {
    name: String,
    topic: String,
    root: PathBuf,
    cache_bytes: usize,
    partitions: BTreeMap<i32, EntityPartition>,
    /// The first error met in a rebalance callback, for the stage loop to stop on.
    failed: Option<TopologyError>,
    /// Keeps a temporary state root alive.
    _temp: Option<tempfile::TempDir>,
}

impl EntityState {
    fn open(
        &self,
        partition: i32,
        committed: Option<i64>,
    ) -> Result<EntityPartition, TopologyError> {
        let err = |message: String| TopologyError::State {
            topic: self.topic.clone(),
            partition,
            message,
        };
        let dir = self.root.join(format!("p{partition}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let store = StateStore::open_small(&dir).map_err(|e| err(e.to_string()))?;
        let next_offset = match store
            .get(Cf::Meta, OFFSET_KEY)
            .map_err(|e| err(e.to_string()))?
        {
            Some(bytes) => <[u8; 8]>::try_from(&bytes[..])
                .map(i64::from_le_bytes)
                .map_err(|_| err("its recorded offset is corrupt".into()))?,
            None => 0,
        };
        let operator = FeatureOperator::open(Arc::new(store), self.cache_bytes)
            .map_err(|e| err(e.to_string()))?;
        let emit_from = committed.unwrap_or(0).max(next_offset);
        tracing::info!(
            stage = %self.name,
            partition,
            state_offset = next_offset,
            committed = ?committed,
            "partition opened: replaying {} events before emitting",
            emit_from - next_offset
        );
        Ok(EntityPartition {
            operator,
            next_offset,
            emit_from,
            written_offset: next_offset,
            watermarks: HashMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            last_eviction: 0,
        })
    }

    /// Writes a partition's state with the offset it covers, and waits until it is applied.
    fn write(&mut self, partition: i32) -> Result<Option<i64>, TopologyError> {
        let Some(part) = self.partitions.get_mut(&partition) else {
            return Ok(None);
        };
        if part.next_offset == part.written_offset {
            return Ok(Some(part.next_offset));
        }
        let offset = part.next_offset.to_le_bytes();
        let err = |e: FeatureError| TopologyError::State {
            topic: self.topic.clone(),
            partition,
            message: format!("cannot write its state: {e}"),
        };
        part.operator
            .flush(&[(OFFSET_KEY, &offset[..])])
            .map_err(err)?;
        part.operator.wait().map_err(err)?;
        part.written_offset = part.next_offset;
        Ok(Some(part.next_offset))
    }
}

/// The rebalance answer: open assigned partitions (their start offset is their state's), write
/// and close revoked ones.
struct Handler {
    state: Arc<Mutex<EntityState>>,
}

impl Rebalanced for Handler {
    fn assigned(
        &self,
        consumer: &BaseConsumer<StageContext>,
        partitions: &[i32],
    ) -> Vec<(i32, Option<i64>)> {
        let mut state = lock(&self.state);
        let committed = stage::committed(consumer, &state.topic, partitions);
        let mut starts = Vec::new();
        for (p, committed) in committed {
            match state.open(p, committed) {
                Ok(part) => {
                    starts.push((p, Some(part.next_offset)));
                    state.partitions.insert(p, part);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot open a partition's state");
                    state.failed.get_or_insert(e);
                }
            }
        }
        starts
    }

    fn revoked(&self, consumer: &BaseConsumer<StageContext>, partitions: &[i32]) {
        let mut state = lock(&self.state);
        let mut offsets = Vec::new();
        for &p in partitions {
            match state.write(p) {
                Ok(Some(offset)) => offsets.push((p, offset)),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot write a revoked partition's state; its new owner replays from the last commit");
                }
            }
            state.partitions.remove(&p);
        }
        stage::commit(consumer, &state.topic, offsets);
    }
}

/// Runs the entity stage of `plan.kinds[kind]` until `stop`.
pub fn run(
    config: &Config,
    plan: &Plan,
    kind: usize,
    bundles: &Bundles,
    stop: &AtomicBool,
) -> Result<(), TopologyError> {
    let entity = &plan.kinds[kind];
    let stage_name = format!("by-{}", entity.name);
    let (root, temp) = match &config.state.dir {
        Some(dir) => (dir.join(&stage_name), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix(&format!("riskstream-{stage_name}-"))
                .tempdir()
                .map_err(|e| TopologyError::State {
                    topic: entity.topic.clone(),
                    partition: -1,
                    message: format!("cannot create a temporary state directory: {e}"),
                })?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let stores = (plan.partitions as usize * plan.kinds.len()).max(1);
    let state = Arc::new(Mutex::new(EntityState {
        name: stage_name.clone(),
        topic: entity.topic.clone(),
        root,
        cache_bytes: (config.state.cache_max_bytes / stores).max(MIN_PARTITION_CACHE),
        partitions: BTreeMap::new(),
        failed: None,
        _temp: temp,
    }));
    let consumer = StageConsumer::subscribe(
        &config.kafka,
        "entity",
        &format!("{}.{stage_name}", plan.group),
        &entity.topic,
        Arc::new(Handler {
            state: Arc::clone(&state),
        }),
    )?;
    let producer = StageProducer::new(&config.kafka, "entity")?;
    let schema = config
        .event_schema()
        .map_err(riskstream_pipeline::PipelineError::from)?;
    let id_column = schema.event_id();
    let time_column = schema.event_time();
    let event_columns = schema.arrow().fields().len();
    let lateness_ms = config.time.allowed_lateness.as_millis() as i64;
    let flush_every_ms = config.state.flush_interval.as_millis() as i64;
    let mut last_flush = now_ms();
    let hasher = std::collections::hash_map::RandomState::new();
    let mut received: Vec<Received> = Vec::new();
    let mut buf = Vec::new();
    let decode_errors =
        metrics::counter!("riskstream_internal_decode_errors_total", "stage" => stage_name.clone());
    let duplicates =
        metrics::counter!("riskstream_duplicate_events_total", "stage" => stage_name.clone());
    let replayed =
        metrics::counter!("riskstream_replayed_events_total", "stage" => stage_name.clone());

    loop {
        received.clear();
        if !stop.load(Ordering::Acquire) {
            consumer.poll(
                config.pipeline.batch_max_events,
                Duration::from_millis(100),
                config.pipeline.linger,
                &mut received,
            )?;
        }
        let now = now_ms();
        let mut state = lock(&state);
        if let Some(e) = state.failed.take() {
            return Err(e);
        }
        if stop.load(Ordering::Acquire) {
            // Written and committed on the way out, partition by partition.
            drop(state);
            break;
        }
        let mut by_partition: BTreeMap<i32, Vec<&Received>> = BTreeMap::new();
        for m in &received {
            by_partition.entry(m.partition).or_default().push(m);
        }
        for (p, messages) in by_partition {
            let Some(part) = state.partitions.get_mut(&p) else {
                continue; // revoked meanwhile
            };
            for m in messages {
                if m.offset < part.next_offset {
                    continue; // before the state's offset: already folded
                }
                part.next_offset = m.offset + 1;
                let (header, batch) = match wire::decode(&m.payload) {
                    Ok((h, b)) if h.kind == Kind::Events => (h, b),
                    Ok(_) | Err(_) => {
                        decode_errors.increment(1);
                        tracing::warn!(stage = %stage_name, partition = p, offset = m.offset, "not an events message; skipped");
                        continue;
                    }
                };
                part.watermarks
                    .insert(header.producer, (header.watermark, now));
                let batch = drop_duplicates(part, &batch, id_column, &hasher, now, &duplicates)?;
                if batch.num_rows() == 0 {
                    continue;
                }
                let versions = batch
                    .column_by_name(RULES_VERSION)
                    .map(|c| c.as_primitive::<arrow::datatypes::UInt64Type>().clone());
                let version = versions
                    .as_ref()
                    .and_then(|v| (!v.is_empty()).then(|| v.value(0)))
                    .unwrap_or(0);
                let bundle = bundles.for_kind(plan, kind, version)?;
                let events = batch.project(&(0..event_columns).collect::<Vec<_>>())?;
                let times = events
                    .column(time_column)
                    .as_primitive::<TimestampMillisecondType>()
                    .values()
                    .to_vec();
                let horizon = part.horizon(lateness_ms);
                let err = |e: FeatureError| TopologyError::State {
                    topic: entity.topic.clone(),
                    partition: p,
                    message: e.to_string(),
                };
                let with = part
                    .operator
                    .compute(&bundle, &events, &times, horizon)
                    .map_err(err)?;
                part.operator.end_batch().map_err(err)?;
                if m.offset < part.emit_from {
                    replayed.increment(events.num_rows() as u64);
                    continue;
                }
                let partial = partial(&with, id_column, event_columns)?;
                send_partials(plan, &producer, &partial, kind, &mut buf)?;
            }
            if now - part.last_eviction >= EVICTION_EVERY_MS {
                if let Some(wm) = part.watermarks.values().filter_map(|(w, _)| *w).min() {
                    let bundle = bundles.for_kind(plan, kind, bundles.current().version())?;
                    part.operator
                        .evict(&bundle, wm, lateness_ms, EVICTION_SWEEP_KEYS)
                        .map_err(|e| TopologyError::State {
                            topic: entity.topic.clone(),
                            partition: p,
                            message: e.to_string(),
                        })?;
                }
                part.last_eviction = now;
            }
        }
        // The partials are delivered before the state that produced them is written and the
        // input committed: a crash in between replays, it never loses a partial.
        producer.flush(stop)?;
        if now - last_flush >= flush_every_ms {
            let partitions: Vec<i32> = state.partitions.keys().copied().collect();
            let mut offsets = Vec::new();
            for p in partitions {
                if let Some(o) = state.write(p)? {
                    offsets.push((p, o));
                }
            }
            drop(state);
            consumer.commit(offsets);
            last_flush = now;
        }
    }
    // Leaving the group revokes every partition: the handler writes and commits each.
    consumer.leave(config.shutdown.timeout);
    let mut state = lock(&state);
    let partitions: Vec<i32> = state.partitions.keys().copied().collect();
    for p in partitions {
        state.write(p)?;
    }
    Ok(())
}

/// `batch` without the events this partition folded recently (by id), remembering the rest.
fn drop_duplicates(
    part: &mut EntityPartition,
    batch: &RecordBatch,
    id_column: usize,
    hasher: &impl BuildHasher,
    now: i64,
    duplicates: &metrics::Counter,
) -> Result<RecordBatch, TopologyError> {
    while part
        .seen_order
        .front()
        .is_some_and(|(at, _)| now - at > DEDUP_RETAIN_MS)
    {
        if let Some((_, h)) = part.seen_order.pop_front() {
            part.seen.remove(&h);
        }
    }
    let ids = KeyWriter::new(std::slice::from_ref(batch.column(id_column)));
    let mut key = Vec::new();
    let mut keep = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        ids.write(row, &mut key);
        let mut h = hasher.build_hasher();
        h.write(&key);
        let h = h.finish();
        let new = part.seen.insert(h);
        if new {
            part.seen_order.push_back((now, h));
        }
        keep.push(new);
    }
    if keep.iter().all(|k| *k) {
        return Ok(batch.clone());
    }
    let dropped = keep.iter().filter(|k| !**k).count();
    duplicates.increment(dropped as u64);
    Ok(arrow::compute::filter_record_batch(
        batch,
        &BooleanArray::from(keep),
    )?)
}

/// The partial result of a computed batch: the event id and the kind's feature columns.
fn partial(
    with: &RecordBatch,
    id_column: usize,
    event_columns: usize,
) -> Result<RecordBatch, TopologyError> {
    let schema = with.schema();
    let mut fields: Vec<Field> = vec![schema.field(id_column).clone()];
    let mut columns: Vec<ArrayRef> = vec![Arc::clone(with.column(id_column))];
    for i in event_columns..with.num_columns() {
        fields.push(schema.field(i).clone());
        columns.push(Arc::clone(with.column(i)));
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Sends `partial` to the gather topic, by event id.
fn send_partials(
    plan: &Plan,
    producer: &StageProducer,
    partial: &RecordBatch,
    kind: usize,
    buf: &mut Vec<u8>,
) -> Result<(), TopologyError> {
    let by_id = wire::partitions_by_id(partial.column(0), partial.num_rows(), plan.partitions);
    let header = Header {
        kind: Kind::Partial,
        producer: 0,
        watermark: None,
        entity: kind as u16,
    };
    producer.send_rows(&plan.gather, partial, &by_id, header, buf)
}

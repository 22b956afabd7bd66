//! The scoring stage: per partition of the gather topic, waits until an event and the partial
//! features of every entity kind it was sent to have arrived, then scores the completed events
//! of a poll together: row-level features and rules of the rules version recorded at ingest,
//! verdicts to the verdicts topic exactly as the single topology writes them.
//!
//! Offsets are committed up to the first message of the oldest event still waiting (and never
//! inside the messages of an event already scored), so a partition that moves, or a restart,
//! re-reads every message of every event it had not scored. An event id scored recently is
//! recognised when its messages come again (an upstream replay) and not scored twice.
//!
//! What it must not do: fold state or compute windowed features (the entity stages do).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use rdkafka::consumer::BaseConsumer;
use riskstream_common::{Config, Position, RawBatch};
use riskstream_kafka::{DeliveryTracker, KafkaSink};
use riskstream_pipeline::{
    verdict, FeatureSelection, PipelineError, Sink, TimeFlags, VerdictBatch,
};
use riskstream_rules::Decision;

use crate::ingest::{flush_letters, CORRECTED, INGEST_MS, KINDS, LATE, RULES_VERSION};
use crate::stage::{self, lock, Rebalanced, Received, StageConsumer, StageContext};
use crate::wire::{self, KeyWriter, Kind};
use crate::{now_ms, Bundles, Plan, TopologyError};

/// How long (processing time) partials without their event wait before they are dropped as
/// strays (partials sent again by a replaying entity stage for an event scored before), and
/// how long a scored event id is remembered.
const STRAY_MS: i64 = 30_000;

/// A message's batch, kept while a waiting event refers to it.
struct Stored {
    batch: RecordBatch,
    live: usize,
}

/// An event not complete yet: where its rows are (stored batch, row).
struct Waiting {
    event: Option<(u64, usize)>,
    partials: Vec<Option<(u64, usize)>>,
    first: i64,
    last: i64,
    since: i64,
}

/// A completed event, ready to score.
struct Ready {
    event: (u64, usize),
    offset: i64,
    partials: Vec<Option<(u64, usize)>>,
}

#[derive(Default)]
struct GatherPartition {
    next_offset: Option<i64>,
    stored: HashMap<u64, Stored>,
    next_seq: u64,
    waiting: HashMap<Box<str>, Waiting>,
    /// Offsets (first, last) of the messages of events scored whose last message is at or past
    /// the commit point: the commit point never goes inside them.
    spans: Vec<(i64, i64)>,
    scored: HashSet<u64>,
    scored_order: VecDeque<(i64, u64)>,
}

impl GatherPartition {
    /// The offset that may be committed: every message of every event not scored is at or
    /// after it, and no scored event has messages on both sides of it.
    fn commit_point(&mut self) -> Option<i64> {
        let mut c = self
            .waiting
            .values()
            .map(|w| w.first)
            .min()
            .or(self.next_offset)?;
        loop {
            let lower = self
                .spans
                .iter()
                .filter(|(f, l)| *l >= c && *f < c)
                .map(|(f, _)| *f)
                .min();
            match lower {
                Some(f) => c = f,
                None => break,
            }
        }
        self.spans.retain(|(_, l)| *l >= c);
        Some(c)
    }

    fn release(&mut self, seq: u64) {
        if let Some(s) = self.stored.get_mut(&seq) {
            s.live = s.live.saturating_sub(1);
            if s.live == 0 {
                self.stored.remove(&seq);
            }
        }
    }
}

struct ScoringState {
    partitions: BTreeMap<i32, GatherPartition>,
}

struct Handler {
    topic: String,
    state: Arc<Mutex<ScoringState>>,
}

impl Rebalanced for Handler {
    fn assigned(
        &self,
        _: &BaseConsumer<StageContext>,
        partitions: &[i32],
    ) -> Vec<(i32, Option<i64>)> {
        let mut state = lock(&self.state);
        for &p in partitions {
            state.partitions.insert(p, GatherPartition::default());
        }
        partitions.iter().map(|&p| (p, None)).collect()
    }

    fn revoked(&self, consumer: &BaseConsumer<StageContext>, partitions: &[i32]) {
        let mut state = lock(&self.state);
        let mut offsets = Vec::new();
        for p in partitions {
            if let Some(mut part) = state.partitions.remove(p) {
                offsets.extend(part.commit_point().map(|c| (*p, c)));
            }
        }
        stage::commit(consumer, &self.topic, offsets);
    }
}

/// Runs the scoring stage until `stop`.
pub fn run(
    config: &Config,
    plan: &Plan,
    bundles: &Bundles,
    stop: &AtomicBool,
) -> Result<(), TopologyError> {
    let state = Arc::new(Mutex::new(ScoringState {
        partitions: BTreeMap::new(),
    }));
    let consumer = StageConsumer::subscribe(
        &config.kafka,
        "scoring",
        &format!("{}.gather", plan.group),
        &plan.gather,
        Arc::new(Handler {
            topic: plan.gather.clone(),
            state: Arc::clone(&state),
        }),
    )?;
    let tracker = Arc::new(DeliveryTracker::new());
    let mut sink =
        KafkaSink::new(&config.kafka, Arc::clone(&tracker)).map_err(PipelineError::from)?;
    let schema = config.event_schema().map_err(PipelineError::from)?;
    let id_column = schema.event_id();
    let time_column = schema.event_time();
    let event_columns = schema.arrow().fields().len();
    let mut selection = FeatureSelection::new(config.verdict.features.clone());
    let mut verdicts = VerdictBatch::default();
    let hasher = std::collections::hash_map::RandomState::new();
    let counters = Counters::new();
    let mut received: Vec<Received> = Vec::new();
    let mut raw = RawBatch::new();
    loop {
        received.clear();
        if !stop.load(Ordering::Acquire) {
            consumer.poll(
                config.pipeline.batch_max_events * (plan.kinds.len() + 1),
                Duration::from_millis(100),
                config.pipeline.linger,
                &mut received,
            )?;
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        let now = now_ms();
        let mut state = lock(&state);
        let mut offsets = Vec::new();
        let mut by_partition: BTreeMap<i32, Vec<&Received>> = BTreeMap::new();
        for m in &received {
            by_partition.entry(m.partition).or_default().push(m);
        }
        let touched: Vec<i32> = state.partitions.keys().copied().collect();
        for p in touched {
            let Some(part) = state.partitions.get_mut(&p) else {
                continue;
            };
            let messages = by_partition.remove(&p).unwrap_or_default();
            let ready = gather(part, &messages, plan, id_column, &hasher, now, &counters);
            if !ready.is_empty() {
                score(
                    part,
                    &ready,
                    p,
                    plan,
                    bundles,
                    event_columns,
                    (id_column, time_column),
                    &mut selection,
                    &mut verdicts,
                    &mut raw,
                    &mut sink,
                    &counters,
                )?;
                for r in &ready {
                    part.release(r.event.0);
                    for (seq, _) in r.partials.iter().flatten() {
                        part.release(*seq);
                    }
                }
            }
            if let Some(c) = part.commit_point() {
                offsets.push((p, c));
            }
        }
        drop(state);
        flush_letters(&mut sink, &tracker, stop)?;
        consumer.commit(offsets);
    }
    consumer.leave(config.shutdown.timeout);
    Ok(())
}

struct Counters {
    strays: metrics::Counter,
    duplicates: metrics::Counter,
    decode_errors: metrics::Counter,
    unknown_version: metrics::Counter,
    decisions: [metrics::Counter; 3],
    gather_wait: metrics::Histogram,
}

impl Counters {
    fn new() -> Self {
        Self {
            strays: metrics::counter!("riskstream_gather_strays_total"),
            duplicates: metrics::counter!("riskstream_duplicate_events_total", "stage" => "scoring"),
            decode_errors: metrics::counter!("riskstream_internal_decode_errors_total", "stage" => "scoring"),
            unknown_version: metrics::counter!("riskstream_rules_version_unknown_total"),
            decisions: Decision::ALL
                .map(|d| metrics::counter!("riskstream_verdicts_total", "decision" => d.as_str())),
            gather_wait: metrics::histogram!("riskstream_gather_wait_seconds"),
        }
    }
}

/// Files the messages of one partition under their events; returns the events completed.
fn gather(
    part: &mut GatherPartition,
    messages: &[&Received],
    plan: &Plan,
    id_column: usize,
    hasher: &impl BuildHasher,
    now: i64,
    counters: &Counters,
) -> Vec<Ready> {
    let hash = |id: &str| {
        let mut h = hasher.build_hasher();
        h.write(id.as_bytes());
        h.finish()
    };
    while part
        .scored_order
        .front()
        .is_some_and(|(at, _)| now - at > STRAY_MS)
    {
        if let Some((_, h)) = part.scored_order.pop_front() {
            part.scored.remove(&h);
        }
    }
    let kinds = plan.kinds.len();
    let mut touched: Vec<Box<str>> = Vec::new();
    for m in messages {
        part.next_offset = Some(m.offset + 1);
        let (header, batch) = match wire::decode(&m.payload) {
            Ok(decoded) => decoded,
            Err(e) => {
                counters.decode_errors.increment(1);
                tracing::warn!(offset = m.offset, error = %e, "unreadable gather message; skipped");
                continue;
            }
        };
        let (column, slot) = match header.kind {
            Kind::Events => (id_column, None),
            Kind::Partial if (header.entity as usize) < kinds => (0, Some(header.entity as usize)),
            Kind::Partial => {
                counters.decode_errors.increment(1);
                continue;
            }
        };
        let seq = part.next_seq;
        part.next_seq += 1;
        let ids = KeyWriter::new(std::slice::from_ref(batch.column(column)));
        let mut key = Vec::new();
        let mut live = 0;
        for row in 0..batch.num_rows() {
            ids.write(row, &mut key);
            let Ok(id) = std::str::from_utf8(&key) else {
                continue;
            };
            if part.scored.contains(&hash(id)) {
                counters.duplicates.increment(1);
                continue;
            }
            let waiting = part.waiting.entry(id.into()).or_insert_with(|| Waiting {
                event: None,
                partials: vec![None; kinds],
                first: m.offset,
                last: m.offset,
                since: now,
            });
            let place = match slot {
                None => &mut waiting.event,
                Some(k) => &mut waiting.partials[k],
            };
            if place.is_some() {
                counters.duplicates.increment(1);
                continue;
            }
            *place = Some((seq, row));
            waiting.last = m.offset;
            live += 1;
            touched.push(id.into());
        }
        if live > 0 {
            part.stored.insert(seq, Stored { batch, live });
        }
    }
    let mut ready = Vec::new();
    for id in touched {
        let Some(w) = part.waiting.get(&id) else {
            continue;
        };
        let Some((seq, row)) = w.event else {
            continue;
        };
        let Some(event) = part.stored.get(&seq) else {
            continue;
        };
        let mask = event
            .batch
            .column_by_name(KINDS)
            .map(|c| c.as_primitive::<UInt64Type>().value(row))
            .unwrap_or(0);
        let complete = (0..kinds).all(|k| mask & (1 << k) == 0 || w.partials[k].is_some());
        if !complete {
            continue;
        }
        let Some(w) = part.waiting.remove(&id) else {
            continue;
        };
        counters
            .gather_wait
            .record((now - w.since).max(0) as f64 / 1000.0);
        part.spans.push((w.first, w.last));
        let h = hash(&id);
        part.scored.insert(h);
        part.scored_order.push_back((now, h));
        let partials = w.partials;
        ready.push(Ready {
            event: (seq, row),
            offset: w.first,
            partials,
        });
    }
    // Strays: partials whose event never came within the deadline (sent again for an event
    // scored before a restart or a move).
    let strays: Vec<Box<str>> = part
        .waiting
        .iter()
        .filter(|(_, w)| w.event.is_none() && now - w.since > STRAY_MS)
        .map(|(id, _)| id.clone())
        .collect();
    for id in strays {
        if let Some(w) = part.waiting.remove(&id) {
            counters.strays.increment(1);
            for (seq, _) in w.partials.into_iter().flatten() {
                part.release(seq);
            }
        }
    }
    ready
}

/// Scores `ready` (one partition's completed events), grouped by rules version, and sends
/// the verdicts.
#[allow(clippy::too_many_arguments)]
fn score(
    part: &GatherPartition,
    ready: &[Ready],
    partition: i32,
    plan: &Plan,
    bundles: &Bundles,
    event_columns: usize,
    (id_column, time_column): (usize, usize),
    selection: &mut FeatureSelection,
    verdicts: &mut VerdictBatch,
    raw: &mut RawBatch,
    sink: &mut KafkaSink,
    counters: &Counters,
) -> Result<(), TopologyError> {
    let version_of = |r: &Ready| {
        part.stored
            .get(&r.event.0)
            .and_then(|s| s.batch.column_by_name(RULES_VERSION))
            .map(|c| c.as_primitive::<UInt64Type>().value(r.event.1))
            .unwrap_or(0)
    };
    let mut by_version: BTreeMap<u64, Vec<&Ready>> = BTreeMap::new();
    for r in ready {
        by_version.entry(version_of(r)).or_default().push(r);
    }
    for (version, group) in by_version {
        let (bundle, known) = bundles.version(version);
        if !known {
            counters.unknown_version.increment(group.len() as u64);
            tracing::warn!(version, running = bundle.version(), "events ingested under a rules version this instance does not know; scored with the running one");
        }
        // Event rows from their stored batches.
        let mut sources: Vec<u64> = Vec::new();
        let mut index = |seq: u64| match sources.iter().position(|s| *s == seq) {
            Some(i) => i,
            None => {
                sources.push(seq);
                sources.len() - 1
            }
        };
        let rows: Vec<(usize, usize)> = group
            .iter()
            .map(|r| (index(r.event.0), r.event.1))
            .collect();
        let batches: Vec<&RecordBatch> = sources
            .iter()
            .filter_map(|s| part.stored.get(s).map(|s| &s.batch))
            .collect();
        let column = |c: usize| -> Result<ArrayRef, TopologyError> {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            Ok(arrow::compute::interleave(&arrays, &rows)?)
        };
        let mut columns: Vec<ArrayRef> =
            (0..event_columns).map(column).collect::<Result<_, _>>()?;
        let by_name = |name: &str| -> Result<ArrayRef, TopologyError> {
            let Some(i) = batches.first().and_then(|b| b.schema().index_of(name).ok()) else {
                return Err(TopologyError::Kafka {
                    what: format!("gather partition {partition}"),
                    message: format!("events without the column {name}"),
                });
            };
            column(i)
        };
        let ingest_ms = by_name(INGEST_MS)?;
        let late = by_name(LATE)?;
        let corrected = by_name(CORRECTED)?;

        // Windowed features from the partials, NULL where an event had no key of that kind.
        let input = Arc::clone(bundle.input_schema());
        for f in bundle.window_features() {
            let data_type = input
                .field_with_name(&f.name)
                .map(|field| field.data_type().clone())?;
            let kind = plan.kind_of(&f.spec.entity);
            let mut arrays: Vec<ArrayRef> = Vec::new();
            let mut seqs: Vec<u64> = Vec::new();
            let mut picks = Vec::with_capacity(group.len());
            for r in &group {
                let found = kind.and_then(|k| r.partials[k]).and_then(|(seq, row)| {
                    let stored = part.stored.get(&seq)?;
                    let i = stored.batch.schema().index_of(&f.name).ok()?;
                    let source = match seqs.iter().position(|s| *s == seq) {
                        Some(j) => j,
                        None => {
                            seqs.push(seq);
                            arrays.push(Arc::clone(stored.batch.column(i)));
                            arrays.len() - 1
                        }
                    };
                    Some((source, row))
                });
                picks.push(found);
            }
            let null_source = arrays.len();
            arrays.push(new_null_array(&data_type, 1));
            let picks: Vec<(usize, usize)> = picks
                .into_iter()
                .map(|p| p.unwrap_or((null_source, 0)))
                .collect();
            let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
            let values = arrow::compute::interleave(&refs, &picks)?;
            columns.push(arrow::compute::cast(&values, &data_type)?);
        }
        let with_features = RecordBatch::try_new(input, columns)?;
        let evaluated = bundle
            .evaluate(&with_features)
            .map_err(PipelineError::from)?;
        raw.clear();
        let ingest = ingest_ms.as_primitive::<arrow::datatypes::Int64Type>();
        for (i, r) in group.iter().enumerate() {
            let position = Position {
                partition,
                offset: r.offset,
            };
            raw.push(b"", position, ingest.value(i));
        }
        let late: Vec<bool> = late.as_boolean().iter().map(|b| b == Some(true)).collect();
        let corrected: Vec<bool> = corrected
            .as_boolean()
            .iter()
            .map(|b| b == Some(true))
            .collect();
        let rows: Vec<u32> = (0..group.len() as u32).collect();
        verdict::encode(
            verdicts,
            selection,
            &bundle,
            &evaluated,
            raw,
            &rows,
            id_column,
            time_column,
            TimeFlags {
                late: Some(&late),
                time_corrected: Some(&corrected),
            },
            now_ms(),
        );
        let mut decisions = [0u64; 3];
        for d in &evaluated.scores.decision {
            decisions[*d as usize] += 1;
        }
        for (n, counter) in decisions.iter().zip(&counters.decisions) {
            counter.increment(*n);
        }
        sink.verdicts(verdicts).map_err(PipelineError::from)?;
        sink.end_batch(raw).map_err(PipelineError::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(first: i64) -> Waiting {
        Waiting {
            event: None,
            partials: vec![None],
            first,
            last: first,
            since: 0,
        }
    }

    #[test]
    fn the_commit_point_stops_at_the_oldest_waiting_event() {
        let mut part = GatherPartition {
            next_offset: Some(20),
            ..GatherPartition::default()
        };
        assert_eq!(part.commit_point(), Some(20));
        part.waiting.insert("a".into(), waiting(12));
        part.waiting.insert("b".into(), waiting(15));
        assert_eq!(part.commit_point(), Some(12));
        // Nothing read yet: nothing to commit.
        assert_eq!(GatherPartition::default().commit_point(), None);
    }

    #[test]
    fn the_commit_point_never_splits_a_scored_event() {
        // A scored event with messages at 5 and 14, one still waiting from 10: committing 10
        // would replay the message at 14 without the one at 5, and that event would wait for
        // ever. The point moves back to 5; and through a chain of overlapping events.
        let mut part = GatherPartition {
            next_offset: Some(20),
            spans: vec![(5, 14), (2, 6), (16, 18)],
            ..GatherPartition::default()
        };
        part.waiting.insert("w".into(), waiting(10));
        assert_eq!(part.commit_point(), Some(2));
        // Spans wholly before the point are forgotten; the others are kept.
        assert_eq!(part.spans, vec![(5, 14), (2, 6), (16, 18)]);
        // With nothing waiting, everything read may be committed: no scored event straddles
        // the end, and spans behind the point are forgotten.
        part.waiting.clear();
        part.spans = vec![(1, 3), (16, 18)];
        assert_eq!(part.commit_point(), Some(20));
        assert!(part.spans.is_empty());
    }
}

//! The ingest stage: consumes the transactions topic in the instance's group, decodes, applies
//! time and bad-input handling exactly as the single topology does ([`Pipeline::ingest`]), and
//! fans every event out: once per entity kind to that kind's repartition topic (partitioned by
//! the entity's key), and once to the gather topic (partitioned by event id), with the columns
//! the later stages need (ingestion time, rules version, time flags, which kinds it went to).
//! Dead letters and late events go to the DLQ and late topics as in the single topology.
//!
//! What it must not do: keep feature state or score (later stages do).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use riskstream_common::{Config, Position, RawBatch};
use riskstream_kafka::{DeliveryTracker, KafkaSink};
use riskstream_pipeline::{Ingested, Pipeline, PipelineError, Processed, Sink};

use crate::stage::{lock, Moves, StageConsumer, StageProducer};
use crate::wire::{self, Header, Kind};
use crate::{now_ms, Bundles, Plan, TopologyError};

/// Columns the ingest appends to the event columns of every events message.
pub const INGEST_MS: &str = "__ingest_ms";
pub const RULES_VERSION: &str = "__rules_version";
pub const LATE: &str = "__late";
pub const CORRECTED: &str = "__time_corrected";
/// Bit `k` set: the event went to entity kind `k` (its key there was not NULL).
pub const KINDS: &str = "__kinds";
/// How many columns [`INGEST_MS`] … [`KINDS`] are.
pub const INGEST_COLUMNS: usize = 5;

/// The schema of events messages: the event schema, then the ingest columns.
pub fn events_schema(event: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = event.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend([
        Field::new(INGEST_MS, DataType::Int64, false),
        Field::new(RULES_VERSION, DataType::UInt64, false),
        Field::new(LATE, DataType::Boolean, false),
        Field::new(CORRECTED, DataType::Boolean, false),
        Field::new(KINDS, DataType::UInt64, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// Runs the ingest stage until `stop`.
pub fn run(
    config: &Config,
    plan: &Plan,
    bundles: &Bundles,
    producer_id: u64,
    stop: &AtomicBool,
) -> Result<(), TopologyError> {
    let topic = config.kafka.topics.transactions.clone();
    // The ingest keeps no feature state: its pipeline's store is a temporary one, unused.
    let mut own = config.clone();
    own.state.dir = None;
    own.checkpoint.url = String::new();
    let mut pipeline = Pipeline::new(&own, Arc::clone(bundles.table()), &topic)?;
    let mut decoder = pipeline.decoder()?;
    let schema = events_schema(pipeline.schema().arrow());
    let id_column = pipeline.schema().event_id();
    let moves = Arc::new(Moves::default());
    let consumer = StageConsumer::subscribe(
        &config.kafka,
        "ingest",
        &config.kafka.group_id,
        &topic,
        Arc::clone(&moves) as _,
    )?;
    let internal = StageProducer::new(&config.kafka, "ingest")?;
    let tracker = Arc::new(DeliveryTracker::new());
    let mut letters =
        KafkaSink::new(&config.kafka, Arc::clone(&tracker)).map_err(PipelineError::from)?;
    let batch_max = config.pipeline.batch_max_events;
    let mut received = Vec::with_capacity(batch_max);
    let mut raw = RawBatch::new();
    let mut out = Processed::default();
    let mut buf = Vec::new();
    loop {
        received.clear();
        if !stop.load(Ordering::Acquire) {
            consumer.poll(
                batch_max,
                Duration::from_millis(100),
                config.pipeline.linger,
                &mut received,
            )?;
        }
        let now = now_ms();
        for p in std::mem::take(&mut *lock(&moves.revoked)) {
            pipeline.time_mut().remove_partition(p);
        }
        let assigned = std::mem::take(&mut *lock(&moves.assigned));
        // A partition continues its watermark where its last owner left it: the highest event
        // time seen travels as the metadata of the group's committed offset.
        for (p, metadata) in consumer.committed_metadata(&assigned) {
            match metadata.and_then(|m| m.parse::<i64>().ok()) {
                Some(max) => pipeline.time_mut().restore_partition(p, max, now),
                None => pipeline.time_mut().add_partition(p, now),
            }
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        if received.is_empty() {
            continue;
        }
        raw.clear();
        for m in &received {
            let ingest_ms = m.timestamp.filter(|t| *t <= now).unwrap_or(now);
            let position = Position {
                partition: m.partition,
                offset: m.offset,
            };
            raw.push(&m.payload, position, ingest_ms);
        }
        let decoded = decoder.decode(&raw).map_err(PipelineError::from)?;
        let bundle = bundles.current();
        if let Some(ingested) = pipeline.ingest(&raw, decoded, &mut out, now)? {
            // Each event's key of every kind, written once: where it goes and which partials
            // the scoring stage is to wait for.
            let destinations = entity_destinations(plan, &ingested.timed.batch);
            let events =
                with_ingest_columns(&schema, &raw, &ingested, bundle.version(), &destinations)?;
            fan_out(
                plan,
                &internal,
                &events,
                &destinations,
                &ingested,
                producer_id,
                id_column,
                &mut buf,
            )?;
        }
        if !out.dead.is_empty() {
            letters
                .dead_letters(&topic, &raw, &out.dead)
                .map_err(PipelineError::from)?;
        }
        if !out.late.is_empty() {
            letters
                .late(&topic, &raw, &out.late)
                .map_err(PipelineError::from)?;
        }
        letters.end_batch(&raw).map_err(PipelineError::from)?;
        internal.flush(stop)?;
        flush_letters(&mut letters, &tracker, stop)?;
        // Everything this batch produced is delivered: its offsets may be committed, each with
        // its partition's highest event time for whoever owns the partition next.
        let mut next: std::collections::BTreeMap<i32, i64> = Default::default();
        for p in raw.positions() {
            let n = next.entry(p.partition).or_insert(0);
            *n = (*n).max(p.offset + 1);
        }
        let progress: std::collections::BTreeMap<i32, i64> =
            pipeline.partition_progress().into_iter().collect();
        consumer.commit_with_metadata(next.into_iter().map(|(p, offset)| {
            let metadata = progress.get(&p).map(|m| m.to_string()).unwrap_or_default();
            (p, offset, metadata)
        }));
    }
    consumer.leave(config.shutdown.timeout);
    Ok(())
}

/// Waits until every dead letter and late event sent is delivered; a broker outage is waited
/// out, a message lost for good fails the stage.
pub(crate) fn flush_letters(
    sink: &mut KafkaSink,
    tracker: &DeliveryTracker,
    stop: &AtomicBool,
) -> Result<(), TopologyError> {
    loop {
        match sink.flush() {
            Ok(()) => return Ok(()),
            Err(e) if tracker.failure().is_none() && !stop.load(Ordering::Acquire) => {
                tracing::warn!(error = %e, "waiting for the cluster to take the outputs");
            }
            Err(e) => return Err(PipelineError::from(e).into()),
        }
    }
}

/// The events of `ingested` with the ingest columns appended.
fn with_ingest_columns(
    schema: &SchemaRef,
    raw: &RawBatch,
    ingested: &Ingested,
    version: u64,
    destinations: &[Vec<Option<i32>>],
) -> Result<RecordBatch, TopologyError> {
    let timed = &ingested.timed;
    let rows = timed.batch.num_rows();
    let ingest_ms: Int64Array = timed
        .rows
        .iter()
        .map(|&r| raw.ingest_ms(r as usize))
        .collect::<Vec<_>>()
        .into();
    let mut kinds = vec![0u64; rows];
    for (k, destinations) in destinations.iter().enumerate() {
        for (mask, d) in kinds.iter_mut().zip(destinations) {
            if d.is_some() {
                *mask |= 1 << k;
            }
        }
    }
    let mut columns = timed.batch.columns().to_vec();
    columns.extend([
        Arc::new(ingest_ms) as ArrayRef,
        Arc::new(UInt64Array::from(vec![version; rows])),
        Arc::new(BooleanArray::from(timed.late.clone())),
        Arc::new(BooleanArray::from(timed.corrected.clone())),
        Arc::new(UInt64Array::from(kinds)),
    ]);
    // The event columns as the time stage left them (a clamped time keeps its zone).
    let mut fields: Vec<Field> = timed
        .batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(
        schema.fields()[fields.len()..]
            .iter()
            .map(|f| f.as_ref().clone()),
    );
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Per entity kind of `plan`, each row's partition of that kind's repartition topic (`None`:
/// the row has no key of that kind).
fn entity_destinations(plan: &Plan, events: &RecordBatch) -> Vec<Vec<Option<i32>>> {
    plan.kinds
        .iter()
        .map(|kind| {
            let columns: Vec<ArrayRef> = kind
                .columns
                .iter()
                .map(|&c| Arc::clone(events.column(c)))
                .collect();
            wire::partitions_by_key(&columns, events.num_rows(), plan.partitions)
        })
        .collect()
}

/// Sends `events` to every entity kind's repartition topic by key (`destinations`, from
/// [`entity_destinations`]) and to the gather topic by event id.
#[allow(clippy::too_many_arguments)]
fn fan_out(
    plan: &Plan,
    producer: &StageProducer,
    events: &RecordBatch,
    destinations: &[Vec<Option<i32>>],
    ingested: &Ingested,
    producer_id: u64,
    id_column: usize,
    buf: &mut Vec<u8>,
) -> Result<(), TopologyError> {
    let header = Header {
        kind: Kind::Events,
        producer: producer_id,
        watermark: ingested.watermark,
        entity: 0,
    };
    for (k, (kind, destinations)) in plan.kinds.iter().zip(destinations).enumerate() {
        let header = Header {
            entity: k as u16,
            ..header
        };
        producer.send_rows(&kind.topic, events, destinations, header, buf)?;
    }
    let by_id =
        wire::partitions_by_id(events.column(id_column), events.num_rows(), plan.partitions);
    producer.send_rows(&plan.gather, events, &by_id, header, buf)
}

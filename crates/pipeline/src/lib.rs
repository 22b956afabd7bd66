//! The pipeline: source → decode → (time, features) → rules → sink, one micro-batch at a time.
//!
//! [`Pipeline::process`] is the whole per-batch path and is independent of where records come
//! from and where verdicts go; [`run`] drives it from a [`Source`] into a [`Sink`] until the
//! source is exhausted. The hot path allocates per batch, loads the rule table once per batch
//! (lock-free) and never blocks on anything but its own source and sink.
//!
//! With checkpoints ([`Pipeline::recover`]), the pipeline restores its state directory from the
//! newest usable checkpoint, and at batch boundaries begins new ones ([`checkpoint`]); [`run`]
//! hands each checkpoint's marker to the sink after the outputs it covers.
//!
//! What this crate must not do: parse JSON by hand (decode owns that), interpret rules (rules
//! owns that), move checkpoint files (the checkpoint crate does), or hold state across batches
//! other than reusable buffers, the source offsets reached and the checkpoint schedule.

pub mod checkpoint;
pub mod sink;
pub mod source;
pub mod status;
pub mod verdict;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, BooleanArray, RecordBatch, TimestampMillisecondArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, TimestampMillisecondType};
use metrics::Counter;
use riskstream_checkpoint::{
    sibling, CheckpointError, CheckpointStore, Checkpointer, Listed, Manifest,
};
use riskstream_common::{
    Config, DeadLetter, DeadReason, Delivery, EventSchema, RawBatch, SchemaError,
};
use riskstream_decode::{DecodeError, Decoded, EventDecoder};
use riskstream_features::{FeatureError, FeatureOperator, StateStats};
use riskstream_rules::{CompiledBundle, Decision, RuleTable, ScoreError};
use riskstream_state::{Cf, StateStore};
use riskstream_time::{Rejection, TimeStage};

pub use checkpoint::{CheckpointHandle, CheckpointRequests, Halt, Marker};
pub use sink::{JsonLinesSink, Sink, SinkError};
pub use source::{JsonLinesSource, Source, SourceError, SourceState};
pub use status::{PartitionStatus, PipelineStatus, RecentEvents, RestoreStatus, StatusBoard};
pub use verdict::{FeatureSelection, TimeFlags, VerdictBatch};

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error("invalid configuration: {0}")]
    Config(#[from] SchemaError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("stopped without a final checkpoint: the state store could not be written ({0}); a restart recovers from the last good checkpoint")]
    Broken(String),
    #[error("cannot create a temporary state directory: {source}")]
    TempState {
        #[source]
        source: std::io::Error,
    },
}

/// The outcome of one batch.
#[derive(Debug, Default)]
pub struct Processed {
    pub verdicts: VerdictBatch,
    pub dead: Vec<DeadLetter>,
    /// Events below the watermark by more than `allowed_lateness`: not scored, not folded.
    pub late: Vec<DeadLetter>,
    /// Verdict counts by decision (allow, review, block).
    pub decisions: [u64; 3],
    /// The rules version that scored the batch (0 when the batch had no scorable event).
    pub rules_version: u64,
}

impl Processed {
    fn clear(&mut self) {
        self.verdicts.clear();
        self.dead.clear();
        self.late.clear();
        self.decisions = [0; 3];
        self.rules_version = 0;
    }
}

/// The per-batch path from raw records to verdicts.
pub struct Pipeline {
    schema: EventSchema,
    decoder: EventDecoder,
    time: TimeStage,
    features: FeatureOperator,
    rules: Arc<RuleTable>,
    /// `verdict.features`, resolved against the running bundle.
    verdict_features: verdict::FeatureSelection,
    metrics: PipelineMetrics,
    last_eviction: Option<i64>,
    /// Where progress is reported (admin API), when anyone reads it.
    status: Option<Arc<StatusBoard>>,
    /// Recently scored events for backtests, when kept.
    recent: Option<Arc<RecentEvents>>,
    /// Processing time of the last state flush.
    last_flush: Option<i64>,
    /// The checkpoint the state was restored from, for the status board.
    restore: Option<RestoreStatus>,
    flush_interval_ms: i64,
    /// Per source partition, the offset after the last record of the last batch.
    offsets: BTreeMap<i32, i64>,
    /// When checkpoints are taken, and by whom they are uploaded.
    checkpoints: Option<checkpoint::Schedule>,
    /// The checkpoint begun after the last batch, for the sink.
    marker: Option<Marker>,
    /// Keeps a temporary state directory alive (declared after `features`, which holds the
    /// store, so the database closes before the directory is removed).
    temp_state: Option<tempfile::TempDir>,
}

/// Records examined per eviction sweep, in the cache and in the store, and the processing time
/// between sweeps: 16K records a second, in slices small enough (about a millisecond) not to
/// show in the latency of the batch that runs one.
const EVICTION_SWEEP_KEYS: usize = 1_638;
const EVICTION_EVERY_MS: i64 = 100;

/// Metadata key of a partition's highest event time.
fn partition_key(partition: i32) -> Vec<u8> {
    format!("time/partition/{partition}").into_bytes()
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

struct PipelineMetrics {
    source: String,
    /// `riskstream_events_total{topic, partition, outcome}` per partition seen: scored, late,
    /// dead-lettered.
    events: Vec<(i32, [Counter; 3])>,
    dead: Vec<(DeadReason, Counter)>,
    decisions: [Counter; 3],
    latency: metrics::Histogram,
    watermark_lag: metrics::Gauge,
    flushes: metrics::Histogram,
    state_size: metrics::Gauge,
}

/// Outcomes of `riskstream_events_total`, in the order of [`PipelineMetrics::events`].
const OUTCOMES: [&str; 3] = ["scored", "late", "dlq"];

impl PipelineMetrics {
    fn new(source: &str) -> Self {
        let source = source.to_string();
        Self {
            events: Vec::new(),
            watermark_lag: metrics::gauge!("riskstream_watermark_lag_seconds"),
            flushes: metrics::histogram!("riskstream_state_flush_seconds"),
            state_size: metrics::gauge!("riskstream_state_size_bytes"),
            dead: DeadReason::ALL
                .iter()
                .map(|r| {
                    (
                        *r,
                        metrics::counter!("riskstream_dlq_total", "source" => source.clone(), "reason" => r.as_str()),
                    )
                })
                .collect(),
            decisions: Decision::ALL.map(|d| {
                metrics::counter!("riskstream_verdicts_total", "decision" => d.as_str())
            }),
            latency: metrics::histogram!("riskstream_event_to_verdict_seconds"),
            source,
        }
    }

    /// Counts one batch's events by partition and outcome: `rows` scored, `late` and `dead`
    /// (record indexes into `raw`).
    fn count_events(
        &mut self,
        raw: &RawBatch,
        rows: &[u32],
        late: &[DeadLetter],
        dead: &[DeadLetter],
    ) {
        let mut counts: Vec<(i32, [u64; 3])> = Vec::new();
        let records = rows
            .iter()
            .map(|&r| (r as usize, 0))
            .chain(late.iter().map(|d| (d.record, 1)))
            .chain(dead.iter().map(|d| (d.record, 2)));
        for (record, outcome) in records {
            let partition = raw.position(record).partition;
            match counts.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, c)) => c[outcome] += 1,
                None => {
                    let mut c = [0; 3];
                    c[outcome] = 1;
                    counts.push((partition, c));
                }
            }
        }
        for (partition, c) in counts {
            let counters = match self.events.iter().position(|(p, _)| *p == partition) {
                Some(i) => &self.events[i].1,
                None => {
                    let topic = self.source.clone();
                    let counters = OUTCOMES.map(|outcome| {
                        metrics::counter!("riskstream_events_total", "topic" => topic.clone(), "partition" => partition.to_string(), "outcome" => outcome)
                    });
                    self.events.push((partition, counters));
                    &self.events[self.events.len() - 1].1
                }
            };
            for (counter, n) in counters.iter().zip(c) {
                if n > 0 {
                    counter.increment(n);
                }
            }
        }
    }
}

impl Pipeline {
    /// A pipeline for `config`'s event schema, batch size and time settings, scored by whatever
    /// `rules` holds when each batch starts. `source_name` labels its metrics.
    pub fn new(
        config: &Config,
        rules: Arc<RuleTable>,
        source_name: &str,
    ) -> Result<Self, PipelineError> {
        let (dir, temp) = state_dir(config)?;
        Self::open(config, rules, source_name, dir, temp)
    }

    /// [`Self::new`] with checkpoints when `config` has somewhere to put them: first restores
    /// the state directory from the newest checkpoint that `accept` takes (and whose files are
    /// sound), then takes checkpoints every `checkpoint.interval` and on request. Returns the
    /// restored checkpoint's manifest: the source must start at its offsets.
    pub fn recover(
        config: &Config,
        rules: Arc<RuleTable>,
        source_name: &str,
        accept: impl Fn(&Listed) -> Result<(), String>,
    ) -> Result<(Self, Option<Manifest>), PipelineError> {
        Self::recover_reporting(config, rules, source_name, accept, None)
    }

    /// [`Self::recover`], showing on `status` how far the restore's download is while it
    /// runs (`/readyz` says so).
    pub fn recover_reporting(
        config: &Config,
        rules: Arc<RuleTable>,
        source_name: &str,
        accept: impl Fn(&Listed) -> Result<(), String>,
        status: Option<&StatusBoard>,
    ) -> Result<(Self, Option<Manifest>), PipelineError> {
        let Some(url) = config.checkpoint_url() else {
            if config.kafka.delivery == Delivery::ExactlyOnce {
                return Err(CheckpointError::Config {
                    location: String::new(),
                    message:
                        "exactly_once delivery needs checkpoints: set checkpoint.url or state.dir"
                            .into(),
                }
                .into());
            }
            return Ok((Self::new(config, rules, source_name)?, None));
        };
        let (dir, temp) = state_dir(config)?;
        let instance = config.checkpoint_name();
        let store = CheckpointStore::open(&url, &instance)?;
        let restore_started = std::time::Instant::now();
        let restored = store.restore_reporting(
            &dir,
            accept,
            |restored| {
                StateStore::open(restored)
                    .map(drop)
                    .map_err(|e| format!("the restored state does not open: {e}"))
            },
            |progress| {
                if let Some(status) = status {
                    status.update(|s| s.restoring = Some(progress));
                }
            },
        )?;
        if let Some(status) = status {
            status.update(|s| s.restoring = None);
        }
        let mut restore = None;
        let restored = match restored {
            Some(r) => {
                let seconds = restore_started.elapsed().as_secs_f64();
                metrics::counter!("riskstream_state_restores_total", "outcome" => "restored")
                    .increment(1);
                metrics::gauge!("riskstream_state_restore_seconds").set(seconds);
                metrics::gauge!("riskstream_state_restored_bytes")
                    .set(r.manifest.bytes_total as f64);
                metrics::counter!("riskstream_checkpoints_skipped_total")
                    .increment(r.skipped.len() as u64);
                restore = Some(RestoreStatus {
                    checkpoint: r.manifest.id,
                    bytes: r.manifest.bytes_total,
                    seconds,
                    skipped: r.skipped.clone(),
                });
                tracing::info!(
                    checkpoint = r.manifest.id,
                    location = store.location(),
                    offsets = ?r.manifest.offsets,
                    rules_version = r.manifest.rules_version,
                    skipped = r.skipped.len(),
                    "state restored from checkpoint {} ({} bytes in {seconds:.2} s)",
                    r.manifest.id,
                    r.manifest.bytes_total
                );
                Some(r.manifest)
            }
            None => {
                metrics::counter!("riskstream_state_restores_total", "outcome" => "empty")
                    .increment(1);
                // Offsets are committed only with checkpoints: without one the source starts
                // from the beginning (or `auto_offset_reset`), and state left by a run whose
                // checkpoints never completed would count its events twice.
                if dir.exists() {
                    tracing::warn!(location = store.location(), state = %dir.display(), "no checkpoint to restore: starting with empty state");
                    std::fs::remove_dir_all(&dir).map_err(|source| CheckpointError::Io {
                        what: dir.display().to_string(),
                        source,
                    })?;
                } else {
                    tracing::info!(
                        location = store.location(),
                        "no checkpoint to restore: starting with empty state"
                    );
                }
                None
            }
        };
        let checkpointer = Checkpointer::start(
            store,
            restored.as_ref(),
            config.checkpoint.retain,
            config.kafka.delivery == Delivery::AtLeastOnce,
        )?;
        let halt = Halt::new(checkpointer.clone(), config.checkpoint.tolerable_failures);
        let staging = sibling(&dir, "staging");
        let _ = std::fs::remove_dir_all(&staging);
        let mut pipeline = Self::open(config, rules, source_name, dir, temp)?;
        if let Some(m) = &restored {
            pipeline.offsets = m.offsets.clone();
        }
        pipeline.restore = restore;
        pipeline.checkpoints = Some(checkpoint::Schedule {
            checkpointer,
            interval_ms: config.checkpoint.interval.as_millis() as i64,
            last_at: None,
            requests: Arc::new(CheckpointRequests::default()),
            served: 0,
            staging,
            source: source_name.to_string(),
            instance,
            delivery: config.kafka.delivery,
            last_offsets: BTreeMap::new(),
            halt,
        });
        Ok((pipeline, restored))
    }

    fn open(
        config: &Config,
        rules: Arc<RuleTable>,
        source_name: &str,
        dir: std::path::PathBuf,
        temp: Option<tempfile::TempDir>,
    ) -> Result<Self, PipelineError> {
        let schema = config.event_schema()?;
        let decoder = EventDecoder::new(&schema, config.pipeline.batch_max_events)?;
        let store = Arc::new(StateStore::open(&dir).map_err(FeatureError::from)?);
        // Continue the watermarks of an earlier run over the same state.
        let mut time = TimeStage::new(&config.time);
        let now = source::now_ms();
        for (key, value) in store
            .scan_prefix(Cf::Meta, b"time/partition/")
            .map_err(FeatureError::from)?
        {
            let partition = std::str::from_utf8(&key[b"time/partition/".len()..])
                .ok()
                .and_then(|p| p.parse::<i32>().ok());
            let max = <[u8; 8]>::try_from(&value[..]).ok().map(i64::from_le_bytes);
            if let (Some(partition), Some(max)) = (partition, max) {
                time.restore_partition(partition, max, now);
            }
        }
        let (threads, min_features) = config.pipeline.feature_threads();
        let features = FeatureOperator::open(store, config.state.cache_max_bytes)?
            .with_threads(threads)?
            .with_min_parallel_features(min_features);
        Ok(Self {
            schema,
            decoder,
            time,
            features,
            rules,
            verdict_features: verdict::FeatureSelection::new(config.verdict.features.clone()),
            metrics: PipelineMetrics::new(source_name),
            last_eviction: None,
            status: None,
            recent: None,
            last_flush: None,
            restore: None,
            flush_interval_ms: config.state.flush_interval.as_millis() as i64,
            offsets: BTreeMap::new(),
            checkpoints: None,
            marker: None,
            temp_state: temp,
        })
    }

    /// Where on-demand checkpoints are requested, when checkpoints are taken.
    pub fn checkpoint_requests(&self) -> Option<Arc<CheckpointRequests>> {
        self.checkpoints.as_ref().map(|c| Arc::clone(&c.requests))
    }

    /// Who uploads the checkpoints, when they are taken.
    pub fn checkpointer(&self) -> Option<&Checkpointer> {
        self.checkpoints.as_ref().map(|c| &c.checkpointer)
    }

    /// What tells whether input must stop (checkpoints failing), when checkpoints are taken.
    pub fn halt(&self) -> Option<Halt> {
        self.checkpoints.as_ref().map(|c| c.halt.clone())
    }

    /// With checkpoints, a state store that cannot be written stops input for good instead of
    /// the pipeline ([`Halt`]): `error` is such a failure, recorded; `false` for any other.
    fn break_on(&mut self, error: &PipelineError) -> bool {
        let Some(schedule) = &self.checkpoints else {
            return false;
        };
        if !matches!(
            error,
            PipelineError::Features(FeatureError::State(_)) | PipelineError::Checkpoint(_)
        ) {
            return false;
        }
        if schedule.halt.break_for(error.to_string()) {
            tracing::error!(
                "the state store cannot be written: {error}; input stops until a restart"
            );
        }
        self.report_halt();
        true
    }

    /// Whether the state store could not be written (input stopped for good).
    fn broken(&self) -> bool {
        self.checkpoints
            .as_ref()
            .is_some_and(|c| c.halt.broken().is_some())
    }

    /// Writes out every change to the state store and makes it durable (RocksDB's memtables
    /// to files), so that a later run over the same state directory continues from here.
    /// A write error (a full disk) is returned, naming the directory.
    ///
    /// Nothing is written to a temporary state directory ([`Self::keeps_state`]).
    pub fn close(mut self) -> Result<(), PipelineError> {
        if !self.keeps_state() {
            return Ok(());
        }
        self.flush_state()?;
        self.features.store().flush().map_err(FeatureError::from)?;
        Ok(())
    }

    /// Per source partition, the offset after the last record processed.
    pub fn offsets(&self) -> &BTreeMap<i32, i64> {
        &self.offsets
    }

    /// The checkpoint begun after the last batch, if one was: hand it to the sink after that
    /// batch's outputs.
    pub fn take_marker(&mut self) -> Option<Marker> {
        self.marker.take()
    }

    /// Begins a checkpoint at this batch boundary (when checkpoints are taken): snapshots the
    /// changed state (the synchronous part), then writes it, takes a RocksDB checkpoint and
    /// hands it to the checkpointer in the background. The marker is kept for
    /// [`Self::take_marker`].
    pub fn checkpoint(&mut self, now_ms: i64) -> Result<(), PipelineError> {
        let progress = self.partition_progress();
        let rules_version = self.rules.load().version();
        let Some(schedule) = &mut self.checkpoints else {
            return Ok(());
        };
        let began = Instant::now();
        let mut manifest = schedule.begin(now_ms, &self.offsets);
        manifest.max_event_times = progress.into_iter().collect();
        manifest.rules_version = rules_version;
        let id = manifest.id;
        let offsets = manifest.offsets.clone();
        let sync_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let after = schedule.after_write(manifest, began, Arc::clone(&sync_us));
        let marker = Marker {
            id,
            offsets,
            delivery: schedule.delivery,
            checkpointer: schedule.checkpointer.clone(),
        };
        let _span = tracing::info_span!("checkpoint", id).entered();
        self.flush_progress(Some(after))?;
        if marker.delivery == Delivery::ExactlyOnce {
            // All at once: the writer waits for this checkpoint before it takes more outputs,
            // so no later batch can be relied on to collect the rest. At-least-once leaves
            // the changed records to the next batches (copy on write), like a state flush.
            self.features.collect_now()?;
        }
        sync_us.store(
            began.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Release,
        );
        self.last_flush = Some(now_ms);
        self.marker = Some(marker);
        Ok(())
    }

    /// Between batches, while no input arrives: takes a checkpoint that was requested, or whose
    /// interval passed with records read since the last one (exactly-once: their outputs are
    /// committed only then).
    ///
    /// A checkpoint that failed is retried each interval, with or without new input, and the
    /// status board says whether input is stopped because of failures.
    pub fn idle(&mut self, now_ms: i64) -> Result<(), PipelineError> {
        let writing = self.features.writing();
        self.report_halt();
        let Some(schedule) = &mut self.checkpoints else {
            return Ok(());
        };
        let moved = schedule.last_offsets != self.offsets;
        let failing = schedule.checkpointer.failed_in_a_row() > 0;
        if !writing && (moved || failing || schedule.requested()) && schedule.due(now_ms) {
            return self.checkpoint(now_ms);
        }
        // A flush or checkpoint being collected goes on without batches.
        Ok(self.features.end_batch()?)
    }

    /// Per partition, the highest event time seen (what a restart restores).
    /// Per source partition, the highest event time seen (its watermark plus the
    /// out-of-orderness): what a restart restores the time stage from.
    pub fn partition_progress(&self) -> Vec<(i32, i64)> {
        let skew = self.time.config().max_out_of_orderness.as_millis() as i64;
        self.time
            .partition_watermarks()
            .map(|(p, wm)| (p, wm + skew))
            .collect()
    }

    fn progress_meta(&self) -> Vec<(Vec<u8>, [u8; 8])> {
        self.partition_progress()
            .into_iter()
            .map(|(p, max)| (partition_key(p), max.to_le_bytes()))
            .collect()
    }

    /// Tells the status board whether input is stopped (checkpoints failing).
    fn report_halt(&self) {
        if let Some(status) = &self.status {
            let reason = self.halt_reason();
            status.update(|s| set_halted(s, reason));
        }
    }

    /// Why input is stopped, if it is (see [`Halt::reason`]).
    fn halt_reason(&self) -> Option<String> {
        self.checkpoints.as_ref().and_then(|c| c.halt.reason())
    }

    /// Reports progress to `status` after every batch; marks the state restored.
    pub fn report_to(&mut self, status: Arc<StatusBoard>) {
        status.update(|s| {
            s.state_restored = true;
            s.restore = self.restore.clone();
        });
        self.status = Some(status);
    }

    /// Keeps recently scored events, with their feature values, in `recent` (for backtests).
    pub fn keep_recent(&mut self, recent: Arc<RecentEvents>) {
        self.recent = Some(recent);
    }

    /// The time stage (watermarks per partition).
    pub fn time(&self) -> &TimeStage {
        &self.time
    }

    /// The time stage, to add and remove source partitions (the partitioned topology's ingest).
    pub fn time_mut(&mut self) -> &mut TimeStage {
        &mut self.time
    }

    /// The event schema.
    pub fn schema(&self) -> &EventSchema {
        &self.schema
    }

    /// Sizes of the windowed feature state (walks the state store).
    pub fn feature_state(&self) -> Result<StateStats, PipelineError> {
        Ok(self.features.stats()?)
    }

    /// Decodes, times, computes features, scores and encodes one batch at processing time
    /// `now_ms`. Bad records come back as dead letters, events too late to score as late events.
    pub fn process_at(
        &mut self,
        raw: &RawBatch,
        out: &mut Processed,
        now_ms: i64,
    ) -> Result<(), PipelineError> {
        let decoded = self.decoder.decode(raw)?;
        self.process_decoded(raw, decoded, out, now_ms)
    }

    /// A decoder like the pipeline's own, for decoding on another thread ahead of
    /// [`Self::process_decoded`].
    pub fn decoder(&self) -> Result<EventDecoder, PipelineError> {
        Ok(EventDecoder::new(&self.schema, self.decoder.capacity())?)
    }

    /// The front half of [`Self::process_decoded`], which is the ingest stage of the partitioned
    /// topology: records the batch's offsets, counts its dead letters, applies time (skew
    /// correction, lateness, watermarks) and returns the events left to score, or `None` when
    /// none is. Dead letters and late events are in `out` (cleared first).
    pub fn ingest(
        &mut self,
        raw: &RawBatch,
        decoded: Decoded,
        out: &mut Processed,
        now_ms: i64,
    ) -> Result<Option<Ingested>, PipelineError> {
        out.clear();
        for p in raw.positions() {
            let next = self.offsets.entry(p.partition).or_insert(0);
            *next = (*next).max(p.offset + 1);
        }
        out.dead = decoded.dead;
        if decoded.batch.num_rows() == 0 {
            self.count_dead(&out.dead);
            self.metrics.count_events(raw, &[], &[], &out.dead);
            return Ok(None);
        }

        // Time: skew correction, lateness, watermarks.
        let time_column = self.schema.event_time();
        let times = decoded
            .batch
            .column(time_column)
            .as_primitive::<TimestampMillisecondType>()
            .values()
            .to_vec();
        let partitions: Vec<i32> = decoded
            .rows
            .iter()
            .map(|&r| raw.position(r as usize).partition)
            .collect();
        let assignment = self.time.assign(&times, &partitions, now_ms);
        let watermark = assignment.watermark;
        // No event of this batch or a later one is older than this.
        let horizon =
            watermark.map(|wm| wm - self.time.config().allowed_lateness.as_millis() as i64);
        let timed = self.apply_time(decoded.batch, decoded.rows, assignment, out)?;
        self.count_dead(&out.dead);
        self.metrics
            .count_events(raw, &timed.rows, &out.late, &out.dead);
        if timed.batch.num_rows() == 0 {
            return Ok(None);
        }
        Ok(Some(Ingested {
            timed,
            watermark,
            horizon,
        }))
    }

    /// [`Self::process_at`] for a batch already decoded (by a decoder from [`Self::decoder`]).
    pub fn process_decoded(
        &mut self,
        raw: &RawBatch,
        decoded: Decoded,
        out: &mut Processed,
        now_ms: i64,
    ) -> Result<(), PipelineError> {
        let Some(Ingested {
            timed:
                Timed {
                    batch: events,
                    rows,
                    event_time,
                    late,
                    corrected,
                },
            horizon,
            ..
        }) = self.ingest(raw, decoded, out, now_ms)?
        else {
            return Ok(());
        };
        let time_column = self.schema.event_time();

        // One load per batch: every event of the batch is scored by this bundle.
        let bundle = self.rules.load();
        let with_features = self
            .features
            .compute(&bundle, &events, &event_time, horizon)?;
        self.features.end_batch()?;
        let evaluated = bundle.evaluate(&with_features)?;
        if let Some(recent) = &self.recent {
            recent.push(&with_features, &bundle);
        }
        let processed_at = source::now_ms();
        verdict::encode(
            &mut out.verdicts,
            &mut self.verdict_features,
            &bundle,
            &evaluated,
            raw,
            &rows,
            self.schema.event_id(),
            time_column,
            TimeFlags {
                late: Some(&late),
                time_corrected: Some(&corrected),
            },
            processed_at,
        );
        for d in &evaluated.scores.decision {
            out.decisions[*d as usize] += 1;
        }
        for (count, counter) in out.decisions.iter().zip(&self.metrics.decisions) {
            counter.increment(*count);
        }
        for &row in &rows {
            let ms = (processed_at - raw.ingest_ms(row as usize)).max(0);
            self.metrics.latency.record(ms as f64 / 1000.0);
        }
        out.rules_version = bundle.version();
        self.report(&bundle, out, rows.len(), now_ms);
        self.evict(&bundle, now_ms)?;
        if !self.features.writing() && self.checkpoints.as_mut().is_some_and(|c| c.due(now_ms)) {
            return self.checkpoint(now_ms);
        }
        match self.last_flush {
            // Applied in the background; scoring goes on. While the last one is still being
            // applied, the next waits for a later batch rather than hold this one up. Nothing
            // reads a temporary directory back (checkpoints flush for themselves): at 10M W2
            // events each flush rewrote the whole 2.4 GB state, a third of the run's time.
            Some(at)
                if self.keeps_state()
                    && now_ms - at >= self.flush_interval_ms
                    && !self.features.writing() =>
            {
                self.write_state()?;
                self.last_flush = Some(now_ms);
            }
            Some(_) => {}
            None => self.last_flush = Some(now_ms),
        }
        Ok(())
    }

    /// Records in the status board that `partitions` were assigned (or revoked).
    fn report_partitions(&self, partitions: &[i32], assigned: bool) {
        if let Some(status) = &self.status {
            status.update(|s| {
                for &p in partitions {
                    let partition = s.partitions.entry(p).or_default();
                    partition.assigned = assigned;
                    if !assigned {
                        partition.watermark_ms = None;
                    }
                }
            });
        }
    }

    /// Updates the status board (when one is attached) and the watermark lag after a batch.
    fn report(&self, bundle: &CompiledBundle, out: &Processed, events: usize, now_ms: i64) {
        let watermark = self.time.watermark(now_ms);
        if let Some(wm) = watermark {
            self.metrics
                .watermark_lag
                .set((now_ms - wm).max(0) as f64 / 1000.0);
        }
        let Some(status) = &self.status else {
            return;
        };
        let halted = self.halt_reason();
        status.update(|s| {
            set_halted(s, halted);
            if s.rules_version != out.rules_version {
                // A window starts with the first batch of a bundle that has it.
                s.features = self.features.warmth(bundle, watermark);
            }
            s.rules_version = out.rules_version;
            s.batches += 1;
            s.events += events as u64;
            s.verdicts += out.verdicts.len() as u64;
            s.watermark_ms = watermark;
            s.watermark_lag_ms = watermark.map(|wm| (now_ms - wm).max(0));
            s.last_batch_at_ms = Some(now_ms);
            s.last_state_flush_at_ms = self.last_flush;
            for (partition, wm) in self.time.partition_watermarks() {
                s.partitions.entry(partition).or_default().watermark_ms = Some(wm);
            }
        });
    }

    /// Writes the feature state changed since the last flush and the partitions' progress to
    /// the state store in one write batch. Afterwards the store holds exactly the state after
    /// the last processed batch: a restart over it continues from there.
    pub fn flush_state(&mut self) -> Result<(), PipelineError> {
        self.write_state()?;
        Ok(self.features.wait()?)
    }

    /// Whether the state directory outlives the pipeline: a temporary one is removed as the
    /// pipeline is dropped, so the state is not written out to it every `state.flush_interval`
    /// nor at the end (for a million W2 records that took a second and a half after the last
    /// verdict); only the cache's overflow and checkpoints go there.
    pub fn keeps_state(&self) -> bool {
        self.temp_state.is_none()
    }

    /// Starts writing the changed feature state and the partitions' progress (one write batch,
    /// applied in the background).
    fn write_state(&mut self) -> Result<(), PipelineError> {
        let partitions = self.time.partition_watermarks().count();
        let _span = tracing::info_span!("state_flush", partitions).entered();
        let started = Instant::now();
        self.flush_progress(None)?;
        self.metrics.flushes.record(started.elapsed().as_secs_f64());
        // The size as of the previous write: this one is still being applied.
        match self.features.store().size_bytes() {
            Ok(bytes) => self.metrics.state_size.set(bytes as f64),
            Err(e) => tracing::debug!(error = %e, "state size unavailable"),
        }
        Ok(())
    }

    /// Flushes the changed feature state with the partitions' progress (then `after`, on the
    /// writer thread).
    fn flush_progress(
        &mut self,
        after: Option<riskstream_state::AfterWrite>,
    ) -> Result<(), PipelineError> {
        let progress = self.progress_meta();
        let meta: Vec<(&[u8], &[u8])> = progress
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        Ok(self.features.flush_then(&meta, after)?)
    }

    /// [`Self::process_at`] at the current wall-clock time.
    pub fn process(&mut self, raw: &RawBatch, out: &mut Processed) -> Result<(), PipelineError> {
        self.process_at(raw, out, source::now_ms())
    }

    /// Applies the time stage's decisions: rejected events leave the batch (future-stamped ones
    /// as dead letters, too-late ones as late events), clamped times replace the originals.
    fn apply_time(
        &self,
        batch: RecordBatch,
        rows: Vec<u32>,
        assignment: riskstream_time::Assignment,
        out: &mut Processed,
    ) -> Result<Timed, PipelineError> {
        let time_column = self.schema.event_time();
        let mut batch = batch;
        if assignment.time_corrected.iter().any(|c| *c) {
            let corrected = TimestampMillisecondArray::from(assignment.event_time.clone())
                .with_timezone_opt(timestamp_timezone(&batch, time_column));
            let mut columns = batch.columns().to_vec();
            columns[time_column] = Arc::new(corrected);
            batch = RecordBatch::try_new(batch.schema(), columns).map_err(ScoreError::from)?;
        }
        let mut timed = Timed {
            batch,
            rows,
            event_time: assignment.event_time,
            late: assignment.late,
            corrected: assignment.time_corrected,
        };
        if assignment.rejected.is_empty() {
            return Ok(timed);
        }
        let mut keep = vec![true; timed.rows.len()];
        for (i, rejection) in &assignment.rejected {
            keep[*i] = false;
            let letter = DeadLetter {
                record: timed.rows[*i] as usize,
                reason: match rejection {
                    Rejection::FutureSkew { .. } => DeadReason::FutureTimestamp,
                    Rejection::TooLate { .. } => DeadReason::TooLate,
                },
                detail: rejection.describe(self.time.config()),
            };
            match rejection {
                Rejection::FutureSkew { .. } => out.dead.push(letter),
                Rejection::TooLate { .. } => out.late.push(letter),
            }
        }
        out.dead.sort_by_key(|d| d.record);
        timed.batch = filter_record_batch(&timed.batch, &BooleanArray::from(keep.clone()))
            .map_err(ScoreError::from)?;
        retain_kept(&mut timed.rows, &keep);
        retain_kept(&mut timed.event_time, &keep);
        retain_kept(&mut timed.late, &keep);
        retain_kept(&mut timed.corrected, &keep);
        Ok(timed)
    }

    fn count_dead(&self, dead: &[DeadLetter]) {
        for d in dead {
            if let Some((_, c)) = self.metrics.dead.iter().find(|(r, _)| *r == d.reason) {
                c.increment(1);
            }
        }
    }

    /// Evicts feature state behind the watermark, a slice every [`EVICTION_EVERY_MS`] of
    /// processing time.
    fn evict(&mut self, bundle: &CompiledBundle, now_ms: i64) -> Result<(), PipelineError> {
        if self
            .last_eviction
            .is_some_and(|at| now_ms - at < EVICTION_EVERY_MS)
        {
            return Ok(());
        }
        if let Some(watermark) = self.time.watermark(now_ms) {
            let lateness = self.time.config().allowed_lateness.as_millis() as i64;
            self.features
                .evict(bundle, watermark, lateness, EVICTION_SWEEP_KEYS)?;
            self.last_eviction = Some(now_ms);
        }
        Ok(())
    }
}

/// Records in `status` whether input is stopped, logging when that changes.
fn set_halted(status: &mut PipelineStatus, reason: Option<String>) {
    if status.halted.is_some() != reason.is_some() {
        match &reason {
            Some(why) => tracing::error!("input stopped: {why}"),
            None => tracing::info!("a checkpoint succeeded again: input resumes"),
        }
    }
    status.halted = reason;
}

/// The events the time stage kept, with their per-event time decisions aligned to the rows.
#[derive(Debug)]
pub struct Timed {
    /// The events, their times corrected.
    pub batch: RecordBatch,
    /// Raw record index of each row.
    pub rows: Vec<u32>,
    /// Each row's event time (corrected).
    pub event_time: Vec<i64>,
    /// Rows below the watermark (scored within `allowed_lateness`).
    pub late: Vec<bool>,
    /// Rows whose future-skewed time was clamped.
    pub corrected: Vec<bool>,
}

/// A batch through the time stage ([`Pipeline::ingest`]).
#[derive(Debug)]
pub struct Ingested {
    pub timed: Timed,
    /// The operator watermark when the batch began.
    pub watermark: Option<i64>,
    /// The lowest event time this batch or a later one may carry (the watermark before the
    /// batch minus `allowed_lateness`).
    pub horizon: Option<i64>,
}

/// Keeps the elements of `v` whose flag in `keep` is set.
fn retain_kept<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| flags.next().copied().unwrap_or(false));
}

fn timestamp_timezone(batch: &RecordBatch, column: usize) -> Option<Arc<str>> {
    match batch.schema().field(column).data_type() {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Records read from the source.
    pub events: u64,
    pub verdicts: u64,
    /// Verdicts by decision: allow, review, block.
    pub decisions: [u64; 3],
    pub dead_letters: BTreeMap<&'static str, u64>,
    /// Events too late to score, sent to the late output.
    pub late: u64,
    /// Rules versions that scored at least one batch.
    pub rules_versions: Vec<u64>,
    pub elapsed: Duration,
    /// The feature state cache at the end of the run.
    pub state_cache: riskstream_features::CacheStats,
}

impl Summary {
    pub fn dead_letter_count(&self) -> u64 {
        self.dead_letters.values().sum()
    }

    /// Records per second over the whole run.
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [allow, review, block] = self.decisions;
        writeln!(
            f,
            "events: {}  verdicts: {}  (allow {allow}, review {review}, block {block})",
            self.events, self.verdicts
        )?;
        write!(f, "dead letters: {}", self.dead_letter_count())?;
        if !self.dead_letters.is_empty() {
            let parts: Vec<_> = self
                .dead_letters
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        writeln!(f)?;
        writeln!(f, "too late (late output): {}", self.late)?;
        let versions: Vec<_> = self
            .rules_versions
            .iter()
            .map(|v| format!("v{v}"))
            .collect();
        writeln!(f, "rules: {}", versions.join(", "))?;
        let cache = &self.state_cache;
        let mb = |b: usize| b as f64 / 1e6;
        writeln!(
            f,
            "state cache: {:.1} MB (peak {:.1} MB of {:.1} MB cap), {} records, {} dropped to stay under it",
            mb(cache.bytes),
            mb(cache.peak_bytes),
            mb(cache.max_bytes),
            cache.records,
            cache.dropped
        )?;
        write!(
            f,
            "elapsed: {:.3} s  throughput: {:.0} events/s",
            self.elapsed.as_secs_f64(),
            self.events_per_second()
        )
    }
}

/// Runs `pipeline` over `source` into `sink` until the source is exhausted, then writes the
/// feature state out ([`Pipeline::flush_state`]) unless its directory is temporary.
///
/// Three threads, each owning one end: a reader fills and decodes raw batches, the calling
/// thread runs time, features and rules, a writer hands the results to the sink. Bounded
/// channels between them keep at most a few batches in flight, so memory stays bounded: when
/// the scorer is full the reader holds the source ([`Source::hold`]: a Kafka source pauses its
/// partitions) rather than read ahead, and a slow sink backs up into the scorer. After the
/// sink flushed, the source is closed ([`Source::close`]: Kafka commits its offsets). The
/// first error stops all three and is returned.
pub fn run(
    source: &mut (dyn Source + Send),
    pipeline: &mut Pipeline,
    sink: &mut (dyn Sink + Send),
) -> Result<Summary, PipelineError> {
    use std::sync::mpsc::{sync_channel, RecvTimeoutError, TrySendError};

    /// Batches in flight between two stages.
    const IN_FLIGHT: usize = 2;
    /// How long the reader holds the source between retries while the scorer is full.
    const HOLD: Duration = Duration::from_millis(2);
    /// How long the reader holds the source at a time while input is stopped.
    const HALTED_HOLD: Duration = Duration::from_millis(100);
    let batch_max_events = pipeline.decoder.capacity();
    let mut decoder = pipeline.decoder()?;
    let halt = pipeline.halt();
    // Set when the scorer stops, so that a reader with nothing to hand over ends too.
    let scorer_gone = std::sync::atomic::AtomicBool::new(false);
    let scorer_gone = &scorer_gone;
    let source_name = source.name().to_string();
    let started = Instant::now();
    let mut summary = Summary::default();
    let (to_score, decoded) = sync_channel::<Input>(IN_FLIGHT);
    let (to_write, scored) = sync_channel::<Output>(IN_FLIGHT);
    // Written batches go back for reuse: a batch's buffers grown anew each time (several MB of
    // verdicts and raw records) were 6 % of the scorer's time in page faults alone.
    let (recycle_raw, recycled_raw) = sync_channel::<RawBatch>(RECYCLED);
    let (recycle_verdicts, recycled_verdicts) = sync_channel::<VerdictBatch>(RECYCLED);

    let summary = std::thread::scope(|scope| {
        let source_ref = &mut *source;
        let reader = scope.spawn(move || -> Result<(), PipelineError> {
            // Hands one input to the scorer; while it is full the source holds (pauses)
            // instead of reading ahead. `false`: the scorer stopped.
            let send = |source: &mut (dyn Source + Send), mut input: Input| {
                let mut held = false;
                loop {
                    match to_score.try_send(input) {
                        Ok(()) => break,
                        Err(TrySendError::Disconnected(_)) => return Ok(false),
                        Err(TrySendError::Full(back)) => {
                            input = back;
                            held = true;
                            source.hold(HOLD)?;
                        }
                    }
                }
                if held {
                    source.release()?;
                }
                Ok::<bool, PipelineError>(true)
            };
            let mut halted = false;
            loop {
                if scorer_gone.load(std::sync::atomic::Ordering::Acquire) {
                    return Ok(());
                }
                // Partition changes go ahead of any event read after them (a source ends a
                // fill at a rebalance, so the batch before holds only earlier events).
                let revoked = source_ref.take_revoked();
                if !revoked.is_empty() && !send(source_ref, Input::Revoked(revoked))? {
                    return Ok(());
                }
                let assigned = source_ref.take_assigned();
                if !assigned.is_empty() && !send(source_ref, Input::Assigned(assigned))? {
                    return Ok(());
                }
                // Checkpoints failing: read nothing (the source pauses its partitions) until one
                // succeeds; the scorer retries them meanwhile.
                if halt.as_ref().is_some_and(|h| h.reason().is_some()) {
                    if source_ref.stopping() {
                        return Ok(());
                    }
                    halted = true;
                    source_ref.hold(HALTED_HOLD)?;
                    continue;
                }
                if std::mem::take(&mut halted) {
                    source_ref.release()?;
                }
                let mut raw = recycled_raw.try_recv().unwrap_or_default();
                raw.clear();
                let state = source_ref.fill(&mut raw, batch_max_events)?;
                if !raw.is_empty() {
                    let batch = decoder.decode(&raw)?;
                    let backlogged = source_ref.backlogged();
                    if !send(source_ref, Input::Batch(raw, batch, backlogged))? {
                        return Ok(()); // the scorer stopped; its error is reported
                    }
                }
                if state == SourceState::Exhausted {
                    return Ok(());
                }
            }
        });
        let source_name = &source_name;
        let writer = scope.spawn(move || -> Result<(), PipelineError> {
            Writer {
                sink,
                source_name,
                committing: None,
                held: std::collections::VecDeque::new(),
                recycle_raw,
                recycle_verdicts,
            }
            .run(scored)
        });

        let scoring = (|| -> Result<Option<(u64, Checkpointer)>, PipelineError> {
            loop {
                let input = match decoded.recv_timeout(IDLE_TICK) {
                    // Input stopped for good (the state store failed): what is still in flight
                    // is left unscored, as a restart scores it again.
                    Ok(_) if pipeline.broken() => continue,
                    Err(RecvTimeoutError::Timeout) if pipeline.broken() => continue,
                    Ok(input) => input,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = pipeline.idle(source::now_ms()) {
                            if pipeline.break_on(&e) {
                                continue;
                            }
                            return Err(e);
                        }
                        if let Some(marker) = pipeline.take_marker() {
                            if to_write.send(Output::Checkpoint(marker)).is_err() {
                                return Ok(None);
                            }
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let (raw, batch) = match input {
                    Input::Batch(raw, batch, backlogged) => {
                        pipeline.time.keep_active(&backlogged, source::now_ms());
                        (raw, batch)
                    }
                    Input::Revoked(partitions) => {
                        for &p in &partitions {
                            pipeline.time.remove_partition(p);
                            pipeline.offsets.remove(&p);
                        }
                        pipeline.report_partitions(&partitions, false);
                        continue;
                    }
                    Input::Assigned(partitions) => {
                        let now = source::now_ms();
                        for &p in &partitions {
                            pipeline.time.add_partition(p, now);
                        }
                        pipeline.report_partitions(&partitions, true);
                        continue;
                    }
                };
                let mut out = Processed {
                    verdicts: recycled_verdicts.try_recv().unwrap_or_default(),
                    ..Processed::default()
                };
                let span = tracing::info_span!(
                    "batch",
                    events = raw.len(),
                    rules_version = tracing::field::Empty
                );
                let _entered = span.enter();
                if let Err(e) = pipeline.process_decoded(&raw, batch, &mut out, source::now_ms()) {
                    if pipeline.break_on(&e) {
                        continue;
                    }
                    return Err(e);
                }
                span.record("rules_version", out.rules_version);
                summary.add(&raw, &out);
                if to_write.send(Output::Batch(raw, out)).is_err() {
                    // The writer stopped (its error is reported): keep the stored state at the
                    // last flush rather than claim batches whose verdicts were not written.
                    return Ok(None);
                }
                if let Some(marker) = pipeline.take_marker() {
                    if to_write.send(Output::Checkpoint(marker)).is_err() {
                        return Ok(None);
                    }
                }
            }
            if let Some(why) = pipeline.checkpoints.as_ref().and_then(|c| c.halt.broken()) {
                // Nothing more can be made durable: stop without a last checkpoint.
                return Err(PipelineError::Broken(why.clone()));
            }
            // The end of the input (or a shutdown): a last checkpoint covers everything read.
            let mut last = None;
            if pipeline.checkpoints.is_some() {
                pipeline.checkpoint(source::now_ms())?;
                if let Some(marker) = pipeline.take_marker() {
                    last = Some((marker.id, marker.checkpointer.clone()));
                    let _ = to_write.send(Output::Checkpoint(marker));
                }
            }
            drop(to_write);
            if pipeline.keeps_state() {
                pipeline.flush_state()?;
            } else {
                pipeline.features.wait()?;
            }
            summary.state_cache = pipeline.features.cache_stats();
            Ok(last)
        })();
        scorer_gone.store(true, std::sync::atomic::Ordering::Release);
        let read = reader
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // The root cause first: a failing sink or source makes the scorer stop too.
        let last = written.and(read).and(scoring)?;
        // A clean stop leaves a checkpoint of everything read.
        if let Some((id, checkpointer)) = last {
            checkpointer.wait(id, LAST_CHECKPOINT_TIMEOUT)?;
        }
        Ok::<_, PipelineError>(summary)
    })?;
    // Every output is flushed: the source may now record its progress.
    source.close()?;
    let mut summary = summary;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Written batches kept for reuse (beyond those in flight).
const RECYCLED: usize = 4;
/// How long the scorer waits for input before it looks whether a checkpoint is due.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// How long a stopping pipeline waits for its last checkpoint.
const LAST_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the writer waits for a checkpoint before it commits its transaction (exactly-once).
const COMMIT_WAIT: Duration = Duration::from_secs(120);

/// What the scorer hands the writer.
// Nearly every value is a batch: boxing it to shrink the rare marker would cost an allocation
// per batch.
#[allow(clippy::large_enum_variant)]
enum Output {
    Batch(RawBatch, Processed),
    /// A checkpoint covering every batch handed over before it.
    Checkpoint(Marker),
}

/// Batches an exactly-once writer holds while its checkpoint is being uploaded, beyond which it
/// waits (and scoring with it).
const MAX_HELD: usize = 1024;
/// How often an exactly-once writer holding outputs looks whether its checkpoint exists.
const HOLD_POLL: Duration = Duration::from_millis(2);

/// The writer thread: hands outputs to the sink in order, and does the sink's part of each
/// checkpoint. At-least-once: waits until every output so far is acknowledged, then lets the
/// checkpoint's manifest be written (a checkpoint must not cover an event whose verdict could
/// still be lost). Exactly-once: once the checkpoint exists, commits the outputs before it with
/// its offsets; outputs after it are held meanwhile (they belong to the next transaction), so
/// scoring does not wait for the upload.
struct Writer<'a> {
    sink: &'a mut (dyn Sink + Send),
    source_name: &'a str,
    /// Exactly-once: the checkpoint whose transaction commits once it exists.
    committing: Option<Marker>,
    /// Outputs received after it, in order.
    held: std::collections::VecDeque<Output>,
    /// Where written batches go back for reuse (dropped when the pool is full).
    recycle_raw: std::sync::mpsc::SyncSender<RawBatch>,
    recycle_verdicts: std::sync::mpsc::SyncSender<VerdictBatch>,
}

impl Writer<'_> {
    fn run(mut self, scored: std::sync::mpsc::Receiver<Output>) -> Result<(), PipelineError> {
        use std::sync::mpsc::RecvTimeoutError;
        let mut open = true;
        while open || self.committing.is_some() {
            if self.committing.is_some() {
                // Block only when nothing more is coming or too much is held.
                let full = !open || self.held.len() >= MAX_HELD;
                self.try_commit(if full { COMMIT_WAIT } else { Duration::ZERO })?;
            }
            if !open {
                continue;
            }
            let next = if self.committing.is_some() {
                match scored.recv_timeout(HOLD_POLL) {
                    Ok(output) => Some(output),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                scored.recv().map_err(|_| open = false).ok()
            };
            match next {
                Some(output) if self.committing.is_some() => self.held.push_back(output),
                Some(output) => self.write(output)?,
                None => {}
            }
        }
        self.sink.flush()?;
        Ok(())
    }

    /// Commits the awaited checkpoint's transaction if the checkpoint exists (waiting up to
    /// `wait` for it), then writes what was held, up to the next checkpoint among it.
    fn try_commit(&mut self, wait: Duration) -> Result<(), PipelineError> {
        let Some(marker) = &self.committing else {
            return Ok(());
        };
        match marker.checkpointer.wait(marker.id, wait) {
            Ok(_) => {}
            Err(CheckpointError::Timeout { .. }) if wait.is_zero() => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.sink.commit(&marker.offsets)?;
        marker.checkpointer.committed(marker.id);
        self.committing = None;
        while self.committing.is_none() {
            let Some(output) = self.held.pop_front() else {
                break;
            };
            self.write(output)?;
        }
        Ok(())
    }

    fn write(&mut self, output: Output) -> Result<(), PipelineError> {
        match output {
            Output::Batch(raw, out) => {
                self.sink.verdicts(&out.verdicts)?;
                if !out.dead.is_empty() {
                    self.sink.dead_letters(self.source_name, &raw, &out.dead)?;
                }
                if !out.late.is_empty() {
                    self.sink.late(self.source_name, &raw, &out.late)?;
                }
                self.sink.end_batch(&raw)?;
                let mut verdicts = out.verdicts;
                verdicts.clear();
                // A full pool drops the batch: nothing waits on reuse.
                let _ = self.recycle_raw.try_send(raw);
                let _ = self.recycle_verdicts.try_send(verdicts);
            }
            Output::Checkpoint(marker) => match marker.delivery {
                Delivery::AtLeastOnce => {
                    self.sink.flush()?;
                    marker.checkpointer.outputs_durable(marker.id);
                }
                Delivery::ExactlyOnce => self.committing = Some(marker),
            },
        }
        Ok(())
    }
}

/// The state directory of `config`, or a fresh temporary one kept alive by the guard.
fn state_dir(
    config: &Config,
) -> Result<(std::path::PathBuf, Option<tempfile::TempDir>), PipelineError> {
    match &config.state.dir {
        Some(dir) => Ok((dir.clone(), None)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("riskstream-state-")
                .tempdir()
                .map_err(|source| PipelineError::TempState { source })?;
            // The store goes one level down, so that its staging directory is beside it.
            Ok((temp.path().join("db"), Some(temp)))
        }
    }
}

/// What the reader hands the scorer.
enum Input {
    /// A batch, and the partitions with more records waiting (not idle).
    Batch(RawBatch, Decoded, Vec<i32>),
    /// Partitions the source lost; their watermarks go.
    Revoked(Vec<i32>),
    /// Partitions the source was given; they hold the watermark until they deliver.
    Assigned(Vec<i32>),
}

impl Summary {
    fn add(&mut self, raw: &RawBatch, out: &Processed) {
        self.late += out.late.len() as u64;
        self.events += raw.len() as u64;
        self.verdicts += out.verdicts.len() as u64;
        for (total, n) in self.decisions.iter_mut().zip(out.decisions) {
            *total += n;
        }
        for d in &out.dead {
            *self.dead_letters.entry(d.reason.as_str()).or_default() += 1;
        }
        if out.rules_version != 0 && self.rules_versions.last() != Some(&out.rules_version) {
            self.rules_versions.push(out.rules_version);
        }
    }
}

//! What a running pipeline tells about itself: per-partition offsets, lag and watermarks, the
//! rules version, counts, and recent events for backtests.
//!
//! The scoring loop updates a [`StatusBoard`] once per batch and the Kafka source from its
//! statistics; the admin API reads snapshots. [`RecentEvents`] keeps the last scored events
//! with their feature values as Arrow batches (shared, not copied). Neither may slow scoring
//! beyond one short lock per batch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::RecordBatch;
use riskstream_features::Warmth;
use riskstream_rules::CompiledBundle;
use serde::Serialize;

/// A snapshot of the pipeline's progress.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineStatus {
    /// The input, e.g. the transactions topic.
    pub source: String,
    /// What the instance is waiting for before it can score (the Kafka cluster, the control
    /// topic), while it waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Why the pipeline stopped consuming (checkpoints failing), while it is stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    /// Feature state is open and restored from the state directory.
    pub state_restored: bool,
    /// While the state is being restored from a checkpoint: how far the download is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restoring: Option<riskstream_checkpoint::RestoreProgress>,
    /// The checkpoint the state came from, when it came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// The rules version of the last scored batch (0 before the first).
    pub rules_version: u64,
    pub batches: u64,
    pub events: u64,
    pub verdicts: u64,
    /// The pipeline's watermark: the minimum over active partitions (ms since the epoch).
    pub watermark_ms: Option<i64>,
    /// Processing time minus the watermark at the last batch.
    pub watermark_lag_ms: Option<i64>,
    /// Processing time of the last batch.
    pub last_batch_at_ms: Option<i64>,
    /// Processing time of the last write of feature state to the store.
    pub last_state_flush_at_ms: Option<i64>,
    pub partitions: BTreeMap<i32, PartitionStatus>,
    /// The running bundle's windowed features and whether their windows have filled yet: a
    /// feature is warming until the watermark passes the start of its window plus its length
    /// (after a reload added it, its values lack the events from before). Starts change only
    /// with the bundle, so this is refreshed when the version does; `warming` is judged when
    /// read ([`StatusBoard::snapshot`]).
    pub features: Vec<Warmth>,
}

/// How the state was restored from a checkpoint at start-up.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RestoreStatus {
    pub checkpoint: u64,
    /// Bytes of the checkpoint's files.
    pub bytes: u64,
    /// From listing the checkpoints to the restored state opening.
    pub seconds: f64,
    /// Newer checkpoints passed over (unreadable, or not accepted), with why.
    pub skipped: Vec<(u64, String)>,
}

/// One source partition.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStatus {
    /// Owned by this instance now.
    pub assigned: bool,
    /// The partition's watermark (ms since the epoch).
    pub watermark_ms: Option<i64>,
    /// Next offset the consumer reads.
    pub position: Option<i64>,
    /// Last committed offset.
    pub committed: Option<i64>,
    /// The partition's end offset at the broker.
    pub high_watermark: Option<i64>,
    /// Records behind the end.
    pub lag: Option<i64>,
}

/// The shared, updatable status of one pipeline.
#[derive(Debug, Default)]
pub struct StatusBoard {
    inner: Mutex<PipelineStatus>,
}

impl StatusBoard {
    pub fn new(source: &str) -> Self {
        Self {
            inner: Mutex::new(PipelineStatus {
                source: source.to_string(),
                ..PipelineStatus::default()
            }),
        }
    }

    /// Changes the status under its lock (keep `f` short).
    pub fn update(&self, f: impl FnOnce(&mut PipelineStatus)) {
        f(&mut lock(&self.inner));
    }

    /// The status now; whether features are warming is judged at its watermark.
    pub fn snapshot(&self) -> PipelineStatus {
        let mut status = lock(&self.inner).clone();
        for feature in &mut status.features {
            feature.at(status.watermark_ms);
        }
        status
    }

    /// State restored and at least one partition owned: the instance can score.
    pub fn ready(&self) -> bool {
        let status = lock(&self.inner);
        status.state_restored && status.partitions.values().any(|p| p.assigned)
    }
}

/// Recently scored events with the feature values they were scored with: event columns plus
/// windowed feature columns, in the input schema of the bundle that scored them.
#[derive(Debug)]
pub struct RecentEvents {
    capacity: usize,
    inner: Mutex<Recent>,
}

#[derive(Debug, Default)]
struct Recent {
    batches: VecDeque<(RecordBatch, Arc<CompiledBundle>)>,
    rows: usize,
}

impl RecentEvents {
    /// Keeps about the last `capacity` events (whole batches; the oldest batch goes once the
    /// rest hold `capacity`).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Recent::default()),
        }
    }

    /// Adds a scored batch (cheap: the columns are shared).
    pub fn push(&self, batch: &RecordBatch, bundle: &Arc<CompiledBundle>) {
        if self.capacity == 0 || batch.num_rows() == 0 {
            return;
        }
        let mut recent = lock(&self.inner);
        recent.rows += batch.num_rows();
        recent
            .batches
            .push_back((batch.clone(), Arc::clone(bundle)));
        while recent.batches.len() > 1 {
            let oldest = recent.batches.front().map_or(0, |(b, _)| b.num_rows());
            if recent.rows - oldest < self.capacity {
                break;
            }
            recent.rows -= oldest;
            recent.batches.pop_front();
        }
    }

    /// The kept batches, oldest first, each with the bundle that scored it.
    pub fn snapshot(&self) -> Vec<(RecordBatch, Arc<CompiledBundle>)> {
        lock(&self.inner).batches.iter().cloned().collect()
    }

    /// Events kept.
    pub fn len(&self) -> usize {
        lock(&self.inner).rows
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! Checkpoints from the pipeline's side: when one is due, what it records (the source offsets
//! after the last batch, the watermarks, the rules version), and the marker that tells the sink
//! where the checkpoint falls among its outputs.
//!
//! Uploading is the checkpoint crate's; this module must not block scoring for more than the
//! snapshot of the changed state (the synchronous part).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use riskstream_checkpoint::{Checkpointer, Manifest, Staged};
use riskstream_common::Delivery;

/// Checkpoints asked for on demand (admin API): a counter the pipeline compares with the
/// requests it has served.
#[derive(Debug, Default)]
pub struct CheckpointRequests {
    requested: AtomicU64,
}

impl CheckpointRequests {
    /// Asks for a checkpoint at the next batch boundary.
    pub fn request(&self) {
        self.requested.fetch_add(1, Ordering::AcqRel);
    }

    fn requested(&self) -> u64 {
        self.requested.load(Ordering::Acquire)
    }
}

/// A running pipeline's checkpoints, for the admin API: where to request one and who uploads
/// them. Empty until the pipeline has recovered (or when it takes no checkpoints).
#[derive(Debug, Default)]
pub struct CheckpointHandle {
    inner: OnceLock<(Arc<CheckpointRequests>, Checkpointer)>,
}

impl CheckpointHandle {
    pub fn set(&self, requests: Arc<CheckpointRequests>, checkpointer: Checkpointer) {
        let _ = self.inner.set((requests, checkpointer));
    }

    pub fn get(&self) -> Option<(&CheckpointRequests, &Checkpointer)> {
        self.inner.get().map(|(r, c)| (r.as_ref(), c))
    }
}

/// Where a checkpoint falls among the outputs: every output handed to the sink before it
/// belongs to the events the checkpoint covers.
#[derive(Debug)]
pub struct Marker {
    pub id: u64,
    /// Per partition, the offset of the first record not covered.
    pub offsets: BTreeMap<i32, i64>,
    pub delivery: Delivery,
    pub checkpointer: Checkpointer,
}

/// The pipeline's checkpoint schedule.
#[derive(Debug)]
pub(crate) struct Schedule {
    pub checkpointer: Checkpointer,
    pub interval_ms: i64,
    pub last_at: Option<i64>,
    pub requests: Arc<CheckpointRequests>,
    pub served: u64,
    /// Where RocksDB checkpoints are staged for upload (same file system as the state).
    pub staging: PathBuf,
    pub source: String,
    pub instance: String,
    pub delivery: Delivery,
    /// The offsets of the last checkpoint begun.
    pub last_offsets: BTreeMap<i32, i64>,
    /// When input must stop (checkpoints failing, the state store broken).
    pub halt: Halt,
}

/// Whether a pipeline must stop taking input because its checkpoints keep failing (a full
/// disk, unreachable storage): scoring on would only widen what a restart must redo, and
/// nothing past the last good checkpoint may be committed. Cloned to the source's thread.
///
/// A state store that cannot be written (a full disk) stops input at once and for good: the
/// changes it lost exist only in memory, so no later checkpoint could be trusted; a restart
/// recovers from the last good one.
#[derive(Debug, Clone)]
pub struct Halt {
    checkpointer: Checkpointer,
    /// Checkpoints that may fail in a row before input stops.
    tolerable: u32,
    /// Set once the state store could not be written: input stops for good.
    broken: Arc<OnceLock<String>>,
}

impl Halt {
    pub(crate) fn new(checkpointer: Checkpointer, tolerable: u32) -> Self {
        Self {
            checkpointer,
            tolerable,
            broken: Arc::new(OnceLock::new()),
        }
    }

    /// Records that the state store could not be written (`why`); `false` if it was already.
    pub(crate) fn break_for(&self, why: String) -> bool {
        self.broken.set(why).is_ok()
    }

    pub(crate) fn broken(&self) -> Option<&String> {
        self.broken.get()
    }

    /// Why input is stopped: the state store could not be written (for good), or
    /// `checkpoint.tolerable_failures` checkpoints or more failed in a row (until one succeeds).
    pub fn reason(&self) -> Option<String> {
        if let Some(why) = self.broken.get() {
            return Some(format!(
                "the state store cannot be written ({why}), so consumption is stopped: free space and restart the instance; it recovers from its last good checkpoint ({:.0} s ago)",
                self.checkpointer.last_good_age().as_secs_f64()
            ));
        }
        // The cheap count first: this is asked once per fill.
        if self.checkpointer.failed_in_a_row() < self.tolerable {
            return None;
        }
        let (failed, why) = self.checkpointer.failing()?;
        (failed >= self.tolerable).then(|| {
            format!(
                "{failed} checkpoints failed in a row (checkpoint.tolerable_failures = {}), so consumption is stopped until one succeeds (last good checkpoint {:.0} s ago); last failure: {why}",
                self.tolerable,
                self.checkpointer.last_good_age().as_secs_f64()
            )
        })
    }
}

impl Schedule {
    /// Whether a checkpoint is due at `now_ms` (its interval passed, or one was requested).
    /// One at a time: while the last is still on its way (a slow or unreachable store), the
    /// next waits rather than pile up staged copies of the state.
    pub fn due(&mut self, now_ms: i64) -> bool {
        let last = *self.last_at.get_or_insert(now_ms);
        (now_ms - last >= self.interval_ms || self.requested())
            && self.checkpointer.in_flight() == 0
    }

    /// Whether a checkpoint was requested since the last one began.
    pub fn requested(&self) -> bool {
        self.requests.requested() > self.served
    }

    /// The manifest of a new checkpoint of the boundary at `now_ms`, after the records before
    /// `offsets`.
    pub fn begin(&mut self, now_ms: i64, offsets: &BTreeMap<i32, i64>) -> Manifest {
        self.last_offsets.clone_from(offsets);
        self.served = self.requests.requested();
        self.last_at = Some(now_ms);
        let id = self.checkpointer.next_id();
        let mut manifest = Manifest::new(
            id,
            &self.instance,
            &self.source,
            self.delivery.as_str(),
            now_ms,
        );
        manifest.offsets.clone_from(offsets);
        manifest
    }

    /// What the state writer runs once the checkpoint's state is written: a RocksDB
    /// checkpoint into the staging directory, handed to the checkpointer.
    pub fn after_write(
        &self,
        manifest: Manifest,
        began: Instant,
        sync_us: Arc<AtomicU64>,
    ) -> riskstream_state::AfterWrite {
        let checkpointer = self.checkpointer.clone();
        let dir = self.staging.join(manifest.id.to_string());
        Box::new(move |store, written| {
            let id = manifest.id;
            let taken = written.map_err(|e| e.to_string()).and_then(|()| {
                let _ = std::fs::remove_dir_all(&dir);
                store.checkpoint(&dir).map_err(|e| e.to_string())
            });
            match taken {
                Ok(()) => {
                    let mut manifest = manifest;
                    manifest.sync_ms = sync_us.load(Ordering::Acquire) as f64 / 1e3;
                    checkpointer.staged(Staged {
                        manifest,
                        dir,
                        began,
                    });
                }
                Err(why) => checkpointer.failed(id, why),
            }
        })
    }
}

//! The checkpoint thread: uploads staged RocksDB checkpoints, writes their manifests once the
//! outputs they cover are durable, collects garbage, and tells waiters when a checkpoint exists.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::{CheckpointError, CheckpointStore, FileRef, Manifest};

/// A RocksDB checkpoint taken at a batch boundary, ready for upload.
#[derive(Debug)]
pub struct Staged {
    /// Its manifest so far (id, offsets, watermarks, rules version, sync time).
    pub manifest: Manifest,
    /// The RocksDB checkpoint directory (hard links); removed once uploaded.
    pub dir: PathBuf,
    /// When the batch boundary was reached.
    pub began: Instant,
}

/// Totals since the checkpointer started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointerStats {
    pub completed: u64,
    pub failed: u64,
    /// Checkpoints failed since the last one completed.
    pub failed_in_a_row: u32,
    /// Why the last failed checkpoint failed.
    pub last_failure: Option<String>,
    pub bytes_uploaded: u64,
    pub files_reused: u64,
    /// The newest complete checkpoint.
    pub latest: Option<Manifest>,
    pub latest_at: Option<Instant>,
    /// When the checkpointer started (the age of "no checkpoint yet").
    pub started_at: Option<Instant>,
}

impl CheckpointerStats {
    /// How long ago the newest good checkpoint completed (or the checkpointer started, while
    /// none has).
    pub fn last_good_age(&self) -> Duration {
        self.latest_at
            .or(self.started_at)
            .map(|at| at.elapsed())
            .unwrap_or_default()
    }
}

enum Message {
    Staged(Box<Staged>),
    /// Every output of the events a checkpoint covers is acknowledged.
    OutputsDurable(u64),
    Failed(u64, String),
    Committed(u64),
}

#[derive(Default)]
struct Progress {
    stats: CheckpointerStats,
    /// Checkpoints that failed, with why (kept until waited for).
    failed: BTreeMap<u64, String>,
    next_id: u64,
    /// Checkpoints begun and neither complete nor failed.
    in_flight: usize,
    stopped: bool,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Uploads checkpoints on a thread of its own. Cloned handles share that thread.
#[derive(Clone)]
pub struct Checkpointer {
    sender: Sender<Message>,
    shared: Arc<Shared>,
    handle: Arc<Mutex<Option<JoinHandle<()>>>>,
    location: Arc<str>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Metrics of checkpoints (DESIGN.md section 9).
struct Metrics {
    sync: metrics::Histogram,
    asynchronous: metrics::Histogram,
    uploaded: metrics::Counter,
    total: metrics::Gauge,
    reused: metrics::Counter,
    age: metrics::Gauge,
    completed: metrics::Counter,
    failed: metrics::Counter,
}

impl Metrics {
    fn new() -> Self {
        Self {
            sync: metrics::histogram!("riskstream_checkpoint_duration_seconds", "part" => "sync"),
            asynchronous: metrics::histogram!("riskstream_checkpoint_duration_seconds", "part" => "async"),
            uploaded: metrics::counter!("riskstream_checkpoint_uploaded_bytes_total"),
            total: metrics::gauge!("riskstream_checkpoint_size_bytes"),
            reused: metrics::counter!("riskstream_checkpoint_files_reused_total"),
            age: metrics::gauge!("riskstream_checkpoint_age_seconds"),
            completed: metrics::counter!("riskstream_checkpoints_total", "outcome" => "completed"),
            failed: metrics::counter!("riskstream_checkpoints_total", "outcome" => "failed"),
        }
    }
}

/// A checkpoint on its way: staged and/or with its outputs durable.
#[derive(Default)]
struct Pending {
    staged: Option<Box<Staged>>,
    uploaded: Option<(Vec<FileRef>, u64, usize)>,
    outputs_durable: bool,
}

impl Checkpointer {
    /// Starts the thread over `store`. `restored` is the checkpoint the state was restored from
    /// (its SST files are not uploaded again); `retain` complete checkpoints are kept; with
    /// `wait_for_outputs`, a manifest is written only once [`Self::outputs_durable`] was called
    /// for it (at-least-once: a checkpoint must not cover events whose verdicts may be lost).
    pub fn start(
        store: CheckpointStore,
        restored: Option<&Manifest>,
        retain: usize,
        wait_for_outputs: bool,
    ) -> Result<Self, CheckpointError> {
        let next_id = store.next_id()?;
        let location: Arc<str> = store.location().into();
        let known: HashMap<String, FileRef> = restored
            .map(|m| {
                m.files
                    .iter()
                    .filter(|f| f.name.ends_with(".sst"))
                    .map(|f| (f.name.clone(), f.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                next_id,
                stats: CheckpointerStats {
                    latest: restored.cloned(),
                    latest_at: restored.map(|_| Instant::now()),
                    started_at: Some(Instant::now()),
                    ..CheckpointerStats::default()
                },
                ..Progress::default()
            }),
            changed: Condvar::new(),
        });
        let (sender, receiver) = channel::<Message>();
        let incarnation = incarnation();
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let mut worker = Worker {
                    store,
                    shared: thread_shared,
                    known,
                    incarnation,
                    retain: retain.max(1),
                    wait_for_outputs,
                    pending: BTreeMap::new(),
                    metrics: Metrics::new(),
                };
                loop {
                    match receiver.recv_timeout(Duration::from_secs(1)) {
                        Ok(message) => worker.handle(message),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    worker.report_age();
                }
                worker.shared.lock().stopped = true;
                worker.shared.changed.notify_all();
            })
            .map_err(|source| CheckpointError::Io {
                what: "thread".into(),
                source,
            })?;
        Ok(Self {
            sender,
            shared,
            handle: Arc::new(Mutex::new(Some(handle))),
            location,
        })
    }

    /// Where checkpoints go.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Reserves the id of the next checkpoint.
    pub fn next_id(&self) -> u64 {
        let mut progress = self.shared.lock();
        let id = progress.next_id;
        progress.next_id += 1;
        progress.in_flight += 1;
        id
    }

    /// Hands over a RocksDB checkpoint for upload.
    pub fn staged(&self, staged: Staged) {
        let _ = self.sender.send(Message::Staged(Box::new(staged)));
    }

    /// Every output of the events checkpoint `id` covers is acknowledged.
    pub fn outputs_durable(&self, id: u64) {
        let _ = self.sender.send(Message::OutputsDurable(id));
    }

    /// Checkpoint `id` cannot be completed (its RocksDB checkpoint failed).
    pub fn failed(&self, id: u64, why: String) {
        let _ = self.sender.send(Message::Failed(id, why));
    }

    /// Records (asynchronously) that the transaction of checkpoint `id` committed.
    pub fn committed(&self, id: u64) {
        let _ = self.sender.send(Message::Committed(id));
    }

    /// Waits until checkpoint `id` exists (its manifest is written) and returns its manifest.
    pub fn wait(&self, id: u64, timeout: Duration) -> Result<Manifest, CheckpointError> {
        let deadline = Instant::now() + timeout;
        let mut progress = self.shared.lock();
        loop {
            if let Some(message) = progress.failed.remove(&id) {
                return Err(CheckpointError::Failed { id, message });
            }
            if let Some(latest) = progress.stats.latest.as_ref().filter(|m| m.id >= id) {
                return Ok(latest.clone());
            }
            if progress.stopped {
                return Err(CheckpointError::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CheckpointError::Timeout {
                    id,
                    seconds: timeout.as_secs(),
                });
            }
            progress = self
                .shared
                .changed
                .wait_timeout(progress, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Checkpoints begun that are neither complete nor failed (being written, uploaded, or
    /// waiting for their outputs).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// The newest complete checkpoint's offsets (what may be committed to the group).
    pub fn latest_offsets(&self) -> Option<BTreeMap<i32, i64>> {
        let progress = self.shared.lock();
        progress.stats.latest.as_ref().map(|m| m.offsets.clone())
    }

    /// Totals so far.
    pub fn stats(&self) -> CheckpointerStats {
        self.shared.lock().stats.clone()
    }

    /// How long ago the newest good checkpoint completed (see
    /// [`CheckpointerStats::last_good_age`]).
    pub fn last_good_age(&self) -> Duration {
        self.shared.lock().stats.last_good_age()
    }

    /// Checkpoints failed since the last one completed.
    pub fn failed_in_a_row(&self) -> u32 {
        self.shared.lock().stats.failed_in_a_row
    }

    /// Checkpoints failed since the last one completed, and why the last one failed.
    pub fn failing(&self) -> Option<(u32, String)> {
        let progress = self.shared.lock();
        let stats = &progress.stats;
        (stats.failed_in_a_row > 0).then(|| {
            (
                stats.failed_in_a_row,
                stats.last_failure.clone().unwrap_or_default(),
            )
        })
    }

    /// Finishes what was handed over and stops the thread (once every clone is dropped or
    /// stopped).
    pub fn stop(self) {
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(self.sender);
        if let Some(handle) = handle {
            // Other clones keep the channel open; they stop the thread when dropped.
            if Arc::strong_count(&self.handle) == 1 {
                let _ = handle.join();
            }
        }
    }
}

struct Worker {
    store: CheckpointStore,
    shared: Arc<Shared>,
    /// SST files already stored, by name.
    known: HashMap<String, FileRef>,
    incarnation: String,
    retain: usize,
    wait_for_outputs: bool,
    pending: BTreeMap<u64, Pending>,
    metrics: Metrics,
}

impl Worker {
    fn handle(&mut self, message: Message) {
        match message {
            Message::Staged(staged) => {
                let id = staged.manifest.id;
                self.metrics.sync.record(staged.manifest.sync_ms / 1e3);
                let upload = self
                    .store
                    .upload(id, &staged.dir, &self.incarnation, &self.known);
                let _ = std::fs::remove_dir_all(&staged.dir);
                match upload {
                    Ok(uploaded) => {
                        let pending = self.pending.entry(id).or_default();
                        pending.uploaded = Some(uploaded);
                        pending.staged = Some(staged);
                        self.complete(id);
                    }
                    Err(e) => self.fail(id, e.to_string()),
                }
            }
            Message::OutputsDurable(id) => {
                self.pending.entry(id).or_default().outputs_durable = true;
                self.complete(id);
            }
            Message::Failed(id, why) => self.fail(id, why),
            Message::Committed(id) => {
                if let Err(e) = self.store.mark_committed(id) {
                    tracing::warn!(checkpoint = id, "cannot record the commit: {e}");
                }
            }
        }
    }

    fn fail(&mut self, id: u64, why: String) {
        tracing::error!(checkpoint = id, location = %self.store.location(), "checkpoint {id} failed: {why}");
        self.pending.remove(&id);
        self.metrics.failed.increment(1);
        let mut progress = self.shared.lock();
        progress.stats.failed += 1;
        progress.stats.failed_in_a_row += 1;
        progress.stats.last_failure = Some(why.clone());
        progress.in_flight = progress.in_flight.saturating_sub(1);
        progress.failed.insert(id, why);
        drop(progress);
        self.shared.changed.notify_all();
    }

    /// Writes the manifest of `id` once it is uploaded and (when required) its outputs are
    /// durable; then collects garbage.
    fn complete(&mut self, id: u64) {
        let ready = self
            .pending
            .get(&id)
            .is_some_and(|p| p.uploaded.is_some() && (p.outputs_durable || !self.wait_for_outputs));
        if !ready {
            return;
        }
        let Some(Pending {
            staged: Some(staged),
            uploaded: Some((files, bytes, uploaded)),
            ..
        }) = self.pending.remove(&id)
        else {
            return;
        };
        let mut manifest = staged.manifest;
        manifest.bytes_total = files.iter().map(|f| f.size).sum();
        manifest.files_reused = files.len() - uploaded;
        manifest.files_uploaded = uploaded;
        manifest.bytes_uploaded = bytes;
        manifest.files = files;
        manifest.duration_ms = staged.began.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = self.store.put_manifest(&manifest) {
            return self.fail(id, e.to_string());
        }
        // A file live now and in an older checkpoint is in this one too (SST files live until
        // deleted): this checkpoint's files are all the next one can share, and the only ones
        // garbage collection is sure to keep.
        self.known = manifest
            .files
            .iter()
            .filter(|f| f.name.ends_with(".sst"))
            .map(|f| (f.name.clone(), f.clone()))
            .collect();
        self.metrics.asynchronous.record(manifest.duration_ms / 1e3);
        self.metrics.uploaded.increment(manifest.bytes_uploaded);
        self.metrics.total.set(manifest.bytes_total as f64);
        self.metrics.reused.increment(manifest.files_reused as u64);
        self.metrics.completed.increment(1);
        tracing::info!(
            checkpoint = id,
            bytes_total = manifest.bytes_total,
            bytes_uploaded = manifest.bytes_uploaded,
            files_reused = manifest.files_reused,
            duration_ms = manifest.duration_ms,
            "checkpoint {id} complete"
        );
        let mut progress = self.shared.lock();
        progress.stats.completed += 1;
        progress.stats.failed_in_a_row = 0;
        progress.in_flight = progress.in_flight.saturating_sub(1);
        progress.stats.bytes_uploaded += manifest.bytes_uploaded;
        progress.stats.files_reused += manifest.files_reused as u64;
        progress.stats.latest = Some(manifest);
        progress.stats.latest_at = Some(Instant::now());
        drop(progress);
        self.shared.changed.notify_all();
        match self.store.gc(self.retain) {
            Ok((checkpoints, files)) if checkpoints + files > 0 => {
                tracing::debug!(checkpoints, files, "checkpoint garbage collected");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("checkpoint garbage collection failed: {e}"),
        }
    }

    /// The age of the newest good checkpoint (since start while there is none), so that an
    /// alert sees checkpoints that never succeed as well as ones that stopped succeeding.
    fn report_age(&self) {
        let age = self.shared.lock().stats.last_good_age();
        self.metrics.age.set(age.as_secs_f64());
    }
}

/// A name for this opening of the state store, unique across restarts: SST file names restart
/// from a restored checkpoint's numbers, so files of different openings may share a name.
fn incarnation() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}-{:x}", now.as_millis(), std::process::id())
}

//! State: keyed operator state in RocksDB.
//!
//! One RocksDB database per pipeline instance, with a column family per concern:
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `features` | entity id (8 bytes) ++ entity key | the windows of that key's features |
//! | `meta` | a name | pipeline metadata: partition watermarks |
//!
//! Writes go out as [`StateBatch`]es (one RocksDB `WriteBatch` each), applied entirely or not at
//! all; callers write whole micro-batches' changes, so the store always holds the state at a
//! batch boundary. This crate stores bytes: it does not
//! know what a window is (the features crate encodes them) and it must not be called from an
//! async runtime's worker threads — RocksDB calls block on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, WriteBatch, WriteOptions, DB,
};

/// A key and its value, as read from the store.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// The column families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    Features,
    Meta,
}

impl Cf {
    const ALL: [Cf; 2] = [Cf::Features, Cf::Meta];

    fn name(self) -> &'static str {
        match self {
            Cf::Features => "features",
            Cf::Meta => "meta",
        }
    }
}

/// RocksDB failed; the message names the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {source}")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store {path}: column family `{cf}` is missing")]
    MissingCf { path: PathBuf, cf: &'static str },
    #[error("state store {path}: cannot start a writer thread: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs on the writer thread after a background write, with its outcome.
pub type AfterWrite = Box<dyn FnOnce(&StateStore, Result<(), &StateError>) + Send>;

/// A write batch being applied on a thread of its own ([`StateStore::write_in_background`]).
#[must_use = "a background write must be waited for before relying on it"]
pub struct PendingWrite {
    handle: JoinHandle<Result<(), StateError>>,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingWrite")
            .field("done", &self.handle.is_finished())
            .finish()
    }
}

impl PendingWrite {
    /// Whether the batch is still being built or applied.
    pub fn running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Waits until the batch is applied; its error, if it failed.
    pub fn wait(self) -> Result<(), StateError> {
        self.handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// The RocksDB database holding one pipeline's state.
pub struct StateStore {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish()
    }
}

/// State changes of one micro-batch, applied atomically by [`StateStore::write`].
pub struct StateBatch<'a> {
    store: &'a StateStore,
    batch: WriteBatch,
}

impl std::fmt::Debug for StateBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateBatch")
            .field("changes", &self.batch.len())
            .finish()
    }
}

impl StateBatch<'_> {
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.batch.put_cf(self.store.cf(cf)?, key, value);
        Ok(())
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<(), StateError> {
        self.batch.delete_cf(self.store.cf(cf)?, key);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Room for about `bytes` of changes, so that the batch does not grow by copying itself.
    /// Only an empty batch takes the hint.
    pub fn reserve(&mut self, bytes: usize) {
        if self.batch.is_empty() {
            self.batch = WriteBatch::with_capacity_bytes(bytes);
        }
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.batch.len()
    }
}

impl StateStore {
    /// Opens (creating if needed) the state database in `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        Self::open_sized(path, 64 << 20, 64 << 20)
    }

    /// [`Self::open`] for one of many small stores in a process (a partition's, in the
    /// partitioned topology): 4 MB memtables and an 8 MB block cache instead of 64 MB each.
    pub fn open_small(path: &Path) -> Result<Self, StateError> {
        Self::open_sized(path, 4 << 20, 8 << 20)
    }

    fn open_sized(
        path: &Path,
        write_buffer: usize,
        block_cache: usize,
    ) -> Result<Self, StateError> {
        let err = |source| StateError::Rocks {
            path: path.to_path_buf(),
            source,
        };
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(DBCompressionType::Lz4);
        // Flushes and compactions yield the CPU to scoring: they have seconds, a batch has
        // milliseconds.
        let mut env = rocksdb::Env::new().map_err(err)?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        options.set_env(&env);
        options.increase_parallelism(2);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(block_cache));
        // Most lookups of new keys find nothing: a bloom filter answers them without disk reads.
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
        // Most lookups are for keys never seen: a whole-key bloom filter on the memtable answers
        // them without walking the skip list.
        options.set_memtable_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.1);
        options.set_write_buffer_size(write_buffer);
        let cfs = Cf::ALL.map(|cf| ColumnFamilyDescriptor::new(cf.name(), options.clone()));
        let db = DB::open_cf_descriptors(&options, path, cfs).map_err(err)?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StateError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StateError::MissingCf {
                path: self.path.clone(),
                cf: cf.name(),
            })
    }

    fn rocks(&self, source: rocksdb::Error) -> StateError {
        StateError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads one value.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.db.get_cf(self.cf(cf)?, key).map_err(|e| self.rocks(e))
    }

    /// Starts a batch of changes.
    pub fn batch(&self) -> StateBatch<'_> {
        StateBatch {
            store: self,
            batch: WriteBatch::default(),
        }
    }

    /// Builds a batch with `build` and applies it like [`Self::write`], both on a thread of
    /// its own, so that the caller goes on while the batch is encoded and RocksDB inserts it
    /// (the caller hands over what to write, for example shared snapshots of its records).
    /// Batches are applied whole; the caller orders them by waiting.
    ///
    /// `after`, when given, runs on that thread once the batch is applied (or failed), before
    /// the write counts as done: nothing the caller writes after waiting for it comes before.
    pub fn write_in_background<F>(
        self: &Arc<Self>,
        build: F,
        after: Option<AfterWrite>,
    ) -> Result<PendingWrite, StateError>
    where
        F: FnOnce(&mut StateBatch<'_>) -> Result<(), StateError> + Send + 'static,
    {
        let store = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                yield_cpu_to_scoring();
                let mut batch = store.batch();
                let written = build(&mut batch).and_then(|()| store.write(batch));
                if let Some(after) = after {
                    after(&store, written.as_ref().map(|_| ()));
                }
                written
            })
            .map_err(|source| StateError::Thread {
                path: self.path.clone(),
                source,
            })?;
        Ok(PendingWrite { handle })
    }

    /// Reads one value in place (no copy out of RocksDB) and maps it with `f`.
    pub fn get_with<T>(
        &self,
        cf: Cf,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, StateError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf)?, key)
            .map_err(|e| self.rocks(e))?
            .map(|v| f(&v)))
    }

    /// Applies a batch of changes atomically (one RocksDB `WriteBatch`).
    ///
    /// The write-ahead log is off: state is made durable by flushes (checkpoints, and
    /// [`Drop`] on a clean shutdown), and a crash falls back to the last durable state, which
    /// the source offsets recorded with it replay forward.
    pub fn write(&self, batch: StateBatch<'_>) -> Result<(), StateError> {
        if batch.is_empty() {
            // RocksDB would queue even an empty batch behind a write in progress (a flush
            // applied in the background can take hundreds of milliseconds).
            return Ok(());
        }
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.db
            .write_opt(batch.batch, &options)
            .map_err(|e| self.rocks(e))
    }

    /// Every key and value of a column family whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Vec<KeyValue>, StateError> {
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(prefix, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k, v));
        }
        Ok(out)
    }

    /// Visits up to `limit` entries of a column family from `start` (inclusive), in key order,
    /// handing `f` each key and value in place (nothing is copied). Returns how many were
    /// visited and the last key visited.
    pub fn visit_from<E: From<StateError>>(
        &self,
        cf: Cf,
        start: &[u8],
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(usize, Option<Vec<u8>>), E> {
        let mut iter = self.db.raw_iterator_cf(self.cf(cf)?);
        iter.seek(start);
        let mut visited = 0;
        let mut last = None;
        while visited < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            f(key, value)?;
            visited += 1;
            if visited == limit {
                last = Some(key.to_vec());
            }
            iter.next();
        }
        iter.status().map_err(|e| self.rocks(e))?;
        Ok((visited, last))
    }

    /// Number of keys in a column family (exact; walks the column family).
    pub fn count(&self, cf: Cf) -> Result<usize, StateError> {
        Ok(self.scan_prefix(cf, &[])?.len())
    }

    /// Creates a RocksDB checkpoint of the store's contents in `dir`, which must not exist:
    /// memtables are flushed (the write-ahead log is off, so they would be missing otherwise),
    /// then SST files are hard-linked and the small files copied. Blocks for the flush.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StateError> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StateError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let checkpoint =
            rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(|e| self.rocks(e))?;
        checkpoint.create_checkpoint(dir).map_err(|e| self.rocks(e))
    }

    /// Compacts every column family down to its last level (tests and benchmarks).
    pub fn compact(&self) -> Result<(), StateError> {
        for cf in Cf::ALL {
            self.db
                .compact_range_cf(self.cf(cf)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Bytes the state takes: SST files on disk plus memtables, over every column family
    /// (RocksDB's own accounting, read from memory; no disk access).
    pub fn size_bytes(&self) -> Result<u64, StateError> {
        let mut total = 0;
        for cf in Cf::ALL {
            let handle = self.cf(cf)?;
            for property in [
                "rocksdb.total-sst-files-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                total += self
                    .db
                    .property_int_value_cf(handle, property)
                    .map_err(|e| self.rocks(e))?
                    .unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Flushes memtables to SST files (for checkpoints and size measurements).
    pub fn flush(&self) -> Result<(), StateError> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.cf(cf)?).map_err(|e| self.rocks(e))?;
        }
        Ok(())
    }
}

impl Drop for StateStore {
    fn drop(&mut self) {
        // Without a write-ahead log, unflushed memtables would be lost on close.
        if let Err(e) = self.flush() {
            eprintln!("warning: {e}: state written since the last flush is lost");
        }
    }
}

/// Lowers the calling thread's CPU priority (nice 10): a background write has seconds, the
/// batch being scored meanwhile has milliseconds, and on a small machine they share cores.
/// Best effort: where the priority cannot be changed, the thread runs as it is.
fn yield_cpu_to_scoring() {
    #[cfg(target_os = "linux")]
    {
        // On Linux the nice value belongs to the thread: this changes only the calling one.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_apply_atomically_and_survive_reopening() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let store = StateStore::open(dir.path())?;
            let mut batch = store.batch();
            batch.put(Cf::Features, b"k1", b"v1")?;
            batch.put(Cf::Features, b"k2", b"v2")?;
            batch.put(Cf::Meta, b"seq", b"7")?;
            assert_eq!(batch.len(), 3);
            store.write(batch)?;
            let mut batch = store.batch();
            batch.delete(Cf::Features, b"k1")?;
            store.write(batch)?;
        }
        let store = StateStore::open(dir.path())?;
        assert_eq!(store.get(Cf::Features, b"k1")?, None);
        assert_eq!(store.get(Cf::Features, b"k2")?.as_deref(), Some(&b"v2"[..]));
        assert_eq!(store.get(Cf::Meta, b"seq")?.as_deref(), Some(&b"7"[..]));
        assert_eq!(store.count(Cf::Features)?, 1);
        let scanned = store.scan_prefix(Cf::Features, b"k")?;
        assert_eq!(scanned.len(), 1);
        Ok(())
    }
}

//! Where checkpoints live: listing, uploading, restoring and garbage-collecting them in an
//! object store (a local directory or S3-compatible storage).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

/// Format of [`Manifest`]s written by this version.
const FORMAT: u32 = 1;

/// A checkpoint could not be listed, written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint storage `{location}`: {message}")]
    Config { location: String, message: String },
    #[error("checkpoint storage `{location}`: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("checkpoint {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {id}: {message}")]
    Invalid { id: u64, message: String },
    #[error("checkpoint {id} failed: {message}")]
    Failed { id: u64, message: String },
    #[error("checkpoint {id} did not complete within {seconds} s")]
    Timeout { id: u64, seconds: u64 },
    #[error("the checkpoint thread stopped")]
    Stopped,
}

/// One file of a checkpoint: its name in the state directory, where it is stored, its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub name: String,
    pub key: String,
    pub size: u64,
}

/// What a checkpoint stands for, written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: u64,
    pub instance: String,
    /// When the batch boundary it captures was reached (epoch ms).
    pub created_at_ms: i64,
    /// The topic the offsets are of.
    pub source: String,
    /// `at_least_once` or `exactly_once`.
    pub delivery: String,
    /// Per partition, the offset of the first record not covered.
    pub offsets: BTreeMap<i32, i64>,
    /// Per partition, the highest event time seen (the watermark plus the out-of-orderness).
    pub max_event_times: BTreeMap<i32, i64>,
    pub rules_version: u64,
    pub files: Vec<FileRef>,
    pub bytes_total: u64,
    pub bytes_uploaded: u64,
    pub files_uploaded: usize,
    pub files_reused: usize,
    /// Time scoring waited for the checkpoint (marking the boundary), in ms.
    pub sync_ms: f64,
    /// From the batch boundary until the manifest was written, in ms.
    pub duration_ms: f64,
}

impl Manifest {
    /// A manifest for checkpoint `id` of the boundary at `created_at_ms`, before its files.
    pub fn new(id: u64, instance: &str, source: &str, delivery: &str, created_at_ms: i64) -> Self {
        Self {
            format: FORMAT,
            id,
            instance: instance.to_string(),
            created_at_ms,
            source: source.to_string(),
            delivery: delivery.to_string(),
            offsets: BTreeMap::new(),
            max_event_times: BTreeMap::new(),
            rules_version: 0,
            files: Vec::new(),
            bytes_total: 0,
            bytes_uploaded: 0,
            files_uploaded: 0,
            files_reused: 0,
            sync_ms: 0.0,
            duration_ms: 0.0,
        }
    }
}

/// A checkpoint as listed: its manifest, or why it has none that can be used.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: u64,
    pub manifest: Result<Manifest, String>,
    /// Exactly-once: its transaction was committed.
    pub committed: bool,
}

/// How far the download of a checkpoint being restored is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RestoreProgress {
    pub checkpoint: u64,
    pub files: usize,
    pub of_files: usize,
    pub bytes: u64,
    pub of_bytes: u64,
}

/// A checkpoint restored into a state directory, and the newer ones passed over.
#[derive(Debug, Clone)]
pub struct Restored {
    pub manifest: Manifest,
    pub skipped: Vec<(u64, String)>,
}

/// Checkpoints of one instance in an object store.
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    location: String,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("location", &self.location)
            .finish()
    }
}

impl CheckpointStore {
    /// Opens the checkpoints of `instance` at `url`: a directory path (created if missing), a
    /// `file://` URL, or `s3://bucket/prefix` (credentials, region and endpoint from the usual
    /// `AWS_*` environment variables, e.g. `AWS_ENDPOINT` for MinIO).
    pub fn open(url: &str, instance: &str) -> Result<Self, CheckpointError> {
        let location = format!("{}/{instance}", url.trim_end_matches('/'));
        let config = |message: String| CheckpointError::Config {
            location: location.clone(),
            message,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = if url.contains("://") {
            let parsed = url::Url::parse(url).map_err(|e| config(e.to_string()))?;
            match parsed.scheme() {
                "file" => {
                    let dir = parsed
                        .to_file_path()
                        .map_err(|()| config("not a local path".into()))?;
                    (local(&dir, &config)?, Path::default())
                }
                "s3" | "s3a" => {
                    // An unreachable store fails a checkpoint within seconds (it is retried at
                    // the next interval) instead of holding it for the client's default of
                    // three minutes of retries.
                    let retry = object_store::RetryConfig {
                        max_retries: 3,
                        retry_timeout: std::time::Duration::from_secs(15),
                        ..object_store::RetryConfig::default()
                    };
                    let store = object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .build()
                        .map_err(|e| config(e.to_string()))?;
                    let prefix = Path::parse(parsed.path().trim_start_matches('/'))
                        .map_err(|e| config(e.to_string()))?;
                    (Arc::new(store), prefix)
                }
                other => {
                    return Err(config(format!(
                        "unsupported scheme `{other}` (use a directory, file:// or s3://)"
                    )))
                }
            }
        } else {
            (local(FsPath::new(url), &config)?, Path::default())
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CheckpointError::Io {
                what: "runtime".into(),
                source,
            })?;
        Ok(Self {
            store,
            root: prefix.clone().join(instance),
            location,
            runtime,
        })
    }

    /// Where the checkpoints are, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn path(&self, key: &str) -> Path {
        let mut path = self.root.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    fn store_err(&self, source: object_store::Error) -> CheckpointError {
        CheckpointError::Store {
            location: self.location.clone(),
            source,
        }
    }

    fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, CheckpointError> {
        let path = self.path(key);
        self.runtime
            .block_on(async {
                match self.store.get(&path).await {
                    Ok(got) => got.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| self.store_err(e))
    }

    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), CheckpointError> {
        let path = self.path(key);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.store_err(e))
    }

    /// Every object under `key/`, with its size.
    fn list_keys(&self, key: &str) -> Result<Vec<(String, u64)>, CheckpointError> {
        let prefix = self.path(key);
        let root = self.root.as_ref().to_string();
        let metas: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect::<Vec<_>>())
            .map_err(|e| self.store_err(e))?;
        Ok(metas
            .into_iter()
            .map(|m| {
                let full = m.location.as_ref();
                let relative = full
                    .strip_prefix(root.as_str())
                    .map(|k| k.trim_start_matches('/'))
                    .unwrap_or(full);
                (relative.to_string(), m.size)
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), CheckpointError> {
        let path = self.path(key);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// The ids of every checkpoint begun, complete or not, newest first.
    fn ids(&self) -> Result<Vec<u64>, CheckpointError> {
        let ids: BTreeSet<u64> = self
            .list_keys("checkpoints")?
            .iter()
            .filter_map(|(key, _)| {
                key.strip_prefix("checkpoints/")?
                    .split('/')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        Ok(ids.into_iter().rev().collect())
    }

    /// The id for the next checkpoint: above every one begun so far.
    pub fn next_id(&self) -> Result<u64, CheckpointError> {
        Ok(self.ids()?.first().map_or(1, |id| id + 1))
    }

    /// Every checkpoint, newest first, with its manifest or why it cannot be used.
    pub fn list(&self) -> Result<Vec<Listed>, CheckpointError> {
        self.ids()?
            .into_iter()
            .map(|id| {
                let manifest = match self.get(&manifest_key(id))? {
                    None => Err("incomplete: no manifest".to_string()),
                    Some(bytes) => serde_json::from_slice::<Manifest>(&bytes)
                        .map_err(|e| format!("manifest is unreadable: {e}"))
                        .and_then(|m| {
                            if m.id != id {
                                Err(format!("manifest names checkpoint {}", m.id))
                            } else if m.format != FORMAT {
                                Err(format!("manifest format {} is not {FORMAT}", m.format))
                            } else {
                                Ok(m)
                            }
                        }),
                };
                let committed = self.get(&committed_key(id))?.is_some();
                Ok(Listed {
                    id,
                    manifest,
                    committed,
                })
            })
            .collect()
    }

    /// Checks that every file of `manifest` is stored with its recorded size.
    pub fn verify(&self, manifest: &Manifest) -> Result<(), String> {
        let mut stored: HashMap<String, u64> = HashMap::new();
        for prefix in ["sst", &format!("checkpoints/{}", manifest.id)] {
            for (key, size) in self.list_keys(prefix).map_err(|e| e.to_string())? {
                stored.insert(key, size);
            }
        }
        for file in &manifest.files {
            match stored.get(&file.key) {
                None => return Err(format!("file {} is missing", file.key)),
                Some(&size) if size != file.size => {
                    return Err(format!(
                        "file {} has {size} bytes, the manifest says {}",
                        file.key, file.size
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Restores into `dir` (replacing what it holds) the newest checkpoint that `accept` takes,
    /// whose files are all stored and which `check` (given the restored directory) finds sound;
    /// every newer one is logged and passed over. `None` when there is none.
    pub fn restore(
        &self,
        dir: &FsPath,
        accept: impl Fn(&Listed) -> Result<(), String>,
        check: impl Fn(&FsPath) -> Result<(), String>,
    ) -> Result<Option<Restored>, CheckpointError> {
        self.restore_reporting(dir, accept, check, |_| {})
    }

    /// [`Self::restore`], telling `progress` after every file downloaded how far the
    /// checkpoint being restored is (a checkpoint passed over starts the count again).
    pub fn restore_reporting(
        &self,
        dir: &FsPath,
        accept: impl Fn(&Listed) -> Result<(), String>,
        check: impl Fn(&FsPath) -> Result<(), String>,
        progress: impl Fn(RestoreProgress),
    ) -> Result<Option<Restored>, CheckpointError> {
        let mut skipped = Vec::new();
        let staging = sibling(dir, "restoring");
        for listed in self.list()? {
            let attempt = listed
                .manifest
                .clone()
                .and_then(|m| accept(&listed).map(|()| m))
                .and_then(|m| {
                    self.download(&m, &staging, &progress)
                        .map_err(|e| e.to_string())?;
                    check(&staging).map(|()| m)
                });
            match attempt {
                Ok(manifest) => {
                    replace_dir(&staging, dir)?;
                    return Ok(Some(Restored { manifest, skipped }));
                }
                Err(why) => {
                    tracing::warn!(
                        checkpoint = listed.id,
                        location = %self.location,
                        "checkpoint {} cannot be restored ({why}); trying the previous one",
                        listed.id
                    );
                    skipped.push((listed.id, why));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&staging);
        Ok(None)
    }

    /// Downloads the files of `manifest` into a fresh `dir`, checking their sizes.
    fn download(
        &self,
        manifest: &Manifest,
        dir: &FsPath,
        progress: &dyn Fn(RestoreProgress),
    ) -> Result<(), CheckpointError> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut done = RestoreProgress {
            checkpoint: manifest.id,
            files: 0,
            of_files: manifest.files.len(),
            bytes: 0,
            of_bytes: manifest.files.iter().map(|f| f.size).sum(),
        };
        progress(done);
        for file in &manifest.files {
            let bytes = self
                .get(&file.key)?
                .ok_or_else(|| CheckpointError::Invalid {
                    id: manifest.id,
                    message: format!("file {} is missing", file.key),
                })?;
            if bytes.len() as u64 != file.size {
                return Err(CheckpointError::Invalid {
                    id: manifest.id,
                    message: format!(
                        "file {} has {} bytes, the manifest says {}",
                        file.key,
                        bytes.len(),
                        file.size
                    ),
                });
            }
            let path = dir.join(&file.name);
            std::fs::write(&path, &bytes).map_err(io(&path))?;
            done.files += 1;
            done.bytes += file.size;
            progress(done);
        }
        Ok(())
    }

    /// Uploads the files of the RocksDB checkpoint in `staged` for checkpoint `id`: SST files
    /// that `known` (name → stored file, from earlier checkpoints of this opening of the store)
    /// already holds are referenced, the others go under `sst/<incarnation>/`; the small files
    /// go under the checkpoint. Returns the files, and the bytes and count uploaded.
    pub fn upload(
        &self,
        id: u64,
        staged: &FsPath,
        incarnation: &str,
        known: &HashMap<String, FileRef>,
    ) -> Result<(Vec<FileRef>, u64, usize), CheckpointError> {
        let mut files = Vec::new();
        let (mut bytes, mut uploaded) = (0, 0);
        let mut entries = std::fs::read_dir(staged)
            .map_err(io(staged))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(staged))?;
        // The SST files first, then MANIFEST, CURRENT and OPTIONS (the manifest comes last, from
        // the caller).
        entries.sort_by_key(|e| {
            (
                !e.file_name().to_string_lossy().ends_with(".sst"),
                e.file_name(),
            )
        });
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().map_err(io(&entry.path()))?.len();
            if let Some(file) = known.get(&name).filter(|f| f.size == size) {
                files.push(file.clone());
                continue;
            }
            let key = if name.ends_with(".sst") {
                format!("sst/{incarnation}/{name}")
            } else {
                format!("checkpoints/{id}/files/{name}")
            };
            let content = std::fs::read(entry.path()).map_err(io(&entry.path()))?;
            self.put(&key, content)?;
            bytes += size;
            uploaded += 1;
            files.push(FileRef { name, key, size });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((files, bytes, uploaded))
    }

    /// Writes `manifest`: from now on its checkpoint exists.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<(), CheckpointError> {
        let bytes = serde_json::to_vec_pretty(manifest).map_err(|e| CheckpointError::Invalid {
            id: manifest.id,
            message: e.to_string(),
        })?;
        self.put(&manifest_key(manifest.id), bytes)
    }

    /// Records that the transaction of checkpoint `id` committed (exactly-once).
    pub fn mark_committed(&self, id: u64) -> Result<(), CheckpointError> {
        self.put(&committed_key(id), b"committed\n".to_vec())
    }

    /// Deletes every checkpoint but the newest `retain` complete ones, then every SST file no
    /// kept checkpoint references. Returns the checkpoints and files deleted.
    pub fn gc(&self, retain: usize) -> Result<(usize, usize), CheckpointError> {
        let listed = self.list()?;
        let newest_complete = listed.iter().find(|l| l.manifest.is_ok()).map(|l| l.id);
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for l in listed {
            match &l.manifest {
                Ok(m) if kept.len() < retain => kept.push(m.clone()),
                // A newer checkpoint without a manifest may still be being written.
                Err(_) if newest_complete.is_none_or(|n| l.id > n) => {}
                _ => dropped.push(l.id),
            }
        }
        for &id in &dropped {
            // The manifest first: a half-deleted checkpoint must not look complete.
            self.delete(&manifest_key(id))?;
            for (key, _) in self.list_keys(&format!("checkpoints/{id}"))? {
                self.delete(&key)?;
            }
        }
        let referenced: BTreeSet<&str> = kept
            .iter()
            .flat_map(|m| m.files.iter().map(|f| f.key.as_str()))
            .collect();
        let mut files = 0;
        for (key, _) in self.list_keys("sst")? {
            if !referenced.contains(key.as_str()) {
                self.delete(&key)?;
                files += 1;
            }
        }
        Ok((dropped.len(), files))
    }

    /// Every stored object and its size (for tests and `checkpoints inspect`).
    pub fn objects(&self) -> Result<Vec<(String, u64)>, CheckpointError> {
        self.list_keys("")
    }
}

fn manifest_key(id: u64) -> String {
    format!("checkpoints/{id}/manifest.json")
}

fn committed_key(id: u64) -> String {
    format!("checkpoints/{id}/committed")
}

fn local(
    dir: &FsPath,
    config: &dyn Fn(String) -> CheckpointError,
) -> Result<Arc<dyn ObjectStore>, CheckpointError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| config(format!("cannot create {}: {e}", dir.display())))?;
    let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| config(e.to_string()))?;
    Ok(Arc::new(store))
}

/// A file system error on `path`.
fn io(path: &FsPath) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let what = path.display().to_string();
    move |source| CheckpointError::Io { what, source }
}

/// `dir` with `.suffix` appended to its last component (a directory beside it, on the same file
/// system).
pub fn sibling(dir: &FsPath, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// Replaces `dir` by `from` (a rename on one file system).
fn replace_dir(from: &FsPath, dir: &FsPath) -> Result<(), CheckpointError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::rename(from, dir).map_err(io(dir))
}

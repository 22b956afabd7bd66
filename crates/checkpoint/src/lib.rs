//! Checkpoints: the state store copied to object storage, incrementally, with the progress it
//! stands for.
//!
//! A checkpoint is a RocksDB checkpoint (hard links to the immutable SST files plus the small
//! MANIFEST/CURRENT/OPTIONS files) taken at a batch boundary, and a [`Manifest`] recording the
//! source offsets, watermarks and rule bundle version of that boundary. [`Checkpointer`]
//! uploads it on a thread of its own: SST files that a retained checkpoint already holds are
//! referenced, not uploaded again (SST files never change once written); then the small files;
//! then the manifest, last: a checkpoint exists only once its manifest does. Files that no
//! retained checkpoint references are then deleted.
//!
//! Layout under `<url>/<instance>/`:
//!
//! | object | what |
//! | --- | --- |
//! | `sst/<incarnation>/<file>.sst` | an SST file; `incarnation` names one opening of the state store, within which RocksDB never reuses a file name |
//! | `checkpoints/<id>/files/<name>` | the small files of checkpoint `id` |
//! | `checkpoints/<id>/manifest.json` | its [`Manifest`], written last |
//! | `checkpoints/<id>/committed` | exactly-once: the Kafka transaction of checkpoint `id` committed |
//!
//! [`CheckpointStore::restore`] picks the newest checkpoint whose manifest parses and whose files
//! are all there with their recorded sizes, falling back to older ones with a log line naming
//! what is wrong with each newer one.
//!
//! This crate moves files and manifests. It does not decide when a checkpoint is taken (the
//! pipeline does, at a batch boundary), what the state means, or how offsets are committed; its
//! calls block and must not run on an async runtime's worker threads.

mod store;
mod uploader;

pub use store::{
    sibling, CheckpointError, CheckpointStore, FileRef, Listed, Manifest, RestoreProgress, Restored,
};
pub use uploader::{Checkpointer, CheckpointerStats, Staged};

//! Checkpoints of a real RocksDB state store in a local object store: incremental uploads,
//! garbage collection, restore, and the fall-back past a damaged newest checkpoint.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use riskstream_checkpoint::{CheckpointStore, Checkpointer, Manifest, Staged};
use riskstream_state::{Cf, StateStore};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const KEYS: u64 = 20_000;
const VALUE: usize = 200;

/// Incompressible bytes, like encoded windows.
fn value(key: u64, round: u64) -> Vec<u8> {
    let mut x = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_add(1);
    (0..VALUE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_keys(store: &StateStore, keys: impl Iterator<Item = u64>, round: u64) -> Result {
    let mut batch = store.batch();
    for k in keys {
        batch.put(Cf::Features, &k.to_be_bytes(), &value(k, round))?;
    }
    store.write(batch)?;
    Ok(())
}

/// Takes a RocksDB checkpoint of `store` and hands it to `checkpointer`; waits until it exists.
fn checkpoint(
    store: &StateStore,
    checkpointer: &Checkpointer,
    staging: &Path,
    offsets: &[(i32, i64)],
) -> Result<Manifest> {
    let began = Instant::now();
    let id = checkpointer.next_id();
    let dir = staging.join(id.to_string());
    store.checkpoint(&dir)?;
    let mut manifest = Manifest::new(id, "test", "transactions", "at_least_once", 0);
    manifest.offsets = offsets.iter().copied().collect();
    checkpointer.staged(Staged {
        manifest,
        dir,
        began,
    });
    Ok(checkpointer.wait(id, Duration::from_secs(30))?)
}

#[test]
fn checkpoints_upload_only_new_files_and_keep_only_referenced_ones() -> Result {
    let dir = tempfile::tempdir()?;
    let objects = dir.path().join("objects");
    let store = Arc::new(StateStore::open(&dir.path().join("state"))?);
    let checkpointer = Checkpointer::start(
        CheckpointStore::open(objects.to_str().ok_or("path")?, "a")?,
        None,
        2,
        false,
    )?;
    let staging = dir.path().join("staging");

    // Warm-up: every key, compacted into the bottom level as a long-running store holds most
    // of its data.
    write_keys(&store, 0..KEYS, 0)?;
    store.flush()?;
    store.compact()?;
    let first = checkpoint(&store, &checkpointer, &staging, &[(0, 10)])?;
    assert_eq!(first.files_reused, 0);
    assert_eq!(first.bytes_uploaded, first.bytes_total);
    assert!(first.bytes_total > KEYS * 10, "{first:?}");

    // Each later checkpoint changes 1% of the keys: only the new files go up. (Three rounds:
    // the fourth file in level 0 would start a compaction, whose output is new files too.)
    let mut ratios = Vec::new();
    let mut last = first.clone();
    for round in 1..=3u64 {
        let start = round * 997 % KEYS;
        write_keys(&store, (start..start + KEYS / 100).map(|k| k % KEYS), round)?;
        last = checkpoint(&store, &checkpointer, &staging, &[(0, 10 + round as i64)])?;
        assert!(last.files_reused > 0, "{last:?}");
        ratios.push(last.bytes_uploaded as f64 / last.bytes_total as f64);
    }
    eprintln!("uploaded share per checkpoint after the warm-up: {ratios:?}");
    for r in &ratios {
        assert!(*r <= 0.10, "uploaded share per checkpoint {ratios:?}");
    }

    // Garbage collection (done before the thread stops) keeps exactly the files the two
    // retained checkpoints reference.
    checkpointer.stop();
    let reader = CheckpointStore::open(objects.to_str().ok_or("path")?, "a")?;
    let listed = reader.list()?;
    let complete: Vec<_> = listed
        .iter()
        .filter_map(|l| l.manifest.as_ref().ok())
        .collect();
    assert_eq!(
        complete.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![last.id, last.id - 1]
    );
    let referenced: BTreeSet<String> = complete
        .iter()
        .flat_map(|m| m.files.iter().map(|f| f.key.clone()))
        .collect();
    let stored_files: BTreeSet<String> = reader
        .objects()?
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| !key.ends_with("manifest.json"))
        .collect();
    assert_eq!(stored_files, referenced);

    // A restore holds the state of the newest checkpoint.
    let restored_dir = dir.path().join("restored");
    let restored = reader
        .restore(&restored_dir, |_| Ok(()), |_| Ok(()))?
        .ok_or("nothing restored")?;
    assert_eq!(restored.manifest.id, last.id);
    assert_eq!(restored.manifest.offsets.get(&0), Some(&13));
    let copy = StateStore::open(&restored_dir)?;
    assert_eq!(copy.count(Cf::Features)?, KEYS as usize);
    let start = 3 * 997 % KEYS;
    assert_eq!(
        copy.get(Cf::Features, &start.to_be_bytes())?,
        Some(value(start, 3))
    );
    assert_eq!(
        copy.get(Cf::Features, &1u64.to_be_bytes())?,
        Some(value(1, 0))
    );
    Ok(())
}

#[test]
fn a_restore_falls_back_past_a_damaged_or_incomplete_newest_checkpoint() -> Result {
    let dir = tempfile::tempdir()?;
    let objects = dir.path().join("objects");
    let url = objects.to_str().ok_or("path")?.to_string();
    let store = StateStore::open(&dir.path().join("state"))?;
    let checkpointer = Checkpointer::start(CheckpointStore::open(&url, "b")?, None, 5, false)?;
    let staging = dir.path().join("staging");
    let mut manifests = Vec::new();
    for round in 0..3u64 {
        write_keys(&store, (0..1000).map(|k| k + round * 1000), round)?;
        manifests.push(checkpoint(
            &store,
            &checkpointer,
            &staging,
            &[(0, round as i64)],
        )?);
    }
    checkpointer.stop();
    let root = objects.join("b").join("checkpoints");

    // The newest manifest truncated: unreadable.
    let newest = root.join(manifests[2].id.to_string()).join("manifest.json");
    let text = std::fs::read(&newest)?;
    std::fs::write(&newest, &text[..text.len() / 2])?;
    // The one before: an SST file it references cut short.
    let sst = manifests[1]
        .files
        .iter()
        .filter(|f| f.name.ends_with(".sst"))
        .find(|f| !manifests[0].files.contains(f))
        .ok_or("no file new in checkpoint 2")?;
    let path = objects.join("b").join(&sst.key);
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    // And a newer checkpoint that never got its manifest.
    std::fs::create_dir_all(root.join("99").join("files"))?;
    std::fs::write(
        root.join("99").join("files").join("CURRENT"),
        b"MANIFEST-000001\n",
    )?;

    let reader = CheckpointStore::open(&url, "b")?;
    let restored_dir = dir.path().join("restored");
    let progress = std::cell::RefCell::new(Vec::new());
    let restored = reader
        .restore_reporting(
            &restored_dir,
            |_| Ok(()),
            |d| StateStore::open(d).map(drop).map_err(|e| e.to_string()),
            |p| progress.borrow_mut().push(p),
        )?
        .ok_or("nothing restored")?;
    assert_eq!(restored.manifest.id, manifests[0].id);
    // Progress: the damaged checkpoint's download started and stopped short at its bad
    // file; the restored one's went from nothing to all of its files, growing.
    let progress = progress.into_inner();
    let of = |id: u64| -> Vec<_> { progress.iter().filter(|p| p.checkpoint == id).collect() };
    let damaged = of(manifests[1].id);
    let last = damaged
        .last()
        .ok_or("no progress for the damaged checkpoint")?;
    assert!(last.files < last.of_files, "{damaged:?}");
    let whole = of(manifests[0].id);
    assert_eq!((whole[0].files, whole[0].bytes), (0, 0), "{whole:?}");
    assert!(whole
        .windows(2)
        .all(|w| w[1].bytes >= w[0].bytes && w[1].files == w[0].files + 1));
    let last = whole
        .last()
        .ok_or("no progress for the restored checkpoint")?;
    let total: u64 = manifests[0].files.iter().map(|f| f.size).sum();
    assert_eq!(
        (last.files, last.bytes, last.of_bytes),
        (manifests[0].files.len(), total, total)
    );
    assert_eq!(last.of_files, manifests[0].files.len());
    let skipped: Vec<u64> = restored.skipped.iter().map(|(id, _)| *id).collect();
    assert_eq!(skipped, vec![99, manifests[2].id, manifests[1].id]);
    assert!(
        restored.skipped[0].1.contains("no manifest"),
        "{:?}",
        restored.skipped
    );
    assert!(
        restored.skipped[1].1.contains("unreadable"),
        "{:?}",
        restored.skipped
    );
    assert!(
        restored.skipped[2].1.contains("bytes"),
        "{:?}",
        restored.skipped
    );
    let copy = StateStore::open(&restored_dir)?;
    assert_eq!(copy.count(Cf::Features)?, 1000);
    assert_eq!(reader.next_id()?, 100);

    // A checkpoint refused by the caller (exactly-once: its transaction did not commit) is
    // passed over too.
    let again = dir.path().join("again");
    let none = reader.restore(&again, |_| Err("not committed".into()), |_| Ok(()))?;
    assert!(none.is_none());
    Ok(())
}

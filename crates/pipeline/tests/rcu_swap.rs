//! The RCU rule table under fire: one thread compiles and publishes thousands of bundle versions
//! while other threads score batches through the pipeline. Every verdict carries a published
//! version, all verdicts of a batch carry the same one (and were scored by it), versions never go
//! backwards for a scorer, and no event is lost or scored twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use riskstream_common::{Config, Position, RawBatch};
use riskstream_pipeline::{Pipeline, Processed};
use riskstream_rules::{RuleCompiler, RuleTable};

const VERSIONS: u64 = 3000;
const BATCH: usize = 32;

/// Version `v` scores every event with exactly `v`, so a verdict's score proves which bundle
/// evaluated it, independently of the version it reports.
fn bundle_text(v: u64) -> String {
    format!(
        "rules:\n  - {{id: v{v}, when: \"amount >= 0\", score: {v}}}\ndecision: {{review_at: 1e12, block_at: 2e12}}\n"
    )
}

fn event(id: &str) -> String {
    format!(
        r#"{{"tx_id":"{id}","ts":"2025-01-01T00:00:00Z","customer_id":"c","terminal_id":"t","amount":1.5,"tx_type":"CP"}}"#
    )
}

#[test]
fn swaps_never_tear_a_batch_and_never_lose_an_event() {
    let config =
        Config::from_toml_over_defaults(&format!("[pipeline]\nbatch_max_events = {BATCH}\n"))
            .unwrap();
    let schema = config.event_schema().unwrap();
    let compiler = RuleCompiler::new(&schema);
    let table = Arc::new(RuleTable::new(
        compiler.compile_text(&bundle_text(1), 1).unwrap(),
    ));
    let done = Arc::new(AtomicBool::new(false));
    // Batches completed per scorer.
    let progress: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);

    let publisher = {
        let table = Arc::clone(&table);
        let done = Arc::clone(&done);
        let progress = Arc::clone(&progress);
        thread::spawn(move || {
            for v in 2..=VERSIONS {
                let compiled = compiler.compile_text(&bundle_text(v), v).unwrap();
                table.publish(Arc::new(compiled)).unwrap();
                if v <= 10 {
                    // Let every scorer finish a batch begun after this swap, so that each sees
                    // the early versions whatever the relative speed of the threads.
                    let at: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Acquire)).collect();
                    while progress
                        .iter()
                        .zip(&at)
                        .any(|(p, at)| p.load(Ordering::Acquire) < at + 2)
                    {
                        thread::yield_now();
                    }
                }
            }
            done.store(true, Ordering::Release);
        })
    };

    let scorers: Vec<_> = (0..2)
        .map(|scorer| {
            let table = Arc::clone(&table);
            let done = Arc::clone(&done);
            let progress = Arc::clone(&progress);
            let config = config.clone();
            thread::spawn(move || {
                let mut pipeline = Pipeline::new(&config, table, "test").unwrap();
                let mut raw = RawBatch::new();
                let mut out = Processed::default();
                let mut sent = Vec::new();
                let mut seen = Vec::new();
                let mut last_version = 0;
                let mut batches = 0u64;
                let mut versions = HashSet::new();
                // Keep scoring until the publisher is done, then one more batch.
                let mut finishing = false;
                while !finishing {
                    finishing = done.load(Ordering::Acquire);
                    raw.clear();
                    for i in 0..BATCH {
                        let id = format!("s{scorer}-b{batches}-{i}");
                        raw.push(
                            event(&id).as_bytes(),
                            Position {
                                partition: scorer,
                                offset: sent.len() as i64,
                            },
                            0,
                        );
                        sent.push(id);
                    }
                    pipeline.process(&raw, &mut out).unwrap();
                    assert!(out.dead.is_empty());
                    assert_eq!(out.verdicts.len(), BATCH);
                    let mut batch_version = None;
                    for (key, payload, _) in out.verdicts.iter() {
                        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
                        let version = v["rules_version"].as_u64().unwrap();
                        assert!((1..=VERSIONS).contains(&version), "unpublished v{version}");
                        assert_eq!(
                            v["score"].as_f64(),
                            Some(version as f64),
                            "scored by another bundle"
                        );
                        assert_eq!(v["fired"][0]["rule_id"], format!("v{version}"));
                        assert_eq!(
                            *batch_version.get_or_insert(version),
                            version,
                            "batch mixes versions"
                        );
                        assert_eq!(key, v["tx_id"].as_str().unwrap().as_bytes());
                        seen.push(v["tx_id"].as_str().unwrap().to_string());
                    }
                    let version = batch_version.unwrap();
                    assert_eq!(version, out.rules_version);
                    assert!(
                        version >= last_version,
                        "version went back: {last_version} -> {version}"
                    );
                    last_version = version;
                    versions.insert(version);
                    batches += 1;
                    progress[scorer as usize].fetch_add(1, Ordering::Release);
                }
                (sent, seen, versions, last_version)
            })
        })
        .collect();

    publisher.join().unwrap();
    let mut all_seen = HashSet::new();
    let mut distinct_versions = HashSet::new();
    for scorer in scorers {
        let (sent, seen, versions, last) = scorer.join().unwrap();
        assert_eq!(sent, seen, "every event exactly once, in order");
        assert_eq!(last, VERSIONS, "the last batch saw the final version");
        for id in seen {
            assert!(all_seen.insert(id), "scored twice");
        }
        distinct_versions.extend(versions);
    }
    assert_eq!(table.version(), VERSIONS);
    // The scorers really ran while swaps happened: each saw at least versions 2 to 10.
    assert!(distinct_versions.len() >= 9, "{distinct_versions:?}");
}

//! A flush writes the state as of the flush: batches computed while the writer thread still
//! encodes and inserts it change the cache, never what is written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use riskstream_features::FeatureOperator;
use riskstream_rules::{CompiledBundle, RuleCompiler};
use riskstream_state::StateStore;

mod common;

/// Enough records that the writer is still busy when the next batch changes them.
const KEYS: usize = 20_000;

fn bundle() -> CompiledBundle {
    RuleCompiler::new(&common::schema())
        .compile_text(
            "features:\n  - {name: n_1h, entity: customer_id, agg: count, window: 1h}\n  - {name: sum_1h, entity: customer_id, agg: sum, of: amount, window: 1h}\nrules:\n  - {id: r, when: \"amount < 0\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n",
            1,
        )
        .unwrap()
}

/// One event per customer `c0..c{KEYS}` at `minute`, amount 1.
fn events(minute: i64) -> (RecordBatch, Vec<i64>) {
    let customers: Vec<String> = (0..KEYS).map(|i| format!("c{i}")).collect();
    let rows: Vec<(i64, &str, f64)> = customers
        .iter()
        .map(|c| (minute, c.as_str(), 1.0))
        .collect();
    common::events(&rows, "x")
}

/// The `n_1h` column of `out`.
fn counts(out: &RecordBatch) -> Vec<i64> {
    let column = out.column_by_name("n_1h").unwrap();
    assert_eq!(column.null_count(), 0);
    column.as_primitive::<Int64Type>().values().to_vec()
}

/// An operator over a new store in `dir` that has seen every customer at minutes 0 and 10,
/// right after it began a flush.
fn flushed_after_minutes_0_and_10(dir: &Path, bundle: &CompiledBundle) -> FeatureOperator {
    let store = Arc::new(StateStore::open(dir).unwrap());
    let mut operator = FeatureOperator::open(store, 1 << 30).unwrap();
    for minute in [0, 10] {
        let (batch, times) = events(minute);
        operator.compute(bundle, &batch, &times, None).unwrap();
        operator.end_batch().unwrap();
    }
    operator.flush(&[]).unwrap();
    operator
}

#[test]
fn a_flush_writes_the_state_of_its_moment_while_later_batches_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle();
    {
        let mut operator = flushed_after_minutes_0_and_10(dir.path(), &bundle);
        // Straight on, while the flush is being written: every record changes again.
        let (batch, times) = events(20);
        let out = operator.compute(&bundle, &batch, &times, None).unwrap();
        assert!(counts(&out).iter().all(|&n| n == 3));
        operator.wait().unwrap();
        // Dropped without another flush: the store keeps the flushed state.
    }
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let mut operator = FeatureOperator::open(store, 1 << 30).unwrap();
    let (batch, times) = events(30);
    let out = operator.compute(&bundle, &batch, &times, None).unwrap();
    let counts = counts(&out);
    let wrong = counts.iter().filter(|&&n| n != 3).count();
    assert_eq!(
        wrong, 0,
        "every key continues from its flushed events (minutes 0 and 10) plus this one; {wrong} of {KEYS} saw otherwise (first: {})",
        counts[0]
    );
}

/// The flush's records are collected over the batches after it ([`FeatureOperator::end_batch`]
/// takes a slice each time): batches that change some of them, add new keys (growing the
/// cache's tables) and evict old events, all before the collection is complete, must leave the
/// written state as of the flush.
#[test]
fn a_flush_collected_over_later_batches_writes_the_state_of_its_moment() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle();
    {
        let mut operator = flushed_after_minutes_0_and_10(dir.path(), &bundle);
        assert!(
            operator.writing(),
            "a flush of {KEYS} records is not collected at once"
        );
        // Each batch: an eighth of the customers at minute 20, and as many new customers.
        let customers: Vec<String> = (0..KEYS).map(|i| format!("c{i}")).collect();
        for part in 0..4 {
            let new: Vec<String> = (0..KEYS / 8).map(|i| format!("new{part}-{i}")).collect();
            let rows: Vec<(i64, &str, f64)> = customers[part * KEYS / 8..(part + 1) * KEYS / 8]
                .iter()
                .chain(&new)
                .map(|c| (20, c.as_str(), 1.0))
                .collect();
            let (batch, times) = common::events(&rows, "x");
            operator.compute(&bundle, &batch, &times, None).unwrap();
            operator.end_batch().unwrap();
        }
        // Drops minutes 0 and 10 from the records in the cache: after the flush, so not from
        // what it writes.
        let dropped = operator
            .evict(&bundle, common::START_MS + 70 * common::MIN, 0, 4 * KEYS)
            .unwrap();
        assert!(dropped >= 2 * KEYS, "{dropped}");
        assert!(
            operator.writing(),
            "the test means to change records before their turn; make it change more"
        );
        operator.wait().unwrap();
        assert!(!operator.writing());
    }
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let mut operator = FeatureOperator::open(store, 1 << 30).unwrap();
    let (batch, times) = events(30);
    let out = operator.compute(&bundle, &batch, &times, None).unwrap();
    let seen = counts(&out);
    let wrong: Vec<usize> = (0..KEYS).filter(|&i| seen[i] != 3).collect();
    assert!(
        wrong.is_empty(),
        "every key continues from its flushed events (minutes 0 and 10) plus this one; {} of {KEYS} saw otherwise (first: c{} with {})",
        wrong.len(),
        wrong[0],
        seen[wrong[0]]
    );
    // The keys first seen after the flush were not written by it.
    let (batch, times) = common::events(&[(30, "new0-0", 1.0), (30, "new3-7", 1.0)], "x");
    let out = operator.compute(&bundle, &batch, &times, None).unwrap();
    assert_eq!(counts(&out), vec![1, 1]);
}

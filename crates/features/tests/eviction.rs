//! Eviction sweeps the store a slice at a time and, call after call, reaches every key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use riskstream_common::Config;
use riskstream_features::FeatureOperator;
use riskstream_rules::RuleCompiler;
use riskstream_state::StateStore;

#[test]
fn sliced_sweeps_reach_every_stored_window() {
    let config = Config::defaults().unwrap();
    let schema = config.event_schema().unwrap();
    let bundle = RuleCompiler::new(&schema)
        .compile_text(
            "features:\n  - {name: n, entity: customer_id, agg: count, window: 1m}\nrules:\n  - {id: r, when: \"n > 1\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n",
            1,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    // A tiny cache: nearly every window lives only in the store.
    let mut operator = FeatureOperator::open(Arc::clone(&store), 1).unwrap();

    let n = 50;
    let text = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
    let columns: Vec<ArrayRef> = schema
        .arrow()
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "ts" => Arc::new(TimestampMillisecondArray::from(vec![1_000; n]).with_timezone("UTC"))
                as ArrayRef,
            "customer_id" => text((0..n).map(|i| format!("c{i}")).collect()),
            "amount" | "bill_lat" | "bill_lon" | "term_lat" | "term_lon" | "ship_lat"
            | "ship_lon" => Arc::new(Float64Array::from(vec![1.0; n])) as ArrayRef,
            _ => text((0..n).map(|i| format!("x{i}")).collect()),
        })
        .collect();
    let events = RecordBatch::try_new(Arc::clone(schema.arrow()), columns).unwrap();
    operator
        .compute(&bundle, &events, &[1_000; 50], None)
        .unwrap();
    // Over its cap, the cache writes its records out and drops them.
    operator.end_batch().unwrap();
    let stats = operator.stats().unwrap();
    assert_eq!((stats.keys, stats.events, stats.cached), (n, n, 0));

    // The watermark is far past every window: each sweep of 7 keys drops up to 7 of them.
    let mut calls = 0;
    while operator.stats().unwrap().keys > 0 {
        operator.evict(&bundle, 10_000_000, 0, 7).unwrap();
        calls += 1;
        assert!(calls <= 20, "sweeps do not reach every key");
    }
    assert!(
        calls >= n / 7,
        "{calls} sweeps of 7 keys cannot have covered {n} keys"
    );
}

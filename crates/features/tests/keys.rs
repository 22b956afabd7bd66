//! Entity keys across a batch: each row's features come from its own key's events, rows whose
//! key field is NULL get NULL features and fold nothing, and neither changes with where in a
//! batch (or in which batch) a key's events fall.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::datatypes::Int64Type;
use riskstream_features::FeatureOperator;
use riskstream_rules::RuleCompiler;
use riskstream_state::StateStore;

mod common;

/// `rows` events a minute apart from `first_minute`, the billing latitude (the one key field
/// of the default schema that may be NULL) of row `i` given by `lat(i)`.
fn events(
    first_minute: i64,
    rows: usize,
    lat: impl Fn(usize) -> Option<f64>,
) -> (RecordBatch, Vec<i64>, Vec<Option<f64>>) {
    let lats: Vec<Option<f64>> = (0..rows).map(lat).collect();
    let plain: Vec<(i64, &str, f64)> = (0..rows)
        .map(|i| (first_minute + i as i64, "c1", 1.0))
        .collect();
    let (batch, times) = common::events(&plain, "CNP");
    let schema = batch.schema();
    let at = schema.index_of("bill_lat").unwrap();
    let mut columns = batch.columns().to_vec();
    columns[at] = Arc::new(Float64Array::from(lats.clone())) as ArrayRef;
    (RecordBatch::try_new(schema, columns).unwrap(), times, lats)
}

#[test]
fn every_row_reads_its_own_keys_events_and_null_keys_read_null() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    // Two threads: the second batch is large enough to be shared between them.
    let mut operator = FeatureOperator::open(store, 64 << 20)
        .unwrap()
        .with_threads(2)
        .unwrap();
    let bundle = RuleCompiler::new(&common::schema())
        .compile_text(
            "features:\n  - {name: n, entity: bill_lat, agg: count, window: 1d}\nrules:\n  - {id: r, when: \"amount < 0\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n",
            1,
        )
        .unwrap();

    // Keys of different lengths, every third row without one; two batches, so that the second
    // finds the first's records in the cache.
    let lat = |i: usize| (i % 3 != 1).then(|| [1.0, 12.5, 123.25, -7.125, 40.0625][i * 7 % 5]);
    let mut seen: HashMap<u64, i64> = HashMap::new();
    let mut nulls = 0;
    for (first_minute, rows) in [(0, 61), (61, 97)] {
        let (batch, times, lats) = events(first_minute, rows, lat);
        let out = operator.compute(&bundle, &batch, &times, None).unwrap();
        let n = out.column_by_name("n").unwrap().as_primitive::<Int64Type>();
        for (row, lat) in lats.iter().enumerate() {
            match lat {
                None => {
                    assert!(n.is_null(row), "row {row} has no key");
                    nulls += 1;
                }
                Some(lat) => {
                    let count = seen.entry(lat.to_bits()).or_insert(0);
                    *count += 1;
                    assert!(n.is_valid(row), "row {row}");
                    assert_eq!(n.value(row), *count, "row {row}, key {lat}");
                }
            }
        }
    }
    assert_eq!(seen.len(), 5);
    assert!(nulls > 40);
    // The NULL rows folded nothing: the state holds the keyed events only.
    let stats = operator.stats().unwrap();
    assert_eq!(stats.keys, 5);
    assert_eq!(stats.events, seen.values().sum::<i64>() as usize);
}

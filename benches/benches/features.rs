//! Per-event cost of windowed features (compute + one RocksDB write batch per 4,096 events) as
//! the window grows from 10 minutes to 30 days and as the key space grows from 10K to 1M keys.
//! Target (issue 3): flat within ±10 %.
//!
//! Each run streams 262,144 events spread evenly over 5 days of event time (the W1 rate) through
//! an operator with a fresh RocksDB store; the features are W1's: a count, a sum and a max per
//! customer.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use riskstream_benches::Rng;
use riskstream_common::Config;
use riskstream_features::FeatureOperator;
use riskstream_rules::{CompiledBundle, RuleCompiler};
use riskstream_state::StateStore;

const EVENTS: usize = 262_144;
const BATCH: usize = 4096;
const SPAN_MS: i64 = 5 * 86_400_000;

fn bundle(window: &str) -> CompiledBundle {
    let schema = Config::defaults()
        .and_then(|c| Ok(c.event_schema()?))
        .unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "features:\n  - {{name: n, entity: customer_id, agg: count, window: {window}}}\n  - {{name: s, entity: customer_id, agg: sum, of: amount, window: {window}}}\n  - {{name: m, entity: customer_id, agg: max, of: amount, window: {window}}}\nrules:\n  - {{id: r, when: \"n > 5\", score: 1}}\ndecision: {{review_at: 1, block_at: 2}}\n"
    );
    RuleCompiler::new(&schema)
        .compile_text(&text, 1)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Event batches in the demo schema with `keys` uniformly drawn customers.
fn batches(keys: u64) -> Vec<(RecordBatch, Vec<i64>)> {
    let schema = Config::defaults()
        .and_then(|c| Ok(c.event_schema()?))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(keys);
    (0..EVENTS / BATCH)
        .map(|b| {
            let times: Vec<i64> = (0..BATCH)
                .map(|i| ((b * BATCH + i) as i64) * SPAN_MS / EVENTS as i64)
                .collect();
            let customers: Vec<String> = (0..BATCH)
                .map(|_| format!("c{}", rng.next_u64() % keys))
                .collect();
            let amounts: Vec<f64> = (0..BATCH).map(|_| rng.f64() * 200.0).collect();
            let columns: Vec<ArrayRef> = schema
                .arrow()
                .fields()
                .iter()
                .map(|f| match f.name().as_str() {
                    "ts" => Arc::new(
                        TimestampMillisecondArray::from(times.clone()).with_timezone("UTC"),
                    ) as ArrayRef,
                    "customer_id" => Arc::new(StringArray::from(customers.clone())) as ArrayRef,
                    "amount" => Arc::new(Float64Array::from(amounts.clone())) as ArrayRef,
                    "tx_type" | "tx_id" | "terminal_id" => {
                        Arc::new(StringArray::from(vec!["x"; BATCH])) as ArrayRef
                    }
                    _ => Arc::new(Float64Array::from(vec![0.0; BATCH])) as ArrayRef,
                })
                .collect();
            let batch = RecordBatch::try_new(Arc::clone(schema.arrow()), columns)
                .unwrap_or_else(|e| panic!("{e}"));
            (batch, times)
        })
        .collect()
}

fn run(c: &mut Criterion, group: &str, cases: &[(&str, u64)]) {
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));
    for &(window, keys) in cases {
        let bundle = bundle(window);
        let input = batches(keys);
        group.bench_function(format!("window_{window}_keys_{keys}"), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
                    let store =
                        Arc::new(StateStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
                    let operator =
                        FeatureOperator::open(store, 256 << 20).unwrap_or_else(|e| panic!("{e}"));
                    (dir, operator)
                },
                |(dir, mut operator)| {
                    for (batch, times) in &input {
                        operator
                            .compute(&bundle, batch, times, None)
                            .unwrap_or_else(|e| panic!("{e}"));
                        operator.flush(&[]).unwrap_or_else(|e| panic!("{e}"));
                    }
                    (dir, operator)
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn windows(c: &mut Criterion) {
    run(
        c,
        "features_by_window",
        &[
            ("10m", 10_000),
            ("1h", 10_000),
            ("1d", 10_000),
            ("30d", 10_000),
        ],
    );
}

fn keys(c: &mut Criterion) {
    run(
        c,
        "features_by_keys",
        &[("1h", 10_000), ("1h", 100_000), ("1h", 1_000_000)],
    );
}

criterion_group!(benches, windows, keys);
criterion_main!(benches);

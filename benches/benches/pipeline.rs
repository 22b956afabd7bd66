//! The whole per-batch path without I/O: decode → default bundle → verdict JSON, one thread.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use riskstream_benches::{raw_batches, w1_events};
use riskstream_common::Config;
use riskstream_pipeline::{Pipeline, Processed};
use riskstream_rules::{RuleCompiler, RuleTable};

fn pipeline(c: &mut Criterion) {
    let config = Config::defaults().unwrap_or_else(|e| panic!("{e}"));
    let schema = config.event_schema().unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/rules/default.yaml"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let bundle = RuleCompiler::new(&schema)
        .compile_text(&text, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let table = Arc::new(RuleTable::new(bundle));
    let events = w1_events(4096 * 4, 3);
    let batches = raw_batches(&events, 4096);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(events.len() as u64));
    // A fresh pipeline per iteration (not timed): replaying the same events into one pipeline
    // would make every later iteration's events late.
    group.bench_function("default_bundle_w1_4096x4", |b| {
        b.iter_batched(
            || {
                Pipeline::new(&config, Arc::clone(&table), "bench")
                    .unwrap_or_else(|e| panic!("{e}"))
            },
            |mut pipeline| {
                let mut out = Processed::default();
                for raw in &batches {
                    pipeline
                        .process(raw, &mut out)
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(out.verdicts.len(), raw.len());
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);

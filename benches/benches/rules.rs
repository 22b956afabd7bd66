//! A bundle of 50 rules evaluated over 4,096-event batches, one thread.
//! Target (issue 2): ≥ 1M events/s on one core (≥ 50M rule evaluations/s).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use riskstream_benches::{raw_batches, rule_bundle, w1_events};
use riskstream_common::Config;
use riskstream_decode::EventDecoder;
use riskstream_rules::RuleCompiler;

fn rules(c: &mut Criterion) {
    let schema = Config::defaults()
        .and_then(|c| Ok(c.event_schema()?))
        .unwrap_or_else(|e| panic!("{e}"));
    let events = w1_events(4096, 2);
    let raw = &raw_batches(&events, 4096)[0];
    let batch = EventDecoder::new(&schema, 4096)
        .and_then(|mut d| d.decode(raw))
        .unwrap_or_else(|e| panic!("{e}"))
        .batch;
    let mut group = c.benchmark_group("rules");
    for n in [5, 50] {
        let bundle = RuleCompiler::new(&schema)
            .compile_text(&rule_bundle(n), 1)
            .unwrap_or_else(|e| panic!("{e}"));
        group.throughput(Throughput::Elements(batch.num_rows() as u64));
        group.bench_function(format!("{n}_rules_4096_events"), |b| {
            b.iter(|| bundle.evaluate(&batch).unwrap_or_else(|e| panic!("{e}")))
        });
    }
    group.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);

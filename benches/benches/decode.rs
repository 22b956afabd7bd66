//! JSON lines → Arrow RecordBatch, 4,096-event batches of W1 events, one thread.
//! Target (issue 2): ≥ 500K events/s on one core.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use riskstream_benches::{raw_batches, w1_events};
use riskstream_common::Config;
use riskstream_decode::EventDecoder;

fn decode(c: &mut Criterion) {
    let schema = Config::defaults()
        .and_then(|c| Ok(c.event_schema()?))
        .unwrap_or_else(|e| panic!("{e}"));
    let events = w1_events(4096 * 4, 1);
    let batches = raw_batches(&events, 4096);
    let bytes: usize = batches.iter().map(|b| b.byte_len()).sum();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function(
        format!("w1_4096x4 ({} bytes/event)", bytes / events.len()),
        |b| {
            let mut decoder = EventDecoder::new(&schema, 4096).unwrap_or_else(|e| panic!("{e}"));
            b.iter(|| {
                for raw in &batches {
                    let decoded = decoder.decode(raw).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(decoded.batch.num_rows(), raw.len());
                }
            })
        },
    );
    // The same with 1% malformed records: the bisecting slow path.
    let mut dirty = events.clone();
    for e in dirty.iter_mut().step_by(100) {
        *e = e.replace("\"amount\":", "\"amount\":null,\"x\":");
    }
    let dirty_batches = raw_batches(&dirty, 4096);
    group.bench_function("w1_4096x4_1pct_malformed", |b| {
        let mut decoder = EventDecoder::new(&schema, 4096).unwrap_or_else(|e| panic!("{e}"));
        b.iter(|| {
            for raw in &dirty_batches {
                let decoded = decoder.decode(raw).unwrap_or_else(|e| panic!("{e}"));
                assert!(!decoded.dead.is_empty());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);

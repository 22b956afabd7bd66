//! Feature state through the whole pipeline: eviction keeps state bounded on an endless stream
//! with a bounded key space.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use riskstream_common::{Config, Position, RawBatch};
use riskstream_pipeline::{Pipeline, Processed};
use riskstream_rules::{RuleCompiler, RuleTable};

const KEYS: usize = 100;
const MINUTE: i64 = 60_000;

fn event(id: usize, key: usize, ts_ms: i64) -> String {
    format!(
        r#"{{"tx_id":"e{id}","ts":{ts_ms},"customer_id":"c{key}","terminal_id":"t{key}","amount":{},"tx_type":"CP"}}"#,
        10 + id % 7
    )
}

#[test]
fn state_stops_growing_on_an_endless_stream_with_bounded_keys() {
    // Windows of 10 minutes, lateness 10 minutes: nothing older than ~20 minutes behind the
    // watermark may stay.
    let config = Config::from_toml_over_defaults(
        "[time]\nallowed_lateness = \"10m\"\nmax_out_of_orderness = \"2s\"\n",
    )
    .unwrap();
    let bundle = "features:\n  - {name: c10, entity: customer_id, agg: count, window: 10m}\n  - {name: t10, entity: terminal_id, agg: avg, of: amount, window: 10m}\nrules:\n  - {id: busy, when: \"c10 > 100\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n";
    let compiled = RuleCompiler::new(&config.event_schema().unwrap())
        .compile_text(bundle, 1)
        .unwrap();
    let mut pipeline = Pipeline::new(&config, Arc::new(RuleTable::new(compiled)), "test").unwrap();

    let start = 1_735_689_600_000i64;
    let mut now = 1_800_000_000_000i64;
    let mut raw = RawBatch::new();
    let mut out = Processed::default();
    let mut sizes = Vec::new();
    let mut id = 0;
    // 300 minutes of event time, one event per key per minute.
    for minute in 0..300 {
        raw.clear();
        for key in 0..KEYS {
            raw.push(
                event(id, key, start + minute * MINUTE).as_bytes(),
                Position {
                    partition: 0,
                    offset: id as i64,
                },
                0,
            );
            id += 1;
        }
        now += 2_000; // eviction runs at most once per second of processing time
        pipeline.process_at(&raw, &mut out, now).unwrap();
        assert_eq!(out.verdicts.len(), KEYS);
        sizes.push(pipeline.feature_state().unwrap());
    }
    let at_100 = sizes[99].events;
    let at_300 = sizes[299].events;
    // Two features x 100 keys x (10 min window + 10 min lateness + a pane) of events.
    assert!(at_300 <= 2 * KEYS * 23, "{at_300} events kept");
    assert!(
        at_300 >= 2 * KEYS * 10,
        "{at_300}: the window itself must stay"
    );
    assert_eq!(
        at_100, at_300,
        "state size is flat once the horizon is reached"
    );
    assert_eq!(sizes[299].windows, 2 * KEYS);
}

//! Feature state through the whole pipeline: eviction keeps state bounded on an endless stream
//! with a bounded key space; the end of a run writes the state out where it is kept.
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
    assert_eq!(sizes[299].keys, 2 * KEYS);
    // Written out, the state is the same size: the store holds what the cache held.
    pipeline.flush_state().unwrap();
    let flushed = pipeline.feature_state().unwrap();
    assert_eq!(
        (flushed.keys, flushed.events, flushed.dirty),
        (2 * KEYS, at_300, 0)
    );
}

fn run_one_batch(config_toml: &str, events: &[String], now: i64) -> Processed {
    // Every feature in the verdicts: the test reads features no rule reads.
    let config =
        Config::from_toml_over_defaults(&format!("{config_toml}\n[verdict]\nfeatures = \"all\"\n"))
            .unwrap();
    let bundle = "features:\n  - {name: since, entity: customer_id, agg: seconds_since_last, window: 1h}\n  - {name: pair, entity: [customer_id, terminal_id], agg: count, window: 1h}\n  - {name: terms, entity: customer_id, agg: count_distinct, of: terminal_id, window: 1h}\nrules:\n  - {id: quick, when: \"since < 60\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n";
    let compiled = RuleCompiler::new(&config.event_schema().unwrap())
        .compile_text(bundle, 1)
        .unwrap();
    let mut pipeline = Pipeline::new(&config, Arc::new(RuleTable::new(compiled)), "test").unwrap();
    let mut raw = RawBatch::new();
    for (i, e) in events.iter().enumerate() {
        raw.push(
            e.as_bytes(),
            Position {
                partition: 0,
                offset: i as i64,
            },
            0,
        );
    }
    let mut out = Processed::default();
    pipeline.process_at(&raw, &mut out, now).unwrap();
    out
}

fn verdicts(out: &Processed) -> Vec<serde_json::Value> {
    out.verdicts
        .iter()
        .map(|(_, payload, _)| serde_json::from_slice(payload).unwrap())
        .collect()
}

#[test]
fn future_stamped_events_are_clamped_or_dead_lettered_by_policy() {
    let now = 1_800_000_000_000i64;
    let events = [
        format!(
            r#"{{"tx_id":"ok","ts":{},"customer_id":"c","terminal_id":"t","amount":1,"tx_type":"CP"}}"#,
            now - 1000
        ),
        format!(
            r#"{{"tx_id":"ahead","ts":{},"customer_id":"c","terminal_id":"t","amount":1,"tx_type":"CP"}}"#,
            now + 3_600_000
        ),
    ];
    let clamped = run_one_batch("[time]\nskew_policy = \"clamp\"\n", &events, now);
    let v = verdicts(&clamped);
    assert_eq!(v.len(), 2);
    assert_eq!(v[1]["tx_id"], "ahead");
    assert_eq!(v[1]["time_corrected"], true);
    assert_eq!(v[0]["time_corrected"], false);
    // The corrected event time is the processing time.
    let expected_time = {
        let mut b = Vec::new();
        riskstream_pipeline::verdict::write_rfc3339(&mut b, now);
        String::from_utf8(b).unwrap()
    };
    assert_eq!(
        format!("\"{}\"", v[1]["event_time"].as_str().unwrap()),
        expected_time
    );
    assert!(clamped.dead.is_empty());

    let rejected = run_one_batch("[time]\nskew_policy = \"dlq\"\n", &events, now);
    assert_eq!(verdicts(&rejected).len(), 1);
    assert_eq!(rejected.dead.len(), 1);
    assert_eq!(rejected.dead[0].record, 1);
    assert_eq!(
        rejected.dead[0].reason,
        riskstream_common::DeadReason::FutureTimestamp
    );
    assert!(rejected.dead[0]
        .detail
        .contains("ahead of the processing clock"));
}

#[test]
fn seconds_since_last_count_distinct_and_composite_keys() {
    let now = 1_800_000_000_000i64;
    let e = |id: &str, s: i64, c: &str, t: &str| {
        format!(
            r#"{{"tx_id":"{id}","ts":{},"customer_id":"{c}","terminal_id":"{t}","amount":1,"tx_type":"CP"}}"#,
            1_735_689_600_000 + s * 1000
        )
    };
    let events = [
        e("a", 0, "c1", "t1"),
        e("b", 30, "c1", "t2"),
        e("c", 100, "c1", "t1"),
        e("d", 100, "c2", "t1"),
        e("e", 4000, "c1", "t1"), // more than an hour after the previous one
    ];
    let out = run_one_batch("", &events, now);
    let v = verdicts(&out);
    let since: Vec<Option<f64>> = v.iter().map(|x| x["features"]["since"].as_f64()).collect();
    assert_eq!(since, [None, Some(30.0), Some(70.0), None, None]);
    let pair: Vec<i64> = v
        .iter()
        .map(|x| x["features"]["pair"].as_i64().unwrap())
        .collect();
    assert_eq!(pair, [1, 1, 2, 1, 1]);
    let terms: Vec<i64> = v
        .iter()
        .map(|x| x["features"]["terms"].as_i64().unwrap())
        .collect();
    assert_eq!(terms, [1, 2, 2, 1, 1]);
    let quick: Vec<bool> = v
        .iter()
        .map(|x| !x["fired"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(quick, [false, true, false, false, false]);
}

/// `run` over 200 events of 100 keys with state in `state_dir` (`None`: a temporary one); the
/// state afterwards.
fn run_file(state_dir: Option<std::path::PathBuf>) -> riskstream_features::StateStats {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::defaults().unwrap();
    config.state.dir = state_dir;
    let bundle = "features:\n  - {name: c10, entity: customer_id, agg: count, window: 10m}\nrules:\n  - {id: busy, when: \"c10 > 100\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n";
    let compiled = RuleCompiler::new(&config.event_schema().unwrap())
        .compile_text(bundle, 1)
        .unwrap();
    let input = dir.path().join("in.jsonl");
    let start = 1_735_689_600_000i64;
    let lines: Vec<String> = (0..2 * KEYS)
        .map(|id| event(id, id % KEYS, start + id as i64 * 1000))
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut pipeline = Pipeline::new(&config, Arc::new(RuleTable::new(compiled)), "file").unwrap();
    let mut source = riskstream_pipeline::JsonLinesSource::open(&input).unwrap();
    let mut sink = riskstream_pipeline::JsonLinesSink::create(
        &dir.path().join("v.jsonl"),
        &dir.path().join("dlq.jsonl"),
        &dir.path().join("late.jsonl"),
    )
    .unwrap();
    let summary = riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink).unwrap();
    assert_eq!(summary.verdicts, 2 * KEYS as u64);
    pipeline.feature_state().unwrap()
}

#[test]
fn state_is_written_out_at_the_end_only_into_a_directory_that_is_kept() {
    // A kept directory holds every record when the run ends: a later run continues from it.
    let kept = tempfile::tempdir().unwrap();
    let state = run_file(Some(kept.path().join("state")));
    assert_eq!((state.keys, state.events, state.dirty), (KEYS, 2 * KEYS, 0));
    // A temporary one is removed with the pipeline: the records stay changed in the cache only.
    let state = run_file(None);
    assert_eq!((state.keys, state.events), (KEYS, 2 * KEYS));
    assert_eq!(
        state.dirty, KEYS,
        "nothing is written to a temporary directory at the end"
    );
}

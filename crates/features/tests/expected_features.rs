//! Streaming the sample transactions in file order through the feature operator gives, for every
//! event and every feature of `features.yaml`, exactly the point-in-time value of DESIGN.md
//! section 4: the events of the same key with event time in `(t − window, t]` that arrived before
//! the event, plus the event itself. The reference here computes that definition the slow way,
//! event by event, independently of the pane machinery (relative error ≤ 1e-9, NULLs alike).
//!
//! Note: `../shared/data/synccfd-small/expected_features.jsonl` does not follow its own
//! `features.yaml` after the first day of data (its values equal aggregates over all earlier
//! history, e.g. `tx-1964` has `cust_tx_count_1d = 8` counting an event 24.3 h older, and
//! `tx-112` has `cust_cnp_count_1h = 2` for CNP events 3 h 24 min apart), so it cannot serve as
//! the reference; see the closing notes of the windowed-features issue.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};
use riskstream_common::{Config, Position, RawBatch};
use riskstream_decode::EventDecoder;
use riskstream_features::FeatureOperator;
use riskstream_rules::{Agg, RuleCompiler};
use riskstream_state::StateStore;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("RISKSTREAM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo("../shared/data"));
    dir.join("synccfd-small/transactions.jsonl")
        .exists()
        .then_some(dir.join("synccfd-small"))
}

/// One event as the reference sees it.
#[derive(Clone, Copy)]
struct Seen {
    ts: i64,
    amount: f64,
    cnp: bool,
}

/// The definition, the slow way: scan every earlier event of the same key.
fn reference(history: &[Seen], me: &Seen, agg: Agg, window: i64, cnp_only: bool) -> Option<f64> {
    let values: Vec<f64> = history
        .iter()
        .chain(std::iter::once(me))
        .filter(|e| e.ts > me.ts - window && e.ts <= me.ts)
        .filter(|e| !cnp_only || e.cnp)
        .map(|e| e.amount)
        .collect();
    let n = values.len() as f64;
    match agg {
        Agg::Count => Some(n),
        Agg::Sum => (n > 0.0).then(|| values.iter().sum()),
        Agg::Avg => (n > 0.0).then(|| values.iter().sum::<f64>() / n),
        Agg::Max => values.iter().copied().reduce(f64::max),
        other => panic!("reference does not cover {other:?}"),
    }
}

/// Replays `transactions` through an operator whose hot-window cache holds `cache_bytes`; a
/// small cache makes most lookups go through RocksDB (encode, write, read back, decode).
fn replay_and_compare(
    features_yaml: &Path,
    transactions: &Path,
    batch: usize,
    limit: usize,
    cache_bytes: usize,
) {
    let config = Config::defaults().unwrap();
    let schema = config.event_schema().unwrap();
    let text = std::fs::read_to_string(features_yaml).unwrap()
        + "rules:\n  - {id: noop, when: \"amount < 0\", score: 0}\ndecision: {review_at: 1, block_at: 2}\n";
    let bundle = RuleCompiler::new(&schema).compile_text(&text, 1).unwrap();
    assert_eq!(bundle.window_features().len(), 10);

    let mut decoder = EventDecoder::new(&schema, batch).unwrap();
    let state = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(state.path()).unwrap());
    let mut operator = FeatureOperator::open(store, cache_bytes).unwrap();
    let input = std::fs::read_to_string(transactions).unwrap();
    let lines: Vec<&str> = input.lines().take(limit).collect();
    // Reference history per (entity field, key), in arrival order.
    let mut history: HashMap<(&str, String), Vec<Seen>> = HashMap::new();
    let mut compared = 0;
    for (n, chunk) in lines.chunks(batch).enumerate() {
        let mut raw = RawBatch::new();
        for (i, l) in chunk.iter().enumerate() {
            raw.push(
                l.as_bytes(),
                Position {
                    partition: 0,
                    offset: i as i64,
                },
                0,
            );
        }
        let decoded = decoder.decode(&raw).unwrap();
        assert!(decoded.dead.is_empty());
        let events = decoded.batch;
        let times: Vec<i64> = events
            .column(1)
            .as_primitive::<TimestampMillisecondType>()
            .values()
            .to_vec();
        let out = operator.compute(&bundle, &events, &times).unwrap();
        // Write-back cache: trimmed to its cap after every batch (records dropped and later
        // reloaded), everything written out now and then.
        operator.end_batch().unwrap();
        if n % 3 == 0 {
            operator.flush(&[]).unwrap();
        }
        let ids = out.column(0).as_string::<i32>();
        let customers = out.column(2).as_string::<i32>();
        let terminals = out.column(3).as_string::<i32>();
        let amounts = out.column(4).as_primitive::<Float64Type>();
        let types = out.column(5).as_string::<i32>();
        for row in 0..out.num_rows() {
            for feature in bundle.window_features() {
                let entity = feature.spec.entity[0].as_str();
                let key = match entity {
                    "customer_id" => customers.value(row),
                    _ => terminals.value(row),
                };
                let me = Seen {
                    ts: times[row],
                    amount: amounts.value(row),
                    cnp: types.value(row) == "CNP",
                };
                let want = reference(
                    history
                        .get(&(entity, key.to_string()))
                        .map_or(&[][..], |h| h.as_slice()),
                    &me,
                    feature.spec.agg,
                    feature.window_ms(),
                    feature.spec.filter.is_some(),
                );
                let column = out.column_by_name(&feature.name).unwrap();
                let got = if column.is_null(row) {
                    None
                } else if let Some(c) = column.as_primitive_opt::<Int64Type>() {
                    Some(c.value(row) as f64)
                } else {
                    Some(column.as_primitive::<Float64Type>().value(row))
                };
                let ok = match (got, want) {
                    (None, None) => true,
                    (Some(g), Some(w)) => (g - w).abs() <= 1e-9 * w.abs().max(1e-300),
                    _ => false,
                };
                assert!(
                    ok,
                    "{} {}: got {got:?}, expected {want:?}",
                    ids.value(row),
                    feature.name
                );
            }
            for entity in ["customer_id", "terminal_id"] {
                let key = if entity == "customer_id" {
                    customers.value(row)
                } else {
                    terminals.value(row)
                };
                history
                    .entry((entity, key.to_string()))
                    .or_default()
                    .push(Seen {
                        ts: times[row],
                        amount: amounts.value(row),
                        cnp: types.value(row) == "CNP",
                    });
            }
            compared += 1;
        }
    }
    assert_eq!(compared, lines.len());
}

#[test]
fn committed_slice_follows_the_definition() {
    replay_and_compare(
        &repo("testdata/synccfd-features.yaml"),
        &repo("testdata/synccfd-slice.jsonl"),
        512,
        usize::MAX,
        16 << 10,
    );
}

#[test]
fn more_of_the_sample_follows_the_definition_when_present() {
    // The reference rescans each key's history for every event and feature; the whole sample
    // (30 days, every window length) stays within seconds.
    match shared_data() {
        Some(dir) => replay_and_compare(
            &dir.join("features.yaml"),
            &dir.join("transactions.jsonl"),
            4096,
            usize::MAX,
            64 << 20,
        ),
        None => eprintln!("shared data not found; only the committed slice was compared"),
    }
}

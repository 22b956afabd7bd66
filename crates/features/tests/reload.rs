//! Bundle reloads and feature state: a feature whose definition is unchanged keeps its state, a
//! feature added over events a log already holds starts with them (a longer window with what
//! the log kept), a feature over a filter of its own starts empty, and the state of logs no
//! bundle uses any more is swept away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use arrow::array::RecordBatch;
use riskstream_features::FeatureOperator;
use riskstream_rules::{CompiledBundle, RuleCompiler};
use riskstream_state::StateStore;

mod common;

fn bundle(features: &str, version: u64) -> CompiledBundle {
    RuleCompiler::new(&common::schema())
        .compile_text(
            &format!(
                "features:\n{features}rules:\n  - {{id: r, when: \"amount < 0\", score: 1}}\ndecision: {{review_at: 1, block_at: 2}}\n"
            ),
            version,
        )
        .unwrap()
}

/// One customer's events: `(minute, amount)`.
fn events(rows: &[(i64, f64)]) -> (RecordBatch, Vec<i64>) {
    let rows: Vec<(i64, &str, f64)> = rows.iter().map(|&(m, a)| (m, "c1", a)).collect();
    common::events(&rows, "CNP")
}

/// The value of feature `name` in the last row of `out`.
fn last(out: &RecordBatch, name: &str) -> Option<f64> {
    common::feature_value(out, name, out.num_rows() - 1)
}

#[test]
fn reloads_keep_share_and_reset_state_by_definition() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let mut operator = FeatureOperator::open(store, 64 << 20).unwrap();

    let v1 = bundle(
        "  - {name: n_1h, entity: customer_id, agg: count, window: 1h}\n  - {name: avg_1h, entity: customer_id, agg: avg, of: amount, window: 1h}\n",
        1,
    );
    let (batch, times) = events(&[(0, 10.0), (10, 20.0), (20, 60.0)]);
    let out = operator.compute(&v1, &batch, &times, None).unwrap();
    assert_eq!(last(&out, "n_1h"), Some(3.0));
    assert_eq!(last(&out, "avg_1h"), Some(30.0));
    operator.flush(&[]).unwrap();

    // v2 keeps both features, adds a max over the same events (it shares their window and sees
    // them at once), a stddev over them too (the window's summaries gain the second moment), a
    // 2-hour average (a new length over the same log: it sees the events the log kept), and a
    // count over a filter of its own (a new log, empty so far).
    let v2 = bundle(
        "  - {name: n_1h, entity: customer_id, agg: count, window: 1h}\n  - {name: avg_1h, entity: customer_id, agg: avg, of: amount, window: 1h}\n  - {name: max_1h, entity: customer_id, agg: max, of: amount, window: 1h}\n  - {name: sd_1h, entity: customer_id, agg: stddev, of: amount, window: 1h}\n  - {name: avg_2h, entity: customer_id, agg: avg, of: amount, window: 2h}\n  - {name: big_1h, entity: customer_id, agg: count, where: \"amount > 25\", window: 1h}\n",
        2,
    );
    let (batch, times) = events(&[(30, 30.0)]);
    let out = operator.compute(&v2, &batch, &times, None).unwrap();
    assert_eq!(last(&out, "n_1h"), Some(4.0), "unchanged: keeps its state");
    assert_eq!(
        last(&out, "avg_1h"),
        Some(30.0),
        "unchanged: keeps its state"
    );
    assert_eq!(last(&out, "max_1h"), Some(60.0), "added over held events");
    let sd = last(&out, "sd_1h").unwrap();
    // Sample standard deviation of 10, 20, 60, 30.
    let want = ((20f64.powi(2) + 10f64.powi(2) + 30f64.powi(2) + 0.0) / 3.0).sqrt();
    assert!((sd - want).abs() < 1e-9, "{sd} vs {want}");
    assert_eq!(
        last(&out, "avg_2h"),
        Some(30.0),
        "a new length over held events"
    );
    assert_eq!(last(&out, "big_1h"), Some(1.0), "a new log starts empty");

    // Back to v1: the log v2 added is no longer live and the sweep removes it; v1's features
    // still have all their events.
    let stats = operator.stats().unwrap();
    assert_eq!(stats.events, 4 + 1);
    operator.evict(&v1, times[0], 0, 100).unwrap();
    assert_eq!(operator.stats().unwrap().events, 4);
    let (batch, times) = events(&[(40, 40.0)]);
    let out = operator.compute(&v1, &batch, &times, None).unwrap();
    assert_eq!(last(&out, "n_1h"), Some(5.0));
    assert_eq!(last(&out, "avg_1h"), Some(32.0));
}

#[test]
fn a_feature_added_by_a_reload_is_warming_until_its_window_has_filled_even_across_a_restart() {
    use common::{MIN, START_MS};
    let dir = tempfile::tempdir().unwrap();
    let count_1h = "  - {name: n_1h, entity: customer_id, agg: count, window: 1h}\n";
    let sum_1h = "  - {name: sum_1h, entity: customer_id, agg: sum, of: amount, window: 1h}\n";
    let max_2h = "  - {name: max_2h, entity: customer_id, agg: max, of: amount, window: 2h}\n";
    let v1 = bundle(count_1h, 1);
    let v2 = bundle(&format!("{count_1h}{sum_1h}{max_2h}"), 2);
    {
        let store = Arc::new(StateStore::open(dir.path()).unwrap());
        let mut operator = FeatureOperator::open(store, 64 << 20).unwrap();
        // Not computed yet: warming, no start.
        let before = operator.warmth(&v1, Some(START_MS));
        assert!(before[0].warming && before[0].started_ms.is_none());

        let (batch, times) = events(&[(0, 10.0), (30, 20.0)]);
        operator.compute(&v1, &batch, &times, None).unwrap();
        let w = operator.warmth(&v1, Some(START_MS + 59 * MIN));
        assert_eq!(w[0].started_ms, Some(START_MS));
        assert_eq!(w[0].warm_at_ms, Some(START_MS + 60 * MIN));
        assert!(w[0].warming);
        assert!(!operator.warmth(&v1, Some(START_MS + 60 * MIN))[0].warming);

        // Minute 90: v2 adds a 1-hour sum (a window of its own: it aggregates `amount`) and a
        // 2-hour max; the count keeps its start.
        let (batch, times) = events(&[(90, 30.0)]);
        operator.compute(&v2, &batch, &times, None).unwrap();
        let w = operator.warmth(&v2, Some(START_MS + 100 * MIN));
        assert_eq!(w[0].name, "n_1h");
        assert!(!w[0].warming, "{w:?}");
        assert_eq!(w[1].started_ms, Some(START_MS + 90 * MIN), "{w:?}");
        assert!(w[1].warming);
        assert_eq!(w[2].warm_at_ms, Some(START_MS + 210 * MIN));
        operator.flush(&[]).unwrap();
        operator.wait().unwrap();
    }
    // After a restart the starts are what they were.
    let store = Arc::new(StateStore::open(dir.path()).unwrap());
    let operator = FeatureOperator::open(store, 64 << 20).unwrap();
    let w = operator.warmth(&v2, Some(START_MS + 150 * MIN));
    assert_eq!(w[0].started_ms, Some(START_MS));
    assert_eq!(w[1].started_ms, Some(START_MS + 90 * MIN));
    assert!(!w[1].warming, "{w:?}");
    assert!(w[2].warming, "{w:?}");
}

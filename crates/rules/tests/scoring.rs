//! Scoring semantics: active and shadow rules, forced actions, score expressions, NULLs, and
//! runtime evaluation problems that count in a metric and leave the rule not fired.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::array::{AsArray, TimestampMillisecondArray};
use arrow::datatypes::Float64Type;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use riskstream_common::Config;
use riskstream_rules::{CompiledBundle, Decision, Evaluated, RuleCompiler};

const SCHEMA: &str = r#"
[schema]
event_id = "id"
event_time = "ts"
entity_keys = []
fields = [
  { name = "id", type = "string" },
  { name = "ts", type = "timestamp" },
  { name = "qty", type = "int64", required = false },
  { name = "amount", type = "float64", required = false },
  { name = "kind", type = "string", required = false },
  { name = "lat", type = "float64", required = false },
  { name = "lon", type = "float64", required = false },
]
"#;

fn compile(bundle: &str) -> CompiledBundle {
    let config = Config::from_toml_over_defaults(SCHEMA).unwrap();
    RuleCompiler::new(&config.event_schema().unwrap())
        .compile_text(bundle, 3)
        .unwrap()
}

struct Row {
    qty: Option<i64>,
    amount: Option<f64>,
    kind: Option<&'static str>,
}

fn batch(bundle: &CompiledBundle, rows: &[Row]) -> RecordBatch {
    let n = rows.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("e{i}")),
        )),
        Arc::new(TimestampMillisecondArray::from(vec![0; n]).with_timezone("UTC")),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.qty))),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.amount))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.kind))),
        Arc::new(Float64Array::from(vec![48.8566; n])),
        Arc::new(Float64Array::from(vec![2.3522; n])),
    ];
    RecordBatch::try_new(Arc::clone(bundle.input_schema()), columns).unwrap()
}

fn fired(e: &Evaluated, bundle: &CompiledBundle, row: usize) -> Vec<String> {
    e.scores
        .hits
        .iter()
        .filter(|h| h.fired.value(row))
        .map(|h| bundle.rule(h.rule).0.to_string())
        .collect()
}

/// The value of counter `name` whose first label has value `label`.
fn counter(snapshot: &[(String, Vec<String>, u64)], name: &str, label: &str) -> u64 {
    snapshot
        .iter()
        .find(|(n, labels, _)| n == name && labels.first().is_some_and(|l| l == label))
        .map(|(_, _, v)| *v)
        .unwrap_or(0)
}

fn snapshot(recorder: &DebuggingRecorder) -> Vec<(String, Vec<String>, u64)> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(v) => Some((
                key.key().name().to_string(),
                key.key().labels().map(|l| l.value().to_string()).collect(),
                v,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn active_shadow_and_forced_actions() {
    let bundle = compile(
        r#"
rules:
  - {id: big, when: "amount > 100", score: 50}
  - {id: huge, when: "amount > 1000", score: 40}
  - {id: watch, when: "amount > 0", score: 99, mode: shadow}
  - {id: banned_kind, when: "kind = 'x'", score: 1, action: block}
  - {id: shadow_block, when: "kind = 'y'", score: 1, action: block, mode: shadow}
decision: {review_at: 40, block_at: 80}
"#,
    );
    let rows = [
        Row {
            qty: Some(1),
            amount: Some(5.0),
            kind: None,
        },
        Row {
            qty: Some(1),
            amount: Some(150.0),
            kind: Some("a"),
        },
        Row {
            qty: Some(1),
            amount: Some(5000.0),
            kind: Some("a"),
        },
        Row {
            qty: Some(1),
            amount: Some(5.0),
            kind: Some("x"),
        },
        Row {
            qty: Some(1),
            amount: None,
            kind: Some("y"),
        },
    ];
    let e = bundle.evaluate(&batch(&bundle, &rows)).unwrap();
    assert_eq!(e.scores.version, 3);
    assert_eq!(e.scores.total, [0.0, 50.0, 90.0, 1.0, 0.0]);
    assert_eq!(
        e.scores.decision,
        [
            Decision::Allow,
            Decision::Review,
            Decision::Block,
            Decision::Block, // forced by an active rule's action
            Decision::Allow, // a shadow rule's action changes nothing
        ]
    );
    assert_eq!(fired(&e, &bundle, 0), ["watch"]);
    assert_eq!(fired(&e, &bundle, 2), ["big", "huge", "watch"]);
    assert_eq!(fired(&e, &bundle, 3), ["watch", "banned_kind"]);
    // NULL amount: `amount > 0` is NULL, so `watch` did not fire.
    assert_eq!(fired(&e, &bundle, 4), ["shadow_block"]);
}

#[test]
fn score_expressions_and_row_features() {
    let bundle = compile(
        r#"
features:
  - {name: km_to_london, expr: "haversine_km(lat, lon, 51.5074, -0.1278)"}
  - {name: tenth, expr: "amount / 10"}
rules:
  - {id: scaled, when: "amount > 0 AND km_to_london > 300", score: "tenth + qty"}
decision: {review_at: 40, block_at: 80}
"#,
    );
    let rows = [
        Row {
            qty: Some(2),
            amount: Some(380.0),
            kind: None,
        },
        Row {
            qty: Some(0),
            amount: Some(10.0),
            kind: None,
        },
    ];
    let e = bundle.evaluate(&batch(&bundle, &rows)).unwrap();
    let km = e.batch.column_by_name("km_to_london").unwrap();
    let km = km.as_primitive::<Float64Type>().value(0);
    assert!((km - 343.5).abs() < 1.0, "{km}");
    assert_eq!(e.scores.total, [40.0, 1.0]);
    assert_eq!(e.scores.decision, [Decision::Review, Decision::Allow]);
    assert_eq!(e.scores.hits[0].score(0), 40.0);
}

#[test]
fn runtime_errors_count_and_leave_the_rule_not_fired() {
    let recorder = DebuggingRecorder::new();
    let bundle = metrics::with_local_recorder(&recorder, || {
        compile(
            r#"
features:
  - {name: per_unit, expr: "100 / qty"}
rules:
  - {id: ratio, when: "1000 / qty > 5", score: 10}
  - {id: null_score, when: "qty > 0", score: "amount * 2"}
  - {id: steady, when: "qty >= 0", score: 1}
decision: {review_at: 40, block_at: 80}
"#,
        )
    });
    let rows = [
        Row {
            qty: Some(1),
            amount: Some(1.0),
            kind: None,
        },
        Row {
            qty: Some(0),
            amount: Some(1.0),
            kind: None,
        },
        Row {
            qty: Some(2),
            amount: None,
            kind: None,
        },
        Row {
            qty: Some(3),
            amount: Some(2.0),
            kind: None,
        },
    ];
    let e = bundle.evaluate(&batch(&bundle, &rows)).unwrap();
    // Division by zero on row 1 only: the rule still fires for the others.
    assert_eq!(fired(&e, &bundle, 0), ["ratio", "null_score", "steady"]);
    assert_eq!(fired(&e, &bundle, 1), ["steady"]);
    // A NULL score (amount is NULL) counts as a problem and the rule does not fire.
    assert_eq!(fired(&e, &bundle, 2), ["ratio", "steady"]);
    assert_eq!(e.scores.total, [13.0, 1.0, 11.0, 15.0]);
    // The row-level feature is NULL where it failed, and present elsewhere.
    let per_unit = e.batch.column_by_name("per_unit").unwrap();
    assert_eq!(per_unit.null_count(), 1);
    assert!(per_unit.is_null(1));

    let snap = snapshot(&recorder);
    assert_eq!(
        counter(&snap, "riskstream_rule_eval_errors_total", "ratio"),
        1
    );
    assert_eq!(
        counter(&snap, "riskstream_rule_eval_errors_total", "null_score"),
        1
    );
    assert_eq!(
        counter(&snap, "riskstream_rule_eval_errors_total", "steady"),
        0
    );
    assert_eq!(
        counter(&snap, "riskstream_feature_eval_errors_total", "per_unit"),
        1
    );
    assert_eq!(counter(&snap, "riskstream_rule_hits_total", "steady"), 4);
    assert_eq!(counter(&snap, "riskstream_rule_hits_total", "ratio"), 3);
}

#[test]
fn a_batch_of_the_wrong_schema_is_refused() {
    let bundle = compile("rules:\n  - {id: a, when: \"amount > 1\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n");
    let other = RecordBatch::try_from_iter(vec![(
        "amount",
        Arc::new(Float64Array::from(vec![1.0])) as ArrayRef,
    )])
    .unwrap();
    let err = bundle.evaluate(&other).unwrap_err().to_string();
    assert!(err.contains("does not match bundle v3"), "{err}");
}

#[test]
fn rules_share_the_evaluation_of_conditions_and_their_errors() {
    let recorder = DebuggingRecorder::new();
    let bundle = metrics::with_local_recorder(&recorder, || {
        compile(
            r#"
rules:
  - {id: big_cnp, when: "amount > 100 AND kind = 'CNP'", score: 10}
  - {id: big_ratio, when: "amount > 100 AND 1000 / qty > 5", score: 20}
  - {id: ratio_only, when: "1000 / qty > 5", score: 1}
  - {id: never, when: "amount > 1000000 AND 1000 / qty > 5", score: 1}
decision: {review_at: 40, block_at: 80}
"#,
        )
    });
    // Seven conditions as written; `amount > 100` twice and `1000 / qty > 5` three times:
    // four distinct ones.
    assert_eq!(bundle.condition_counts(), (4, 7));
    let rows = [
        Row {
            qty: Some(1),
            amount: Some(500.0),
            kind: Some("CNP"),
        },
        Row {
            qty: Some(0),
            amount: Some(500.0),
            kind: Some("CP"),
        },
        Row {
            qty: Some(1000),
            amount: Some(5.0),
            kind: Some("CNP"),
        },
    ];
    let e = bundle.evaluate(&batch(&bundle, &rows)).unwrap();
    // Each rule fires where all of its conditions hold, as the whole `when` would.
    assert_eq!(
        fired(&e, &bundle, 0),
        ["big_cnp", "big_ratio", "ratio_only"]
    );
    assert_eq!(fired(&e, &bundle, 1), Vec::<String>::new());
    assert_eq!(fired(&e, &bundle, 2), Vec::<String>::new());
    assert_eq!(e.scores.total, [31.0, 0.0, 0.0]);
    // The shared failing condition (division by zero on row 1) counts for every rule that
    // evaluated it; `never` stops at its first condition, which holds for no row.
    let snap = snapshot(&recorder);
    for (rule, errors) in [
        ("big_cnp", 0),
        ("big_ratio", 1),
        ("ratio_only", 1),
        ("never", 0),
    ] {
        assert_eq!(
            counter(&snap, "riskstream_rule_eval_errors_total", rule),
            errors,
            "{rule}"
        );
    }
}

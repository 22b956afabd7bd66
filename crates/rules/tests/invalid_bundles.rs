//! Invalid bundles of every kind are rejected with a message naming the rule (or feature) and the
//! problem; valid ones compile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use riskstream_common::Config;
use riskstream_rules::{BundleError, RuleCompiler, Subject};

fn compiler() -> RuleCompiler {
    RuleCompiler::new(&Config::defaults().unwrap().event_schema().unwrap())
}

fn reject(text: &str) -> BundleError {
    match compiler().compile_text(text, 1) {
        Ok(_) => panic!("bundle should be rejected:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts that some problem is about `subject` and mentions every word of `words`.
fn assert_problem(err: &BundleError, subject: Subject, words: &[&str]) {
    let found = err
        .problems
        .iter()
        .any(|p| p.subject == subject && words.iter().all(|w| p.message.contains(w)));
    assert!(
        found,
        "expected a problem about {subject} mentioning {words:?}, got:\n{err}"
    );
    // The rendered error names the subject too.
    assert!(err.to_string().contains(&subject.to_string()), "{err}");
}

const DECISION: &str = "decision: {review_at: 40, block_at: 80}\n";

fn rule(id: &str) -> Subject {
    Subject::Rule(id.to_string())
}

fn feature(name: &str) -> Subject {
    Subject::Feature(name.to_string())
}

#[test]
fn a_valid_bundle_compiles_in_yaml_and_json() {
    let yaml = format!(
        "rules:\n  - {{id: big, when: \"amount > 220\", score: 60, tags: [amount]}}\n{DECISION}"
    );
    let compiled = compiler().compile_text(&yaml, 7).unwrap();
    assert_eq!(compiled.version(), 7);
    assert_eq!(compiled.rule_count(), 1);
    let json = r#"{"rules":[{"id":"big","when":"amount > 220","score":60,"tags":["amount"]}],
                  "decision":{"review_at":40,"block_at":80}}"#;
    let from_json = compiler().compile_text(json, 1).unwrap();
    assert_eq!(from_json.doc().rules, compiled.doc().rules);
}

#[test]
fn the_default_bundle_compiles() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/rules/default.yaml"
    ))
    .unwrap();
    compiler().compile_text(&text, 1).unwrap();
}

#[test]
fn syntax_errors_name_the_document() {
    let err = reject("rules: [\n  - id: x\n    when: [unclosed\n");
    assert_problem(&err, Subject::Document, &["YAML syntax error"]);
    let err = reject(r#"{"rules": [ }"#);
    assert_problem(&err, Subject::Document, &["JSON syntax error"]);
}

#[test]
fn unknown_columns_are_named() {
    let err = reject(&format!(
        "rules:\n  - {{id: typo, when: \"amout > 220\", score: 60}}\n{DECISION}"
    ));
    assert_problem(
        &err,
        rule("typo"),
        &["unknown column `amout`", "`when`", "`amount`"],
    );
    let err = reject(&format!(
        "rules:\n  - {{id: s, when: \"amount > 1\", score: \"amount * fx_rate\"}}\n{DECISION}"
    ));
    assert_problem(&err, rule("s"), &["unknown column `fx_rate`", "`score`"]);
}

#[test]
fn type_errors_are_named() {
    let err = reject(&format!(
        "rules:\n  - {{id: arith, when: \"tx_type + 1 > 3\", score: 1}}\n{DECISION}"
    ));
    assert_problem(&err, rule("arith"), &["`when`"]);
    let err = reject(&format!(
        "rules:\n  - {{id: nonbool, when: \"amount * 2\", score: 1}}\n{DECISION}"
    ));
    assert_problem(&err, rule("nonbool"), &["must be a boolean", "Float64"]);
    let err = reject(&format!(
        "rules:\n  - {{id: textscore, when: \"amount > 1\", score: \"tx_type\"}}\n{DECISION}"
    ));
    assert_problem(
        &err,
        rule("textscore"),
        &["`score` must be a number", "Utf8"],
    );
}

#[test]
fn duplicate_ids_are_named() {
    let err = reject(&format!(
        "rules:\n  - {{id: twin, when: \"amount > 1\", score: 1}}\n  - {{id: twin, when: \"amount > 2\", score: 2}}\n{DECISION}"
    ));
    assert_problem(&err, rule("twin"), &["duplicate rule id"]);
}

#[test]
fn unknown_fields_are_named() {
    let err = reject(&format!(
        "rules:\n  - {{id: misspelt, whn: \"amount > 1\", score: 1}}\n{DECISION}"
    ));
    assert_problem(&err, rule("misspelt"), &["unknown field `whn`"]);
    let err = reject(&format!(
        "rules:\n  - {{id: a, when: \"amount > 1\", score: 1}}\n{DECISION}thresholds: 3\n"
    ));
    assert_problem(&err, Subject::Document, &["unknown field `thresholds`"]);
}

#[test]
fn nulls_where_a_value_is_required_are_named() {
    let err = reject(&format!(
        "rules:\n  - {{id: nowhen, when: null, score: 1}}\n  - {{id: noscore, when: \"amount > 1\", score: ~}}\n{DECISION}"
    ));
    assert_problem(&err, rule("nowhen"), &["`when` is null"]);
    assert_problem(&err, rule("noscore"), &["`score` is null"]);
    let err = reject(
        "rules:\n  - {id: a, when: \"amount > 1\", score: 1}\ndecision: {review_at: null, block_at: 80}\n",
    );
    assert_problem(&err, Subject::Decision, &["`review_at` is null"]);
    let err = reject(&format!(
        "rules:\n  - {{id: null, when: \"amount > 1\", score: 1}}\n{DECISION}"
    ));
    assert_problem(&err, rule("rules[0]"), &["`id` is null"]);
}

#[test]
fn empty_bundles_are_rejected() {
    let err = reject(&format!("rules: []\n{DECISION}"));
    assert_problem(&err, Subject::Document, &["no rules"]);
    let err = reject("");
    assert_problem(&err, Subject::Document, &["must be a mapping"]);
    let err = reject("rules:\n  - {id: a, when: \"amount > 1\", score: 1}\n");
    assert_problem(&err, Subject::Document, &["`decision` is missing"]);
}

#[test]
fn feature_problems_are_named() {
    // Structure: checked without the event schema.
    let err = reject(&format!(
        "features:\n  - {{name: f2, entity: customer_id, agg: sum, window: 1h}}\n  - {{name: f3, entity: customer_id, agg: count, window: 200d}}\n  - {{name: f4, entity: customer_id, agg: median, window: 1h}}\n  - {{name: f8, entity: customer_id, agg: count, window: soon}}\n  - {{name: f9, agg: count, window: 1h}}\nrules:\n  - {{id: a, when: \"amount > 1\", score: 1}}\n{DECISION}"
    ));
    assert_problem(&err, feature("f2"), &["`sum` needs `of`"]);
    assert_problem(&err, feature("f3"), &["out of range"]);
    assert_problem(&err, feature("f4"), &["unknown aggregation `median`"]);
    assert_problem(&err, feature("f8"), &["window `soon` is not a duration"]);
    assert_problem(&err, feature("f9"), &["`entity` is missing"]);
    // Meaning: checked against the event schema.
    let err = reject(&format!(
        "features:\n  - {{name: f1, entity: cust, agg: count, window: 1h}}\n  - {{name: f5, entity: customer_id, agg: avg, of: tx_type, window: 1h}}\n  - {{name: f6, entity: customer_id, agg: count, where: \"amount\", window: 1h}}\n  - {{name: f7, expr: \"haversine_km(bill_lat, bill_lon)\"}}\n  - {{name: amount, expr: \"amount * 2\"}}\nrules:\n  - {{id: a, when: \"amount > 1\", score: 1}}\n{DECISION}"
    ));
    assert_problem(&err, feature("f1"), &["unknown entity field `cust`"]);
    assert_problem(&err, feature("f5"), &["numeric `of`", "Utf8"]);
    assert_problem(&err, feature("f6"), &["`where` must be a boolean"]);
    assert_problem(&err, feature("f7"), &["`expr`"]);
    assert_problem(&err, feature("amount"), &["clashes"]);
}

#[test]
fn rules_may_use_declared_features() {
    let text = format!(
        "features:\n  - {{name: cust_tx_count_1h, entity: customer_id, agg: count, window: 1h}}\n  - {{name: cust_avg_30d, entity: [customer_id, terminal_id], agg: avg, of: amount, window: 30d}}\n  - {{name: ratio, expr: \"amount / cust_avg_30d\"}}\nrules:\n  - {{id: velocity, when: \"cust_tx_count_1h >= 5 AND ratio > 3\", score: \"ratio * 10\"}}\n{DECISION}"
    );
    let compiled = compiler().compile_text(&text, 1).unwrap();
    assert_eq!(compiled.window_features().len(), 2);
    assert_eq!(compiled.window_features()[1].entity_columns, vec![2, 3]);
    let names: Vec<_> = compiled.feature_columns().1.collect();
    assert_eq!(names, ["cust_tx_count_1h", "cust_avg_30d", "ratio"]);
}

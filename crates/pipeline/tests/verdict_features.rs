//! `verdict.features`: which feature values each verdict lists, through the whole pipeline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use riskstream_common::{Config, Position, RawBatch};
use riskstream_pipeline::{Pipeline, Processed};
use riskstream_rules::{RuleCompiler, RuleTable};

/// Five features, three rules reading different ones: `burst` reads `c1h`; `big_spend` reads
/// `s1h` in `when` and `terms` in `score`; `far` reads the row-level `dist` (and no windowed
/// feature). `avg1h` no rule reads.
const BUNDLE: &str = r#"
features:
  - {name: c1h, entity: customer_id, agg: count, window: 1h}
  - {name: s1h, entity: customer_id, agg: sum, of: amount, window: 1h}
  - {name: avg1h, entity: customer_id, agg: avg, of: amount, window: 1h}
  - {name: terms, entity: customer_id, agg: count_distinct, of: terminal_id, window: 1h}
  - {name: dist, expr: "amount * 2"}
rules:
  - {id: burst, when: "c1h >= 3", score: 10}
  - {id: big_spend, when: "s1h > 500 AND amount > 100", score: "terms * 5"}
  - {id: far, when: "dist > 1800", score: 1, mode: shadow}
decision: {review_at: 50, block_at: 100}
"#;

fn run(setting: &str) -> Vec<serde_json::Value> {
    let config =
        Config::from_toml_over_defaults(&format!("[verdict]\nfeatures = {setting}\n")).unwrap();
    let compiled = RuleCompiler::new(&config.event_schema().unwrap())
        .compile_text(BUNDLE, 1)
        .unwrap();
    let mut pipeline = Pipeline::new(&config, Arc::new(RuleTable::new(compiled)), "test").unwrap();
    let start = 1_735_689_600_000i64;
    // e1: nothing fires. e2: nothing. e3: burst (3 events). e4: burst and big_spend and far.
    let events = [
        ("e1", 10.0, "t1"),
        ("e2", 20.0, "t2"),
        ("e3", 30.0, "t1"),
        ("e4", 950.0, "t3"),
    ];
    let mut raw = RawBatch::new();
    for (i, (id, amount, terminal)) in events.iter().enumerate() {
        let json = format!(
            r#"{{"tx_id":"{id}","ts":{},"customer_id":"c","terminal_id":"{terminal}","amount":{amount},"tx_type":"CP"}}"#,
            start + i as i64 * 1000
        );
        raw.push(
            json.as_bytes(),
            Position {
                partition: 0,
                offset: i as i64,
            },
            0,
        );
    }
    let mut out = Processed::default();
    pipeline.process_at(&raw, &mut out, start + 10_000).unwrap();
    out.verdicts
        .iter()
        .map(|(_, payload, _)| serde_json::from_slice(payload).unwrap())
        .collect()
}

fn listed(v: &serde_json::Value) -> BTreeSet<String> {
    v["features"]
        .as_object()
        .expect("features object")
        .keys()
        .cloned()
        .collect()
}

fn fired(v: &serde_json::Value) -> BTreeSet<String> {
    v["fired"]
        .as_array()
        .expect("fired")
        .iter()
        .map(|h| h["rule_id"].as_str().unwrap().to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn fired_lists_exactly_the_features_the_fired_rules_read() {
    let verdicts = run("\"fired\"");
    assert_eq!(verdicts.len(), 4);
    let by_id = |id: &str| {
        verdicts
            .iter()
            .find(|v| v["tx_id"] == id)
            .unwrap_or_else(|| panic!("no verdict for {id}"))
    };
    for id in ["e1", "e2"] {
        assert!(fired(by_id(id)).is_empty(), "{id}: {}", by_id(id));
        assert_eq!(
            listed(by_id(id)),
            set(&[]),
            "{id}: no rule fired, no feature"
        );
    }
    let e3 = by_id("e3");
    assert_eq!(fired(e3), set(&["burst"]), "{e3}");
    assert_eq!(listed(e3), set(&["c1h"]), "{e3}");
    assert_eq!(e3["features"]["c1h"], 3);
    let e4 = by_id("e4");
    assert_eq!(fired(e4), set(&["burst", "big_spend", "far"]), "{e4}");
    // `when` and `score` of big_spend, each feature once, row-level `dist` included, avg1h not.
    assert_eq!(listed(e4), set(&["c1h", "s1h", "terms", "dist"]), "{e4}");
    assert_eq!(e4["features"]["s1h"], 1010.0);
    assert_eq!(e4["features"]["terms"], 3);
}

#[test]
fn all_none_and_a_list_select_what_they_say() {
    let all = run("\"all\"");
    for v in &all {
        assert_eq!(
            listed(v),
            set(&["c1h", "s1h", "avg1h", "terms", "dist"]),
            "{v}"
        );
    }
    assert_eq!(all[3]["features"]["avg1h"], 252.5);
    for v in run("\"none\"") {
        assert_eq!(listed(&v), set(&[]), "{v}");
        // Rules still fire; only the features are left out.
        assert_eq!(v["tx_id"] == "e4", fired(&v).len() == 3, "{v}");
    }
    // A name the bundle lacks is left out (and logged), not an error.
    for v in run("[\"terms\", \"avg1h\", \"no_such_feature\"]") {
        assert_eq!(listed(&v), set(&["avg1h", "terms"]), "{v}");
    }
}

#[test]
fn an_unknown_setting_is_refused_with_the_choices() {
    let err = Config::from_toml_over_defaults("[verdict]\nfeatures = \"some\"\n")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("\"fired\", \"all\", \"none\" or a list of feature names"),
        "{err}"
    );
}

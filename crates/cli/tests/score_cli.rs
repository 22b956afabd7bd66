//! `riskstream score` and `riskstream validate` end to end, through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// `../shared/data` beside the checkout, or `RISKSTREAM_SHARED_DATA`, when present.
fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("RISKSTREAM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo("../shared/data"));
    dir.join("synccfd-small/transactions.jsonl")
        .exists()
        .then_some(dir)
}

fn riskstream() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_riskstream"));
    // Most tests read features no rule reads: list them all (the default is "fired").
    cmd.env_remove("RISKSTREAM_CONFIG")
        .env("RISKSTREAM_LOG", "warn")
        .env("RISKSTREAM__VERDICT__FEATURES", "all");
    cmd
}

/// `riskstream score --bundle BUNDLE --input INPUT --output OUTPUT`, ready for more arguments.
fn score(bundle: &Path, input: &Path, output: &Path) -> Command {
    let mut cmd = riskstream();
    cmd.args(["score", "--bundle"])
        .arg(bundle)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);
    cmd
}

/// Every line of a JSON-lines file, parsed.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids_of(path: &Path) -> Vec<String> {
    json_lines(path)
        .iter()
        .map(|v| v["tx_id"].as_str().unwrap().to_string())
        .collect()
}

/// Scores `input` with the default bundle and checks one verdict per event, in input order.
///
/// The sample stream holds events stamped up to four days before the newest event already seen
/// (stolen-card transactions crammed into one day), so the replay allows that much lateness;
/// with the default ten minutes those events go to the late output (see below).
fn assert_one_verdict_per_event(input: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("verdicts.jsonl");
    let dlq = dir.path().join("dlq.jsonl");
    let run = score(&repo("config/rules/default.yaml"), input, &output)
        .env("RISKSTREAM__TIME__ALLOWED_LATENESS", "5d")
        .arg("--dlq")
        .arg(&dlq)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let inputs = ids_of(input);
    let verdicts = ids_of(&output);
    assert_eq!(verdicts.len(), inputs.len());
    assert_eq!(verdicts, inputs, "one verdict per event, in order");
    assert_eq!(
        inputs.iter().collect::<HashSet<_>>().len(),
        inputs.len(),
        "fixture ids are unique"
    );
    assert_eq!(std::fs::read_to_string(&dlq).unwrap(), "");
    assert!(
        stderr.contains(&format!("events: {}", inputs.len())),
        "{stderr}"
    );
    assert!(stderr.contains("dead letters: 0"), "{stderr}");
    assert!(stderr.contains("events/s"), "{stderr}");

    // Every verdict has the fields of DESIGN.md section 6.
    let text = std::fs::read_to_string(&output).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for key in [
        "tx_id",
        "event_time",
        "decision",
        "score",
        "fired",
        "features",
        "rules_version",
        "late",
        "time_corrected",
        "processed_at",
        "latency_ms",
    ] {
        assert!(first.get(key).is_some(), "verdict lacks {key}: {first}");
    }
    assert!(first["features"]["ship_distance_km"].is_number());
}

#[test]
fn by_default_verdicts_list_the_features_of_the_rules_that_fired() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("verdicts.jsonl");
    let run = score(
        &repo("config/rules/default.yaml"),
        &repo("testdata/synccfd-slice.jsonl"),
        &output,
    )
    .env_remove("RISKSTREAM__VERDICT__FEATURES")
    .env("RISKSTREAM__TIME__ALLOWED_LATENESS", "5d")
    .output()
    .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // What each rule of the default bundle reads (config/rules/default.yaml).
    let reads = |rule: &str| -> &[&str] {
        match rule {
            "high_amount" | "very_high_amount" => &[],
            "cnp_shipped_elsewhere" | "large_cnp_shipped_elsewhere" => &["ship_distance_km"],
            "amount_spike" | "mild_amount_spike" => &["cust_tx_count_30d", "cust_avg_amount_30d"],
            "daily_velocity" => &["cust_tx_count_1d"],
            "terminal_burst" => &["term_tx_count_1h"],
            "far_terminal_large_amount" => &["terminal_distance_km"],
            other => panic!("a rule this test does not know: {other}"),
        }
    };
    let (mut with_features, mut without) = (0, 0);
    for v in json_lines(&output) {
        let listed: HashSet<&str> = v["features"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let expected: HashSet<&str> = v["fired"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| reads(h["rule_id"].as_str().unwrap()).iter().copied())
            .collect();
        assert_eq!(listed, expected, "{v}");
        if expected.is_empty() {
            without += 1;
        } else {
            with_features += 1;
        }
    }
    assert!(
        with_features > 0 && without > 0,
        "{with_features} {without}"
    );
}

#[test]
fn scores_the_committed_fixture() {
    assert_one_verdict_per_event(&repo("testdata/synccfd-slice.jsonl"));
}

#[test]
fn scores_the_whole_sample_when_present() {
    match shared_data() {
        Some(dir) => assert_one_verdict_per_event(&dir.join("synccfd-small/transactions.jsonl")),
        None => eprintln!("shared data not found; only the committed fixture was scored"),
    }
}

#[test]
fn bad_records_go_to_the_dead_letter_file_and_the_rest_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let fixture = std::fs::read_to_string(repo("testdata/synccfd-slice.jsonl")).unwrap();
    let good: Vec<&str> = fixture.lines().take(50).collect();
    let mut lines = Vec::new();
    for (i, g) in good.iter().enumerate() {
        lines.push(g.to_string());
        if i % 10 == 3 {
            lines.push(g.replace("\"amount\":", "\"amount\":null,\"x\":"));
            lines.push("{not json".to_string());
        }
    }
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let run = score(&repo("config/rules/default.yaml"), &input, &output)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(ids_of(&output).len(), 50);
    let dead = json_lines(&dir.path().join("out.jsonl.dlq.jsonl"));
    assert_eq!(dead.len(), 10);
    assert_eq!(dead[0]["reason"], "null_field");
    assert_eq!(dead[0]["offset"], 5, "line number of the bad record");
    assert_eq!(dead[0]["raw"].as_str().unwrap(), lines[4]);
    assert_eq!(dead[1]["reason"], "invalid_json");
    assert_eq!(dead[1]["raw"], "{not json");
}

#[test]
fn events_too_late_go_to_the_late_file_and_the_rest_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let event = |id: &str, ts: &str| {
        format!(
            r#"{{"tx_id":"{id}","ts":"2025-01-01T{ts}Z","customer_id":"c1","terminal_id":"t1","amount":10.0,"tx_type":"CP","bill_lat":1,"bill_lon":1,"term_lat":1,"term_lon":1,"ship_lat":1,"ship_lon":1}}"#
        )
    };
    let lines = [
        event("a", "10:00:00"),
        event("b", "10:20:00"),
        event("c", "10:19:59"), // 1 s behind the newest event: on time
        event("d", "10:15:00"), // 5 min behind: late, still scored
        event("e", "10:05:00"), // 15 min behind: beyond allowed_lateness (10 min)
        event("f", "10:21:00"),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let run = score(&repo("config/rules/default.yaml"), &input, &output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let verdicts = json_lines(&output);
    let scored: Vec<(&str, bool)> = verdicts
        .iter()
        .map(|v| (v["tx_id"].as_str().unwrap(), v["late"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        scored,
        [
            ("a", false),
            ("b", false),
            ("c", false),
            ("d", true),
            ("f", false)
        ]
    );
    // The late event is folded into state, the too-late one is not: `c` and `d` see `a` and
    // themselves (the others are newer); `f` sees a, b, c, d and itself, not `e`.
    let day_counts: Vec<i64> = verdicts
        .iter()
        .map(|v| v["features"]["cust_tx_count_1d"].as_i64().unwrap())
        .collect();
    assert_eq!(day_counts, [1, 2, 2, 2, 5]);
    let late = json_lines(&dir.path().join("out.jsonl.late.jsonl"));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["reason"], "too_late");
    assert_eq!(late[0]["offset"], 5);
    assert_eq!(late[0]["raw"].as_str().unwrap(), lines[4]);
    assert!(
        late[0]["detail"]
            .as_str()
            .unwrap()
            .contains("898000 ms behind the watermark"),
        "{}",
        late[0]
    );
    assert!(stderr.contains("too late (late output): 1"), "{stderr}");
}

#[test]
fn validate_reports_problems_by_rule() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "rules:\n  - {id: typo, when: \"amout > 1\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n",
    )
    .unwrap();
    let run = riskstream()
        .args(["validate", "--bundle"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(out.contains("rule `typo`: unknown column `amout`"), "{out}");

    let ok = riskstream()
        .args(["validate", "--bundle"])
        .arg(repo("config/rules/default.yaml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    // The compile time is reported.
    let ms: f64 = out
        .split("compiled in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no compile time in: {out}"));
    assert!(ms > 0.0, "{out}");
}

/// Verdicts of `riskstream score` by event id: (features, late flag).
fn verdict_features(path: &Path) -> Vec<(String, serde_json::Value)> {
    json_lines(path)
        .into_iter()
        .map(|v| {
            (
                v["tx_id"].as_str().unwrap().to_string(),
                serde_json::json!({"features": v["features"], "late": v["late"]}),
            )
        })
        .collect()
}

#[test]
fn a_restart_with_the_same_state_directory_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.yaml");
    std::fs::write(
        &bundle,
        std::fs::read_to_string(repo("testdata/synccfd-features.yaml")).unwrap()
            + "rules:\n  - {id: busy, when: \"cust_tx_count_1d > 5\", score: 50}\ndecision: {review_at: 40, block_at: 80}\n",
    )
    .unwrap();
    let fixture = std::fs::read_to_string(repo("testdata/synccfd-slice.jsonl")).unwrap();
    let lines: Vec<&str> = fixture.lines().collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    let write = |name: &str, lines: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };
    let all = write("all.jsonl", &lines);
    let first = write("first.jsonl", first);
    let second = write("second.jsonl", second);
    let run_with_state = |input: &Path, output: &str, state: &Path| {
        let output = dir.path().join(output);
        let run = score(&bundle, input, &output)
            .env("RISKSTREAM__TIME__ALLOWED_LATENESS", "5d")
            .arg("--state")
            .arg(state)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        verdict_features(&output)
    };
    let uninterrupted = run_with_state(&all, "all.out", &dir.path().join("state-a"));
    let restarted = dir.path().join("state-b");
    let mut resumed = run_with_state(&first, "first.out", &restarted);
    resumed.extend(run_with_state(&second, "second.out", &restarted));
    assert_eq!(resumed.len(), uninterrupted.len());
    for (a, b) in uninterrupted.iter().zip(&resumed) {
        assert_eq!(a, b, "restart changed the verdict of {}", a.0);
    }
    // The second run really started from stored state: its first customers have history.
    let fresh = run_with_state(&second, "fresh.out", &dir.path().join("state-c"));
    assert_ne!(fresh, resumed[first_len(&lines)..].to_vec());
}

fn first_len(lines: &[&str]) -> usize {
    lines.len() / 2
}

#[test]
fn state_report_counts_every_log_of_a_scored_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = repo("testdata/w2/w2.toml");
    let bundle = repo("testdata/w2/w2.yaml");
    let input = repo("testdata/w2/w2-slice.jsonl");
    let with_config = |command: &str| {
        let mut cmd = riskstream();
        cmd.arg("--config")
            .arg(&config)
            .args([command, "--bundle"])
            .arg(&bundle)
            .arg("--state")
            .arg(&state);
        cmd
    };
    let run = with_config("score")
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("v.jsonl"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let report = with_config("state-report").output().unwrap();
    let out = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&report.stderr)
    );
    // The slice spans minutes: every log still holds every event that passed its filter.
    let events = json_lines(&input);
    let cnp = events.iter().filter(|e| e["tx_type"] == "CNP").count();
    let customers: HashSet<&str> = events
        .iter()
        .filter_map(|e| e["customer_id"].as_str())
        .collect();
    let row = |name: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with("  "))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{out}"))[name.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // fields, windows, keys, events, MB, bytes/event
    let customer = row("customer_id");
    assert_eq!(customer[2], customers.len().to_string(), "{out}");
    assert_eq!(customer[3], events.len().to_string(), "{out}");
    assert_eq!(
        row("terminal_id where tx_type = 'CNP'")[3],
        cnp.to_string(),
        "{out}"
    );
    assert!(!out.contains("(not in this bundle)"), "{out}");

    // Not a state directory: a message, not a new empty database.
    let missing = riskstream()
        .args(["state-report", "--state"])
        .arg(dir.path().join("nothing"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is not a state directory"));
    assert!(!dir.path().join("nothing").exists());
}

//! The admin API's answers to bad requests (invalid bundles of every kind, oversized bodies,
//! missing tokens, stale and missing versions), concurrent updates, rollback and backtests.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::BaseRecord;

const TOKEN: &str = "s3cret-token";

fn token_config(
    broker: &riskstream_kafka::EmbeddedBroker,
) -> TestResult<riskstream_common::Config> {
    config(
        broker,
        &format!(
            "token = \"{TOKEN}\"\nmax_body_bytes = 4096\n[kafka.topics]\nlabels = \"labels\"\n"
        ),
    )
}

/// The `[admin]` lines of [`token_config`], for [`LocalApi`].
fn local_admin() -> String {
    format!("token = \"{TOKEN}\"\nmax_body_bytes = 4096")
}

/// Asserts a 4xx error body whose problems name `subject` (kind, name) and mention `words`.
fn assert_problem(status: u16, body: &serde_json::Value, kind: &str, name: &str, words: &[&str]) {
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "invalid_bundle", "{body}");
    let problems = body["problems"].as_array().cloned().unwrap_or_default();
    let found = problems.iter().any(|p| {
        p["subject"]["kind"] == kind
            && (name.is_empty() || p["subject"]["name"] == name)
            && words
                .iter()
                .all(|w| p["message"].as_str().unwrap_or("").contains(w))
    });
    assert!(
        found,
        "no problem about {kind} `{name}` mentioning {words:?}: {body}"
    );
}

#[test]
fn invalid_bundles_are_refused_naming_rule_and_problem_and_the_running_version_stays() -> TestResult
{
    // The router over one process's rules: what is checked here needs no broker.
    let api = LocalApi::start(&local_admin(), &bundle(101))?;
    let client = http()?;
    let base = &api.base;
    let put = |text: &str| put_rules(&client, base, text, Some(1), Some(TOKEN));
    let decision = "decision: {review_at: 40, block_at: 80}\n";

    // Syntax.
    let (status, body) = put("rules: [ {id: a, when: \"amount > 1\"")?;
    assert_problem(status, &body, "document", "", &[]);
    // Unknown column.
    let (status, body) = put(&format!(
        "rules:\n  - {{id: r1, when: \"amount_usd > 5\", score: 10}}\n{decision}"
    ))?;
    assert_problem(status, &body, "rule", "r1", &["amount_usd"]);
    // Type error.
    let (status, body) = put(&format!(
        "rules:\n  - {{id: r2, when: \"amount + 'x'\", score: 10}}\n{decision}"
    ))?;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("r2"),
        "{body}"
    );
    // A null where a value is required.
    let (status, body) = put(&format!(
        "rules:\n  - {{id: r3, when: null, score: 10}}\n{decision}"
    ))?;
    assert_problem(status, &body, "rule", "r3", &["when"]);
    // Duplicate id.
    let (status, body) = put(&format!(
        "rules:\n  - {{id: dup, when: \"amount > 1\", score: 10}}\n  - {{id: dup, when: \"amount > 2\", score: 10}}\n{decision}"
    ))?;
    assert_problem(status, &body, "rule", "dup", &["duplicate"]);
    // Oversized body (admin.max_body_bytes = 4096).
    let big = format!("# {}\n{}", "x".repeat(5000), bundle(5));
    let (status, body) = put(&big)?;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "body_too_large", "{body}");
    // Not UTF-8.
    let response = client
        .put(format!("{base}/api/v1/rules"))
        .header("if-match", "\"1\"")
        .bearer_auth(TOKEN)
        .body(vec![0xff, 0xfe, 0x00])
        .send()?;
    assert_eq!(response.status().as_u16(), 400);

    // `validate` answers alike without publishing.
    let response = client
        .post(format!("{base}/api/v1/rules/validate"))
        .bearer_auth(TOKEN)
        .body(format!(
            "rules:\n  - {{id: r9, when: \"nope > 1\", score: 1}}\n{decision}"
        ))
        .send()?;
    assert_eq!(response.status().as_u16(), 422);
    let body: serde_json::Value = response.json()?;
    assert_problem(422, &body, "rule", "r9", &["nope"]);
    let response = client
        .post(format!("{base}/api/v1/rules/validate"))
        .bearer_auth(TOKEN)
        .body(bundle(7))
        .send()?;
    assert_eq!(response.status().as_u16(), 200);

    // Nothing of the above changed what runs.
    let (_, rules) = get_json(&client, base, "/api/v1/rules")?;
    assert_eq!(rules["version"], 1);
    assert_eq!(rules["bundle"], bundle(101));
    let (_, versions) = get_json(&client, base, "/api/v1/rules/versions")?;
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(1));
    assert_eq!(api.plane.version(), 1);
    Ok(())
}

#[test]
fn mutations_need_the_token_and_if_match() -> TestResult {
    let api = LocalApi::start(&local_admin(), &bundle(101))?;
    let client = http()?;
    let base = &api.base;

    let (status, body) = put_rules(&client, base, &bundle(5), Some(1), None)?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unauthorized");
    let (status, _) = put_rules(&client, base, &bundle(5), Some(1), Some("s3cret-tokem"))?;
    assert_eq!(status, 401);
    let (status, _) = put_rules(&client, base, &bundle(5), Some(1), Some("s3cret"))?;
    assert_eq!(status, 401);
    for path in [
        "/api/v1/rules/validate",
        "/api/v1/rules/rollback/1",
        "/api/v1/rules/backtest",
    ] {
        let response = client
            .post(format!("{base}{path}"))
            .body(bundle(5))
            .send()?;
        assert_eq!(response.status().as_u16(), 401, "{path}");
    }
    // Reads need no token.
    let (status, _) = get_json(&client, base, "/api/v1/rules")?;
    assert_eq!(status, 200);
    // No If-Match: 428, and nothing changes.
    let (status, body) = put_rules(&client, base, &bundle(5), None, Some(TOKEN))?;
    assert_eq!(status, 428, "{body}");
    let response = client
        .put(format!("{base}/api/v1/rules"))
        .header("if-match", "latest")
        .bearer_auth(TOKEN)
        .body(bundle(5))
        .send()?;
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(api.plane.version(), 1);
    // The token does not leak into anything the API shows.
    let (_, status) = get_json(&client, base, "/api/v1/status")?;
    assert!(!status.to_string().contains(TOKEN));
    // With the token and the running version, the update applies; the same If-Match again
    // is stale (409), and a rollback needs the current version too.
    let (status, body) = put_rules(&client, base, &bundle(5), Some(1), Some(TOKEN))?;
    assert_eq!(
        (status, &body["version"]),
        (200, &serde_json::json!(2)),
        "{body}"
    );
    let (status, body) = put_rules(&client, base, &bundle(6), Some(1), Some(TOKEN))?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(api.plane.version(), 2);
    let response = client
        .post(format!("{base}/api/v1/rules/rollback/1"))
        .header("if-match", "\"2\"")
        .bearer_auth(TOKEN)
        .send()?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(api.plane.version(), 3);
    let (_, rules) = get_json(&client, base, "/api/v1/rules")?;
    assert_eq!(rules["bundle"], bundle(101));
    Ok(())
}

#[test]
fn readiness_says_how_far_a_restore_is_and_turns_ready_after_it() -> TestResult {
    let api = LocalApi::start("", &bundle(101))?;
    let client = http()?;
    api.status.update(|s| {
        s.restoring = Some(riskstream_checkpoint::RestoreProgress {
            checkpoint: 7,
            files: 1,
            of_files: 3,
            bytes: 2_000_000,
            of_bytes: 6_000_000,
        })
    });
    let (status, body) = get_json(&client, &api.base, "/readyz")?;
    assert_eq!(status, 503, "{body}");
    let waiting: Vec<&str> = body["waiting_for"]
        .as_array()
        .ok_or("no waiting_for")?
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    assert!(
        waiting.contains(&"restoring feature state from checkpoint 7: 1 of 3 files, 2.0 of 6.0 MB"),
        "{body}"
    );
    let (_, status_body) = get_json(&client, &api.base, "/api/v1/status")?;
    assert_eq!(
        status_body["pipeline"]["restoring"]["of_files"], 3,
        "{status_body}"
    );
    // Restored, and a partition owned: ready.
    api.status.update(|s| {
        s.restoring = None;
        s.state_restored = true;
        s.partitions.insert(
            0,
            riskstream_pipeline::PartitionStatus {
                assigned: true,
                ..Default::default()
            },
        );
    });
    let (status, body) = get_json(&client, &api.base, "/readyz")?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

#[test]
fn concurrent_updates_naming_one_version_have_exactly_one_winner_then_stale_gets_409() -> TestResult
{
    let broker = broker()?;
    let instance = Instance::start(&token_config(&broker)?, &bundle(101), false)?;
    let client = http()?;
    let base = instance.base.clone();
    const N: u32 = 8;
    let updates: Vec<(String, String)> = (0..N).map(|i| (base.clone(), bundle(200 + i))).collect();
    let results: Vec<u16> = concurrent_puts(&client, &updates, 1, Some(TOKEN))?
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    assert_eq!(
        results.iter().filter(|s| **s == 200).count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|s| **s == 409).count(),
        N as usize - 1,
        "{results:?}"
    );
    assert_eq!(instance.rules().version(), 2);

    // A stale update later: 409 naming both versions, nothing changes.
    let (status, body) = put_rules(&client, &base, &bundle(300), Some(1), Some(TOKEN))?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["expected"], 1);
    assert_eq!(body["current"], 2);
    assert_eq!(instance.rules().version(), 2);

    // Rollback publishes version 1's bundle as version 3; every version stays retrievable.
    let response = client
        .post(format!("{base}/api/v1/rules/rollback/1"))
        .bearer_auth(TOKEN)
        .send()?;
    assert_eq!(response.status().as_u16(), 200);
    let (_, rules) = get_json(&client, &base, "/api/v1/rules")?;
    assert_eq!(rules["version"], 3);
    assert_eq!(rules["bundle"], bundle(101));
    assert_eq!(rules["comment"], "rollback to version 1");
    assert_eq!(
        rules["document"]["rules"][0]["id"], "high_amount",
        "{rules}"
    );
    assert_eq!(
        rules["document"]["rules"][0]["when"], "amount > 101",
        "{rules}"
    );
    let (_, versions) = get_json(&client, &base, "/api/v1/rules/versions")?;
    let numbers: Vec<u64> = versions["versions"]
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["version"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(numbers, [1, 2, 3]);
    let (status, v2) = get_json(&client, &base, "/api/v1/rules/versions/2")?;
    assert_eq!(status, 200);
    assert!(
        v2["bundle"].as_str().unwrap_or("").contains("amount > 2"),
        "{v2}"
    );
    let (status, body) = get_json(&client, &base, "/api/v1/rules/versions/9")?;
    assert_eq!(status, 404, "{body}");
    let response = client
        .post(format!("{base}/api/v1/rules/rollback/9"))
        .bearer_auth(TOKEN)
        .send()?;
    assert_eq!(response.status().as_u16(), 404);
    instance.stop()?;
    Ok(())
}

#[test]
fn a_backtest_reports_hits_changed_decisions_and_label_quality_without_changing_anything(
) -> TestResult {
    let broker = broker()?;
    let instance = Instance::start(&token_config(&broker)?, &bundle(150), false)?;
    let client = http()?;
    instance.wait_ready(&client)?;
    let base = &instance.base;

    // An empty buffer: nothing to backtest yet.
    let response = client
        .post(format!("{base}/api/v1/rules/backtest"))
        .bearer_auth(TOKEN)
        .body(bundle(100))
        .send()?;
    assert_eq!(response.status().as_u16(), 409);

    // 200 events, amounts 0..199; labels say the ones above 120 are fraud.
    let producer = producer(&broker)?;
    for i in 0..200u32 {
        let id = format!("bt-{i:03}");
        if i > 120 {
            let label = format!(r#"{{"tx_id":"{id}","fraud":true}}"#);
            producer
                .send(BaseRecord::<(), str>::to("labels").payload(label.as_str()))
                .map_err(|(e, _)| e)?;
        } else if i % 2 == 0 {
            let label = format!(r#"{{"tx_id":"{id}","fraud":false}}"#);
            producer
                .send(BaseRecord::<(), str>::to("labels").payload(label.as_str()))
                .map_err(|(e, _)| e)?;
        }
        send(
            &producer,
            (i % 4) as i32,
            &event(&id, now_ms(), f64::from(i)),
        );
    }
    flush(&producer)?;
    read_verdicts(&broker, 200)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while instance.recent().len() < 200 {
        assert!(Instant::now() < deadline, "events not buffered");
        std::thread::sleep(Duration::from_millis(20));
    }
    while instance.labels().len() < 140 {
        assert!(Instant::now() < deadline, "labels not consumed");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Candidate: threshold 100 instead of 150.
    let response = client
        .post(format!("{base}/api/v1/rules/backtest"))
        .bearer_auth(TOKEN)
        .body(bundle(100))
        .send()?;
    assert_eq!(response.status().as_u16(), 200);
    let report: serde_json::Value = response.json()?;
    assert_eq!(report["active_version"], 1, "{report}");
    assert_eq!(report["events"], 200, "{report}");
    // amount > 100: 99 events (101..199); amount > 150: 49 (151..199).
    assert_eq!(report["rules"][0]["id"], "high_amount");
    assert_eq!(report["rules"][0]["hits"], 99, "{report}");
    assert_eq!(report["rules"][0]["active_hits"], 49, "{report}");
    assert_eq!(report["rules"][1]["id"], "tiny");
    assert_eq!(report["rules"][1]["mode"], "shadow");
    assert_eq!(report["rules"][1]["hits"], 1, "{report}"); // amount 0
    assert_eq!(report["changed"]["allow->review"], 50, "{report}");
    assert_eq!(report["changed_total"], 50, "{report}");
    // Labels: 79 fraud (121..199) and 61 genuine (even ids up to 120).
    assert_eq!(report["labels"]["labelled"], 79 + 61, "{report}");
    assert_eq!(report["labels"]["fraud"], 79, "{report}");
    let candidate = &report["labels"]["candidate"];
    // Flagged > 100: fraud 121..199 (79), genuine even 102..120 (10).
    assert_eq!(candidate["true_positives"], 79, "{report}");
    assert_eq!(candidate["false_positives"], 10, "{report}");
    assert_eq!(candidate["recall"], 1.0, "{report}");
    let active = &report["labels"]["active"];
    assert_eq!(active["true_positives"], 49, "{report}");
    assert_eq!(active["false_negatives"], 30, "{report}");
    assert_eq!(active["precision"], 1.0, "{report}");

    // Only the events a `where` filter selects: amounts 100..199.
    let response = client
        .post(format!("{base}/api/v1/rules/backtest"))
        .query(&[("where", "amount >= 100")])
        .bearer_auth(TOKEN)
        .body(bundle(100))
        .send()?;
    assert_eq!(response.status().as_u16(), 200);
    let report: serde_json::Value = response.json()?;
    assert_eq!(report["events"], 100, "{report}");
    assert_eq!(report["rules"][0]["hits"], 99, "{report}");
    assert_eq!(report["rules"][1]["hits"], 0, "{report}");
    let response = client
        .post(format!("{base}/api/v1/rules/backtest"))
        .query(&[("where", "no_such_field > 1")])
        .bearer_auth(TOKEN)
        .body(bundle(100))
        .send()?;
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json()?;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("no_such_field"),
        "{body}"
    );

    // A candidate with a windowed feature the running bundle does not compute is refused.
    let with_feature = format!(
        "features:\n  - {{name: cust_count_1h, entity: customer_id, agg: count, window: 1h}}\n{}",
        bundle(100)
    );
    let response = client
        .post(format!("{base}/api/v1/rules/backtest"))
        .bearer_auth(TOKEN)
        .body(with_feature)
        .send()?;
    assert_eq!(response.status().as_u16(), 422);
    let body: serde_json::Value = response.json()?;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("cust_count_1h"),
        "{body}"
    );
    // Backtests change nothing.
    assert_eq!(instance.rules().version(), 1);
    instance.stop()?;
    Ok(())
}

#[test]
fn an_update_during_a_broker_outage_answers_503_and_applies_once_the_broker_is_back() -> TestResult
{
    let broker = broker()?;
    let config = config(&broker, "publish_timeout = \"1s\"")?;
    let instance = Instance::start(&config, &bundle(101), false)?;
    let client = http()?;
    let base = &instance.base;

    broker.down(1)?;
    let (status, body) = put_rules(&client, base, &bundle(120), Some(1), None)?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "control_topic", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("may still apply"),
        "{body}"
    );
    assert_eq!(instance.rules().version(), 1);
    // Reads keep working from what this instance knows.
    let (status, rules) = get_json(&client, base, "/api/v1/rules")?;
    assert_eq!((status, rules["version"].as_u64()), (200, Some(1)));

    // Back up: the queued update reaches the log and applies, as the 503 warned; an update
    // naming the old version is now stale.
    broker.up(1)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while instance.rules().version() != 2 {
        assert!(Instant::now() < deadline, "the queued update never applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, rules) = get_json(&client, base, "/api/v1/rules")?;
    assert_eq!(rules["bundle"], bundle(120));
    let (status, body) = put_rules(&client, base, &bundle(130), Some(1), None)?;
    assert_eq!(status, 409, "{body}");
    let (status, body) = put_rules(&client, base, &bundle(130), Some(2), None)?;
    assert_eq!(status, 200, "{body}");
    instance.stop()?;
    Ok(())
}

#[test]
fn the_served_openapi_document_describes_the_routes_the_api_has() -> TestResult {
    let broker = broker()?;
    let instance = Instance::start(&token_config(&broker)?, &bundle(101), false)?;
    let client = http()?;
    let base = &instance.base;
    let response = client.get(format!("{base}/api/v1/openapi.yaml")).send()?;
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text()?;
    assert_eq!(text, riskstream_admin::OPENAPI);
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let paths = doc["paths"].as_mapping().ok_or("no paths")?;
    assert!(paths.len() >= 12, "{} paths", paths.len());
    for (path, operations) in paths {
        let path = path
            .as_str()
            .ok_or("path not a string")?
            .replace("{version}", "1");
        for method in operations.as_mapping().ok_or("no operations")?.keys() {
            let method = method.as_str().unwrap_or("").to_uppercase();
            let request = match method.as_str() {
                "GET" => client.get(format!("{base}{path}")),
                "PUT" => client
                    .put(format!("{base}{path}"))
                    .header("if-match", "\"99\""),
                "POST" => client.post(format!("{base}{path}")),
                other => return Err(format!("unexpected method {other}").into()),
            };
            let response = request.bearer_auth(TOKEN).body(bundle(5)).send()?;
            let status = response.status().as_u16();
            let body = response.text()?;
            // The route exists (the fallback answers `not_found`; a wrong method, 405).
            assert!(
                status != 405 && !body.contains("\"not_found\""),
                "{method} {path}: {status} {body}"
            );
        }
    }
    // And a path it does not document is unknown.
    let (status, body) = get_json(&client, base, "/api/v1/nope")?;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    instance.stop()?;
    Ok(())
}

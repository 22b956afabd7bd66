//! `/metrics` serves every series of DESIGN.md section 9 (checkpoints excepted: they do not
//! exist yet), and the values move with what the pipeline did.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// Parses the Prometheus text format into `name{labels}` → value.
fn scrape(client: &Http, base: &str) -> TestResult<BTreeMap<String, f64>> {
    let response = client.get(format!("{base}/metrics")).send()?;
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text()?;
    let mut series = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        if let Some((key, value)) = line.rsplit_once(' ') {
            series.insert(key.to_string(), value.parse::<f64>()?);
        }
    }
    Ok(series)
}

/// The sum of every series of metric `name` whose labels include all of `labels`.
fn sum(series: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    let matching: Vec<f64> = series
        .iter()
        .filter(|(k, _)| {
            let (metric, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
            metric == name && labels.iter().all(|l| rest.contains(l))
        })
        .map(|(_, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

#[test]
fn metrics_list_every_series_and_count_what_happened() -> TestResult {
    // Before anything registers a metric.
    riskstream_admin::telemetry::prometheus()?;
    let broker = broker()?;
    // A state directory that is kept: periodic flushes go only there.
    let state = tempfile::tempdir()?;
    let config = config(
        &broker,
        &format!(
            "[time]\nidle_timeout = \"100ms\"\n[state]\ndir = {:?}\nflush_interval = \"100ms\"\n",
            state.path().join("state")
        ),
    )?;
    let instance = Instance::start(&config, &bundle(101), true)?;
    let client = http()?;
    instance.wait_ready(&client)?;
    let base = &instance.base;

    // 100 events now (40 above the threshold), 2 stamped an hour ahead (clamped), 3 malformed.
    let producer = producer(&broker)?;
    let now = now_ms();
    for i in 0..100u32 {
        let amount = if i < 40 { 500.0 } else { 20.0 };
        send(
            &producer,
            (i % 2) as i32,
            &event(&format!("m-{i:03}"), now, amount),
        );
    }
    send(&producer, 0, &event("future-1", now + 3_600_000, 20.0));
    send(&producer, 1, &event("future-2", now + 3_600_000, 20.0));
    for bad in [r#"{"tx_id":"x1""#, "not json", r#"{"tx_id":"x3","ts":1}"#] {
        send(&producer, 0, bad);
    }
    flush(&producer)?;
    read_verdicts(&broker, 102)?;
    // Then 2 events late within allowed_lateness (5 min) and 2 beyond it (1 h).
    for (id, ts) in [
        ("late-ok-1", now - 300_000),
        ("late-ok-2", now - 300_000),
        ("late-no-1", now - 3_600_000),
        ("late-no-2", now - 3_600_000),
    ] {
        send(&producer, 0, &event(id, ts, 20.0));
    }
    flush(&producer)?;
    read_verdicts(&broker, 104)?;
    // One rules update.
    let (status, body) = put_rules(&client, base, &bundle(300), Some(1), None)?;
    assert_eq!(status, 200, "{body}");

    // Statistics (consumer lag) arrive once a second; the state flush every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(15);
    let series = loop {
        let series = scrape(&client, base)?;
        let scored = sum(&series, "riskstream_events_total", &["outcome=\"scored\""]);
        if scored == Some(104.0)
            && sum(&series, "riskstream_consumer_lag", &[]).is_some()
            && sum(&series, "riskstream_state_flush_seconds_count", &[]).unwrap_or(0.0) > 0.0
        {
            break series;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not settle: {series:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let get = |name: &str, labels: &[&str]| {
        sum(&series, name, labels).unwrap_or_else(|| panic!("no series {name} {labels:?}"))
    };

    // Events in, per topic/partition/outcome.
    assert_eq!(
        get(
            "riskstream_events_total",
            &[
                "topic=\"transactions\"",
                "partition=\"0\"",
                "outcome=\"scored\""
            ]
        ),
        50.0 + 1.0 + 2.0
    );
    assert_eq!(
        get(
            "riskstream_events_total",
            &["partition=\"1\"", "outcome=\"scored\""]
        ),
        50.0 + 1.0
    );
    assert_eq!(get("riskstream_events_total", &["outcome=\"late\""]), 2.0);
    assert_eq!(get("riskstream_events_total", &["outcome=\"dlq\""]), 3.0);
    // Verdicts by decision.
    assert_eq!(
        get("riskstream_verdicts_total", &["decision=\"review\""]),
        40.0
    );
    assert_eq!(
        get("riskstream_verdicts_total", &["decision=\"allow\""]),
        64.0
    );
    assert_eq!(
        get("riskstream_verdicts_total", &["decision=\"block\""]),
        0.0
    );
    // Hits per rule and mode.
    assert_eq!(
        get(
            "riskstream_rule_hits_total",
            &["rule=\"high_amount\"", "mode=\"active\""]
        ),
        40.0
    );
    assert_eq!(
        get(
            "riskstream_rule_hits_total",
            &["rule=\"tiny\"", "mode=\"shadow\""]
        ),
        0.0
    );
    // Event-to-verdict latency histogram.
    assert_eq!(get("riskstream_event_to_verdict_seconds_count", &[]), 104.0);
    assert!(
        get(
            "riskstream_event_to_verdict_seconds_bucket",
            &["le=\"+Inf\""]
        ) >= 104.0
    );
    // Watermark lag and consumer lag.
    let lag = get("riskstream_watermark_lag_seconds", &[]);
    assert!((0.0..3600.0).contains(&lag), "watermark lag {lag}");
    assert_eq!(
        get(
            "riskstream_consumer_lag",
            &["topic=\"transactions\"", "partition=\"0\""]
        ),
        0.0
    );
    // Late events and clock-skew corrections.
    assert_eq!(
        get("riskstream_late_events_total", &["outcome=\"scored\""]),
        2.0
    );
    assert_eq!(
        get("riskstream_late_events_total", &["outcome=\"late_output\""]),
        2.0
    );
    assert_eq!(
        get(
            "riskstream_clock_skew_corrections_total",
            &["policy=\"clamp\""]
        ),
        2.0
    );
    // Dead letters by reason.
    assert_eq!(
        get("riskstream_dlq_total", &["reason=\"invalid_json\""]),
        2.0
    );
    assert_eq!(
        get("riskstream_dlq_total", &["reason=\"missing_field\""]),
        1.0
    );
    // State writes (checkpoints are not implemented yet; the state flush is what exists).
    assert!(get("riskstream_state_flush_seconds_count", &[]) >= 1.0);
    // Rules version and reloads.
    assert_eq!(get("riskstream_rules_version", &[]), 2.0);
    // The group gave this instance every transactions partition.
    assert!(get("riskstream_rebalances_total", &["event=\"assigned\""]) >= 1.0);
    assert!(
        get(
            "riskstream_rebalance_partitions_total",
            &["event=\"assigned\""]
        ) >= f64::from(TRANSACTIONS_PARTITIONS)
    );
    assert_eq!(
        get("riskstream_rules_reloads_total", &["outcome=\"applied\""]),
        1.0
    );
    assert_eq!(
        get("riskstream_rules_reloads_total", &["outcome=\"conflict\""]),
        0.0
    );

    // The status endpoint agrees.
    let (_, status) = get_json(&client, base, "/api/v1/status")?;
    assert_eq!(status["pipeline"]["events"], 104, "{status}");
    assert_eq!(
        status["pipeline"]["partitions"]["0"]["assigned"], true,
        "{status}"
    );
    assert_eq!(status["pipeline"]["partitions"]["0"]["lag"], 0, "{status}");
    assert_eq!(
        status["pipeline"]["partitions"]["0"]["high_watermark"],
        50 + 1 + 3 + 4,
        "{status}"
    );
    assert!(
        status["pipeline"]["watermark_ms"].as_i64().is_some(),
        "{status}"
    );
    instance.stop()?;
    Ok(())
}

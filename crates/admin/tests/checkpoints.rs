//! Checkpoints through the admin API: on demand (201 with the manifest, 401 without the
//! token, 409 when an instance takes none), listed, reported in `/status`; a clean stop leaves a
//! checkpoint covering everything read, and the next instance restores it and scores only what
//! came after.

mod common;

use common::*;

const TOKEN: &str = "cp-token";

/// The records a checkpoint covers: its offsets summed over partitions (every partition here
/// starts at 0).
fn records_covered(checkpoint: &serde_json::Value) -> TestResult<i64> {
    Ok(checkpoint["offsets"]
        .as_object()
        .ok_or("no offsets")?
        .values()
        .filter_map(serde_json::Value::as_i64)
        .sum())
}

#[test]
fn checkpoints_on_demand_are_listed_and_a_restart_continues_from_the_last_one() -> TestResult {
    let broker = broker()?;
    let store = tempfile::tempdir()?;
    let config = common::config(
        &broker,
        &format!(
            "token = \"{TOKEN}\"\n[checkpoint]\nurl = \"{}\"\ninterval = \"1h\"\nname = \"one\"\n",
            store.path().display()
        ),
    )?;
    // The next instance joins the group as this one leaves: a short session lets the broker
    // settle the group quickly.
    let mut config = config;
    for (k, v) in [
        ("session.timeout.ms", "3000"),
        ("heartbeat.interval.ms", "300"),
    ] {
        config.kafka.consumer.insert(k.into(), v.into());
    }
    let instance = Instance::start(&config, &bundle(100), false)?;
    let client = http()?;
    let base = instance.base.clone();
    if let Err(e) = instance.wait_ready(&client) {
        return Err(format!("{e}; the pipeline: {:?}", instance.stop().map(|_| ())).into());
    }

    let producer = producer(&broker)?;
    let t0 = now_ms();
    for i in 0..100 {
        send(
            &producer,
            i % TRANSACTIONS_PARTITIONS,
            &event(&format!("a{i}"), t0 + i as i64, 50.0),
        );
    }
    flush(&producer)?;
    assert_eq!(read_verdicts(&broker, 100)?.len(), 100);

    let response = client.post(format!("{base}/api/v1/checkpoints")).send()?;
    assert_eq!(response.status().as_u16(), 401);
    let response = client
        .post(format!("{base}/api/v1/checkpoints"))
        .bearer_auth(TOKEN)
        .send()?;
    assert_eq!(response.status().as_u16(), 201);
    let taken: serde_json::Value = response.json()?;
    let offsets = records_covered(&taken)?;
    assert_eq!(offsets, 100, "{taken}");
    assert!(taken["bytes_total"].as_u64() > Some(0), "{taken}");

    let (status, listed) = get_json(&client, &base, "/api/v1/checkpoints")?;
    assert_eq!(status, 200);
    let first = &listed["checkpoints"][0];
    assert_eq!(first["id"], taken["id"], "{listed}");
    assert_eq!(first["complete"], true);
    let (_, status) = get_json(&client, &base, "/api/v1/status")?;
    assert_eq!(status["last_checkpoint"]["id"], taken["id"], "{status}");

    // A clean stop checkpoints everything read; the next instance restores it.
    instance.stop()?;
    let instance = Instance::start(&config, &bundle(100), false)?;
    instance.wait_ready(&client)?;
    let (_, status) = get_json(&client, &instance.base, "/api/v1/status")?;
    let restored = status["last_checkpoint"]["id"]
        .as_u64()
        .ok_or("no checkpoint")?;
    assert!(restored > taken["id"].as_u64().ok_or("id")?, "{status}");
    for i in 0..10 {
        send(
            &producer,
            i % TRANSACTIONS_PARTITIONS,
            &event(&format!("b{i}"), t0 + 200 + i as i64, 50.0),
        );
    }
    flush(&producer)?;
    let verdicts = read_verdicts(&broker, 110)?;
    assert_eq!(verdicts.len(), 110);
    let repeated: Vec<_> = verdicts.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        repeated.is_empty(),
        "scored again after a clean restart: {repeated:?}"
    );
    instance.stop()?;
    Ok(())
}

#[test]
fn an_instance_without_checkpoints_says_so() -> TestResult {
    let broker = broker()?;
    let instance = Instance::start(&config(&broker, "")?, &bundle(100), false)?;
    let client = http()?;
    let response = client
        .post(format!("{}/api/v1/checkpoints", instance.base))
        .send()?;
    assert_eq!(response.status().as_u16(), 409);
    let body: serde_json::Value = response.json()?;
    assert_eq!(body["error"], "checkpoints_off", "{body}");
    let (status, _) = get_json(&client, &instance.base, "/api/v1/checkpoints")?;
    assert_eq!(status, 409);
    instance.stop()?;
    Ok(())
}

#[test]
fn exactly_once_recovery_passes_over_a_checkpoint_whose_transaction_did_not_commit() -> TestResult {
    let broker = broker()?;
    let store = tempfile::tempdir()?;
    let mut config = common::config(
        &broker,
        &format!(
            "[checkpoint]\nurl = \"{}\"\ninterval = \"1h\"\nname = \"eos\"\n",
            store.path().display()
        ),
    )?;
    config.kafka.delivery = riskstream_common::Delivery::ExactlyOnce;
    for (k, v) in [
        ("session.timeout.ms", "3000"),
        ("heartbeat.interval.ms", "300"),
    ] {
        config.kafka.consumer.insert(k.into(), v.into());
    }
    let instance = Instance::start(&config, &bundle(100), false)?;
    let client = http()?;
    instance.wait_ready(&client)?;
    let producer = producer(&broker)?;
    let t0 = now_ms();
    for i in 0..40 {
        send(
            &producer,
            i % TRANSACTIONS_PARTITIONS,
            &event(&format!("e{i}"), t0 + i as i64, 50.0),
        );
    }
    flush(&producer)?;
    assert_eq!(read_verdicts(&broker, 40)?.len(), 40);
    let response = client
        .post(format!("{}/api/v1/checkpoints", instance.base))
        .send()?;
    assert_eq!(response.status().as_u16(), 201);
    let first: serde_json::Value = response.json()?;
    let first = first["id"].as_u64().ok_or("id")?;
    instance.stop()?;

    // Every checkpoint's transaction committed, and each is marked so.
    let checkpoints = store.path().join("eos").join("checkpoints");
    let newest = std::fs::read_dir(&checkpoints)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .ok_or("no checkpoint")?;
    assert!(newest > first);
    for id in [first, newest] {
        assert!(checkpoints.join(id.to_string()).join("committed").exists());
    }
    // As if the instance had died between the newest manifest and its commit: no mark. (The
    // embedded broker does not keep offsets committed inside transactions, so the group's
    // offsets cannot vouch for the commit either; on a real cluster they would, had it
    // committed.)
    std::fs::remove_file(checkpoints.join(newest.to_string()).join("committed"))?;
    let instance = Instance::start(&config, &bundle(100), false)?;
    instance.wait_ready(&client)?;
    let (_, status) = get_json(&client, &instance.base, "/api/v1/status")?;
    assert_eq!(
        status["last_checkpoint"]["id"].as_u64(),
        Some(first),
        "{status}"
    );
    instance.stop()?;
    Ok(())
}

#[test]
fn scoring_goes_on_while_checkpoint_storage_fails_and_checkpoints_resume_once_it_is_back(
) -> TestResult {
    let broker = broker()?;
    let store = tempfile::tempdir()?;
    let config = common::config(
        &broker,
        &format!(
            "[checkpoint]\nurl = \"{}\"\ninterval = \"1h\"\nname = \"flaky\"\n",
            store.path().display()
        ),
    )?;
    let instance = Instance::start(&config, &bundle(100), false)?;
    let client = http()?;
    instance.wait_ready(&client)?;
    let producer = producer(&broker)?;
    let t0 = now_ms();
    let produce = |from: usize, to: usize| -> TestResult {
        for i in from..to {
            send(
                &producer,
                i as i32 % TRANSACTIONS_PARTITIONS,
                &event(&format!("f{i}"), t0 + i as i64, 50.0),
            );
        }
        flush(&producer)
    };
    produce(0, 20)?;
    assert_eq!(read_verdicts(&broker, 20)?.len(), 20);

    // The storage breaks: a file where the SST directory should be.
    let blocker = store.path().join("flaky").join("sst");
    std::fs::create_dir_all(store.path().join("flaky"))?;
    std::fs::write(&blocker, b"not a directory")?;
    let response = client
        .post(format!("{}/api/v1/checkpoints", instance.base))
        .send()?;
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = response.json()?;
    assert_eq!(body["error"], "checkpoint_failed", "{body}");

    // Scoring does not depend on it.
    produce(20, 40)?;
    assert_eq!(read_verdicts(&broker, 40)?.len(), 40);

    // Repaired: the next checkpoint covers everything.
    std::fs::remove_file(&blocker)?;
    let response = client
        .post(format!("{}/api/v1/checkpoints", instance.base))
        .send()?;
    assert_eq!(response.status().as_u16(), 201);
    let taken: serde_json::Value = response.json()?;
    let offsets = records_covered(&taken)?;
    assert_eq!(offsets, 40, "{taken}");
    instance.stop()?;
    Ok(())
}

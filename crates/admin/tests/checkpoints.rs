//! Checkpoints through the admin API: on demand (201 with the manifest, 401 without the
//! token, 409 when an instance takes none), listed, reported in `/status`; a clean stop leaves a
//! checkpoint covering everything read, and the next instance restores it and scores only what
//! came after.

mod common;

use common::*;

const TOKEN: &str = "cp-token";

/// Configuration with checkpoints on demand only (`interval` 1 h) named `name` under `store`,
/// `admin` lines in `[admin]`, and a short group session: an instance started as another stops
/// is given the partitions quickly.
fn checkpoint_config(
    broker: &riskstream_kafka::EmbeddedBroker,
    store: &std::path::Path,
    name: &str,
    admin: &str,
) -> TestResult<riskstream_common::Config> {
    let mut config = common::config(
        broker,
        &format!(
            "{admin}\n[checkpoint]\nurl = \"{}\"\ninterval = \"1h\"\nname = \"{name}\"\n",
            store.display()
        ),
    )?;
    for (k, v) in [
        ("session.timeout.ms", "3000"),
        ("heartbeat.interval.ms", "300"),
    ] {
        config.kafka.consumer.insert(k.into(), v.into());
    }
    Ok(config)
}

/// Sends events `<prefix><i>` for `ids` at `t0 + i`, spread over the partitions.
fn produce(
    producer: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    prefix: &str,
    ids: std::ops::Range<i32>,
    t0: i64,
) -> TestResult {
    for i in ids {
        send(
            producer,
            i % TRANSACTIONS_PARTITIONS,
            &event(&format!("{prefix}{i}"), t0 + i64::from(i), 50.0),
        );
    }
    flush(producer)
}

/// `POST /api/v1/checkpoints` on `base`, with `token` if given: the status and the JSON body.
fn take_checkpoint(
    client: &Http,
    base: &str,
    token: Option<&str>,
) -> TestResult<(u16, serde_json::Value)> {
    let mut request = client.post(format!("{base}/api/v1/checkpoints"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    Ok((status, response.json()?))
}

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
    let config = checkpoint_config(
        &broker,
        store.path(),
        "one",
        &format!("token = \"{TOKEN}\""),
    )?;
    let instance = Instance::start(&config, &bundle(100), false)?;
    let client = http()?;
    let base = instance.base.clone();
    instance.wait_ready(&client)?;

    let producer = producer(&broker)?;
    let t0 = now_ms();
    produce(&producer, "a", 0..100, t0)?;
    assert_eq!(read_verdicts(&broker, 100)?.len(), 100);

    let (status, _) = take_checkpoint(&client, &base, None)?;
    assert_eq!(status, 401);
    let (status, taken) = take_checkpoint(&client, &base, Some(TOKEN))?;
    assert_eq!(status, 201);
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
    // The status says which checkpoint the state came from, and what it took.
    let restore = &status["pipeline"]["restore"];
    // The final checkpoint of the clean stop, after the one taken on demand.
    let from = restore["checkpoint"]
        .as_u64()
        .ok_or("no restore in the status")?;
    assert!(
        from > taken["id"].as_u64().ok_or("id")? && from <= restored,
        "{status}"
    );
    assert!(restore["bytes"].as_u64() > Some(0), "{status}");
    assert!(restore["seconds"].as_f64() >= Some(0.0), "{status}");
    assert_eq!(restore["skipped"], serde_json::json!([]), "{status}");
    produce(&producer, "b", 200..210, t0)?;
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
    let (status, body) = take_checkpoint(&client, &instance.base, None)?;
    assert_eq!(status, 409);
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
    let mut config = checkpoint_config(&broker, store.path(), "eos", "")?;
    config.kafka.delivery = riskstream_common::Delivery::ExactlyOnce;
    let instance = Instance::start(&config, &bundle(100), false)?;
    let client = http()?;
    instance.wait_ready(&client)?;
    let producer = producer(&broker)?;
    let t0 = now_ms();
    produce(&producer, "e", 0..40, t0)?;
    // The verdicts are in the open transaction: a read_committed reader sees them once the
    // checkpoint after them commits it.
    let first = loop {
        let (status, checkpoint) = take_checkpoint(&client, &instance.base, None)?;
        assert_eq!(status, 201);
        if records_covered(&checkpoint)? == 40 {
            break checkpoint;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(read_verdicts(&broker, 40)?.len(), 40);
    produce(&producer, "e", 40..50, t0)?;
    instance.stop()?;
    // The clean stop committed the rest.
    assert_eq!(read_verdicts(&broker, 50)?.len(), 50);

    // Every checkpoint's transaction committed, and each is marked so.
    let first_id = first["id"].as_u64().ok_or("id")?;
    let checkpoints = store.path().join("eos").join("checkpoints");
    let newest = std::fs::read_dir(&checkpoints)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .ok_or("no checkpoint")?;
    assert!(newest > first_id);
    for id in [first_id, newest] {
        assert!(checkpoints.join(id.to_string()).join("committed").exists());
    }
    // As if the instance had died between the newest manifest and its commit: no mark, and
    // the group's offsets (which the transaction would have committed) still those of the
    // first checkpoint.
    std::fs::remove_file(checkpoints.join(newest.to_string()).join("committed"))?;
    let group: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", &config.kafka.group_id)
        .create()?;
    let mut offsets = rdkafka::TopicPartitionList::new();
    for (partition, offset) in first["offsets"].as_object().ok_or("no offsets")? {
        offsets.add_partition_offset(
            "transactions",
            partition.parse()?,
            rdkafka::Offset::Offset(offset.as_i64().ok_or("offset")?),
        )?;
    }
    rdkafka::consumer::Consumer::commit(&group, &offsets, rdkafka::consumer::CommitMode::Sync)?;
    drop(group);

    let instance = Instance::start(&config, &bundle(100), false)?;
    instance.wait_ready(&client)?;
    let (_, status) = get_json(&client, &instance.base, "/api/v1/status")?;
    assert_eq!(
        status["last_checkpoint"]["id"].as_u64(),
        Some(first_id),
        "{status}"
    );
    // The status says so, naming the checkpoint passed over and why.
    let restore = &status["pipeline"]["restore"];
    assert_eq!(restore["checkpoint"].as_u64(), Some(first_id), "{status}");
    let skipped = restore["skipped"].as_array().ok_or("no skipped list")?;
    assert!(
        skipped
            .iter()
            .any(|s| s[0].as_u64() == Some(newest)
                && s[1].as_str().is_some_and(|why| !why.is_empty())),
        "{status}"
    );
    // Restored at the first checkpoint, the instance scores the last 10 events again, in a
    // new transaction.
    let (status, _) = take_checkpoint(&client, &instance.base, None)?;
    assert_eq!(status, 201);
    let verdicts = read_verdicts(&broker, 60)?;
    assert_eq!(verdicts.len(), 50);
    assert!((40..50).all(|i| verdicts.get(&format!("e{i}")).map(Vec::len) == Some(2)));
    instance.stop()?;
    Ok(())
}

#[test]
fn scoring_goes_on_while_checkpoint_storage_fails_and_checkpoints_resume_once_it_is_back(
) -> TestResult {
    let broker = broker()?;
    let store = tempfile::tempdir()?;
    let config = checkpoint_config(&broker, store.path(), "flaky", "")?;
    let instance = Instance::start(&config, &bundle(100), false)?;
    let client = http()?;
    instance.wait_ready(&client)?;
    let producer = producer(&broker)?;
    let t0 = now_ms();
    produce(&producer, "f", 0..20, t0)?;
    assert_eq!(read_verdicts(&broker, 20)?.len(), 20);

    // The storage breaks: a file where the SST directory should be.
    let blocker = store.path().join("flaky").join("sst");
    std::fs::create_dir_all(store.path().join("flaky"))?;
    std::fs::write(&blocker, b"not a directory")?;
    let (status, body) = take_checkpoint(&client, &instance.base, None)?;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "checkpoint_failed", "{body}");

    // Scoring does not depend on it.
    produce(&producer, "f", 20..40, t0)?;
    assert_eq!(read_verdicts(&broker, 40)?.len(), 40);

    // Repaired: the next checkpoint covers everything.
    std::fs::remove_file(&blocker)?;
    let (status, taken) = take_checkpoint(&client, &instance.base, None)?;
    assert_eq!(status, 201);
    let offsets = records_covered(&taken)?;
    assert_eq!(offsets, 40, "{taken}");
    instance.stop()?;
    Ok(())
}

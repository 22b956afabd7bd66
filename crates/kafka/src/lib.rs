//! Kafka at both ends of the pipeline: the transactions consumer ([`KafkaSource`]), the
//! verdicts / DLQ / late producer ([`KafkaSink`], transactional for exactly-once delivery), the
//! labels consumer ([`LabelsConsumer`]), the bookkeeping that commits an offset only once its
//! outputs are acknowledged ([`DeliveryTracker`]; with checkpoints, only once a checkpoint
//! covers it), the control topic of rule bundles ([`RulesControl`]), and the embedded
//! Kafka-protocol broker ([`EmbeddedBroker`]). [`run_observed`] recovers the pipeline from its
//! newest usable checkpoint and starts the partitions at that checkpoint's offsets.
//!
//! This crate speaks Kafka and nothing else: it does not decode, score or keep feature state;
//! the pipeline crate does that over whatever [`riskstream_pipeline::Source`] and
//! [`riskstream_pipeline::Sink`] it is given. The same code runs against the embedded broker
//! and a real cluster: only the bootstrap address differs.

pub mod acks;
pub mod broker;
pub mod control;
pub mod errors;
pub mod labels;
pub mod sink;
pub mod source;

use rdkafka::ClientConfig;
use riskstream_common::KafkaConfig;

pub use acks::DeliveryTracker;
pub use broker::EmbeddedBroker;
pub use control::{ControlError, Outcome, RulesControl, RulesVersion};
pub use labels::{Label, LabelStore, LabelsConsumer};
pub use sink::KafkaSink;
pub use source::KafkaSource;

/// Which client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Consumer,
    Producer,
}

/// librdkafka settings for `role`: riskstream's own, then `kafka.properties`, then the role's
/// section, so an operator can override anything (security, tuning).
pub fn client_config(config: &KafkaConfig, role: Role) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    match role {
        Role::Consumer => {
            c.set("group.id", &config.group_id)
                // Offsets are committed by riskstream, and only once outputs are acknowledged.
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                // Reaching the end of a partition is how the source knows it has nothing
                // waiting there: only then may it count as idle for the watermark.
                .set("enable.partition.eof", "true")
                .set("auto.offset.reset", &config.auto_offset_reset)
                .set("fetch.wait.max.ms", "10")
                // librdkafka's prefetch queue keeps its default bound (64 MB; pausing purges
                // it). Once it is full, librdkafka waits `fetch.queue.backoff.ms` (default 1 s)
                // before fetching again: a scorer that drains it faster than that then sits idle
                // (W1 saturation: 135K events/s with the default, 270K with 10 ms).
                .set("fetch.queue.backoff.ms", "10");
            if !config.group_instance_id.is_empty() {
                c.set("group.instance.id", &config.group_instance_id);
            }
        }
        Role::Producer => {
            c.set("acks", "all")
                .set("enable.idempotence", "true")
                .set("compression.type", "lz4")
                .set("linger.ms", "5")
                .set("batch.size", "1000000")
                // Transient errors (a broker outage) are retried until the broker is back;
                // the bounded queue below makes the pipeline wait instead of buffering.
                .set("message.timeout.ms", "0")
                .set(
                    "queue.buffering.max.messages",
                    config.max_unacked.to_string(),
                )
                .set("queue.buffering.max.kbytes", "131072");
        }
    }
    let role_properties = match role {
        Role::Consumer => &config.consumer,
        Role::Producer => &config.producer,
    };
    for (k, v) in config.properties.iter().chain(role_properties) {
        c.set(k, v);
    }
    c
}

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use riskstream_common::{Config, Delivery};
use riskstream_pipeline::{
    CheckpointHandle, Pipeline, PipelineError, RecentEvents, SourceError, StatusBoard, Summary,
};
use riskstream_rules::RuleTable;

pub use source::Assignment;

/// Runs the pipeline from the transactions topic to the verdicts, DLQ and late topics until
/// `shutdown` is set, then drains: every event read gets its output acknowledged and its offset
/// committed before this returns. With `labels`, the configured labels topic is consumed into
/// it meanwhile.
pub fn run(
    config: &Config,
    rules: Arc<RuleTable>,
    assignment: Assignment,
    shutdown: Arc<AtomicBool>,
    labels: Option<Arc<LabelStore>>,
) -> Result<Summary, PipelineError> {
    run_observed(
        config,
        rules,
        assignment,
        shutdown,
        labels,
        Observers::default(),
    )
}

/// Who watches a running pipeline: the admin API's status board and backtest buffer.
#[derive(Debug, Default, Clone)]
pub struct Observers {
    pub status: Option<Arc<StatusBoard>>,
    pub recent: Option<Arc<RecentEvents>>,
    /// Filled with the pipeline's checkpoints once it has recovered.
    pub checkpoints: Option<Arc<CheckpointHandle>>,
}

/// [`run`], reporting progress and recent events to `observers`.
pub fn run_observed(
    config: &Config,
    rules: Arc<RuleTable>,
    assignment: Assignment,
    shutdown: Arc<AtomicBool>,
    labels: Option<Arc<LabelStore>>,
    observers: Observers,
) -> Result<Summary, PipelineError> {
    errors::register_metrics();
    let tracker = Arc::new(DeliveryTracker::new());
    let exactly_once = config.kafka.delivery == Delivery::ExactlyOnce;
    let topic = &config.kafka.topics.transactions;
    let mut source = KafkaSource::new(
        &config.kafka,
        config.pipeline.linger,
        tracker.clone(),
        assignment,
        shutdown.clone(),
    )?;
    // Exactly-once: a checkpoint counts only if its transaction committed. Its mark says so,
    // or (a crash between the commit and the mark) the group's offsets, committed in it.
    let accept = |listed: &riskstream_checkpoint::Listed| -> Result<(), String> {
        if !exactly_once || listed.committed {
            return Ok(());
        }
        let manifest = listed.manifest.as_ref().map_err(Clone::clone)?;
        // Asked until the cluster answers: passing over a checkpoint whose transaction did
        // commit would score its events again.
        let mut backoff = errors::Backoff::default();
        loop {
            match committed_offsets(&source, topic, manifest.offsets.keys().copied()) {
                Ok(committed) if committed == manifest.offsets => return Ok(()),
                Ok(_) => return Err("its transaction did not commit".into()),
                Err(e) => {
                    if let Some(fatal) = errors::record("transactions consumer", &e, "") {
                        return Err(format!(
                            "cannot tell whether its transaction committed: {fatal}"
                        ));
                    }
                    tracing::warn!(checkpoint = listed.id, error = %e, "waiting for the cluster to tell whether the checkpoint's transaction committed");
                    if !backoff.wait(&shutdown) {
                        return Err("stopping before the cluster answered whether its transaction committed".into());
                    }
                }
            }
        }
    };
    let (mut pipeline, restored) =
        Pipeline::recover_reporting(config, rules, topic, accept, observers.status.as_deref())?;
    if let Some(manifest) = &restored {
        source.start_at(&manifest.offsets)?;
    }
    if let Some(checkpointer) = pipeline.checkpointer() {
        source.commit_with(checkpointer.clone());
    }
    let mut sink = if exactly_once {
        source.without_commits();
        let group = source.group_metadata().ok_or_else(|| SourceError::Stream {
            name: topic.clone(),
            message: "exactly_once delivery needs the consumer group's metadata".into(),
        })?;
        let id = format!("{}-{}", config.kafka.group_id, config.checkpoint_name());
        match KafkaSink::transactional(&config.kafka, tracker, &id, group, &shutdown)? {
            Some(sink) => sink,
            None => return Ok(Summary::default()),
        }
    } else {
        KafkaSink::new(&config.kafka, tracker)?
    };
    if let (Some(handle), Some(requests), Some(checkpointer)) = (
        &observers.checkpoints,
        pipeline.checkpoint_requests(),
        pipeline.checkpointer(),
    ) {
        handle.set(requests, checkpointer.clone());
    }
    if let Some(status) = observers.status {
        source.report_to(Arc::clone(&status));
        pipeline.report_to(status);
    }
    if let Some(recent) = observers.recent {
        pipeline.keep_recent(recent);
    }
    let labels = match (config.kafka.topics.labels(), labels) {
        (Some(topic), Some(store)) => Some(
            LabelsConsumer::start(&config.kafka, topic, store, shutdown.clone()).map_err(|e| {
                riskstream_pipeline::SourceError::Stream {
                    name: topic.to_string(),
                    message: e.to_string(),
                }
            })?,
        ),
        _ => None,
    };
    let result = riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink);
    if let Some(labels) = labels {
        // The labels thread watches the same flag; make sure it ends even after an error.
        shutdown.store(true, std::sync::atomic::Ordering::Release);
        labels.join();
    }
    let summary = result?;
    pipeline.close()?;
    Ok(summary)
}

/// The group's committed offsets of `partitions` of `topic` (partitions without one are left
/// out).
fn committed_offsets(
    source: &KafkaSource,
    topic: &str,
    partitions: impl Iterator<Item = i32>,
) -> Result<std::collections::BTreeMap<i32, i64>, rdkafka::error::KafkaError> {
    use rdkafka::consumer::Consumer;
    let mut list = rdkafka::TopicPartitionList::new();
    for p in partitions {
        list.add_partition(topic, p);
    }
    let committed = source
        .consumer()
        .committed_offsets(list, std::time::Duration::from_secs(10))?;
    Ok(committed
        .elements_for_topic(topic)
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

//! The partitioned topology (`pipeline.topology = "partitioned"`): scale-out over Kafka itself,
//! the way Kafka Streams does it, with features exact however many instances share the work.
//!
//! ```text
//!  transactions ──► ingest ──┬──► <group>.by-<entity A> ──► entity stage A ──┐
//!   (any key)    decode, time├──► <group>.by-<entity B> ──► entity stage B ──┤ partials
//!                 bad input  │                                               ▼ by event id
//!                            └────────────── events, by event id ──► <group>.gather ──► scoring
//!                                                                   row features, rules, verdicts
//! ```
//!
//! Every instance runs every stage, each stage in a consumer group of its own, so Kafka spreads
//! the partitions. An entity stage keeps the state of the partitions it owns, one state store
//! per partition, and restores a partition it is given by replaying its input from the offset
//! its state records, emitting nothing for what the group had already committed. The scoring
//! stage gathers an event and its partials and scores them with the rules version that was in
//! force when the event was ingested.
//!
//! What it must not do: decide time, compute features or evaluate rules itself (the pipeline,
//! features and rules crates do, exactly as in the single topology).

pub mod entity;
pub mod ingest;
pub mod scoring;
pub mod stage;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use riskstream_common::{Config, EventSchema};
use riskstream_kafka::{client_config, Role};
use riskstream_pipeline::PipelineError;
use riskstream_rules::{
    BundleDoc, BundleError, CompiledBundle, FeatureKind, RuleCompiler, RuleTable,
};

/// The partitioned topology could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{what}: {message}")]
    Kafka { what: String, message: String },
    #[error(
        "internal topic {topic} has {found} partitions, pipeline.partitions says {configured}: \
         the partition count of internal topics never changes after they are created (delete \
         them, with the state, to start over with another count)"
    )]
    Partitions {
        topic: String,
        found: i32,
        configured: i32,
    },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("the {entity} stage's features of rules version {version}: {source}")]
    Bundle {
        entity: String,
        version: u64,
        source: BundleError,
    },
    #[error("partition {partition} of {topic}: {message}")]
    State {
        topic: String,
        partition: i32,
        message: String,
    },
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("cannot start the {0} stage's thread: {1}")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("the {0} stage's thread panicked")]
    Panicked(String),
}

/// One entity kind of the windowed features: its key fields, its column indexes in the event
/// schema and its repartition topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityKind {
    /// The key fields joined by `+` (`customer_id`, `card+merchant`).
    pub name: String,
    pub fields: Vec<String>,
    pub columns: Vec<usize>,
    pub topic: String,
}

/// The stages and internal topics of a bundle's features.
#[derive(Debug, Clone)]
pub struct Plan {
    pub group: String,
    pub partitions: i32,
    pub kinds: Vec<EntityKind>,
    pub gather: String,
}

impl Plan {
    /// The entity kinds of `bundle`'s windowed features, in the order they first appear.
    pub fn new(config: &Config, bundle: &CompiledBundle) -> Self {
        let group = config.kafka.group_id.clone();
        let mut kinds: Vec<EntityKind> = Vec::new();
        for f in bundle.window_features() {
            if kinds.iter().any(|k| k.fields == f.spec.entity) {
                continue;
            }
            let name = f.spec.entity.join("+");
            kinds.push(EntityKind {
                topic: format!("{group}.by-{name}"),
                name,
                fields: f.spec.entity.clone(),
                columns: f.entity_columns.clone(),
            });
        }
        Self {
            gather: format!("{group}.gather"),
            partitions: config.pipeline.partitions,
            kinds,
            group,
        }
    }

    /// Every internal topic.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.kinds
            .iter()
            .map(|k| k.topic.as_str())
            .chain([self.gather.as_str()])
    }

    /// The kind of the entity `fields`, if the plan has it.
    pub fn kind_of(&self, fields: &[String]) -> Option<usize> {
        self.kinds.iter().position(|k| k.fields == fields)
    }
}

/// Creates the internal topics that do not exist yet with `plan.partitions` partitions, and
/// refuses ones that exist with another count.
pub fn ensure_topics(config: &Config, plan: &Plan) -> Result<(), TopologyError> {
    let kafka = |what: &str, e: String| TopologyError::Kafka {
        what: what.to_string(),
        message: e,
    };
    let consumer: BaseConsumer = client_config(&config.kafka, Role::Consumer)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| kafka("a metadata client", e.to_string()))?;
    let partitions_of = |topic: &str| -> Result<i32, TopologyError> {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(15))
            .map_err(|e| kafka(&format!("the metadata of {topic}"), e.to_string()))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .unwrap_or(0))
    };
    let mut missing = Vec::new();
    for topic in plan.topics() {
        match partitions_of(topic)? {
            0 => missing.push(topic),
            found if found != plan.partitions => {
                return Err(TopologyError::Partitions {
                    topic: topic.to_string(),
                    found,
                    configured: plan.partitions,
                })
            }
            _ => {}
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(&config.kafka, Role::Producer)
        .create()
        .map_err(|e| kafka("the admin client for internal topics", e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| kafka("a runtime for the admin client", e.to_string()))?;
    let topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| NewTopic::new(t, plan.partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(15)));
    let results = runtime
        .block_on(admin.create_topics(topics.iter(), &options))
        .map_err(|e| {
            kafka(
                &format!("creating the internal topics {missing:?}"),
                e.to_string(),
            )
        })?;
    for result in results {
        match result {
            Ok(topic) => {
                tracing::info!(%topic, partitions = plan.partitions, "internal topic created")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(kafka(
                    &format!("creating internal topic {topic}"),
                    code.to_string(),
                ))
            }
        }
    }
    Ok(())
}

/// The compiled bundles the stages use, by rules version: the whole bundle (scoring) and per
/// entity kind the bundle of that kind's windowed features alone (entity stages). A version is
/// kept from the first time a stage sees it in the rule table, so that an event is scored by
/// the version in force when it was ingested even after a reload.
pub struct Bundles {
    table: Arc<RuleTable>,
    compiler: RuleCompiler,
    full: Mutex<HashMap<u64, Arc<CompiledBundle>>>,
    kinds: Mutex<HashMap<(usize, u64), Arc<CompiledBundle>>>,
}

/// Versions kept for events in flight across a reload.
const KEPT_VERSIONS: usize = 16;

impl Bundles {
    pub fn new(table: Arc<RuleTable>, schema: &EventSchema) -> Self {
        let bundles = Self {
            compiler: RuleCompiler::new(schema),
            full: Mutex::new(HashMap::new()),
            kinds: Mutex::new(HashMap::new()),
            table,
        };
        bundles.current();
        bundles
    }

    /// The rule table the bundles come from.
    pub fn table(&self) -> &Arc<RuleTable> {
        &self.table
    }

    /// The running bundle, remembered by version.
    pub fn current(&self) -> Arc<CompiledBundle> {
        let bundle = self.table.load();
        let mut full = stage::lock(&self.full);
        if !full.contains_key(&bundle.version()) {
            if full.len() >= KEPT_VERSIONS {
                if let Some(&oldest) = full.keys().min() {
                    full.remove(&oldest);
                }
            }
            full.insert(bundle.version(), Arc::clone(&bundle));
        }
        bundle
    }

    /// The bundle of `version`, or the running one when that version is no longer (or not
    /// yet) known here; the second value says whether it was found.
    pub fn version(&self, version: u64) -> (Arc<CompiledBundle>, bool) {
        let current = self.current();
        match stage::lock(&self.full).get(&version) {
            Some(b) => (Arc::clone(b), true),
            None => (current, false),
        }
    }

    /// The windowed features of entity kind `kind` (of `plan`) in rules version `version`.
    pub fn for_kind(
        &self,
        plan: &Plan,
        kind: usize,
        version: u64,
    ) -> Result<Arc<CompiledBundle>, TopologyError> {
        if let Some(b) = stage::lock(&self.kinds).get(&(kind, version)) {
            return Ok(Arc::clone(b));
        }
        let (full, _) = self.version(version);
        let fields = &plan.kinds[kind].fields;
        let doc = full.doc();
        let only = BundleDoc {
            name: doc.name.clone(),
            description: None,
            features: doc
                .features
                .iter()
                .filter(|f| matches!(&f.kind, FeatureKind::Window(w) if &w.entity == fields))
                .cloned()
                .collect(),
            rules: Vec::new(),
            decision: doc.decision,
        };
        let compiled = Arc::new(
            self.compiler
                .compile(only, full.version())
                .map_err(|source| TopologyError::Bundle {
                    entity: plan.kinds[kind].name.clone(),
                    version: full.version(),
                    source,
                })?,
        );
        let mut kinds = stage::lock(&self.kinds);
        if kinds.len() >= KEPT_VERSIONS * plan.kinds.len().max(1) {
            kinds.retain(|(_, v), _| *v >= full.version());
        }
        kinds.insert((kind, version), Arc::clone(&compiled));
        Ok(compiled)
    }
}

/// The partitioned topology running in this instance: one thread per stage.
pub struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<Result<(), TopologyError>>)>,
    plan: Plan,
}

impl Running {
    /// The plan the stages run.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether a stage has ended (stopped or failed).
    pub fn any_finished(&self) -> bool {
        self.threads.iter().any(|(_, t)| t.is_finished())
    }

    /// Asks every stage to stop: each flushes its outputs, writes its partitions' state and
    /// leaves its group.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Waits for every stage; the first error, if any.
    pub fn wait(self) -> Result<(), TopologyError> {
        let mut first = Ok(());
        for (name, thread) in self.threads {
            let ended = thread
                .join()
                .unwrap_or_else(|_| Err(TopologyError::Panicked(name.clone())));
            if let Err(e) = ended {
                tracing::error!(stage = %name, error = %e, "stage failed");
                // Every stage stops with the first failure.
                self.stop.store(true, Ordering::Release);
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// Starts every stage of the partitioned topology for `config`, scoring with `rules`, until
/// `stop` is set (or a stage fails, which stops the others).
pub fn start(
    config: &Config,
    rules: Arc<RuleTable>,
    stop: Arc<AtomicBool>,
) -> Result<Running, TopologyError> {
    let schema = config.event_schema().map_err(PipelineError::from)?;
    let bundles = Arc::new(Bundles::new(Arc::clone(&rules), &schema));
    let plan = Plan::new(config, &bundles.current());
    ensure_topics(config, &plan)?;
    tracing::info!(
        group = %plan.group,
        partitions = plan.partitions,
        entities = ?plan.kinds.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        "partitioned topology starting"
    );
    let producer = rand_producer_id();
    /// What a stage thread runs: its body over a shared context.
    type Body =
        Box<dyn FnOnce(&Config, &Plan, &Bundles, &AtomicBool) -> Result<(), TopologyError> + Send>;
    let mut bodies: Vec<(String, Body)> = vec![(
        "ingest".into(),
        Box::new(move |c, p, b, s| ingest::run(c, p, b, producer, s)),
    )];
    for kind in 0..plan.kinds.len() {
        bodies.push((
            format!("by-{}", plan.kinds[kind].name),
            Box::new(move |c, p, b, s| entity::run(c, p, kind, b, s)),
        ));
    }
    bodies.push(("scoring".into(), Box::new(scoring::run)));
    let mut threads = Vec::new();
    for (name, body) in bodies {
        let (config, plan, bundles, stop) = (
            config.clone(),
            plan.clone(),
            Arc::clone(&bundles),
            Arc::clone(&stop),
        );
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let ended = body(&config, &plan, &bundles, &stop);
                if ended.is_err() {
                    // Every stage stops with the first failure.
                    stop.store(true, Ordering::Release);
                }
                ended
            })
            .map_err(|e| TopologyError::Thread("partitioned", e))?;
        threads.push((name, thread));
    }
    Ok(Running {
        stop,
        threads,
        plan,
    })
}

/// An id for this instance's ingest, as the producer of the watermarks it sends.
fn rand_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    riskstream_pipeline::source::now_ms()
}

//! Configuration: `config/default.toml` (compiled in) < `--config FILE` < `RISKSTREAM__…` env vars.
//!
//! Every section denies unknown keys, so a misspelt setting is an error rather than a silent
//! default. Loading validates what can be validated without building pipeline objects; the
//! expensive objects (compiled rules, decoders) are built from the validated values once.

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::schema::{EventSchema, SchemaConfig, SchemaError};

/// The built-in defaults; the same file a reader finds at `config/default.toml`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../config/default.toml");

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layered configuration could not be read or does not match the expected shape.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// The event schema section is inconsistent.
    #[error("invalid configuration: {0}")]
    Schema(#[from] SchemaError),
    /// A value is out of its allowed range.
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// Top-level configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The event schema (fields, event id, event time, entity keys).
    pub schema: SchemaConfig,
    /// Micro-batching.
    pub pipeline: PipelineConfig,
    /// Event time, watermarks, clock skew and lateness.
    pub time: TimeConfig,
    /// Where keyed state lives.
    pub state: StateConfig,
    /// Checkpoints of the state and the source offsets.
    pub checkpoint: CheckpointConfig,
    /// The Kafka cluster, topics and client settings of `riskstream run`.
    pub kafka: KafkaConfig,
    /// The admin HTTP API.
    pub admin: AdminConfig,
    /// Traces.
    pub telemetry: TelemetryConfig,
    /// Stopping on SIGTERM/SIGINT.
    pub shutdown: ShutdownConfig,
    pub verdict: VerdictConfig,
}

/// The `[verdict]` section: what each verdict carries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictConfig {
    /// Which feature values a verdict lists.
    pub features: VerdictFeatures,
}

/// `verdict.features`: `"fired"`, `"all"`, `"none"`, or a list of feature names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "FeaturesSetting")]
pub enum VerdictFeatures {
    /// The features the fired rules' `when` and `score` expressions read: the reasons.
    Fired,
    /// Every feature of the bundle.
    All,
    /// None (`"features":{}`).
    None,
    /// These features, where the bundle has them, in the bundle's order.
    List(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FeaturesSetting {
    Mode(String),
    List(Vec<String>),
}

impl TryFrom<FeaturesSetting> for VerdictFeatures {
    type Error = String;

    fn try_from(setting: FeaturesSetting) -> Result<Self, String> {
        match setting {
            FeaturesSetting::Mode(mode) => match mode.as_str() {
                "fired" => Ok(Self::Fired),
                "all" => Ok(Self::All),
                "none" => Ok(Self::None),
                other => Err(format!(
                    "verdict.features must be \"fired\", \"all\", \"none\" or a list of feature names, not \"{other}\""
                )),
            },
            FeaturesSetting::List(names) => Ok(Self::List(names)),
        }
    }
}

/// The `[shutdown]` section: how a signalled instance stops.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest a stop may take to drain, take its final checkpoint and commit; past it the
    /// process exits with a failure status and a restart recovers from the last checkpoint.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// The `[admin]` section: the admin HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address, `host:port`.
    pub listen: String,
    /// Bearer token for mutating endpoints.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the bearer token (trailing whitespace ignored).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Recent events kept for backtests.
    pub backtest_events: usize,
    /// How long a rules update waits for the control topic to confirm it.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Name of this instance in published rule versions; empty: host name and process id.
    pub instance_id: String,
    /// Serve a non-loopback `listen` address without a token (only on purpose: anyone who
    /// reaches the address can then replace the rules).
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

impl AdminConfig {
    /// The configured bearer token: `token`, else the contents of `token_file`. An empty token
    /// counts as none.
    pub fn bearer_token(&self) -> Result<Option<Secret>, ConfigError> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Value(format!(
                        "admin.token_file {}: cannot read it: {e}",
                        path.display()
                    ))
                })?;
                Some(Secret(text.trim_end().to_string()))
            }
            (None, None) => None,
        };
        Ok(token.filter(|t| !t.0.is_empty()))
    }

    /// Whether `listen` accepts connections from loopback only (`127.0.0.0/8`, `[::1]`,
    /// `localhost`). Any other address, `0.0.0.0` and host names included, is reachable from
    /// other hosts.
    pub fn listens_on_loopback_only(&self) -> bool {
        let host = match self.listen.rsplit_once(':') {
            Some((host, _port)) => host,
            None => self.listen.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The bearer token, checked against the address: an admin API reachable from other hosts
    /// must have one, unless `allow_unauthenticated` says otherwise on purpose.
    pub fn checked_token(&self) -> Result<Option<Secret>, ConfigError> {
        let token = self.bearer_token()?;
        if token.is_none() && !self.listens_on_loopback_only() && !self.allow_unauthenticated {
            return Err(ConfigError::Value(format!(
                "admin.listen = {} is reachable from other hosts and no token is configured: \
                 set admin.token (RISKSTREAM__ADMIN__TOKEN) or admin.token_file (a mounted secret), \
                 listen on 127.0.0.1, or set admin.allow_unauthenticated = true to serve it open on purpose",
                self.listen
            )));
        }
        Ok(token)
    }
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; keep it out of logs and error messages.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The `[telemetry]` section: trace export.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces endpoint; empty: no export.
    pub otlp_endpoint: String,
    pub service_name: String,
}

/// The `[kafka]` section: the cluster, the topics and librdkafka settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Consumer group of the transactions consumer.
    pub group_id: String,
    /// Static group membership: this instance's `group.instance.id` (a StatefulSet's pod
    /// name). Empty: dynamic membership.
    #[serde(default)]
    pub group_instance_id: String,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// How often acknowledged offsets are committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Produced messages awaiting acknowledgement above which the consumer pauses.
    pub max_unacked: usize,
    /// `at_least_once` or `exactly_once` (needs checkpoints).
    pub delivery: Delivery,
    /// How long a transaction may stay open before the broker aborts it (exactly-once).
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    pub topics: TopicsConfig,
    /// librdkafka properties for every client (security, SASL, SSL …).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// A file of librdkafka properties, `key=value` per line (`#` comments), merged over
    /// `properties` at load: credentials (`sasl.password`, …) from a mounted secret rather than
    /// from the configuration.
    #[serde(default)]
    pub properties_file: Option<std::path::PathBuf>,
    /// librdkafka properties for the consumers only.
    #[serde(default)]
    pub consumer: std::collections::BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(default)]
    pub producer: std::collections::BTreeMap<String, String>,
}

/// The `[kafka.topics]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Payment events in.
    pub transactions: String,
    /// One verdict per scored event, keyed by event id.
    pub verdicts: String,
    /// Events too late to score: original bytes plus reason headers.
    pub late: String,
    /// Bad records: original bytes plus reason headers.
    pub dlq: String,
    /// Feedback labels `{tx_id, fraud, …}`; empty when not consumed.
    pub labels: String,
    /// The control topic of published rule bundles (one partition, compacted).
    pub rules: String,
}

impl TopicsConfig {
    /// The labels topic, when one is configured.
    pub fn labels(&self) -> Option<&str> {
        Some(self.labels.as_str()).filter(|t| !t.is_empty())
    }
}

/// The `[state]` section: the RocksDB state directory and the cache in front of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// State directory. Unset: a fresh temporary directory, removed when the process ends.
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
    /// Memory cap of the in-memory write-back cache of feature state, in bytes (approximate).
    pub cache_max_bytes: usize,
    /// Changed state in the cache is written to the store at least this often (processing
    /// time), besides when the cache makes room and at shutdown.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

/// The `[checkpoint]` section: incremental checkpoints of the state store and the progress
/// they stand for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// A directory, `file:///dir` or `s3://bucket/prefix`. Empty: `<state.dir>.checkpoints`
    /// when `state.dir` is set, else no checkpoints.
    pub url: String,
    /// How often a checkpoint is taken (processing time).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Complete checkpoints kept; older ones and files only they use are deleted.
    pub retain: usize,
    /// This instance's name under `url` and in its `transactional.id`; empty: `admin.instance_id`,
    /// else `riskstream`. Instances sharing `url` need distinct names.
    pub name: String,
    /// Checkpoints that may fail in a row (each retried at the next interval) before the
    /// instance stops consuming and reports itself not ready until one succeeds.
    pub tolerable_failures: u32,
}

impl PipelineConfig {
    /// With `feature_threads = 0`, the windowed features a bundle needs for its batches to be
    /// computed on more than one thread.
    pub const AUTO_PARALLEL_FEATURES: usize = 16;

    /// [`Self::feature_threads`], with 0 resolved to the cores this process may use, and the
    /// windowed features a bundle needs for them to be used.
    pub fn feature_threads(&self) -> (usize, usize) {
        match self.feature_threads {
            0 => (
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                Self::AUTO_PARALLEL_FEATURES,
            ),
            n => (n, 1),
        }
    }
}

impl Config {
    /// Where checkpoints go, if anywhere (see [`CheckpointConfig::url`]).
    pub fn checkpoint_url(&self) -> Option<String> {
        if !self.checkpoint.url.is_empty() {
            return Some(self.checkpoint.url.clone());
        }
        let dir = self.state.dir.as_ref()?;
        let mut name = dir.file_name()?.to_os_string();
        name.push(".checkpoints");
        Some(dir.with_file_name(name).display().to_string())
    }

    /// This instance's checkpoint name (see [`CheckpointConfig::name`]).
    pub fn checkpoint_name(&self) -> String {
        [&self.checkpoint.name, &self.admin.instance_id]
            .into_iter()
            .find(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| "riskstream".to_string())
    }
}

/// How verdicts reach the verdicts topic relative to checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Verdicts are produced at once; a crash may repeat the verdicts of the events after the
    /// last checkpoint.
    AtLeastOnce,
    /// One Kafka transaction per checkpoint interval carries the verdicts and the consumer
    /// offsets, committed once the checkpoint exists.
    ExactlyOnce,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at_least_once",
            Delivery::ExactlyOnce => "exactly_once",
        }
    }
}

/// What to do with an event stamped further in the future than `max_future_skew` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkewPolicy {
    /// Use the processing time instead and mark the verdict `time_corrected`.
    Clamp,
    /// Send the event to the dead-letter output with reason `future_timestamp`.
    Dlq,
}

/// The `[time]` section: how event time becomes watermarks and what counts as late.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// A partition's watermark trails the highest event time it has seen by this much.
    #[serde(with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// A partition without events for this long (delivery time: processing time while the
    /// source delivers) stops holding the watermark.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Events stamped more than this ahead of the processing clock are corrected by `skew_policy`.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    pub skew_policy: SkewPolicy,
    /// Events below the watermark by at most this much are still scored and folded into state;
    /// older ones go to the late output.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
}

/// How events are grouped into micro-batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Maximum events per micro-batch.
    pub batch_max_events: usize,
    /// Longest time the first event of a batch waits for the batch to fill (streaming sources).
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    pub topology: Topology,
    /// Threads a batch's windowed features are computed on (0: one per core for bundles of
    /// at least [`PipelineConfig::AUTO_PARALLEL_FEATURES`] windowed features, else one).
    pub feature_threads: usize,
    /// Partitions of the partitioned topology's internal topics (fixed once created).
    pub partitions: i32,
}

/// How the pipeline's work is laid out over instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// Every stage in one process, over the partitions it is assigned.
    Single,
    /// Ingest, entity and scoring stages over internal repartition and gather topics.
    Partitioned,
}

/// Reads `key=value` lines (blank lines and `#` comments skipped) of a librdkafka properties
/// file. Values are never echoed in errors: the file holds secrets.
fn read_properties_file(
    path: &Path,
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Value(format!(
            "kafka.properties_file {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    let mut properties = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(ConfigError::Value(format!(
                "kafka.properties_file {} line {}: expected key=value",
                path.display(),
                n + 1
            )));
        };
        properties.insert(key.trim().to_string(), value.trim().to_string());
    }
    Ok(properties)
}

impl Config {
    /// Loads the defaults, then `file` if given, then `RISKSTREAM__…` environment overrides.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Value(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("RISKSTREAM__").split("__"));
        Self::from_figment(figment)
    }

    /// The compiled-in defaults alone (no file, no environment): for tests and benchmarks.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(DEFAULT_CONFIG_TOML)))
    }

    /// Parses a complete TOML document layered over the defaults (no environment).
    pub fn from_toml_over_defaults(toml: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Toml::string(DEFAULT_CONFIG_TOML)).merge(Toml::string(toml)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if let Some(path) = &config.kafka.properties_file {
            let properties = read_properties_file(path)?;
            config.kafka.properties.extend(properties);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.pipeline.batch_max_events == 0 {
            return Err(ConfigError::Value(
                "pipeline.batch_max_events must be at least 1".into(),
            ));
        }
        if !(1..=10_000).contains(&self.pipeline.partitions) {
            return Err(ConfigError::Value(format!(
                "pipeline.partitions must be between 1 and 10000, not {}",
                self.pipeline.partitions
            )));
        }
        EventSchema::new(&self.schema)?;
        if !matches!(self.kafka.auto_offset_reset.as_str(), "earliest" | "latest") {
            return Err(ConfigError::Value(format!(
                "kafka.auto_offset_reset must be `earliest` or `latest`, not `{}`",
                self.kafka.auto_offset_reset
            )));
        }
        if self.admin.max_body_bytes == 0 {
            return Err(ConfigError::Value(
                "admin.max_body_bytes must be at least 1".into(),
            ));
        }
        if self.checkpoint.tolerable_failures == 0 {
            return Err(ConfigError::Value(
                "checkpoint.tolerable_failures must be at least 1".into(),
            ));
        }
        if self.kafka.max_unacked == 0 {
            return Err(ConfigError::Value(
                "kafka.max_unacked must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The event schema described by this configuration.
    pub fn event_schema(&self) -> Result<EventSchema, SchemaError> {
        EventSchema::new(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_properties_file_is_merged_over_properties_and_never_echoed() -> Result<(), ConfigError>
    {
        let dir = std::env::temp_dir().join(format!("riskstream-props-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| ConfigError::Value(e.to_string()))?;
        let file = dir.join("kafka.properties");
        std::fs::write(
            &file,
            "# credentials\nsasl.username = scorer\n\nsasl.password=s3cret=with=equals\n",
        )
        .map_err(|e| ConfigError::Value(e.to_string()))?;
        let toml = format!(
            "[kafka]\nproperties_file = {:?}\n[kafka.properties]\n\"sasl.username\" = \"inline\"\n\"security.protocol\" = \"SASL_SSL\"\n",
            file.display().to_string()
        );
        let config = Config::from_toml_over_defaults(&toml)?;
        let p = &config.kafka.properties;
        assert_eq!(p.get("sasl.username").map(String::as_str), Some("scorer"));
        assert_eq!(
            p.get("sasl.password").map(String::as_str),
            Some("s3cret=with=equals")
        );
        assert_eq!(
            p.get("security.protocol").map(String::as_str),
            Some("SASL_SSL")
        );

        std::fs::write(&file, "sasl.password s3cret\n")
            .map_err(|e| ConfigError::Value(e.to_string()))?;
        let err = Config::from_toml_over_defaults(&toml)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 1: expected key=value"), "{err}");
        assert!(!err.contains("s3cret"), "the secret leaked into: {err}");

        let missing = format!(
            "[kafka]\nproperties_file = {:?}\n",
            dir.join("absent").display().to_string()
        );
        let err = Config::from_toml_over_defaults(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cannot read it"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn defaults_load_and_describe_the_demo_schema() -> Result<(), ConfigError> {
        let config = Config::defaults()?;
        let schema = config.event_schema()?;
        assert_eq!(schema.event_id_name(), "tx_id");
        assert_eq!(schema.event_time_name(), "ts");
        assert_eq!(schema.arrow().fields().len(), 12);
        assert_eq!(config.pipeline.batch_max_events, 4096);
        // Feature threads: one per core for broad bundles only, unless set.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            config.pipeline.feature_threads(),
            (cores, PipelineConfig::AUTO_PARALLEL_FEATURES)
        );
        let three = Config::from_toml_over_defaults("[pipeline]\nfeature_threads = 3\n").unwrap();
        assert_eq!(three.pipeline.feature_threads(), (3, 1));
        Ok(())
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml_over_defaults("[pipeline]\nbatch_max_event = 5\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("batch_max_event"), "{err}");
    }

    #[test]
    fn an_admin_api_reachable_from_other_hosts_needs_a_token() -> Result<(), ConfigError> {
        let admin = |toml: &str| Config::from_toml_over_defaults(toml).map(|c| c.admin);
        assert!(
            admin("")?.checked_token()?.is_none(),
            "loopback: open is fine"
        );
        for listen in [
            "127.0.0.1:8080",
            "127.1.2.3:80",
            "[::1]:8080",
            "localhost:8080",
        ] {
            let a = admin(&format!("[admin]\nlisten = \"{listen}\"\n"))?;
            assert!(a.listens_on_loopback_only(), "{listen}");
        }
        for listen in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.0.0.5:8080",
            "riskstream-0:8080",
        ] {
            let a = admin(&format!("[admin]\nlisten = \"{listen}\"\n"))?;
            assert!(!a.listens_on_loopback_only(), "{listen}");
            let err = a
                .checked_token()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("admin.token") && err.contains("admin.token_file"),
                "{listen}: {err}"
            );
            let open = admin(&format!(
                "[admin]\nlisten = \"{listen}\"\nallow_unauthenticated = true\n"
            ))?;
            assert!(open.checked_token()?.is_none());
            let with = admin(&format!(
                "[admin]\nlisten = \"{listen}\"\ntoken = \"s3cret\"\n"
            ))?;
            assert_eq!(
                with.checked_token()?
                    .map(|t| t.expose().to_string())
                    .as_deref(),
                Some("s3cret")
            );
        }
        Ok(())
    }

    #[test]
    fn zero_batch_size_is_rejected() {
        let err = Config::from_toml_over_defaults("[pipeline]\nbatch_max_events = 0\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("batch_max_events"), "{err}");
    }
}

//! One running instance, assembled in one place: the admin API (answering at once, health and
//! readiness first), the rules control plane (the control topic, read however long the
//! cluster takes to be there) and the Kafka pipeline that scores with its rule table and
//! reports to the admin API: the single topology, or the stages of the partitioned one
//! (`pipeline.topology`). `riskstream run`, the demo and the tests all start instances
//! here, so that what they run is the same.
//!
//! What it must not do: score, decode or keep state itself (the pipeline's), or serve HTTP
//! beyond starting the admin API (the admin crate's).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use riskstream_admin::{AdminPlane, ControlPlaneError};
use riskstream_common::{Config, Topology};
use riskstream_kafka::{Assignment, LabelStore, RulesControl};
use riskstream_pipeline::{PipelineError, RecentEvents, StatusBoard, Summary};

/// Labels kept for backtests unless told otherwise.
pub const DEFAULT_LABELS: usize = 1_000_000;

/// How an instance starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// The bundle that seeds an empty control topic (`None`: wait for one to be published).
    pub seed: Option<String>,
    /// Serves `/metrics` from this recorder.
    pub metrics: Option<PrometheusHandle>,
    /// Labels kept in memory for backtests.
    pub labels: usize,
    /// Stops the instance when set (a signal handler's flag); one of its own otherwise.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: None,
            metrics: None,
            labels: DEFAULT_LABELS,
            stop: None,
        }
    }
}

/// An instance could not start, or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Topology(#[from] riskstream_topology::TopologyError),
    #[error("cannot start the instance thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the instance thread panicked: {0}")]
    Panicked(String),
    #[error(
        "the rules were not loaded within {0:?} (is the Kafka cluster reachable? see GET /readyz)"
    )]
    RulesTimeout(Duration),
    #[error("the instance stopped before its rules were loaded")]
    Stopped,
}

/// What an instance's thread ends with: the pipeline's summary, or `None` when it was stopped
/// while waiting for the cluster.
type Ended = Result<Option<Summary>, RuntimeError>;

/// A running instance. Dropping it without [`Instance::stop`] leaves its thread running.
pub struct Instance {
    address: SocketAddr,
    status: Arc<StatusBoard>,
    recent: Arc<RecentEvents>,
    labels: Arc<LabelStore>,
    stop: Arc<AtomicBool>,
    rules: Arc<Loaded>,
    thread: JoinHandle<Ended>,
}

/// The rules control plane once loaded, for those who wait for it.
#[derive(Default)]
struct Loaded {
    control: Mutex<Option<Arc<RulesControl>>>,
    changed: Condvar,
    /// The instance thread ended (with or without rules).
    ended: AtomicBool,
}

impl Loaded {
    fn set(&self, control: Arc<RulesControl>) {
        *lock(&self.control) = Some(control);
        self.changed.notify_all();
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let _guard = lock(&self.control);
        self.changed.notify_all();
    }
}

impl Instance {
    /// Serves the admin API on `admin.listen` (refusing an address other hosts reach
    /// without a token), then, on a thread of its own, reads the rules from the control
    /// topic and runs the pipeline in consumer group `kafka.group_id` until stopped.
    /// Returns once the admin API answers; the rules and the pipeline follow whenever the
    /// cluster is there ([`Self::wait_rules`], `/readyz`).
    pub fn start(config: &Config, options: Options) -> Result<Self, RuntimeError> {
        let labels = Arc::new(LabelStore::new(options.labels));
        let admin = AdminPlane::open(config, Some(Arc::clone(&labels)), options.metrics)?;
        let address = admin.address();
        let status = Arc::clone(admin.status());
        let recent = admin.recent();
        let stop = options.stop.unwrap_or_default();
        let rules = Arc::new(Loaded::default());
        let thread = {
            let config = config.clone();
            let stop = Arc::clone(&stop);
            let labels = Arc::clone(&labels);
            let rules = Arc::clone(&rules);
            let seed = options.seed;
            std::thread::Builder::new()
                .name("instance".into())
                .spawn(move || {
                    let ended = run(&config, admin, seed.as_deref(), stop, labels, &rules);
                    rules.end();
                    ended
                })
                .map_err(RuntimeError::Thread)?
        };
        tracing::info!(admin = %address, brokers = %config.kafka.brokers, topic = %config.kafka.topics.transactions, rules_topic = %config.kafka.topics.rules, "instance started");
        Ok(Self {
            address,
            status,
            recent,
            labels,
            stop,
            rules,
            thread,
        })
    }

    /// Where the admin API listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// What `/readyz` and `/api/v1/status` report.
    pub fn status(&self) -> &Arc<StatusBoard> {
        &self.status
    }

    /// The events kept for backtests.
    pub fn recent(&self) -> &Arc<RecentEvents> {
        &self.recent
    }

    /// The labels kept for backtests.
    pub fn labels(&self) -> &Arc<LabelStore> {
        &self.labels
    }

    /// The rules control plane, once loaded.
    pub fn rules(&self) -> Option<Arc<RulesControl>> {
        lock(&self.rules.control).clone()
    }

    /// Waits at most `timeout` for the rules to be loaded.
    pub fn wait_rules(&self, timeout: Duration) -> Result<Arc<RulesControl>, RuntimeError> {
        let deadline = Instant::now() + timeout;
        let mut control = lock(&self.rules.control);
        loop {
            if let Some(control) = control.as_ref() {
                return Ok(Arc::clone(control));
            }
            if self.rules.ended.load(Ordering::Acquire) {
                return Err(RuntimeError::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RuntimeError::RulesTimeout(timeout));
            }
            control = self
                .rules
                .changed
                .wait_timeout(control, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Whether the instance has ended (stopped, or failed: [`Self::wait`] says how).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Asks the instance to stop: the pipeline drains (every event read gets its output
    /// acknowledged and its offset committed) and ends.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Stops the instance and waits for it ([`Self::request_stop`], then [`Self::wait`]).
    pub fn stop(self) -> Result<Option<Summary>, RuntimeError> {
        self.request_stop();
        self.wait()
    }

    /// Waits for the instance to end: its pipeline's summary, or `None` when it was stopped
    /// before the rules were loaded.
    pub fn wait(self) -> Result<Option<Summary>, RuntimeError> {
        self.thread.join().unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(RuntimeError::Panicked(what))
        })
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("address", &self.address)
            .field("rules", &self.rules().map(|r| r.version()))
            .finish_non_exhaustive()
    }
}

/// The instance thread: the rules, then the pipeline.
fn run(
    config: &Config,
    admin: AdminPlane,
    seed: Option<&str>,
    stop: Arc<AtomicBool>,
    labels: Arc<LabelStore>,
    loaded: &Loaded,
) -> Ended {
    // The bundle given (or none) seeds the control topic when it is empty.
    let Some(plane) = admin.load_rules(seed, &stop)? else {
        tracing::info!("stopped while waiting for the Kafka cluster");
        return Ok(None);
    };
    loaded.set(Arc::clone(&plane.control));
    if config.pipeline.topology == Topology::Partitioned {
        let running = riskstream_topology::start(config, plane.control.table(), stop)?;
        running.wait()?;
        drop(plane);
        return Ok(Some(Summary::default()));
    }
    let summary = riskstream_kafka::run_observed(
        config,
        plane.control.table(),
        Assignment::Group,
        stop,
        Some(labels),
        plane.observers(),
    )?;
    // The admin API answers until the pipeline has drained.
    drop(plane);
    Ok(Some(summary))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

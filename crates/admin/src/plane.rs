//! What the admin API needs of a rules control plane ([`RulesPlane`]): the running version,
//! every applied one, checking a bundle, and publishing one against an expected version.
//!
//! Two implementations: the control topic ([`RulesControl`], every instance of a deployment
//! sees every update) and [`LocalRules`], one process's versions in memory (an instance that
//! has no control topic, and the API's own tests, which then run without a broker).
//!
//! What it must not do: serve HTTP (the router's) or score events (the pipeline reads the
//! [`RuleTable`] the plane feeds).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use riskstream_kafka::{ControlError, Outcome, RulesControl, RulesVersion};
use riskstream_pipeline::source::now_ms;
use riskstream_rules::{BundleError, CompiledBundle, RuleCompiler, RuleTable};

/// A rules control plane as the admin API sees it. Blocking methods run on blocking threads.
pub trait RulesPlane: Send + Sync + std::fmt::Debug {
    /// The rule table this plane feeds (the pipeline scores with it).
    fn table(&self) -> Arc<RuleTable>;

    /// The running version.
    fn version(&self) -> u64 {
        self.table().version()
    }

    /// The compiler bundles are checked with (this deployment's event schema).
    fn compiler(&self) -> &RuleCompiler;

    /// Every applied version, oldest first.
    fn versions(&self) -> Vec<Arc<RulesVersion>>;

    /// One applied version.
    fn get(&self, version: u64) -> Option<Arc<RulesVersion>>;

    /// Checks `bundle` as the version after the running one, without publishing it.
    fn validate(&self, bundle: &str) -> Result<CompiledBundle, BundleError> {
        self.compiler().compile_text(bundle, self.version() + 1)
    }

    /// Publishes `bundle` to replace version `expected`; waits at most `timeout` until it is
    /// decided. A stale `expected` or an invalid bundle changes nothing. Blocking.
    fn publish(
        &self,
        bundle: &str,
        expected: u64,
        comment: Option<String>,
        timeout: Duration,
    ) -> Result<Outcome, ControlError>;
}

impl RulesPlane for RulesControl {
    fn table(&self) -> Arc<RuleTable> {
        RulesControl::table(self)
    }

    fn version(&self) -> u64 {
        RulesControl::version(self)
    }

    fn compiler(&self) -> &RuleCompiler {
        RulesControl::compiler(self)
    }

    fn versions(&self) -> Vec<Arc<RulesVersion>> {
        RulesControl::versions(self)
    }

    fn get(&self, version: u64) -> Option<Arc<RulesVersion>> {
        RulesControl::get(self, version)
    }

    fn publish(
        &self,
        bundle: &str,
        expected: u64,
        comment: Option<String>,
        timeout: Duration,
    ) -> Result<Outcome, ControlError> {
        RulesControl::publish(self, bundle, expected, comment, timeout)
    }
}

/// One process's rules, versions kept in memory: publishing compiles the bundle and swaps it
/// in when `expected` is still the running version. Nothing outlives the process and no
/// other instance sees an update; a deployment of several instances uses the control topic.
#[derive(Debug)]
pub struct LocalRules {
    compiler: RuleCompiler,
    table: Arc<RuleTable>,
    origin: String,
    /// Every applied version; the lock also orders publishes.
    versions: Mutex<BTreeMap<u64, Arc<RulesVersion>>>,
}

impl LocalRules {
    /// Starts at version 1 with `bundle`, published by `origin`.
    pub fn new(compiler: RuleCompiler, bundle: &str, origin: &str) -> Result<Self, BundleError> {
        let compiled = compiler.compile_text(bundle, 1)?;
        let first = RulesVersion {
            version: 1,
            published_at: now_ms(),
            origin: origin.to_string(),
            comment: None,
            bundle: bundle.to_string(),
            offset: -1,
        };
        Ok(Self {
            compiler,
            table: Arc::new(RuleTable::new(compiled)),
            origin: origin.to_string(),
            versions: Mutex::new(BTreeMap::from([(1, Arc::new(first))])),
        })
    }
}

impl RulesPlane for LocalRules {
    fn table(&self) -> Arc<RuleTable> {
        Arc::clone(&self.table)
    }

    fn compiler(&self) -> &RuleCompiler {
        &self.compiler
    }

    fn versions(&self) -> Vec<Arc<RulesVersion>> {
        lock(&self.versions).values().cloned().collect()
    }

    fn get(&self, version: u64) -> Option<Arc<RulesVersion>> {
        lock(&self.versions).get(&version).cloned()
    }

    fn publish(
        &self,
        bundle: &str,
        expected: u64,
        comment: Option<String>,
        _timeout: Duration,
    ) -> Result<Outcome, ControlError> {
        let mut versions = lock(&self.versions);
        let current = self.table.version();
        if expected != current {
            return Ok(Outcome::Conflict { expected, current });
        }
        let compiled = match self.compiler.compile_text(bundle, current + 1) {
            Ok(compiled) => compiled,
            Err(e) => return Ok(Outcome::Rejected(e)),
        };
        let version = compiled.version();
        if let Err(stale) = self.table.publish(Arc::new(compiled)) {
            // Only this plane publishes to its table, under the lock: not reachable unless
            // someone else holds the table.
            return Ok(Outcome::Conflict {
                expected,
                current: stale.running,
            });
        }
        versions.insert(
            version,
            Arc::new(RulesVersion {
                version,
                published_at: now_ms(),
                origin: self.origin.clone(),
                comment,
                bundle: bundle.to_string(),
                offset: -1,
            }),
        );
        Ok(Outcome::Applied(version))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

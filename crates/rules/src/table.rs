//! The RCU rule table: the live compiled bundle behind one atomic pointer.
//!
//! Readers (the scoring loop) call [`RuleTable::load`] once per micro-batch: a lock-free atomic
//! load and reference-count increment, so every event of a batch is scored by exactly one bundle.
//! Writers (reload, admin API) build and compile a bundle completely first and then publish it
//! with one pointer swap; a half-built bundle is never visible. The old bundle is freed when the
//! last batch holding it finishes. Versions only move forward.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::compile::CompiledBundle;

/// A publish was refused because the table already holds this or a newer version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bundle version {offered} is not newer than the running version {running}")]
pub struct StaleVersion {
    pub offered: u64,
    pub running: u64,
}

/// The live rule bundle, shared by every scoring thread.
pub struct RuleTable {
    current: ArcSwap<CompiledBundle>,
}

impl std::fmt::Debug for RuleTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleTable")
            .field("version", &self.version())
            .finish()
    }
}

impl RuleTable {
    pub fn new(bundle: CompiledBundle) -> Self {
        Self {
            current: ArcSwap::from_pointee(bundle),
        }
    }

    /// The bundle to score the next batch with. Lock-free; call once per batch.
    pub fn load(&self) -> Arc<CompiledBundle> {
        self.current.load_full()
    }

    /// The running version.
    pub fn version(&self) -> u64 {
        self.current.load().version()
    }

    /// Installs `bundle` if its version is newer than the running one; returns the replaced one.
    pub fn publish(
        &self,
        bundle: Arc<CompiledBundle>,
    ) -> Result<Arc<CompiledBundle>, StaleVersion> {
        let mut current = self.current.load_full();
        loop {
            if bundle.version() <= current.version() {
                return Err(StaleVersion {
                    offered: bundle.version(),
                    running: current.version(),
                });
            }
            let previous = self.current.compare_and_swap(&current, Arc::clone(&bundle));
            if Arc::ptr_eq(&previous, &current) {
                return Ok(current);
            }
            current = arc_swap::Guard::into_inner(previous);
        }
    }
}

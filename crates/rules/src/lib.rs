//! Rules: rule bundles, their compilation with DataFusion, scoring, and the RCU rule table.
//!
//! This crate owns everything between "a batch of events with feature columns" and "a decision
//! per event": parsing and validating bundle documents ([`bundle`]), compiling their expressions
//! once into DataFusion physical expressions ([`compile`]), evaluating them vectorised over a
//! batch ([`score`]) and publishing compiled bundles to scoring threads without locks
//! ([`table`]). It must not do I/O, own feature state, or block: compilation happens off the hot
//! path, scoring is pure computation over Arrow arrays.

pub mod bundle;
pub mod compile;
pub mod error;
pub mod functions;
pub mod score;
pub mod table;

pub use bundle::{
    Agg, BundleDoc, Decision, DecisionSpec, FeatureKind, FeatureSpec, Mode, RuleSpec, ScoreSpec,
    WindowFeature,
};
pub use compile::{CompiledBundle, CompiledWindowFeature, RuleCompiler};
pub use error::{BundleError, Problem, Subject};
pub use score::{Evaluated, RuleHits, ScoreError, Scores};
pub use table::{RuleTable, StaleVersion};

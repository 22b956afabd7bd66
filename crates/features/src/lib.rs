//! Features: keyed sliding-window aggregates per entity, exact and point-in-time correct.
//!
//! For an event `e` with entity key `k` and event time `t`, a windowed feature aggregates the
//! events with key `k` and event time in `(t − window, t]` that were processed before `e`, plus
//! `e` itself (DESIGN.md section 4). [`FeatureOperator::compute`] walks a batch in arrival order,
//! folds each event into its keys' state and reads the feature values, producing one column per
//! windowed feature of the running bundle.
//!
//! State is kept per (feature definition, entity key) as time panes ([`window`]), so a bundle
//! reload that keeps a feature keeps its state, and a new or changed definition starts empty.
//! This crate computes; it must not decode, score, or decide anything about time other than what
//! the time stage hands it (corrected event times and the watermark for eviction).

pub mod operator;
pub mod window;

pub use operator::{FeatureError, FeatureOperator, StateStats};

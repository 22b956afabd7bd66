//! Features: keyed sliding-window aggregates per entity, exact and point-in-time correct.
//!
//! For an event `e` with entity key `k` and event time `t`, a windowed feature aggregates the
//! events with key `k` and event time in `(t − window, t]` that were processed before `e`, plus
//! `e` itself (DESIGN.md section 4). [`FeatureOperator::compute`] walks a batch in arrival order,
//! folds each event into its keys' state and reads the feature values, producing one column per
//! windowed feature of the running bundle.
//!
//! Features over the same key fields form one record per key, and features over the same
//! `where` filter read one event log in it, whatever their lengths and fields ([`layout`]). A
//! log keeps its events once and answers every length in one walk over them ([`log`]); a large
//! one also keeps indexed windows of pre-aggregated panes ([`window`]). Records live in
//! RocksDB (through `riskstream-state`) behind a bounded write-back cache of hot records; they
//! reach the store between batches only, in one write batch each time: when the cache trims
//! itself to its memory cap ([`FeatureOperator::end_batch`]) and on [`FeatureOperator::flush`]
//! (periodically, before a checkpoint, at shutdown). A bundle reload keeps the state of every
//! window it keeps.
//!
//! The operator blocks on RocksDB: run it on a thread where blocking is allowed, never on an
//! async runtime's workers. This crate computes; it must not decode, score, or decide anything
//! about time other than what the time stage hands it (corrected event times and the horizon
//! below which no event can arrive any more).

mod cache;
pub mod layout;
pub mod log;
pub mod operator;
pub mod window;

pub use operator::{
    state_report, CacheStats, FeatureError, FeatureOperator, LogState, StateReport, StateStats,
    Warmth,
};

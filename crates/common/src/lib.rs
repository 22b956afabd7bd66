//! Shared vocabulary of riskstream: configuration, the event schema, and where a record came from.
//!
//! This crate owns the types every pipeline stage agrees on. It must stay small and cheap to
//! compile: no DataFusion, no I/O beyond reading configuration files, no pipeline logic.

pub mod batch;
pub mod config;
pub mod schema;

pub use batch::{DeadLetter, DeadReason, RawBatch};
pub use config::{
    AdminConfig, CheckpointConfig, Config, ConfigError, Delivery, KafkaConfig, PipelineConfig,
    Secret, ShutdownConfig, SkewPolicy, StateConfig, TelemetryConfig, TimeConfig, TopicsConfig,
    Topology, VerdictConfig, VerdictFeatures,
};
pub use schema::{EventSchema, FieldType, SchemaConfig, SchemaError};

/// Where a raw record came from: a source partition and an offset within it.
///
/// Kafka sources use the partition and the message offset. The file source uses partition 0 and
/// the 1-based line number as the offset, so a dead-letter entry points at the line to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

//! The event schema declared in configuration, and its Arrow form.
//!
//! Every stage sees events as Arrow columns in the declared field order. Event time is always
//! `Timestamp(Millisecond, UTC)` whatever the wire form (RFC 3339 string or epoch milliseconds).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

/// The `[schema]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Field holding the unique event id (verdicts are keyed by it).
    pub event_id: String,
    /// Field holding the event time.
    pub event_time: String,
    /// Fields identifying entities that features may be keyed by.
    #[serde(default)]
    pub entity_keys: Vec<String>,
    /// Records larger than this many bytes are dead-lettered as `oversized`.
    pub max_event_bytes: usize,
    /// The fields, in column order.
    pub fields: Vec<FieldConfig>,
}

/// One declared event field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// A required field must be present and non-null, or the record is dead-lettered.
    #[serde(default = "default_required")]
    pub required: bool,
}

fn default_required() -> bool {
    true
}

/// Wire types an event field may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Int64,
    Float64,
    Boolean,
    /// RFC 3339 string or epoch milliseconds, stored as `Timestamp(Millisecond, UTC)`.
    Timestamp,
}

impl FieldType {
    /// The Arrow type events of this field decode into.
    pub fn arrow_type(self) -> DataType {
        match self {
            FieldType::String => DataType::Utf8,
            FieldType::Int64 => DataType::Int64,
            FieldType::Float64 => DataType::Float64,
            FieldType::Boolean => DataType::Boolean,
            FieldType::Timestamp => timestamp_type(),
        }
    }

    /// How a person would name the JSON value this field expects.
    pub fn expected_json(self) -> &'static str {
        match self {
            FieldType::String => "a string",
            FieldType::Int64 => "an integer",
            FieldType::Float64 => "a number",
            FieldType::Boolean => "true or false",
            FieldType::Timestamp => "an RFC 3339 string or epoch milliseconds",
        }
    }
}

/// The Arrow type of event time.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The schema configuration is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema declares no fields")]
    NoFields,
    #[error("schema declares field `{0}` twice")]
    DuplicateField(String),
    #[error("schema.{role} names `{name}`, which is not a declared field")]
    UnknownField { role: &'static str, name: String },
    #[error("schema.{role} field `{name}` must be required (it cannot be null)")]
    MustBeRequired { role: &'static str, name: String },
    #[error("schema.event_time field `{0}` must have type `timestamp`")]
    EventTimeType(String),
    #[error("schema.event_id field `{0}` must have type `string` or `int64`")]
    EventIdType(String),
    #[error("schema.max_event_bytes must be at least 2")]
    MaxEventBytes,
}

/// A validated event schema.
#[derive(Debug, Clone)]
pub struct EventSchema {
    arrow: SchemaRef,
    fields: Vec<FieldConfig>,
    event_id: usize,
    event_time: usize,
    entity_keys: Vec<usize>,
    max_event_bytes: usize,
}

impl EventSchema {
    /// Validates the configuration and builds the Arrow schema.
    pub fn new(config: &SchemaConfig) -> Result<Self, SchemaError> {
        if config.fields.is_empty() {
            return Err(SchemaError::NoFields);
        }
        if config.max_event_bytes < 2 {
            return Err(SchemaError::MaxEventBytes);
        }
        let mut seen = HashSet::new();
        for f in &config.fields {
            if !seen.insert(f.name.as_str()) {
                return Err(SchemaError::DuplicateField(f.name.clone()));
            }
        }
        let index_of = |role: &'static str, name: &str| {
            config
                .fields
                .iter()
                .position(|f| f.name == name)
                .ok_or_else(|| SchemaError::UnknownField {
                    role,
                    name: name.to_string(),
                })
        };
        let event_id = index_of("event_id", &config.event_id)?;
        let event_time = index_of("event_time", &config.event_time)?;
        let entity_keys = config
            .entity_keys
            .iter()
            .map(|k| index_of("entity_keys", k))
            .collect::<Result<Vec<_>, _>>()?;
        for (role, idx) in [("event_id", event_id), ("event_time", event_time)] {
            if !config.fields[idx].required {
                return Err(SchemaError::MustBeRequired {
                    role,
                    name: config.fields[idx].name.clone(),
                });
            }
        }
        if config.fields[event_time].ty != FieldType::Timestamp {
            return Err(SchemaError::EventTimeType(config.event_time.clone()));
        }
        if !matches!(
            config.fields[event_id].ty,
            FieldType::String | FieldType::Int64
        ) {
            return Err(SchemaError::EventIdType(config.event_id.clone()));
        }
        let arrow = Arc::new(Schema::new(
            config
                .fields
                .iter()
                .map(|f| Field::new(&f.name, f.ty.arrow_type(), !f.required))
                .collect::<Vec<_>>(),
        ));
        Ok(Self {
            arrow,
            fields: config.fields.clone(),
            event_id,
            event_time,
            entity_keys,
            max_event_bytes: config.max_event_bytes,
        })
    }

    /// The Arrow schema of decoded event batches.
    pub fn arrow(&self) -> &SchemaRef {
        &self.arrow
    }

    /// The declared fields, in column order.
    pub fn fields(&self) -> &[FieldConfig] {
        &self.fields
    }

    /// Column index of the event id.
    pub fn event_id(&self) -> usize {
        self.event_id
    }

    /// Column index of the event time.
    pub fn event_time(&self) -> usize {
        self.event_time
    }

    pub fn event_id_name(&self) -> &str {
        &self.fields[self.event_id].name
    }

    pub fn event_time_name(&self) -> &str {
        &self.fields[self.event_time].name
    }

    /// Column indexes of the entity key fields.
    pub fn entity_keys(&self) -> &[usize] {
        &self.entity_keys
    }

    /// Largest accepted record, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(fields: &[(&str, FieldType, bool)]) -> SchemaConfig {
        SchemaConfig {
            event_id: "id".into(),
            event_time: "ts".into(),
            entity_keys: vec![],
            max_event_bytes: 1024,
            fields: fields
                .iter()
                .map(|(n, t, r)| FieldConfig {
                    name: n.to_string(),
                    ty: *t,
                    required: *r,
                })
                .collect(),
        }
    }

    #[test]
    fn rejects_inconsistent_schemas() {
        let ok = config(&[
            ("id", FieldType::String, true),
            ("ts", FieldType::Timestamp, true),
        ]);
        assert!(EventSchema::new(&ok).is_ok());

        let dup = config(&[
            ("id", FieldType::String, true),
            ("id", FieldType::String, true),
        ]);
        assert!(matches!(
            EventSchema::new(&dup),
            Err(SchemaError::DuplicateField(_))
        ));

        let no_ts = config(&[("id", FieldType::String, true)]);
        assert!(matches!(
            EventSchema::new(&no_ts),
            Err(SchemaError::UnknownField {
                role: "event_time",
                ..
            })
        ));

        let optional_ts = config(&[
            ("id", FieldType::String, true),
            ("ts", FieldType::Timestamp, false),
        ]);
        assert!(matches!(
            EventSchema::new(&optional_ts),
            Err(SchemaError::MustBeRequired { .. })
        ));

        let ts_as_string = config(&[
            ("id", FieldType::String, true),
            ("ts", FieldType::String, true),
        ]);
        assert!(matches!(
            EventSchema::new(&ts_as_string),
            Err(SchemaError::EventTimeType(_))
        ));
    }
}

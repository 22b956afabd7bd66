//! Event batches for the operator tests, in the default configuration's schema.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{Float64Type, Int64Type};
use riskstream_common::{Config, EventSchema};

pub const MIN: i64 = 60_000;
/// 2025-01-01T00:00:00Z, minute 0 of the tests.
pub const START_MS: i64 = 1_735_689_600_000;

pub fn schema() -> EventSchema {
    Config::defaults().unwrap().event_schema().unwrap()
}

/// One event per `(minute, customer, amount)`, with `tx_type` and event times from `START_MS`;
/// returns the batch and its event times.
pub fn events(rows: &[(i64, &str, f64)], tx_type: &str) -> (RecordBatch, Vec<i64>) {
    let schema = schema();
    let n = rows.len();
    let times: Vec<i64> = rows.iter().map(|r| START_MS + r.0 * MIN).collect();
    let columns: Vec<ArrayRef> = schema
        .arrow()
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "ts" => Arc::new(TimestampMillisecondArray::from(times.clone()).with_timezone("UTC"))
                as ArrayRef,
            "amount" => {
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))) as ArrayRef
            }
            "customer_id" => {
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))) as ArrayRef
            }
            "tx_type" => Arc::new(StringArray::from(vec![tx_type; n])) as ArrayRef,
            "tx_id" | "terminal_id" => Arc::new(StringArray::from(vec!["x"; n])) as ArrayRef,
            _ => Arc::new(Float64Array::from(vec![0.0; n])) as ArrayRef,
        })
        .collect();
    (
        RecordBatch::try_new(Arc::clone(schema.arrow()), columns).unwrap(),
        times,
    )
}

/// Feature `name`'s value in row `row` of the operator's output, as a number (counts are
/// integers there); `None` for NULL.
pub fn feature_value(out: &RecordBatch, name: &str, row: usize) -> Option<f64> {
    let column = out.column_by_name(name).unwrap();
    if column.is_null(row) {
        None
    } else if let Some(ints) = column.as_primitive_opt::<Int64Type>() {
        Some(ints.value(row) as f64)
    } else {
        Some(column.as_primitive::<Float64Type>().value(row))
    }
}

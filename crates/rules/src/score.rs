//! Scoring: evaluating a compiled bundle over one micro-batch, vectorised rule by rule.
//!
//! A rule's `when` is the conjunction of its conditions (its top-level `AND` terms), and the
//! bundle evaluates each distinct condition at most once per batch, when the first rule that
//! needs it asks: rules that share `amount > 100` share its evaluation. A rule stops at its
//! first condition that holds for no row.
//!
//! A runtime problem in an expression (division by zero, overflow, a NULL or non-finite score)
//! never fails the batch: the batch is re-evaluated row by row for that expression only, the
//! rows that fail count in `riskstream_rule_eval_errors_total` (or
//! `riskstream_feature_eval_errors_total`) and the rule is treated as not fired for them (the
//! feature is NULL for them).

use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::buffer::BooleanBuffer;
use arrow::compute::concat;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use datafusion::physical_expr::PhysicalExpr;
use metrics::Counter;

use crate::bundle::Decision;
use crate::compile::{CompiledBundle, CompiledScore};

/// The caller handed the bundle a batch it was not compiled for: a bug in the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("batch schema does not match bundle v{version}: expected {expected}, found {found}")]
    SchemaMismatch {
        version: u64,
        expected: String,
        found: String,
    },
    #[error("internal error assembling the scoring batch (please report): {0}")]
    Arrow(#[from] ArrowError),
}

/// One rule's hits in a batch (only rules with at least one hit are reported).
#[derive(Debug)]
pub struct RuleHits {
    /// Index of the rule in its bundle.
    pub rule: usize,
    /// Rows where the rule fired.
    pub fired: BooleanBuffer,
    score: HitScore,
}

#[derive(Debug)]
enum HitScore {
    Constant(f64),
    PerRow(Float64Array),
}

impl RuleHits {
    /// The score the rule contributed to `row` (meaningful where it fired).
    pub fn score(&self, row: usize) -> f64 {
        match &self.score {
            HitScore::Constant(v) => *v,
            HitScore::PerRow(a) => a.value(row),
        }
    }
}

/// Decisions for a batch.
#[derive(Debug)]
pub struct Scores {
    /// The bundle version that scored every row of the batch.
    pub version: u64,
    /// Sum of the scores of the active rules that fired, per row.
    pub total: Vec<f64>,
    pub decision: Vec<Decision>,
    /// Fired rules (active and shadow), in bundle order.
    pub hits: Vec<RuleHits>,
}

/// A scored batch: the scoring batch (events + features) and the decisions.
#[derive(Debug)]
pub struct Evaluated {
    /// The input columns followed by the row-level feature columns.
    pub batch: RecordBatch,
    pub scores: Scores,
}

impl CompiledBundle {
    /// Adds row-level features to `input` (event + windowed feature columns) and scores it.
    pub fn evaluate(&self, input: &RecordBatch) -> Result<Evaluated, ScoreError> {
        if input.schema().fields() != self.input_schema.fields() {
            return Err(ScoreError::SchemaMismatch {
                version: self.version,
                expected: describe(&self.input_schema),
                found: describe(&input.schema()),
            });
        }
        let batch = self.add_row_features(input)?;
        let scores = self.score(&batch);
        Ok(Evaluated { batch, scores })
    }

    fn add_row_features(&self, input: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        if self.row_features.is_empty() {
            return Ok(input.clone());
        }
        let mut columns = input.columns().to_vec();
        let n_input = columns.len();
        for (i, feature) in self.row_features.iter().enumerate() {
            let field = self.scoring_schema.field(n_input + i);
            let so_far = RecordBatch::try_new(
                Arc::new(
                    self.scoring_schema
                        .project(&(0..n_input + i).collect::<Vec<_>>())?,
                ),
                columns.clone(),
            )?;
            debug_assert_eq!(field.name(), &feature.name);
            columns.push(evaluate(
                &feature.expr,
                &so_far,
                field.data_type(),
                &feature.errors,
            ));
        }
        RecordBatch::try_new(Arc::clone(&self.scoring_schema), columns)
    }

    fn score(&self, batch: &RecordBatch) -> Scores {
        let n = batch.num_rows();
        let mut total = vec![0.0; n];
        let mut forced = vec![Decision::Allow; n];
        let mut hits = Vec::new();
        // Per condition, once evaluated: the rows where it holds, and those where it failed.
        let mut conditions: Vec<Option<(BooleanBuffer, Option<BooleanBuffer>)>> =
            vec![None; self.conditions.len()];
        for (index, rule) in self.rules.iter().enumerate() {
            let mut fired: Option<BooleanBuffer> = None;
            let mut failed: Option<BooleanBuffer> = None;
            for &c in &rule.when {
                let (holds, broke) = conditions[c].get_or_insert_with(|| {
                    let (when, broke) =
                        evaluate_rows(&self.conditions[c], batch, &DataType::Boolean);
                    let when = when.as_boolean();
                    let holds = match when.nulls() {
                        Some(valid) => when.values() & valid.inner(),
                        None => when.values().clone(),
                    };
                    (holds, broke)
                });
                fired = Some(match fired {
                    Some(f) => &f & holds,
                    None => holds.clone(),
                });
                if let Some(broke) = broke {
                    failed = Some(match failed {
                        Some(f) => &f | broke,
                        None => broke.clone(),
                    });
                }
                if fired.as_ref().is_some_and(|f| f.count_set_bits() == 0) {
                    break;
                }
            }
            if let Some(failed) = failed {
                rule.errors.increment(failed.count_set_bits() as u64);
            }
            let Some(mut fired) = fired else {
                continue;
            };
            if fired.count_set_bits() == 0 {
                continue;
            }
            let score = match &rule.score {
                CompiledScore::Constant(v) => HitScore::Constant(*v),
                CompiledScore::Expr(expr) => {
                    let values = evaluate(expr, batch, &DataType::Float64, &rule.errors);
                    let values = values
                        .as_primitive::<arrow::datatypes::Float64Type>()
                        .clone();
                    let usable = BooleanBuffer::collect_bool(n, |i| {
                        fired.value(i) && values.is_valid(i) && values.value(i).is_finite()
                    });
                    let unusable = fired.count_set_bits() - usable.count_set_bits();
                    if unusable > 0 {
                        rule.errors.increment(unusable as u64);
                        fired = usable;
                    }
                    HitScore::PerRow(values)
                }
            };
            let count = fired.count_set_bits();
            if count == 0 {
                continue;
            }
            rule.hits.increment(count as u64);
            let hit = RuleHits {
                rule: index,
                fired,
                score,
            };
            if rule.mode == crate::Mode::Active {
                for row in hit.fired.set_indices() {
                    total[row] += hit.score(row);
                    if let Some(action) = rule.action {
                        forced[row] = forced[row].max(action);
                    }
                }
            }
            hits.push(hit);
        }
        let decision = total
            .iter()
            .zip(&forced)
            .map(|(score, forced)| self.decision.for_score(*score).max(*forced))
            .collect();
        Scores {
            version: self.version,
            total,
            decision,
            hits,
        }
    }
}

/// Evaluates `expr` over the whole batch; on a runtime error, row by row (see module docs).
pub(crate) fn evaluate(
    expr: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
    data_type: &DataType,
    errors: &Counter,
) -> ArrayRef {
    let (array, failed) = evaluate_rows(expr, batch, data_type);
    if let Some(failed) = failed {
        errors.increment(failed.count_set_bits() as u64);
    }
    array
}

/// [`evaluate`], returning the rows that failed (NULL in the result) instead of counting them.
fn evaluate_rows(
    expr: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
    data_type: &DataType,
) -> (ArrayRef, Option<BooleanBuffer>) {
    let n = batch.num_rows();
    if let Ok(array) = expr.evaluate(batch).and_then(|v| v.into_array(n)) {
        return (array, None);
    }
    let mut failed = vec![false; n];
    let rows: Vec<ArrayRef> = (0..n)
        .map(|i| {
            let row = batch.slice(i, 1);
            expr.evaluate(&row)
                .and_then(|v| v.into_array(1))
                .unwrap_or_else(|_| {
                    failed[i] = true;
                    new_null_array(data_type, 1)
                })
        })
        .collect();
    let parts: Vec<&dyn Array> = rows.iter().map(|a| a.as_ref()).collect();
    // All parts share `data_type`, so concatenation cannot fail; be defensive all the same.
    let array = concat(&parts).unwrap_or_else(|_| new_null_array(data_type, n));
    (array, Some(BooleanBuffer::from(failed)))
}

fn describe(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

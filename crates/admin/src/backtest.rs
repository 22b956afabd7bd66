//! Backtests: a candidate bundle scored over the recent-events buffer, against the running one.
//!
//! The buffer holds Arrow batches of recently scored events with the windowed feature values
//! they were scored with. The candidate's rules and row-level features are evaluated over them
//! with DataFusion (its compiled physical expressions), as is the running bundle, and the report
//! gives per-rule hits, the decisions that would change, and precision/recall against labels
//! where the labels topic supplied them.
//!
//! What it must not do: change anything that runs, or count its evaluations in the production
//! metrics (candidates are compiled under a no-op recorder). A candidate whose windowed
//! features differ from those in the buffer is refused: their values would have to be
//! recomputed from history the buffer does not hold.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use riskstream_kafka::LabelStore;
use riskstream_rules::{CompiledBundle, Decision, Mode, RuleCompiler};
use serde::Serialize;

use crate::{blocking, bundle_text, AdminState, ApiError};

/// The report of one backtest.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The running version compared against.
    pub active_version: u64,
    /// Buffered events scored by both bundles.
    pub events: u64,
    /// Buffered events left out: scored by an older bundle whose feature values the running
    /// bundle would not see alike.
    pub skipped_events: u64,
    /// Per candidate rule: hits and the running bundle's hits for the same id.
    pub rules: Vec<RuleReport>,
    /// Decisions by value, candidate and running.
    pub decisions: DecisionCounts,
    /// Events whose decision would change, by `from->to` (e.g. `allow->review`).
    pub changed: BTreeMap<String, u64>,
    pub changed_total: u64,
    /// Quality against labels (flagged = review or block), where labels are known.
    pub labels: LabelReport,
}

#[derive(Debug, Serialize)]
pub struct RuleReport {
    pub id: String,
    pub mode: &'static str,
    pub hits: u64,
    /// Hits of the rule with the same id in the running bundle (absent: no such rule).
    pub active_hits: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct DecisionCounts {
    pub candidate: BTreeMap<&'static str, u64>,
    pub active: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct LabelReport {
    /// Events with a known label.
    pub labelled: u64,
    pub fraud: u64,
    pub candidate: Quality,
    pub active: Quality,
}

#[derive(Debug, Default, Serialize)]
pub struct Quality {
    pub true_positives: u64,
    pub false_positives: u64,
    pub false_negatives: u64,
    /// Absent when nothing was flagged (precision) or no fraud is labelled (recall).
    pub precision: Option<f64>,
    pub recall: Option<f64>,
}

impl Quality {
    fn add(&mut self, flagged: bool, fraud: bool) {
        match (flagged, fraud) {
            (true, true) => self.true_positives += 1,
            (true, false) => self.false_positives += 1,
            (false, true) => self.false_negatives += 1,
            (false, false) => {}
        }
    }

    fn finish(&mut self) {
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        self.precision = ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        );
        self.recall = ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        );
    }
}

/// Query parameters of a backtest.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct Params {
    /// A SQL boolean over event fields: only matching buffered events are scored.
    #[serde(rename = "where")]
    filter: Option<String>,
}

/// `POST /api/v1/rules/backtest[?where=SQL]`: the body is the candidate bundle.
pub(crate) async fn handle(
    State(state): State<AdminState>,
    Query(params): Query<Params>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Report>, ApiError> {
    let text = bundle_text(body)?;
    let control = state.control()?;
    let recent = Arc::clone(&state.recent);
    let labels = state.labels.clone();
    let event_id = state.event_id.clone();
    blocking(move || {
        let active = control.table().load();
        let candidate = compile_quietly(control.compiler(), &text)?;
        let filter = params
            .filter
            .as_deref()
            .map(|sql| compile_filter(control.compiler(), sql))
            .transpose()?;
        let mut batches = recent.snapshot();
        if batches.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_events",
                "the backtest buffer is empty: no event has been scored yet (admin.backtest_events sets its size)",
            ));
        }
        if let Some(filter) = &filter {
            batches = select(filter, batches)?;
        }
        run(&candidate, &active, &batches, labels.as_deref(), &event_id)
    })
    .await
    .map(Json)
}

/// Compiles a candidate without registering its counters in the process's metrics.
fn compile_quietly(compiler: &RuleCompiler, text: &str) -> Result<CompiledBundle, ApiError> {
    let recorder = metrics::NoopRecorder;
    metrics::with_local_recorder(&recorder, || compiler.compile_text(text, 0))
        .map_err(|e| ApiError::bundle(&e))
}

/// A `where` filter compiled as a one-rule bundle over the event fields (the same SQL dialect,
/// functions and checks as rules).
fn compile_filter(compiler: &RuleCompiler, sql: &str) -> Result<CompiledBundle, ApiError> {
    let doc = serde_json::json!({
        "rules": [{"id": "where", "when": sql, "score": 1}],
        "decision": {"review_at": 1, "block_at": 2},
    });
    let recorder = metrics::NoopRecorder;
    metrics::with_local_recorder(&recorder, || compiler.compile_text(&doc.to_string(), 0)).map_err(
        |e| {
            let detail = e
                .problems
                .first()
                .map(|p| p.message.clone())
                .unwrap_or_default();
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_filter",
                format!(
                    "the `where` filter is not a valid SQL boolean over event fields: {detail}"
                ),
            )
        },
    )
}

/// The rows of each batch that `filter` selects (batches left empty are dropped).
fn select(
    filter: &CompiledBundle,
    batches: Vec<(RecordBatch, Arc<CompiledBundle>)>,
) -> Result<Vec<(RecordBatch, Arc<CompiledBundle>)>, ApiError> {
    let mut selected = Vec::with_capacity(batches.len());
    for (batch, scored_by) in batches {
        let events = project(filter, &batch, &scored_by)
            .map_err(|c| ApiError::internal(format!("buffered events lack column `{c}`")))?;
        let evaluated =
            metrics::with_local_recorder(&metrics::NoopRecorder, || filter.evaluate(&events))
                .map_err(|e| ApiError::internal(format!("backtest filter failed: {e}")))?;
        let Some(hits) = evaluated.scores.hits.first() else {
            continue;
        };
        let mask = arrow::array::BooleanArray::from(hits.fired.clone());
        let kept = arrow::compute::filter_record_batch(&batch, &mask)
            .map_err(|e| ApiError::internal(format!("backtest filter failed: {e}")))?;
        selected.push((kept, scored_by));
    }
    Ok(selected)
}

/// Scores `batches` with both bundles and compares.
pub fn run(
    candidate: &CompiledBundle,
    active: &CompiledBundle,
    batches: &[(RecordBatch, Arc<CompiledBundle>)],
    labels: Option<&LabelStore>,
    event_id: &str,
) -> Result<Report, ApiError> {
    let mut report = Report {
        active_version: active.version(),
        ..Report::default()
    };
    let mut hits = vec![0u64; candidate.rule_count()];
    let mut active_hits = vec![0u64; active.rule_count()];
    // The newest batch has the running bundle's features: a candidate feature missing there is
    // missing everywhere.
    if let Some((batch, scored_by)) = batches.last() {
        if let Err(feature) = project(candidate, batch, scored_by) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "feature_not_buffered",
                format!("feature `{feature}` of the candidate is not among the buffered events' feature values (the running bundle computes no windowed feature of that name and definition); backtest with the running bundle's windowed features, or publish the rule in shadow mode to measure it live"),
            ));
        }
    }
    for (batch, scored_by) in batches {
        // Older batches may lack a feature a later bundle added: leave them out.
        let Ok(candidate_input) = project(candidate, batch, scored_by) else {
            report.skipped_events += batch.num_rows() as u64;
            continue;
        };
        let Ok(active_input) = project(active, batch, scored_by) else {
            report.skipped_events += batch.num_rows() as u64;
            continue;
        };
        let evaluate = |bundle: &CompiledBundle, input: &RecordBatch| {
            metrics::with_local_recorder(&metrics::NoopRecorder, || bundle.evaluate(input))
                .map_err(|e| ApiError::internal(format!("backtest evaluation failed: {e}")))
        };
        let new = evaluate(candidate, &candidate_input)?;
        let old = evaluate(active, &active_input)?;
        for h in &new.scores.hits {
            hits[h.rule] += h.fired.count_set_bits() as u64;
        }
        for h in &old.scores.hits {
            active_hits[h.rule] += h.fired.count_set_bits() as u64;
        }
        let tx_ids = labels
            .and_then(|_| batch.column_by_name(event_id))
            .and_then(|c| c.as_string_opt::<i32>());
        for (row, (n, o)) in new
            .scores
            .decision
            .iter()
            .zip(&old.scores.decision)
            .enumerate()
        {
            report.events += 1;
            *report.decisions.candidate.entry(n.as_str()).or_default() += 1;
            *report.decisions.active.entry(o.as_str()).or_default() += 1;
            if n != o {
                report.changed_total += 1;
                *report
                    .changed
                    .entry(format!("{}->{}", o.as_str(), n.as_str()))
                    .or_default() += 1;
            }
            let label = match (labels, tx_ids) {
                (Some(labels), Some(ids)) if ids.is_valid(row) => labels.get(ids.value(row)),
                _ => None,
            };
            if let Some(fraud) = label {
                report.labels.labelled += 1;
                report.labels.fraud += u64::from(fraud);
                report.labels.candidate.add(*n != Decision::Allow, fraud);
                report.labels.active.add(*o != Decision::Allow, fraud);
            }
        }
    }
    report.labels.candidate.finish();
    report.labels.active.finish();
    let active_ids: BTreeMap<&str, usize> = (0..active.rule_count())
        .map(|i| (active.rule(i).0, i))
        .collect();
    report.rules = (0..candidate.rule_count())
        .map(|i| {
            let (id, mode) = candidate.rule(i);
            RuleReport {
                id: id.to_string(),
                mode: match mode {
                    Mode::Active => "active",
                    Mode::Shadow => "shadow",
                },
                hits: hits[i],
                active_hits: active_ids.get(id).map(|&j| active_hits[j]),
            }
        })
        .collect();
    Ok(report)
}

/// `batch` (in `scored_by`'s input schema) projected to `bundle`'s input schema; `Err` names a
/// windowed feature of `bundle` the batch lacks or computed differently.
fn project(
    bundle: &CompiledBundle,
    batch: &RecordBatch,
    scored_by: &CompiledBundle,
) -> Result<RecordBatch, String> {
    for feature in bundle.window_features() {
        let same = scored_by
            .window_features()
            .iter()
            .any(|f| f.name == feature.name && f.spec == feature.spec);
        if !same {
            return Err(feature.name.clone());
        }
    }
    let schema = bundle.input_schema();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch
            .column_by_name(field.name())
            .ok_or_else(|| field.name().clone())?;
        columns.push(Arc::clone(column));
    }
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|_| schema.field(0).name().clone())
}

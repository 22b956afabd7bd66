//! Compiling a [`BundleDoc`] with DataFusion into physical expressions over the scoring schema.
//!
//! The scoring schema is the event schema, then one column per windowed feature, then one per
//! row-level feature, all in declared order. Every expression is parsed, type-coerced, constant
//! folded and planned once here; scoring only evaluates the planned expressions. Everything that
//! can be wrong with a bundle and its schema is reported here, naming the rule or feature.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DFSchema, DataFusionError, SchemaError};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{Cast, Expr, ExprSchemable};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::utils::{collect_columns, split_conjunction};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use metrics::Counter;
use riskstream_common::EventSchema;

use crate::bundle::{Agg, BundleDoc, Decision, DecisionSpec, Mode, ScoreSpec, WindowFeature};
use crate::error::{BundleError, Problems, Subject};
use crate::functions;

/// Compiles bundles against one event schema. Cheap to keep around; build once per schema.
pub struct RuleCompiler {
    state: SessionState,
    event: EventSchema,
}

impl std::fmt::Debug for RuleCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleCompiler").finish_non_exhaustive()
    }
}

/// A compiled, immutable rule bundle: what one RCU swap installs.
pub struct CompiledBundle {
    pub(crate) version: u64,
    pub(crate) doc: BundleDoc,
    /// Event columns + windowed feature columns: what the pipeline hands to [`Self::evaluate`].
    pub(crate) input_schema: SchemaRef,
    /// `input_schema` + row-level feature columns: what rules are evaluated over.
    pub(crate) scoring_schema: SchemaRef,
    pub(crate) window_features: Vec<CompiledWindowFeature>,
    pub(crate) row_features: Vec<CompiledRowFeature>,
    pub(crate) rules: Vec<CompiledRule>,
    /// The distinct conditions of the rules' `when`s (their top-level `AND` terms): a term
    /// several rules share, such as `amount > 100`, is evaluated once per batch.
    pub(crate) conditions: Vec<Arc<dyn PhysicalExpr>>,
    pub(crate) decision: DecisionSpec,
    /// Index of the first feature column in the scoring schema.
    pub(crate) first_feature_column: usize,
}

impl std::fmt::Debug for CompiledBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledBundle")
            .field("version", &self.version)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// A windowed feature with everything the feature operator needs, resolved to column indexes.
#[derive(Debug)]
pub struct CompiledWindowFeature {
    pub name: String,
    pub spec: WindowFeature,
    /// Column indexes (in the event schema) of the entity key fields.
    pub entity_columns: Vec<usize>,
    /// Column index (in the event schema) of the aggregated field.
    pub of_column: Option<usize>,
    /// The `where` filter, planned over the event schema.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The type of the feature column.
    pub data_type: DataType,
    /// Rows whose `where` filter failed at runtime (counted, treated as not passing).
    pub filter_errors: Counter,
}

pub(crate) struct CompiledRowFeature {
    pub(crate) name: String,
    pub(crate) expr: Arc<dyn PhysicalExpr>,
    pub(crate) errors: Counter,
}

pub(crate) enum CompiledScore {
    Constant(f64),
    Expr(Arc<dyn PhysicalExpr>),
}

pub(crate) struct CompiledRule {
    pub(crate) id: String,
    /// The features its `when` and `score` read: indexes among the feature columns (windowed,
    /// then row-level), ascending.
    pub(crate) features: Vec<usize>,
    pub(crate) mode: Mode,
    pub(crate) action: Option<Decision>,
    /// Its `when`, as the conditions that must all hold: indexes into the bundle's
    /// `conditions`, in the order written.
    pub(crate) when: Vec<usize>,
    pub(crate) score: CompiledScore,
    pub(crate) hits: Counter,
    pub(crate) errors: Counter,
}

impl CompiledWindowFeature {
    /// Rows of `events` (a batch in the event schema) that pass the feature's `where` filter; a
    /// NULL or failing filter counts as not passing.
    pub fn filter_mask(&self, events: &RecordBatch) -> Option<BooleanBuffer> {
        let filter = self.filter.as_ref()?;
        let mask = crate::score::evaluate(filter, events, &DataType::Boolean, &self.filter_errors);
        let mask = mask.as_boolean();
        Some(match mask.nulls() {
            Some(valid) => mask.values() & valid.inner(),
            None => mask.values().clone(),
        })
    }

    /// The window length in milliseconds.
    pub fn window_ms(&self) -> i64 {
        self.spec.window.as_millis() as i64
    }
}

impl CompiledBundle {
    /// The bundle version every verdict scored by it carries.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The document this bundle was compiled from.
    pub fn doc(&self) -> &BundleDoc {
        &self.doc
    }

    /// Event columns followed by windowed feature columns.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input_schema
    }

    /// The input schema followed by row-level feature columns.
    pub fn scoring_schema(&self) -> &SchemaRef {
        &self.scoring_schema
    }

    /// The windowed features, in the order of their columns.
    pub fn window_features(&self) -> &[CompiledWindowFeature] {
        &self.window_features
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Number of distinct conditions across the rules' `when`s (each evaluated once per batch
    /// however many rules share it), and the number of conditions as written.
    pub fn condition_counts(&self) -> (usize, usize) {
        (
            self.conditions.len(),
            self.rules.iter().map(|r| r.when.len()).sum(),
        )
    }

    /// Rule ids and modes, in bundle order (the order of [`crate::Scores::hits`] rule indexes).
    pub fn rule(&self, index: usize) -> (&str, Mode) {
        let r = &self.rules[index];
        (&r.id, r.mode)
    }

    /// The features rule `index` reads in its `when` and `score`, as indexes among the feature
    /// columns of [`Self::feature_columns`], ascending.
    pub fn rule_features(&self, index: usize) -> &[usize] {
        &self.rules[index].features
    }

    /// Names of all feature columns (windowed, then row-level), and the index of the first.
    pub fn feature_columns(&self) -> (usize, impl Iterator<Item = &str>) {
        (
            self.first_feature_column,
            self.scoring_schema.fields()[self.first_feature_column..]
                .iter()
                .map(|f| f.name().as_str()),
        )
    }

    pub fn decision(&self) -> &DecisionSpec {
        &self.decision
    }
}

impl RuleCompiler {
    /// A compiler for bundles over `event` with riskstream's SQL functions registered.
    pub fn new(event: &EventSchema) -> Self {
        let ctx = SessionContext::new();
        for udf in functions::all() {
            ctx.register_udf(udf);
        }
        Self {
            state: ctx.state(),
            event: event.clone(),
        }
    }

    /// Parses and compiles bundle text (YAML or JSON) as `version`.
    pub fn compile_text(&self, text: &str, version: u64) -> Result<CompiledBundle, BundleError> {
        self.compile(BundleDoc::parse(text)?, version)
    }

    /// Compiles a parsed bundle as `version`.
    pub fn compile(&self, doc: BundleDoc, version: u64) -> Result<CompiledBundle, BundleError> {
        let mut problems = Problems::default();
        let event_arrow = self.event.arrow();
        let event_df = df_schema(event_arrow);
        let event_names: HashSet<&str> = event_arrow
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();

        // Windowed features: resolved against the event schema.
        let mut fields: Vec<Field> = event_arrow
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let first_feature_column = fields.len();
        let mut window_features = Vec::new();
        for (spec, w) in doc.window_features() {
            let subject = Subject::Feature(spec.name.clone());
            if event_names.contains(spec.name.as_str()) {
                problems.push(
                    &subject,
                    "name clashes with an event field; pick another column name",
                );
            }
            let column = |name: &str, role: &str, problems: &mut Problems| {
                let found = event_arrow.index_of(name).ok();
                if found.is_none() {
                    problems.push(
                        &subject,
                        format!(
                            "unknown {role} field `{name}`; event fields are {}",
                            list(event_arrow)
                        ),
                    );
                }
                found
            };
            let entity_columns: Vec<Option<usize>> = w
                .entity
                .iter()
                .map(|e| column(e, "entity", &mut problems))
                .collect();
            let of_column =
                w.of.as_deref()
                    .and_then(|of| column(of, "`of`", &mut problems));
            let of_type = of_column.map(|i| event_arrow.field(i).data_type().clone());
            if let (Some(ty), true) = (&of_type, w.agg.needs_numeric()) {
                if !ty.is_numeric() {
                    problems.push(
                        &subject,
                        format!(
                            "`{}` needs a numeric `of` field, but `{}` is {ty}",
                            w.agg.name(),
                            w.of.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
            let filter = w.filter.as_deref().and_then(|sql| {
                match self.plan_boolean(sql, &event_df, "where") {
                    Ok(e) => Some(e),
                    Err(msg) => {
                        problems.push(&subject, msg);
                        None
                    }
                }
            });
            let data_type = match w.agg {
                Agg::Count | Agg::CountDistinct => DataType::Int64,
                _ => DataType::Float64,
            };
            fields.push(Field::new(&spec.name, data_type.clone(), true));
            if let Some(entity_columns) = entity_columns.into_iter().collect::<Option<Vec<_>>>() {
                window_features.push(CompiledWindowFeature {
                    name: spec.name.clone(),
                    spec: w.clone(),
                    entity_columns,
                    of_column,
                    filter,
                    data_type,
                    filter_errors: metrics::counter!(
                        "riskstream_feature_eval_errors_total",
                        "feature" => spec.name.clone()
                    ),
                });
            }
        }
        let input_schema = Arc::new(Schema::new(fields.clone()));

        // Row-level features: each sees the event, the windowed features and earlier row features.
        let mut row_features = Vec::new();
        for (spec, sql) in doc.row_features() {
            let subject = Subject::Feature(spec.name.clone());
            if fields.iter().any(|f| f.name() == &spec.name) {
                problems.push(
                    &subject,
                    "name clashes with an event field or an earlier feature",
                );
            }
            let schema = df_schema(&Arc::new(Schema::new(fields.clone())));
            match self.plan(sql, &schema, "expr") {
                Ok((expr, data_type)) => {
                    fields.push(Field::new(&spec.name, data_type, true));
                    row_features.push(CompiledRowFeature {
                        name: spec.name.clone(),
                        expr,
                        errors: metrics::counter!(
                            "riskstream_feature_eval_errors_total",
                            "feature" => spec.name.clone()
                        ),
                    });
                }
                Err(msg) => {
                    problems.push(&subject, msg);
                    fields.push(Field::new(&spec.name, DataType::Null, true));
                }
            }
        }
        let scoring_schema = Arc::new(Schema::new(fields));
        let scoring_df = df_schema(&scoring_schema);

        let mut rules = Vec::new();
        let mut conditions: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
        for spec in &doc.rules {
            let subject = Subject::Rule(spec.id.clone());
            let when = match self.plan_boolean(&spec.when, &scoring_df, "when") {
                Ok(e) => Some(e),
                Err(msg) => {
                    problems.push(&subject, msg);
                    None
                }
            };
            let score = match &spec.score {
                ScoreSpec::Constant(v) => Some(CompiledScore::Constant(*v)),
                ScoreSpec::Expr(sql) => match self.plan_number(sql, &scoring_df) {
                    Ok(e) => Some(CompiledScore::Expr(e)),
                    Err(msg) => {
                        problems.push(&subject, msg);
                        None
                    }
                },
            };
            if let (Some(when), Some(score)) = (when, score) {
                let mode = spec.mode.as_str();
                let mut read = collect_columns(&when);
                if let CompiledScore::Expr(e) = &score {
                    read.extend(collect_columns(e));
                }
                let mut features: Vec<usize> = read
                    .iter()
                    .filter_map(|c| c.index().checked_sub(first_feature_column))
                    .collect();
                features.sort_unstable();
                features.dedup();
                let when = split_conjunction(&when)
                    .into_iter()
                    .map(
                        |term| match conditions.iter().position(|c| c.as_ref() == term.as_ref()) {
                            Some(at) => at,
                            None => {
                                conditions.push(Arc::clone(term));
                                conditions.len() - 1
                            }
                        },
                    )
                    .collect();
                rules.push(CompiledRule {
                    id: spec.id.clone(),
                    features,
                    mode: spec.mode,
                    action: spec.action,
                    when,
                    score,
                    hits: metrics::counter!(
                        "riskstream_rule_hits_total",
                        "rule" => spec.id.clone(),
                        "mode" => mode
                    ),
                    errors: metrics::counter!(
                        "riskstream_rule_eval_errors_total",
                        "rule" => spec.id.clone()
                    ),
                });
            }
        }

        if !problems.is_empty() {
            return Err(problems.into_error());
        }
        Ok(CompiledBundle {
            version,
            decision: doc.decision,
            doc,
            input_schema,
            scoring_schema,
            window_features,
            row_features,
            rules,
            conditions,
            first_feature_column,
        })
    }

    /// Plans `sql` and requires a boolean result.
    fn plan_boolean(
        &self,
        sql: &str,
        schema: &DFSchema,
        what: &str,
    ) -> Result<Arc<dyn PhysicalExpr>, String> {
        let (expr, ty) = self.plan(sql, schema, what)?;
        if ty != DataType::Boolean {
            return Err(format!(
                "`{what}` must be a boolean condition, but `{sql}` has type {ty}"
            ));
        }
        Ok(expr)
    }

    /// Plans a numeric `score` expression, cast to Float64.
    fn plan_number(&self, sql: &str, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>, String> {
        let logical = self.logical(sql, schema, "score")?;
        let ty = logical
            .get_type(schema)
            .map_err(|e| explain(&e, "score", sql))?;
        if !ty.is_numeric() && ty != DataType::Null {
            return Err(format!(
                "`score` must be a number, but `{sql}` has type {ty}"
            ));
        }
        if ty == DataType::Null {
            return Err(format!("`score` `{sql}` is always null"));
        }
        let cast = Expr::Cast(Cast::new(Box::new(logical), DataType::Float64));
        self.physical(cast, schema, "score", sql).map(|(e, _)| e)
    }

    /// Parses, coerces, simplifies and plans `sql` over `schema`.
    fn plan(
        &self,
        sql: &str,
        schema: &DFSchema,
        what: &str,
    ) -> Result<(Arc<dyn PhysicalExpr>, DataType), String> {
        let logical = self.logical(sql, schema, what)?;
        self.physical(logical, schema, what, sql)
    }

    fn logical(&self, sql: &str, schema: &DFSchema, what: &str) -> Result<Expr, String> {
        self.state
            .create_logical_expr(sql, schema)
            .map_err(|e| explain(&e, what, sql))
    }

    fn physical(
        &self,
        expr: Expr,
        schema: &DFSchema,
        what: &str,
        sql: &str,
    ) -> Result<(Arc<dyn PhysicalExpr>, DataType), String> {
        let context = SimplifyContext::builder()
            .with_schema(Arc::new(schema.clone()))
            .with_config_options(Arc::clone(self.state.config_options()))
            .build();
        let simplifier = ExprSimplifier::new(context);
        let expr = simplifier
            .coerce(expr, schema)
            .and_then(|e| simplifier.simplify(e))
            .map_err(|e| explain(&e, what, sql))?;
        let physical = self
            .state
            .create_physical_expr(expr, schema)
            .map_err(|e| explain(&e, what, sql))?;
        let ty = physical
            .data_type(schema.as_arrow())
            .map_err(|e| explain(&e, what, sql))?;
        Ok((physical, ty))
    }
}

fn df_schema(schema: &SchemaRef) -> DFSchema {
    // Building a DFSchema from a valid Arrow schema without qualifiers cannot fail.
    DFSchema::try_from(Arc::clone(schema)).unwrap_or_else(|_| DFSchema::empty())
}

fn list(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("`{}`", f.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turns a DataFusion error about `what` (`when`, `score`, …) into a sentence for a person.
fn explain(e: &DataFusionError, what: &str, sql: &str) -> String {
    match e.find_root() {
        DataFusionError::SchemaError(err, _) => match err.as_ref() {
            SchemaError::FieldNotFound {
                field,
                valid_fields,
            } => format!(
                "unknown column `{}` in `{what}`; available columns are {}",
                field.name(),
                valid_fields
                    .iter()
                    .map(|c| format!("`{}`", c.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => format!("`{what}` `{sql}`: {other}"),
        },
        DataFusionError::SQL(err, _) => format!("syntax error in `{what}` `{sql}`: {err}"),
        DataFusionError::Plan(msg) => format!("type error in `{what}` `{sql}`: {msg}"),
        DataFusionError::ArrowError(err, _) => {
            format!("type error in `{what}` `{sql}`: {err}")
        }
        other => format!("cannot compile `{what}` `{sql}`: {other}"),
    }
}

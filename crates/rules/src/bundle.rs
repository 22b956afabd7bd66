//! The rule bundle document (YAML or JSON, one model) and its structural validation.
//!
//! Parsing checks everything that does not need the event schema: syntax, unknown fields, `null`
//! or missing required values, value types, duplicate ids and names, an empty bundle, windows and
//! thresholds in range. Column names and expression types are checked by [`crate::compile`].

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{BundleError, Problems, Subject};

/// The longest window a feature may declare.
pub const MAX_WINDOW: Duration = Duration::from_secs(90 * 86_400);
/// The shortest window a feature may declare.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);

/// A parsed, structurally valid rule bundle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BundleDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub features: Vec<FeatureSpec>,
    pub rules: Vec<RuleSpec>,
    pub decision: DecisionSpec,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleSpec {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// SQL boolean over event and feature columns.
    pub when: String,
    pub score: ScoreSpec,
    /// Forces at least this decision when the (active) rule fires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Decision>,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A rule's score: a constant or a SQL expression evaluated per event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ScoreSpec {
    Constant(f64),
    Expr(String),
}

/// Whether a rule's hits count toward the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Hits add to the score and may force a decision.
    Active,
    /// Hits are reported in the verdict and counted, but change nothing.
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::Shadow => "shadow",
        }
    }
}

/// The verdict for an event, ordered by severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Review,
    Block,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Allow, Decision::Review, Decision::Block];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Review => "review",
            Decision::Block => "block",
        }
    }
}

/// Score thresholds for `review` and `block`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DecisionSpec {
    pub review_at: f64,
    pub block_at: f64,
}

impl DecisionSpec {
    /// The decision a total score earns on its own.
    pub fn for_score(&self, score: f64) -> Decision {
        if score >= self.block_at {
            Decision::Block
        } else if score >= self.review_at {
            Decision::Review
        } else {
            Decision::Allow
        }
    }
}

/// A named feature column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureSpec {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(flatten)]
    pub kind: FeatureKind,
}

/// A keyed sliding-window aggregate, or a row-level expression.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FeatureKind {
    Window(WindowFeature),
    Row { expr: String },
}

/// A keyed sliding-window aggregate over event time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowFeature {
    /// Key fields (one, or several for a composite key).
    pub entity: Vec<String>,
    pub agg: Agg,
    /// The aggregated field, for aggregations over a value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub of: Option<String>,
    /// Optional SQL filter over event fields: only matching events are aggregated.
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(with = "humantime_duration")]
    pub window: Duration,
}

/// Window aggregations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    Stddev,
    CountDistinct,
    Last,
    SecondsSinceLast,
}

impl Agg {
    const NAMES: [(&'static str, Agg); 9] = [
        ("count", Agg::Count),
        ("sum", Agg::Sum),
        ("avg", Agg::Avg),
        ("min", Agg::Min),
        ("max", Agg::Max),
        ("stddev", Agg::Stddev),
        ("count_distinct", Agg::CountDistinct),
        ("last", Agg::Last),
        ("seconds_since_last", Agg::SecondsSinceLast),
    ];

    /// The name used in bundles.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("?", |(n, _)| *n)
    }

    fn parse(s: &str) -> Option<Agg> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, a)| *a)
    }

    /// Whether the aggregation needs an `of` field.
    pub fn needs_of(self) -> bool {
        !matches!(self, Agg::Count | Agg::SecondsSinceLast)
    }

    /// Whether the `of` field must be numeric.
    pub fn needs_numeric(self) -> bool {
        matches!(
            self,
            Agg::Sum | Agg::Avg | Agg::Min | Agg::Max | Agg::Stddev
        )
    }
}

mod humantime_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl BundleDoc {
    /// Parses a bundle from YAML or JSON text (JSON when the first non-blank character is `{`).
    pub fn parse(text: &str) -> Result<BundleDoc, BundleError> {
        let value: Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| {
                BundleError::one(Subject::Document, format!("JSON syntax error: {e}"))
            })?
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                BundleError::one(Subject::Document, format!("YAML syntax error: {e}"))
            })?
        };
        Self::from_value(&value)
    }

    /// Validates an already parsed document.
    pub fn from_value(value: &Value) -> Result<BundleDoc, BundleError> {
        let mut problems = Problems::default();
        let doc = Subject::Document;
        let Some(map) = value.as_object() else {
            return Err(BundleError::one(
                doc,
                format!(
                    "a bundle must be a mapping with `rules` and `decision`, found {}",
                    kind(value)
                ),
            ));
        };
        let mut top = Fields::new(&doc, map, &mut problems);
        top.deny_unknown(&["name", "description", "features", "rules", "decision"]);
        let name = top.optional_string("name");
        let description = top.optional_string("description");
        let features_value = top.optional_list("features");
        let rules_value = top.required_list("rules", "a list of rules");
        let decision_value = top.required_map("decision", "`review_at` and `block_at`");

        let features = features_value
            .iter()
            .enumerate()
            .filter_map(|(i, v)| parse_feature(i, v, &mut problems))
            .collect::<Vec<_>>();
        let rules = rules_value
            .iter()
            .enumerate()
            .filter_map(|(i, v)| parse_rule(i, v, &mut problems))
            .collect::<Vec<_>>();
        let decision = decision_value.and_then(|m| parse_decision(m, &mut problems));

        if rules_value.is_empty() && map.contains_key("rules") {
            problems.push(
                &doc,
                "the bundle has no rules; add at least one under `rules`",
            );
        }
        let mut ids = HashSet::new();
        for r in &rules {
            if !ids.insert(r.id.as_str()) {
                problems.push(
                    &Subject::Rule(r.id.clone()),
                    "duplicate rule id; every rule needs its own id",
                );
            }
        }
        let mut names = HashSet::new();
        for f in &features {
            if !names.insert(f.name.as_str()) {
                problems.push(
                    &Subject::Feature(f.name.clone()),
                    "duplicate feature name; every feature needs its own name",
                );
            }
        }
        match decision {
            Some(decision) if problems.is_empty() => Ok(BundleDoc {
                name,
                description,
                features,
                rules,
                decision,
            }),
            // A missing decision always left a problem behind.
            _ => Err(problems.into_error()),
        }
    }

    /// The windowed features, in declared order.
    pub fn window_features(&self) -> impl Iterator<Item = (&FeatureSpec, &WindowFeature)> {
        self.features.iter().filter_map(|f| match &f.kind {
            FeatureKind::Window(w) => Some((f, w)),
            FeatureKind::Row { .. } => None,
        })
    }

    /// The row-level expression features, in declared order.
    pub fn row_features(&self) -> impl Iterator<Item = (&FeatureSpec, &str)> {
        self.features.iter().filter_map(|f| match &f.kind {
            FeatureKind::Row { expr } => Some((f, expr.as_str())),
            FeatureKind::Window(_) => None,
        })
    }
}

fn parse_rule(i: usize, value: &Value, problems: &mut Problems) -> Option<RuleSpec> {
    let id_hint = value
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string);
    let subject = Subject::Rule(id_hint.clone().unwrap_or_else(|| format!("rules[{i}]")));
    let Some(map) = value.as_object() else {
        problems.push(
            &subject,
            format!("a rule must be a mapping, found {}", kind(value)),
        );
        return None;
    };
    let mut f = Fields::new(&subject, map, problems);
    f.deny_unknown(&[
        "id",
        "description",
        "when",
        "score",
        "action",
        "mode",
        "tags",
    ]);
    let id = f.required_string("id", "a unique rule id");
    if let Some(id) = &id {
        if !is_valid_id(id) {
            f.problem(format!(
                "id `{id}` may contain only letters, digits, `_`, `-` and `.`"
            ));
        }
    }
    let description = f.optional_string("description");
    let when = f.required_string("when", "a SQL boolean expression");
    let score = match f.get("score") {
        None => {
            f.problem("`score` is missing; give a number or a SQL expression");
            None
        }
        Some(Value::Null) => {
            f.problem("`score` is null; give a number or a SQL expression");
            None
        }
        Some(Value::Number(n)) => match n.as_f64().filter(|v| v.is_finite()) {
            Some(v) => Some(ScoreSpec::Constant(v)),
            None => {
                f.problem(format!("`score` {n} is not a finite number"));
                None
            }
        },
        Some(Value::String(s)) if !s.trim().is_empty() => Some(ScoreSpec::Expr(s.clone())),
        Some(other) => {
            f.problem(format!(
                "`score` must be a number or a SQL expression, found {}",
                kind(other)
            ));
            None
        }
    };
    let action = f.optional_enum(
        "action",
        &[("review", Decision::Review), ("block", Decision::Block)],
    );
    let mode = f
        .optional_enum(
            "mode",
            &[("active", Mode::Active), ("shadow", Mode::Shadow)],
        )
        .unwrap_or(Mode::Active);
    let tags = f.optional_string_list("tags");
    Some(RuleSpec {
        id: id?,
        description,
        when: when?,
        score: score?,
        action,
        mode,
        tags,
    })
}

fn parse_feature(i: usize, value: &Value, problems: &mut Problems) -> Option<FeatureSpec> {
    let name_hint = value
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string);
    let subject = Subject::Feature(name_hint.unwrap_or_else(|| format!("features[{i}]")));
    let Some(map) = value.as_object() else {
        problems.push(
            &subject,
            format!("a feature must be a mapping, found {}", kind(value)),
        );
        return None;
    };
    let mut f = Fields::new(&subject, map, problems);
    f.deny_unknown(&[
        "name",
        "description",
        "entity",
        "agg",
        "of",
        "where",
        "window",
        "expr",
    ]);
    let name = f.required_string("name", "a column name for rules to use");
    if let Some(name) = &name {
        if !is_valid_column(name) {
            f.problem(format!(
                "name `{name}` must be lower-case letters, digits and `_`, starting with a letter"
            ));
        }
    }
    let description = f.optional_string("description");
    if map.contains_key("expr") {
        for key in ["entity", "agg", "of", "where", "window"] {
            if map.contains_key(key) {
                f.problem(format!(
                    "`{key}` belongs to windowed features; a feature with `expr` is computed per row"
                ));
            }
        }
        let expr = f.required_string("expr", "a SQL expression");
        return Some(FeatureSpec {
            name: name?,
            description,
            kind: FeatureKind::Row { expr: expr? },
        });
    }
    let entity = match f.get("entity") {
        None | Some(Value::Null) => {
            f.problem("`entity` is missing or null; name the key field (or a list of fields), or give `expr` for a row-level feature");
            None
        }
        Some(Value::String(s)) if !s.is_empty() => Some(vec![s.clone()]),
        Some(Value::Array(items))
            if !items.is_empty()
                && items
                    .iter()
                    .all(|v| v.as_str().is_some_and(|s| !s.is_empty())) =>
        {
            Some(
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            )
        }
        Some(other) => {
            f.problem(format!(
                "`entity` must be a field name or a non-empty list of field names, found {}",
                kind(other)
            ));
            None
        }
    };
    let agg_names: Vec<_> = Agg::NAMES.iter().map(|(n, _)| *n).collect();
    let agg = f
        .required_string("agg", "an aggregation")
        .and_then(|s| match Agg::parse(&s) {
            Some(a) => Some(a),
            None => {
                f.problem(format!(
                    "unknown aggregation `{s}`; use one of {}",
                    agg_names.join(", ")
                ));
                None
            }
        });
    let of = f.optional_string("of");
    let filter = f.optional_string("where");
    let window = f
        .required_string("window", "a duration such as `10m`, `1h` or `30d`")
        .and_then(|s| match humantime::parse_duration(&s) {
            Ok(d) if (MIN_WINDOW..=MAX_WINDOW).contains(&d) => Some(d),
            Ok(_) => {
                f.problem(format!(
                    "window `{s}` is out of range; windows run from 1s to 90d"
                ));
                None
            }
            Err(e) => {
                f.problem(format!(
                    "window `{s}` is not a duration ({e}); write e.g. `45s`, `10m`, `1h`, `30d`"
                ));
                None
            }
        });
    if let Some(agg) = agg {
        let agg_name = agg.name();
        if agg.needs_of() && of.is_none() {
            f.problem(format!("`{agg_name}` needs `of`: the field to aggregate"));
        }
        if !agg.needs_of() && of.is_some() {
            f.problem(format!("`{agg_name}` takes no `of` field"));
        }
    }
    Some(FeatureSpec {
        name: name?,
        description,
        kind: FeatureKind::Window(WindowFeature {
            entity: entity?,
            agg: agg?,
            of,
            filter,
            window: window?,
        }),
    })
}

fn parse_decision(map: &Map<String, Value>, problems: &mut Problems) -> Option<DecisionSpec> {
    let mut f = Fields::new(&Subject::Decision, map, problems);
    f.deny_unknown(&["review_at", "block_at"]);
    let review_at = f.required_number("review_at");
    let block_at = f.required_number("block_at");
    let (review_at, block_at) = (review_at?, block_at?);
    if review_at > block_at {
        f.problem(format!(
            "`review_at` ({review_at}) must not exceed `block_at` ({block_at})"
        ));
        return None;
    }
    Some(DecisionSpec {
        review_at,
        block_at,
    })
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn is_valid_column(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Typed access to one mapping's fields, recording problems against its subject.
struct Fields<'a, 'p> {
    subject: &'a Subject,
    map: &'a Map<String, Value>,
    problems: &'p mut Problems,
}

impl<'a, 'p> Fields<'a, 'p> {
    fn new(subject: &'a Subject, map: &'a Map<String, Value>, problems: &'p mut Problems) -> Self {
        Self {
            subject,
            map,
            problems,
        }
    }

    fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(self.subject, message);
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn deny_unknown(&mut self, known: &[&str]) {
        for key in self.map.keys() {
            if !known.contains(&key.as_str()) {
                self.problems.push(
                    self.subject,
                    format!(
                        "unknown field `{key}`; expected one of {}",
                        known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
    }

    fn required_string(&mut self, key: &str, what: &str) -> Option<String> {
        match self.get(key) {
            None => self.problem(format!("`{key}` is missing; it needs {what}")),
            Some(Value::Null) => self.problem(format!("`{key}` is null; it needs {what}")),
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.problem(format!("`{key}` is empty; it needs {what}"))
            }
            Some(Value::String(s)) => return Some(s.clone()),
            Some(other) => self.problem(format!(
                "`{key}` must be a string ({what}), found {}",
                kind(other)
            )),
        }
        None
    }

    fn optional_string(&mut self, key: &str) -> Option<String> {
        match self.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.problem(format!("`{key}` must be a string, found {}", kind(other)));
                None
            }
        }
    }

    fn required_number(&mut self, key: &str) -> Option<f64> {
        match self.get(key) {
            None => self.problem(format!("`{key}` is missing; it needs a number")),
            Some(Value::Null) => self.problem(format!("`{key}` is null; it needs a number")),
            Some(Value::Number(n)) => match n.as_f64().filter(|v| v.is_finite()) {
                Some(v) => return Some(v),
                None => self.problem(format!("`{key}` ({n}) is not a finite number")),
            },
            Some(other) => self.problem(format!("`{key}` must be a number, found {}", kind(other))),
        }
        None
    }

    fn required_list(&mut self, key: &str, what: &str) -> Vec<Value> {
        match self.get(key) {
            None => self.problem(format!("`{key}` is missing; it needs {what}")),
            Some(Value::Null) => self.problem(format!("`{key}` is null; it needs {what}")),
            Some(Value::Array(items)) => return items.clone(),
            Some(other) => self.problem(format!(
                "`{key}` must be a list ({what}), found {}",
                kind(other)
            )),
        }
        Vec::new()
    }

    fn optional_list(&mut self, key: &str) -> Vec<Value> {
        match self.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(other) => {
                self.problem(format!("`{key}` must be a list, found {}", kind(other)));
                Vec::new()
            }
        }
    }

    fn required_map(&mut self, key: &str, what: &str) -> Option<&'a Map<String, Value>> {
        match self.get(key) {
            None => self.problem(format!("`{key}` is missing; it needs {what}")),
            Some(Value::Null) => self.problem(format!("`{key}` is null; it needs {what}")),
            Some(Value::Object(m)) => return Some(m),
            Some(other) => self.problem(format!(
                "`{key}` must be a mapping ({what}), found {}",
                kind(other)
            )),
        }
        None
    }

    fn optional_enum<T: Copy>(&mut self, key: &str, choices: &[(&str, T)]) -> Option<T> {
        let names = || {
            choices
                .iter()
                .map(|(n, _)| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.get(key) {
            None => None,
            Some(Value::Null) => {
                self.problem(format!("`{key}` is null; use one of {}", names()));
                None
            }
            Some(Value::String(s)) => match choices.iter().find(|(n, _)| n == s) {
                Some((_, v)) => Some(*v),
                None => {
                    self.problem(format!("`{key}` is `{s}`; use one of {}", names()));
                    None
                }
            },
            Some(other) => {
                self.problem(format!(
                    "`{key}` must be one of {}, found {}",
                    names(),
                    kind(other)
                ));
                None
            }
        }
    }

    fn optional_string_list(&mut self, key: &str) -> Vec<String> {
        match self.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(other) => {
                self.problem(format!(
                    "`{key}` must be a list of strings, found {}",
                    kind(other)
                ));
                Vec::new()
            }
        }
    }
}

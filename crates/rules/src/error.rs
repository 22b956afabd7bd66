//! Bundle validation errors: every problem names its rule (or feature) and what is wrong.

use std::fmt;

/// What a problem is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Subject {
    /// The document as a whole (syntax, top-level fields, emptiness).
    Document,
    /// A rule, by id (or by `rules[i]` when it has no usable id).
    Rule(String),
    /// A feature, by name (or by `features[i]`).
    Feature(String),
    /// The `decision` section.
    Decision,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Document => f.write_str("bundle"),
            Subject::Rule(id) => write!(f, "rule `{id}`"),
            Subject::Feature(name) => write!(f, "feature `{name}`"),
            Subject::Decision => f.write_str("decision"),
        }
    }
}

/// One problem in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub subject: Subject,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// A bundle was rejected; `problems` lists everything found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct BundleError {
    pub problems: Vec<Problem>,
}

impl BundleError {
    pub(crate) fn one(subject: Subject, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                subject,
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "rule bundle rejected ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Collects problems while validating; turns into `Err` if any were found.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn push(&mut self, subject: &Subject, message: impl Into<String>) {
        self.0.push(Problem {
            subject: subject.clone(),
            message: message.into(),
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn into_error(self) -> BundleError {
        BundleError { problems: self.0 }
    }
}

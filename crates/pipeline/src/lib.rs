//! The pipeline: source → decode → (time, features) → rules → sink, one micro-batch at a time.
//!
//! [`Pipeline::process`] is the whole per-batch path and is independent of where records come
//! from and where verdicts go; [`run`] drives it from a [`Source`] into a [`Sink`] until the
//! source is exhausted. The hot path allocates per batch, loads the rule table once per batch
//! (lock-free) and never blocks on anything but its own source and sink.
//!
//! What this crate must not do: parse JSON by hand (decode owns that), interpret rules (rules
//! owns that), or hold state across batches other than reusable buffers.

pub mod sink;
pub mod source;
pub mod verdict;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Counter;
use riskstream_common::{DeadLetter, DeadReason, EventSchema, RawBatch};
use riskstream_decode::{DecodeError, EventDecoder};
use riskstream_rules::{Decision, RuleTable, ScoreError};

pub use sink::{JsonLinesSink, Sink, SinkError};
pub use source::{JsonLinesSource, Source, SourceError, SourceState};
pub use verdict::{TimeFlags, VerdictBatch};

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(
        "rule bundle v{version} declares windowed feature(s) {names}; this build computes \
         row-level `expr` features only, so it cannot score this bundle"
    )]
    WindowFeaturesUnsupported { version: u64, names: String },
}

/// The outcome of one batch.
#[derive(Debug, Default)]
pub struct Processed {
    pub verdicts: VerdictBatch,
    pub dead: Vec<DeadLetter>,
    /// Verdict counts by decision (allow, review, block).
    pub decisions: [u64; 3],
    /// The rules version that scored the batch (0 when the batch had no scorable event).
    pub rules_version: u64,
}

/// The per-batch path from raw records to verdicts.
pub struct Pipeline {
    schema: EventSchema,
    decoder: EventDecoder,
    rules: Arc<RuleTable>,
    metrics: PipelineMetrics,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

struct PipelineMetrics {
    scored: Counter,
    dead: Vec<(DeadReason, Counter)>,
    decisions: [Counter; 3],
    latency: metrics::Histogram,
}

impl PipelineMetrics {
    fn new(source: &str) -> Self {
        let source = source.to_string();
        Self {
            scored: metrics::counter!("riskstream_events_total", "source" => source.clone(), "outcome" => "scored"),
            dead: DeadReason::ALL
                .iter()
                .map(|r| {
                    (
                        *r,
                        metrics::counter!("riskstream_dlq_total", "source" => source.clone(), "reason" => r.as_str()),
                    )
                })
                .collect(),
            decisions: Decision::ALL.map(|d| {
                metrics::counter!("riskstream_verdicts_total", "decision" => d.as_str())
            }),
            latency: metrics::histogram!("riskstream_event_to_verdict_seconds"),
        }
    }
}

impl Pipeline {
    /// A pipeline for events of `schema` in batches of up to `batch_max_events`, scored by
    /// whatever `rules` holds when each batch starts. `source_name` labels its metrics.
    pub fn new(
        schema: &EventSchema,
        batch_max_events: usize,
        rules: Arc<RuleTable>,
        source_name: &str,
    ) -> Result<Self, PipelineError> {
        let decoder = EventDecoder::new(schema, batch_max_events)?;
        Ok(Self {
            schema: schema.clone(),
            decoder,
            rules,
            metrics: PipelineMetrics::new(source_name),
        })
    }

    /// Decodes, scores and encodes one batch. Bad records come back as dead letters.
    pub fn process(&mut self, raw: &RawBatch, out: &mut Processed) -> Result<(), PipelineError> {
        out.dead.clear();
        out.decisions = [0; 3];
        out.verdicts.clear();
        let decoded = self.decoder.decode(raw)?;
        out.dead = decoded.dead;
        for d in &out.dead {
            if let Some((_, c)) = self.metrics.dead.iter().find(|(r, _)| *r == d.reason) {
                c.increment(1);
            }
        }
        if decoded.batch.num_rows() == 0 {
            return Ok(());
        }
        // One load per batch: every event of the batch is scored by this bundle.
        let bundle = self.rules.load();
        if !bundle.window_features().is_empty() {
            return Err(PipelineError::WindowFeaturesUnsupported {
                version: bundle.version(),
                names: bundle
                    .window_features()
                    .iter()
                    .map(|f| format!("`{}`", f.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let evaluated = bundle.evaluate(&decoded.batch)?;
        let processed_at = source::now_ms();
        verdict::encode(
            &mut out.verdicts,
            &bundle,
            &evaluated,
            raw,
            &decoded.rows,
            self.schema.event_id(),
            self.schema.event_time(),
            TimeFlags::default(),
            processed_at,
        );
        for d in &evaluated.scores.decision {
            out.decisions[*d as usize] += 1;
        }
        for (count, counter) in out.decisions.iter().zip(&self.metrics.decisions) {
            counter.increment(*count);
        }
        self.metrics
            .scored
            .increment(evaluated.batch.num_rows() as u64);
        for &row in &decoded.rows {
            let ms = (processed_at - raw.ingest_ms(row as usize)).max(0);
            self.metrics.latency.record(ms as f64 / 1000.0);
        }
        out.rules_version = bundle.version();
        Ok(())
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Records read from the source.
    pub events: u64,
    pub verdicts: u64,
    /// Verdicts by decision: allow, review, block.
    pub decisions: [u64; 3],
    pub dead_letters: BTreeMap<&'static str, u64>,
    /// Rules versions that scored at least one batch.
    pub rules_versions: Vec<u64>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn dead_letter_count(&self) -> u64 {
        self.dead_letters.values().sum()
    }

    /// Records per second over the whole run.
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [allow, review, block] = self.decisions;
        writeln!(
            f,
            "events: {}  verdicts: {}  (allow {allow}, review {review}, block {block})",
            self.events, self.verdicts
        )?;
        write!(f, "dead letters: {}", self.dead_letter_count())?;
        if !self.dead_letters.is_empty() {
            let parts: Vec<_> = self
                .dead_letters
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        writeln!(f)?;
        let versions: Vec<_> = self
            .rules_versions
            .iter()
            .map(|v| format!("v{v}"))
            .collect();
        writeln!(f, "rules: {}", versions.join(", "))?;
        write!(
            f,
            "elapsed: {:.3} s  throughput: {:.0} events/s",
            self.elapsed.as_secs_f64(),
            self.events_per_second()
        )
    }
}

/// Runs `pipeline` over `source` into `sink` until the source is exhausted.
pub fn run(
    source: &mut dyn Source,
    pipeline: &mut Pipeline,
    sink: &mut dyn Sink,
    batch_max_events: usize,
) -> Result<Summary, PipelineError> {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut raw = RawBatch::new();
    let mut out = Processed::default();
    loop {
        raw.clear();
        let state = source.fill(&mut raw, batch_max_events)?;
        if !raw.is_empty() {
            pipeline.process(&raw, &mut out)?;
            sink.verdicts(&out.verdicts)?;
            if !out.dead.is_empty() {
                sink.dead_letters(source.name(), &raw, &out.dead)?;
            }
            summary.events += raw.len() as u64;
            summary.verdicts += out.verdicts.len() as u64;
            for (total, n) in summary.decisions.iter_mut().zip(out.decisions) {
                *total += n;
            }
            for d in &out.dead {
                *summary.dead_letters.entry(d.reason.as_str()).or_default() += 1;
            }
            if out.rules_version != 0 && summary.rules_versions.last() != Some(&out.rules_version) {
                summary.rules_versions.push(out.rules_version);
            }
        }
        if state == SourceState::Exhausted {
            break;
        }
    }
    sink.flush()?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

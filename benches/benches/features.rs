//! Per-event cost of windowed features at steady state, as the window grows from 10 minutes to
//! 30 days and as the key space grows from 10K to 1M keys. Target (issue 3): flat within ±10 %.
//!
//! Each case streams W1-style events (three features per customer: a count, a sum and a max
//! over the window under test; uniformly drawn customers; event time advancing at a steady
//! rate) through one operator over a fresh RocksDB store. The operator is first filled to steady
//! state — the window plus `allowed_lateness` of events, and at least twice the key count — and
//! then measured batch after batch, doing what the pipeline does per batch: compute (with the
//! windows' expired events dropped as keys are touched), trim the cache, and, at their
//! processing-time cadence, an eviction sweep and a write of the changed state to RocksDB.
//!
//! - `features_by_window`: 10K keys at W1's 1M-event rate (200K events a day), window 10m, 1h,
//!   1d, 30d — from a fraction of an event per key and window to 600.
//! - `features_by_window_same_state`: the same four windows with the rate scaled so that each
//!   holds about 100 events per key: the state is the same size for all four, which separates
//!   the window's length from the memory its events occupy.
//! - `features_by_keys`: a 1-day window at W1's 10M-event rate (2M events a day), 10K, 100K and
//!   1M keys — from 200 events per key and window to 2.
//!
//! The groups above measure at steady state, after the longest window has filled: for 30 days
//! at W1's rate that takes 6.6M events, more than W1 itself holds. The `features_w1_*` groups
//! measure W1 as `gen_w1.py` makes it instead, one iteration being a whole replay from empty
//! state (5 days of event time; the operator's time only):
//!
//! - `features_w1_by_window`: 1M events, window 10m, 1h, 1d, 30d, for W1's 200K customers and
//!   for 10K.
//! - `features_w1_by_keys`: 10M events, 1-day window, 10K, 100K and 1M customers.
//!
//! `features_w2_breadth` measures breadth instead: 100K W2-like events (customer, device, IP
//! and terminal drawn from W2-sized key spaces, a day of event time) from empty state through
//! 10, 50 and 200 of W2's windowed features (`testdata/w2/w2.yaml`, taken evenly), on one
//! thread and on two. Issue 20's target: the per-event cost at 200 features under 4× the cost
//! at 10.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::DataType;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use riskstream_benches::Rng;
use riskstream_common::{Config, EventSchema};
use riskstream_features::FeatureOperator;
use riskstream_rules::{CompiledBundle, RuleCompiler};
use riskstream_state::StateStore;

/// The binary's allocator, so that allocation costs are those of a real run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 4096;
const START_MS: i64 = 1_735_689_600_000;
const DAY_MS: i64 = 86_400_000;
/// The pipeline's defaults: 2 s out of orderness, 10 minutes of allowed lateness.
const OUT_OF_ORDER_MS: i64 = 2_000;
const LATENESS_MS: i64 = 600_000;
/// Batches between eviction sweeps and between state flushes: about 1 s and 10 s of
/// processing time at 300K events/s.
const SWEEP_EVERY: u64 = 75;
const FLUSH_EVERY: u64 = 750;
const SWEEP_KEYS: usize = 16_384;

fn schema() -> EventSchema {
    Config::defaults()
        .and_then(|c| Ok(c.event_schema()?))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn bundle(schema: &EventSchema, window: &str) -> CompiledBundle {
    let text = format!(
        "features:\n  - {{name: n, entity: customer_id, agg: count, window: {window}}}\n  - {{name: s, entity: customer_id, agg: sum, of: amount, window: {window}}}\n  - {{name: m, entity: customer_id, agg: max, of: amount, window: {window}}}\nrules:\n  - {{id: r, when: \"n > 5\", score: 1}}\ndecision: {{review_at: 1, block_at: 2}}\n"
    );
    RuleCompiler::new(schema)
        .compile_text(&text, 1)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An endless stream of event batches: `keys` uniformly drawn customers, one event every
/// `gap_ms` of event time with up to 1 s of disorder.
struct Stream {
    schema: EventSchema,
    rng: Rng,
    keys: u64,
    gap_ms: f64,
    next: u64,
    newest: i64,
}

impl Stream {
    fn batch(&mut self) -> (RecordBatch, Vec<i64>) {
        let times: Vec<i64> = (0..BATCH as u64)
            .map(|i| {
                START_MS
                    + ((self.next + i) as f64 * self.gap_ms) as i64
                    + (self.rng.next_u64() % 1000) as i64
            })
            .collect();
        self.next += BATCH as u64;
        let customers: Vec<String> = (0..BATCH)
            .map(|_| format!("c{}", self.rng.next_u64() % self.keys))
            .collect();
        let amounts: Vec<f64> = (0..BATCH)
            .map(|_| (3.5 + (self.rng.f64() - 0.5) * 3.0).exp())
            .collect();
        let batch = event_batch(
            &self.schema,
            &times,
            vec![
                (
                    "customer_id",
                    Arc::new(StringArray::from(customers)) as ArrayRef,
                ),
                ("amount", Arc::new(Float64Array::from(amounts)) as ArrayRef),
            ],
        );
        (batch, times)
    }
}

/// A batch of `times.len()` events in `schema`: event time `times`, the `given` columns, and
/// every other string field `"x"`, every other number 0.
fn event_batch(schema: &EventSchema, times: &[i64], given: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let n = times.len();
    let columns: Vec<ArrayRef> = schema
        .arrow()
        .fields()
        .iter()
        .map(|f| {
            if let Some((_, column)) = given.iter().find(|(name, _)| name == f.name()) {
                return Arc::clone(column);
            }
            match f.data_type() {
                DataType::Timestamp(..) => {
                    Arc::new(TimestampMillisecondArray::from(times.to_vec()).with_timezone("UTC"))
                        as ArrayRef
                }
                DataType::Utf8 => Arc::new(StringArray::from(vec!["x"; n])) as ArrayRef,
                _ => Arc::new(Float64Array::from(vec![0.0; n])) as ArrayRef,
            }
        })
        .collect();
    RecordBatch::try_new(Arc::clone(schema.arrow()), columns).unwrap_or_else(|e| panic!("{e}"))
}

/// An operator with its store, fed as the pipeline feeds it.
struct Harness {
    operator: FeatureOperator,
    bundle: CompiledBundle,
    stream: Stream,
    batches: u64,
    /// Dropped last: the operator's last write must land before its directory goes.
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(window: &str, keys: u64, events_per_day: f64) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(StateStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
        let operator = FeatureOperator::open(store, 1 << 30).unwrap_or_else(|e| panic!("{e}"));
        let schema = schema();
        let bundle = bundle(&schema, window);
        Self {
            _dir: dir,
            operator,
            bundle,
            stream: Stream {
                schema,
                rng: Rng::new(keys),
                keys,
                gap_ms: DAY_MS as f64 / events_per_day,
                next: 0,
                newest: START_MS,
            },
            batches: 0,
        }
    }

    /// One batch through the operator; returns the time the operator took.
    fn step(&mut self) -> Duration {
        let (batch, times) = self.stream.batch();
        let watermark = self.stream.newest - OUT_OF_ORDER_MS;
        let started = Instant::now();
        self.operator
            .compute(&self.bundle, &batch, &times, Some(watermark - LATENESS_MS))
            .unwrap_or_else(|e| panic!("{e}"));
        self.operator.end_batch().unwrap_or_else(|e| panic!("{e}"));
        self.batches += 1;
        if self.batches.is_multiple_of(SWEEP_EVERY) {
            self.operator
                .evict(&self.bundle, watermark, LATENESS_MS, SWEEP_KEYS)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if self.batches.is_multiple_of(FLUSH_EVERY) {
            self.operator.flush(&[]).unwrap_or_else(|e| panic!("{e}"));
        }
        let took = started.elapsed();
        self.stream.newest = times.iter().copied().fold(self.stream.newest, i64::max);
        took
    }

    /// Streams until the windows hold their steady-state contents.
    fn fill(&mut self, window_ms: i64) {
        let span = (window_ms + LATENESS_MS) as f64 / self.stream.gap_ms;
        let events = (span as u64).max(2 * self.stream.keys).max(BATCH as u64);
        self.stream_until(events);
    }

    /// Streams batches until `events` events have gone in; returns the operator's time.
    fn stream_until(&mut self, events: u64) -> Duration {
        let mut took = Duration::ZERO;
        while self.stream.next < events {
            took += self.step();
        }
        took
    }
}

/// Days of event time a W1 input spans (`gen_w1.py`'s default).
const W1_DAYS: f64 = 5.0;

/// Replays W1 streams of `events` events from empty state: one iteration a whole replay.
fn run_w1(c: &mut Criterion, group: &str, events: u64, cases: &[(&str, u64)]) {
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(events));
    for &(window, keys) in cases {
        group.bench_function(format!("window_{window}_keys_{keys}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        Harness::new(window, keys, events as f64 / W1_DAYS).stream_until(events)
                    })
                    .sum()
            })
        });
    }
    group.finish();
}

fn w1_windows(c: &mut Criterion) {
    let cases: Vec<(&str, u64)> = [200_000, 10_000]
        .into_iter()
        .flat_map(|keys| ["10m", "1h", "1d", "30d"].map(|w| (w, keys)))
        .collect();
    run_w1(c, "features_w1_by_window", 1_000_000, &cases);
}

fn w1_keys(c: &mut Criterion) {
    run_w1(
        c,
        "features_w1_by_keys",
        10_000_000,
        &[("1d", 10_000), ("1d", 100_000), ("1d", 1_000_000)],
    );
}

fn run(c: &mut Criterion, group: &str, cases: &[(&str, i64, u64, f64)]) {
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(BATCH as u64));
    for &(window, window_ms, keys, per_day) in cases {
        // Filled on first use, so that a case a filter leaves out costs nothing.
        let mut harness = None;
        group.bench_function(format!("window_{window}_keys_{keys}"), |b| {
            let harness = harness.get_or_insert_with(|| {
                let mut harness = Harness::new(window, keys, per_day);
                harness.fill(window_ms);
                harness
            });
            b.iter_custom(|iters| (0..iters).map(|_| harness.step()).sum())
        });
    }
    group.finish();
}

fn windows(c: &mut Criterion) {
    const MIN: i64 = 60_000;
    run(
        c,
        "features_by_window",
        &[
            ("10m", 10 * MIN, 10_000, 2e5),
            ("1h", 60 * MIN, 10_000, 2e5),
            ("1d", DAY_MS, 10_000, 2e5),
            ("30d", 30 * DAY_MS, 10_000, 2e5),
        ],
    );
}

/// Window length alone: the event rate scaled so that every window holds about 100 events per
/// key (10K keys, 1M events per window length, in the indexed regime), so that the state takes
/// about the same memory whatever the length and what is left is the cost of the length
/// itself. (The 10-minute case holds about twice as much: `allowed_lateness`, 10 minutes, keeps
/// its events for as long again.)
fn windows_same_state(c: &mut Criterion) {
    const MIN: i64 = 60_000;
    const KEYS: u64 = 10_000;
    let per_day = |window_ms: i64| 100.0 * KEYS as f64 * DAY_MS as f64 / window_ms as f64;
    run(
        c,
        "features_by_window_same_state",
        &[
            ("10m", 10 * MIN, KEYS, per_day(10 * MIN)),
            ("1h", 60 * MIN, KEYS, per_day(60 * MIN)),
            ("1d", DAY_MS, KEYS, per_day(DAY_MS)),
            ("30d", 30 * DAY_MS, KEYS, per_day(30 * DAY_MS)),
        ],
    );
}

fn keys(c: &mut Criterion) {
    run(
        c,
        "features_by_keys",
        &[
            ("1d", DAY_MS, 10_000, 2e6),
            ("1d", DAY_MS, 100_000, 2e6),
            ("1d", DAY_MS, 1_000_000, 2e6),
        ],
    );
}

/// `k` of W2's windowed features, taken evenly from its list, with one rule, in the W2 schema.
fn w2_bundle(k: usize) -> (EventSchema, CompiledBundle) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/w2");
    let read = |name: &str| {
        std::fs::read_to_string(format!("{root}/{name}"))
            .unwrap_or_else(|e| panic!("{root}/{name}: {e}"))
    };
    let config =
        Config::from_toml_over_defaults(&read("w2.toml")).unwrap_or_else(|e| panic!("{e}"));
    let schema = config.event_schema().unwrap_or_else(|e| panic!("{e}"));
    let windowed: Vec<String> = read("w2.yaml")
        .lines()
        .filter(|l| l.trim_start().starts_with("- {name:") && l.contains("window:"))
        .map(str::to_string)
        .collect();
    assert_eq!(windowed.len(), 200, "W2 has 200 windowed features");
    let step = windowed.len() as f64 / k as f64;
    let mut text = String::from("features:\n");
    for i in 0..k {
        text.push_str(&windowed[(i as f64 * step) as usize]);
        text.push('\n');
    }
    text.push_str("rules:\n  - {id: noop, when: \"amount < 0\", score: 1}\ndecision: {review_at: 1, block_at: 2}\n");
    let bundle = RuleCompiler::new(&schema)
        .compile_text(&text, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    (schema, bundle)
}

/// A batch of W2-like events: event `first` onwards, a day of event time per `per_day`.
fn w2_batch(
    schema: &EventSchema,
    rng: &mut Rng,
    first: u64,
    per_day: f64,
) -> (RecordBatch, Vec<i64>) {
    let times: Vec<i64> = (0..BATCH as u64)
        .map(|i| START_MS + ((first + i) as f64 * DAY_MS as f64 / per_day) as i64)
        .collect();
    let mut keys = |prefix: &str, n: u64| -> ArrayRef {
        Arc::new(StringArray::from(
            (0..BATCH)
                .map(|_| format!("{prefix}{}", rng.skewed(n)))
                .collect::<Vec<_>>(),
        ))
    };
    let customers = keys("c", 200_000);
    let devices = keys("d", 200_000);
    let ips = keys("10.0.", 100_000);
    let terminals = keys("t", 50_000);
    let amounts: Vec<f64> = (0..BATCH)
        .map(|_| (3.5 + (rng.f64() - 0.5) * 3.0).exp())
        .collect();
    let kinds: Vec<&str> = (0..BATCH)
        .map(|_| if rng.f64() < 0.3 { "CNP" } else { "CP" })
        .collect();
    let batch = event_batch(
        schema,
        &times,
        vec![
            ("customer_id", customers),
            ("device_id", devices),
            ("ip", ips),
            ("terminal_id", terminals),
            ("amount", Arc::new(Float64Array::from(amounts)) as ArrayRef),
            ("tx_type", Arc::new(StringArray::from(kinds)) as ArrayRef),
        ],
    );
    (batch, times)
}

fn w2_breadth(c: &mut Criterion) {
    const EVENTS: u64 = 100_000;
    let mut group = c.benchmark_group("features_w2_breadth");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(EVENTS));
    for (k, threads) in [(10, 1), (50, 1), (200, 1), (10, 2), (50, 2), (200, 2)] {
        let (schema, bundle) = w2_bundle(k);
        group.bench_function(format!("features_{k}_threads_{threads}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
                        let store = Arc::new(
                            StateStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")),
                        );
                        let mut operator = FeatureOperator::open(store, 512 << 20)
                            .and_then(|o| o.with_threads(threads))
                            .unwrap_or_else(|e| panic!("{e}"));
                        let mut rng = Rng::new(k as u64);
                        let mut took = Duration::ZERO;
                        let mut next = 0;
                        while next < EVENTS {
                            let (batch, times) = w2_batch(&schema, &mut rng, next, 200_000.0);
                            let horizon = times[0] - OUT_OF_ORDER_MS - LATENESS_MS;
                            let started = Instant::now();
                            operator
                                .compute(&bundle, &batch, &times, Some(horizon))
                                .unwrap_or_else(|e| panic!("{e}"));
                            operator.end_batch().unwrap_or_else(|e| panic!("{e}"));
                            took += started.elapsed();
                            next += BATCH as u64;
                        }
                        let started = Instant::now();
                        operator.flush(&[]).unwrap_or_else(|e| panic!("{e}"));
                        operator.wait().unwrap_or_else(|e| panic!("{e}"));
                        took + started.elapsed()
                    })
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    windows,
    windows_same_state,
    keys,
    w1_windows,
    w1_keys,
    w2_breadth
);
criterion_main!(benches);

//! Checkpoints with a large state: synchronous pause, duration and bytes per checkpoint, the
//! share uploaded when few keys change, and the time from a restart to the first verdict.
//!
//! ```text
//! checkpoint_bench W1.jsonl [WORK_DIR] [SMALL_SHARE_SECONDS]
//! ```
//!
//! 1. Fill: W1 (10M events for about 1 GB of state) through the pipeline with a bundle of long
//!    windows, a checkpoint every 10 s into a local directory, as `riskstream run` takes them.
//! 2. Restart: the state directory is deleted (a rescheduled instance) and the pipeline
//!    recovers from the newest checkpoint; the time until its first verdict is reported.
//! 3. Small share: events for 500 new customers and terminals only, at 20K events/s, with a
//!    checkpoint every 10 s: bytes uploaded per checkpoint against the checkpoint's size.
//!
//! `CHECKPOINT_BENCH_DELIVERY=exactly_once` takes the exactly-once snapshots (all at once);
//! `CHECKPOINT_BENCH_OFF=1` runs the fill alone, without checkpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use riskstream_checkpoint::{CheckpointStore, Manifest};
use riskstream_common::{Config, DeadLetter, Position, RawBatch};
use riskstream_pipeline::{
    JsonLinesSource, Pipeline, Sink, SinkError, Source, SourceError, SourceState, VerdictBatch,
};
use riskstream_rules::{RuleCompiler, RuleTable};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Long windows over W1's 50 days (10M events): each distinct window keeps its events.
const BUNDLE: &str = "\
features:
  - {name: cust_n_90d, entity: customer_id, agg: count, window: 90d}
  - {name: cust_sum_90d, entity: customer_id, agg: sum, of: amount, window: 90d}
  - {name: term_n_90d, entity: terminal_id, agg: count, window: 90d}
  - {name: cust_cnp_90d, entity: customer_id, agg: count, window: 90d, where: \"tx_type = 'CNP'\"}
  - {name: term_big_90d, entity: terminal_id, agg: max, of: amount, window: 90d, where: \"amount > 20\"}
  - {name: cust_big_90d, entity: customer_id, agg: max, of: amount, window: 90d, where: \"amount > 20\"}
  - {name: term_cnp_90d, entity: terminal_id, agg: count, window: 90d, where: \"tx_type = 'CNP'\"}
rules:
  - {id: busy, when: \"cust_n_90d > 400\", score: 40}
decision: {review_at: 40, block_at: 80}
";

/// Counts verdicts and notes when the first arrived.
#[derive(Default)]
struct CountingSink {
    verdicts: u64,
    first: Option<Instant>,
}

impl Sink for CountingSink {
    fn verdicts(&mut self, verdicts: &VerdictBatch) -> std::result::Result<(), SinkError> {
        if !verdicts.is_empty() && self.first.is_none() {
            self.first = Some(Instant::now());
        }
        self.verdicts += verdicts.len() as u64;
        Ok(())
    }

    fn dead_letters(
        &mut self,
        _: &str,
        _: &RawBatch,
        _: &[DeadLetter],
    ) -> std::result::Result<(), SinkError> {
        Ok(())
    }

    fn late(
        &mut self,
        _: &str,
        _: &RawBatch,
        _: &[DeadLetter],
    ) -> std::result::Result<(), SinkError> {
        Ok(())
    }

    fn flush(&mut self) -> std::result::Result<(), SinkError> {
        Ok(())
    }
}

/// Events for a few keys only, at a steady rate, after `start_ms` in event time.
struct SmallShare {
    next: i64,
    offset: i64,
    start_ms: i64,
    rate: f64,
    began: Instant,
    until: Instant,
}

impl Source for SmallShare {
    fn name(&self) -> &str {
        "small-share"
    }

    fn fill(
        &mut self,
        batch: &mut RawBatch,
        max: usize,
    ) -> std::result::Result<SourceState, SourceError> {
        if Instant::now() >= self.until {
            return Ok(SourceState::Exhausted);
        }
        let due = (self.began.elapsed().as_secs_f64() * self.rate) as i64;
        if due <= self.next {
            std::thread::sleep(Duration::from_millis(2));
            return Ok(SourceState::Open);
        }
        let now = chrono::Utc::now().timestamp_millis();
        while self.next < due && batch.len() < max {
            let i = self.next;
            let ts = chrono::DateTime::from_timestamp_millis(self.start_ms + i * 50)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                .unwrap_or_default();
            let json = format!(
                "{{\"tx_id\":\"s{i}\",\"ts\":\"{ts}\",\"customer_id\":\"bench-c{}\",\"terminal_id\":\"bench-t{}\",\"amount\":{}.5,\"tx_type\":\"CNP\"}}",
                i % 500,
                (i * 7) % 500,
                10 + i % 90
            );
            batch.push(
                json.as_bytes(),
                Position {
                    partition: 0,
                    offset: self.offset + i,
                },
                now,
            );
            self.next += 1;
        }
        Ok(SourceState::Open)
    }
}

fn report(title: &str, manifests: &[Manifest]) {
    println!("{title}");
    println!(
        "{:>4}  {:>9}  {:>11}  {:>12}  {:>12}  {:>7}  {:>7}",
        "id", "sync ms", "duration ms", "uploaded", "total", "share", "reused"
    );
    for m in manifests {
        println!(
            "{:>4}  {:>9.2}  {:>11.0}  {:>12}  {:>12}  {:>6.1}%  {:>7}",
            m.id,
            m.sync_ms,
            m.duration_ms,
            m.bytes_uploaded,
            m.bytes_total,
            100.0 * m.bytes_uploaded as f64 / m.bytes_total.max(1) as f64,
            m.files_reused
        );
    }
    if let Some(max) = manifests.iter().map(|m| m.sync_ms).reduce(f64::max) {
        let mut sync: Vec<f64> = manifests.iter().map(|m| m.sync_ms).collect();
        sync.sort_by(f64::total_cmp);
        println!(
            "sync pause: median {:.2} ms, max {max:.2} ms over {} checkpoints",
            sync[sync.len() / 2],
            sync.len()
        );
    }
}

fn manifests(url: &str, after: u64) -> Result<Vec<Manifest>> {
    let mut all: Vec<Manifest> = CheckpointStore::open(url, "bench")?
        .list()?
        .into_iter()
        .filter_map(|l| l.manifest.ok())
        .filter(|m| m.id > after)
        .collect();
    all.sort_by_key(|m| m.id);
    Ok(all)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let input = PathBuf::from(
        args.get(1)
            .ok_or("usage: checkpoint_bench W1.jsonl [WORK_DIR] [SMALL_SHARE_SECONDS]")?,
    );
    let work = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| input.with_file_name("checkpoint-bench"));
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(60);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let state = work.join("state");
    let url = work.join("checkpoints").display().to_string();

    let mut config = Config::defaults()?;
    // CHECKPOINT_BENCH_DELIVERY=exactly_once: snapshots of the changed state taken all at once
    // (the exactly-once path), not collected over the following batches.
    if std::env::var("CHECKPOINT_BENCH_DELIVERY").as_deref() == Ok("exactly_once") {
        config.kafka.delivery = riskstream_common::Delivery::ExactlyOnce;
    }
    config.state.dir = Some(state.clone());
    config.checkpoint.url = url.clone();
    config.checkpoint.name = "bench".into();
    config.checkpoint.interval = Duration::from_secs(10);
    config.time.max_out_of_orderness = Duration::from_secs(2);
    let bundle = RuleCompiler::new(&config.event_schema()?).compile_text(BUNDLE, 1)?;
    let rules = Arc::new(RuleTable::new(bundle));

    // 1. Fill. Checkpoints are kept three at a time: note each as it completes.
    let seen: Arc<std::sync::Mutex<BTreeMap<u64, Manifest>>> = Arc::default();
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (seen, watching, url) = (Arc::clone(&seen), Arc::clone(&watching), url.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Acquire) {
                if let Ok(found) = manifests(&url, 0) {
                    if let Ok(mut seen) = seen.lock() {
                        seen.extend(found.into_iter().map(|m| (m.id, m)));
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let began = Instant::now();
    // CHECKPOINT_BENCH_OFF=1: the fill alone, without checkpoints (their cost on throughput).
    let off = std::env::var_os("CHECKPOINT_BENCH_OFF").is_some();
    let mut pipeline = if off {
        Pipeline::new(&config, Arc::clone(&rules), "w1")?
    } else {
        Pipeline::recover(&config, Arc::clone(&rules), "w1", |_| Ok(()))?.0
    };
    let mut source = JsonLinesSource::open(&input)?;
    let mut sink = CountingSink::default();
    let summary = riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink)?;
    let stats = pipeline.feature_state()?;
    drop(pipeline);
    println!(
        "fill: {} events in {:.1} s ({:.0} events/s); {stats:?}",
        summary.events,
        began.elapsed().as_secs_f64(),
        summary.events_per_second()
    );
    watching.store(false, Ordering::Release);
    watcher.join().map_err(|_| "watcher panicked")?;
    if off {
        return Ok(());
    }
    let mut all = seen.lock().map_err(|_| "poisoned")?.clone();
    all.extend(manifests(&url, 0)?.into_iter().map(|m| (m.id, m)));
    let filled: Vec<Manifest> = all.into_values().collect();
    report(
        &format!(
            "checkpoints while filling (W1, every 10 s, {}):",
            config.kafka.delivery.as_str()
        ),
        &filled,
    );
    let last = filled.last().ok_or("no checkpoint")?.clone();

    // 2. Restart on an empty state directory.
    std::fs::remove_dir_all(&state)?;
    let began = Instant::now();
    let (mut pipeline, restored) =
        Pipeline::recover(&config, Arc::clone(&rules), "w1", |_| Ok(()))?;
    let restored_in = began.elapsed();
    let restored = restored.ok_or("nothing restored")?;
    let start_ms = restored
        .max_event_times
        .values()
        .copied()
        .max()
        .unwrap_or(0)
        + 1_000;
    let mut source = SmallShare {
        next: 0,
        offset: restored.offsets.get(&0).copied().unwrap_or(0),
        start_ms,
        rate: 20_000.0,
        began: Instant::now(),
        until: Instant::now() + Duration::from_secs(seconds),
    };
    let mut sink = CountingSink::default();
    riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink)?;
    let first = sink.first.ok_or("no verdict after the restart")?;
    println!(
        "restart: checkpoint {} ({} bytes) restored in {:.2} s; first verdict {:.2} s after the restart began",
        restored.id,
        restored.bytes_total,
        restored_in.as_secs_f64(),
        (first - began).as_secs_f64()
    );
    drop(pipeline);

    // 3. The small-share checkpoints (after the first, which follows the restart).
    let small = manifests(&url, last.id)?;
    report(
        &format!(
            "checkpoints with 500 customers and terminals changing ({seconds} s at 20K events/s):"
        ),
        &small,
    );
    let shares: Vec<f64> = small
        .iter()
        .skip(1)
        .map(|m| m.bytes_uploaded as f64 / m.bytes_total.max(1) as f64)
        .collect();
    if !shares.is_empty() {
        println!(
            "uploaded share after the first: mean {:.2}%, max {:.2}%",
            100.0 * shares.iter().sum::<f64>() / shares.len() as f64,
            100.0 * shares.iter().copied().fold(0.0, f64::max)
        );
    }
    Ok(())
}

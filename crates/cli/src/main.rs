//! `riskstream`: the command line. Parses arguments, loads configuration, wires the stages.
//!
//! It owns no pipeline logic: every command builds the stages from the library crates and runs
//! them. Errors end up here and are printed with their causes for a person to act on.

mod demo;
mod generate;
mod generator;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use riskstream_admin::telemetry;
use riskstream_common::Config;
use riskstream_pipeline::{JsonLinesSink, JsonLinesSource, Pipeline};
use riskstream_rules::{RuleCompiler, RuleTable};
use riskstream_runtime::Instance;

/// Feature state is hundreds of thousands of small long-lived allocations; mimalloc allocates
/// and frees them several times faster than glibc's malloc, with less fragmentation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "riskstream",
    version,
    about = "Real-time risk scoring over payment event streams"
)]
struct Cli {
    /// Configuration file layered over the built-in defaults (see config/default.toml).
    #[arg(long, global = true, env = "RISKSTREAM_CONFIG")]
    config: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a JSON-lines file of events through the pipeline and write one verdict per event.
    Score {
        /// Rule bundle (YAML or JSON).
        #[arg(long)]
        bundle: PathBuf,
        /// Events, one JSON object per line (`-` for stdin).
        #[arg(long)]
        input: PathBuf,
        /// Verdicts, one JSON object per line (`-` for stdout).
        #[arg(long)]
        output: PathBuf,
        /// Dead letters (bad records with their reason). Default: `<output>.dlq.jsonl`, or
        /// `dlq.jsonl` when writing verdicts to stdout.
        #[arg(long)]
        dlq: Option<PathBuf>,
        /// RocksDB state directory; reusing one continues from its state. Default: a temporary
        /// directory removed at exit.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Events too late to score (below the watermark by more than `allowed_lateness`).
        /// Default: `<output>.late.jsonl`, or `late.jsonl` when writing verdicts to stdout.
        #[arg(long)]
        late: Option<PathBuf>,
    },
    /// What a state directory holds, per event log of a bundle: keys, events, and bytes per
    /// event. Run it on the state of a stopped instance or of `score --state DIR`.
    StateReport {
        /// RocksDB state directory.
        #[arg(long)]
        state: PathBuf,
        /// Rule bundle whose logs to report. Default: the built-in default bundle.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Check a rule bundle against the configured event schema and print its problems.
    Validate {
        /// Rule bundle (YAML or JSON).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Score the transactions topic of a Kafka cluster into the verdicts, DLQ and late topics
    /// (`kafka.*` in the configuration; RISKSTREAM__KAFKA__BROKERS=host:port). Runs until
    /// SIGINT/SIGTERM, then drains and commits.
    Run {
        /// Rule bundle (YAML or JSON). Default: the built-in default bundle.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// RocksDB state directory. Default: `state.dir`, else a temporary directory.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// The whole system in one process: an embedded Kafka-protocol broker, a generator of
    /// payment traffic with four fraud scenarios, the pipeline with the default bundle, and a
    /// live status line with precision and recall against the generator's ground truth.
    Demo {
        /// How long to generate traffic (e.g. 30s, 5m). Default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Events per second.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        /// Simulated time per wall-clock time: at 40000, a 30-second demo covers two weeks.
        #[arg(long, default_value_t = 40_000.0)]
        speed: f64,
        /// Partitions of the transactions and verdicts topics.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        /// Seed of the traffic generator.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Rule bundle. Default: the built-in default bundle.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Produce the demo's payment traffic, with four fraud scenarios and a label per event, to
    /// the transactions and labels topics of any Kafka cluster (`kafka.brokers`,
    /// RISKSTREAM__KAFKA__BROKERS) at a steady rate, until the duration, the count or a signal.
    Generate {
        /// Events per second.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Simulated time per wall-clock time while simulated time is behind the clock (see
        /// --history); once it catches up it follows the clock.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// How far behind the clock simulated time starts (e.g. 1d with --speed 100 replays a
        /// day of history in about 15 minutes before running live).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        history: Duration,
        /// How long to produce (e.g. 10m). Default: until SIGINT/SIGTERM.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Seed of the traffic generator.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Topic of the labels. Default: `kafka.topics.labels`, else `labels`.
        #[arg(long)]
        labels_topic: Option<String>,
        /// Produce no labels.
        #[arg(long, conflicts_with = "labels_topic")]
        no_labels: bool,
        /// Prefix of the event ids. Default: `g<start time in seconds>-`, so that a restarted
        /// generator never repeats an id.
        #[arg(long)]
        id_prefix: Option<String>,
    },
    /// Ask a running instance whether it is alive (`/healthz`) or ready (`/readyz`); exit 0 if
    /// so, 1 with the reason if not. The container image's HEALTHCHECK, with no curl needed.
    Health {
        /// The instance's admin API. Default: `admin.listen`.
        #[arg(long)]
        admin: Option<String>,
        /// Ask for readiness instead of liveness.
        #[arg(long)]
        ready: bool,
        /// How long to wait for the answer.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
        timeout: Duration,
    },
    /// This instance's checkpoints (`checkpoint.url`, `checkpoint.name`).
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointAction,
    },
    /// Run the embedded Kafka-protocol broker as a process of its own and print its bootstrap
    /// address, for local development and tests that need a broker outside the process.
    Broker {
        /// Topics to create, as NAME or NAME:PARTITIONS (default partitions: 8).
        #[arg(long = "topic", value_name = "NAME[:PARTITIONS]")]
        topics: Vec<String>,
        /// Also create the configured topics (kafka.topics.*).
        #[arg(long)]
        configured_topics: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CheckpointAction {
    /// Every stored checkpoint, newest first, complete or not.
    List {
        /// State directory (locates the default checkpoint storage). Default: `state.dir`.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// One checkpoint's manifest (the newest complete one by default), with its files, and
    /// whether every file is stored with its recorded size.
    Inspect {
        /// Checkpoint id.
        id: Option<u64>,
        /// State directory (locates the default checkpoint storage). Default: `state.dir`.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Ask a running instance for a checkpoint now, through its admin API; waits until it exists.
    Create {
        /// The instance's admin API. Default: `admin.listen`.
        #[arg(long)]
        admin: Option<String>,
    },
}

/// The default rule bundle, compiled in so `run` and `demo` work from any directory.
const DEFAULT_BUNDLE: &str = include_str!("../../../config/rules/default.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    let format = match cli.log_format {
        LogFormat::Plain => telemetry::LogFormat::Plain,
        LogFormat::Json => telemetry::LogFormat::Json,
    };
    // Flushes exported traces when `run` returns.
    let _telemetry = telemetry::init_tracing(format, &config.telemetry)?;
    match cli.command {
        Command::Score {
            bundle,
            input,
            output,
            dlq,
            late,
            state,
        } => score(
            &Config {
                state: riskstream_common::StateConfig {
                    dir: state.or(config.state.dir.clone()),
                    ..config.state.clone()
                },
                ..config.clone()
            },
            &bundle,
            &input,
            &output,
            dlq.as_deref(),
            late.as_deref(),
        ),
        Command::Validate { bundle } => validate(&config, &bundle),
        Command::StateReport { state, bundle } => state_report(&config, &state, bundle.as_deref()),
        Command::Run { bundle, state } => {
            let mut config = config;
            config.state.dir = state.or(config.state.dir);
            let seed = match &bundle {
                Some(path) => read_bundle(path)?,
                None => DEFAULT_BUNDLE.to_string(),
            };
            let shutdown = shutdown_on_signal()?;
            bound_shutdown(Arc::clone(&shutdown), config.shutdown.timeout);
            let metrics = match telemetry::prometheus() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "/metrics disabled");
                    None
                }
            };
            // The admin API answers first (health, and readiness saying what is awaited), then
            // the rules come from the control topic, however long the cluster takes to be
            // there; the bundle given (or the default) seeds the topic when it is empty.
            let instance = Instance::start(
                &config,
                riskstream_runtime::Options {
                    seed: Some(seed),
                    metrics,
                    stop: Some(shutdown),
                    ..Default::default()
                },
            )
            .context("cannot start the instance")?;
            let Some(summary) = instance.wait().context("the instance failed")? else {
                tracing::info!("stopped while waiting for the Kafka cluster");
                return Ok(ExitCode::SUCCESS);
            };
            eprintln!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            duration,
            rate,
            speed,
            partitions,
            seed,
            bundle,
        } => {
            let bundle = match &bundle {
                Some(path) => read_bundle(path)?,
                None => DEFAULT_BUNDLE.to_string(),
            };
            // Fail before starting anything when the bundle is invalid.
            check_bundle(&config, &bundle)?;
            let shutdown = shutdown_on_signal()?;
            let options = demo::DemoOptions {
                duration,
                rate: rate.max(1),
                speed,
                seed,
                partitions: partitions.max(1),
            };
            demo::run(config, &bundle, options, shutdown)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            rate,
            speed,
            history,
            duration,
            count,
            seed,
            labels_topic,
            no_labels,
            id_prefix,
        } => {
            let labels_topic = match (no_labels, labels_topic, config.kafka.topics.labels()) {
                (true, _, _) => None,
                (false, Some(topic), _) => Some(topic),
                (false, None, Some(topic)) => Some(topic.to_string()),
                (false, None, None) => Some("labels".to_string()),
            };
            let id_prefix = id_prefix.unwrap_or_else(|| {
                let secs = riskstream_pipeline::source::now_ms() / 1000;
                format!("g{secs}-")
            });
            let options = generate::GenerateOptions {
                rate: rate.max(1),
                speed: speed.max(1.0),
                history,
                duration,
                count,
                seed,
                labels_topic,
                id_prefix,
            };
            let shutdown = shutdown_on_signal()?;
            let done = generate::run(&config, &options, &shutdown)?;
            eprintln!(
                "generated {} events ({} fraud, {} malformed on purpose) and {} labels; {} records acknowledged, {} failed",
                done.events, done.frauds, done.malformed, done.labels, done.delivered, done.failed
            );
            Ok(if done.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Broker {
            topics,
            configured_topics,
        } => broker(&config, &topics, configured_topics),
        Command::Health {
            admin,
            ready,
            timeout,
        } => {
            let address = admin.unwrap_or_else(|| config.admin.listen.clone());
            let path = if ready { "/readyz" } else { "/healthz" };
            let (status, body) = admin_request("GET", &address, path, None, timeout)?;
            if status == 200 {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{path} answered {status}: {}", body.trim());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Checkpoints { action } => checkpoints(config, action),
    }
}

fn checkpoint_store(config: &Config) -> Result<riskstream_checkpoint::CheckpointStore> {
    let url = config
        .checkpoint_url()
        .context("no checkpoint storage: set checkpoint.url, or state.dir (--state)")?;
    Ok(riskstream_checkpoint::CheckpointStore::open(
        &url,
        &config.checkpoint_name(),
    )?)
}

fn checkpoints(mut config: Config, action: CheckpointAction) -> Result<ExitCode> {
    match action {
        CheckpointAction::List { state } => {
            config.state.dir = state.or(config.state.dir);
            let store = checkpoint_store(&config)?;
            let listed = store.list()?;
            println!("{}: {} checkpoint(s)", store.location(), listed.len());
            println!(
                "{:>6}  {:<24}  {:>12}  {:>12}  {:>7}  {:>9}  offsets",
                "id", "created", "bytes", "uploaded", "rules", "committed"
            );
            for l in &listed {
                match &l.manifest {
                    Ok(m) => println!(
                        "{:>6}  {:<24}  {:>12}  {:>12}  {:>7}  {:>9}  {:?}",
                        l.id,
                        chrono::DateTime::from_timestamp_millis(m.created_at_ms)
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                            .unwrap_or_default(),
                        m.bytes_total,
                        m.bytes_uploaded,
                        m.rules_version,
                        if m.delivery == "exactly_once" {
                            if l.committed {
                                "yes"
                            } else {
                                "no"
                            }
                        } else {
                            "-"
                        },
                        m.offsets
                    ),
                    Err(problem) => println!("{:>6}  unusable: {problem}", l.id),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CheckpointAction::Inspect { id, state } => {
            config.state.dir = state.or(config.state.dir);
            let store = checkpoint_store(&config)?;
            let listed = store.list()?;
            let found = match id {
                Some(id) => listed.iter().find(|l| l.id == id),
                None => listed.iter().find(|l| l.manifest.is_ok()),
            };
            let Some(l) = found else {
                anyhow::bail!(
                    "{}: no checkpoint {}",
                    store.location(),
                    id.map_or("is complete".to_string(), |i| i.to_string())
                );
            };
            match &l.manifest {
                Ok(m) => {
                    println!("{}", serde_json::to_string_pretty(m)?);
                    println!("committed: {}", l.committed);
                    match store.verify(m) {
                        Ok(()) => println!("files: all {} stored with their sizes", m.files.len()),
                        Err(problem) => {
                            println!("files: {problem}");
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(problem) => {
                    println!("checkpoint {} is unusable: {problem}", l.id);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        CheckpointAction::Create { admin } => {
            let address = admin.unwrap_or_else(|| config.admin.listen.clone());
            let token = config.admin.bearer_token()?;
            let (status, body) = admin_request(
                "POST",
                &address,
                "/api/v1/checkpoints",
                token.as_ref().map(|t| t.expose()),
                Duration::from_secs(120),
            )?;
            println!("{body}");
            Ok(if status == 201 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A bodiless request over plain HTTP/1.1 to the admin API at `address` (`host:port` or
/// `http://host:port`), with an optional bearer token. An unspecified listen address
/// (`0.0.0.0:8080`, as in a container) is reached on loopback.
fn admin_request(
    method: &str,
    address: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let host = match address.split_once("://") {
        Some(("http", rest)) => rest.trim_end_matches('/'),
        Some(_) => anyhow::bail!(
            "the admin API is plain http:// (put a TLS proxy in front for remote use)"
        ),
        None => address,
    };
    let host = match host.strip_prefix("0.0.0.0:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => host.to_string(),
    };
    let target = host
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the admin API address {host}"))?
        .next()
        .with_context(|| format!("the admin API address {host} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("cannot reach the admin API at {host}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("no answer from the admin API at {host}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the admin API answered something that is not HTTP")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Checks a bundle document against the configured schema.
fn check_bundle(config: &Config, text: &str) -> Result<()> {
    RuleCompiler::new(&config.event_schema()?)
        .compile_text(text, 1)
        .context("in the rule bundle")?;
    Ok(())
}

/// Bounds a graceful stop: once `shutdown` is set, the process exits with a failure status if
/// it is still running `timeout` later (draining against a broker that does not come back, a
/// final checkpoint that cannot be written). Nothing past the last checkpoint is committed, so
/// a restart recovers.
fn bound_shutdown(shutdown: Arc<AtomicBool>, timeout: Duration) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-bound".into())
        .spawn(move || {
            while !shutdown.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(timeout);
            tracing::error!(?timeout, "the graceful stop took longer than shutdown.timeout: exiting without it; a restart recovers from the last checkpoint");
            std::process::exit(3);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot bound the graceful stop (shutdown.timeout)");
    }
}

/// A flag set by SIGINT or SIGTERM (a second signal exits at once).
fn shutdown_on_signal() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Exit at once on a second signal, after the first has asked for a graceful stop.
        signal_hook::flag::register_conditional_shutdown(signal, 1, flag.clone())
            .context("cannot install a signal handler")?;
        signal_hook::flag::register(signal, flag.clone())
            .context("cannot install a signal handler")?;
    }
    Ok(flag)
}

fn broker(config: &Config, topics: &[String], configured: bool) -> Result<ExitCode> {
    let broker = riskstream_kafka::EmbeddedBroker::start(1)?;
    let mut wanted: Vec<(String, i32)> = Vec::new();
    for t in topics {
        let (name, partitions) = match t.split_once(':') {
            Some((name, p)) => (
                name.to_string(),
                p.parse::<i32>().ok().filter(|p| *p > 0).with_context(|| {
                    format!("--topic {t}: partitions must be a positive number")
                })?,
            ),
            None => (t.clone(), 8),
        };
        wanted.push((name, partitions));
    }
    if configured {
        let t = &config.kafka.topics;
        for name in [&t.transactions, &t.verdicts, &t.late, &t.dlq] {
            wanted.push((name.clone(), 8));
        }
        // The control topic orders rule updates: one partition.
        wanted.push((t.rules.clone(), 1));
        if let Some(labels) = t.labels() {
            wanted.push((labels.to_string(), 8));
        }
    }
    for (name, partitions) in &wanted {
        broker.create_topic(name, *partitions)?;
    }
    // The address on stdout (first line) for scripts; the rest on stderr.
    println!("{}", broker.bootstrap_servers());
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("cannot write the bootstrap address")?;
    eprintln!(
        "embedded broker listening at {} ({} topics created); Ctrl-C stops it",
        broker.bootstrap_servers(),
        wanted.len()
    );
    let shutdown = shutdown_on_signal()?;
    while !shutdown.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(ExitCode::SUCCESS)
}

fn read_bundle(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read rule bundle {}", path.display()))
}

fn state_report(config: &Config, state: &Path, bundle: Option<&Path>) -> Result<ExitCode> {
    if !state.join("CURRENT").is_file() {
        anyhow::bail!(
            "{} is not a state directory (no RocksDB database there)",
            state.display()
        );
    }
    let text = match bundle {
        Some(path) => read_bundle(path)?,
        None => DEFAULT_BUNDLE.to_string(),
    };
    let bundle = RuleCompiler::new(&config.event_schema()?)
        .compile_text(&text, 1)
        .context("the bundle does not compile")?;
    let store = riskstream_state::StateStore::open(state)
        .with_context(|| format!("cannot open the state in {}", state.display()))?;
    let report = riskstream_features::state_report(&store, &bundle)?;
    let mb = |b: usize| b as f64 / 1e6;
    let events: usize = report.logs.iter().map(|l| l.events).sum();
    println!(
        "{}: {} records, {} events held, {:.1} MB of values and {:.1} MB of keys",
        state.display(),
        report.records,
        events,
        mb(report.value_bytes),
        mb(report.key_bytes),
    );
    println!(
        "{:<48} {:>6} {:>7} {:>10} {:>11} {:>9} {:>11}",
        "log (entity, filter)", "fields", "windows", "keys", "events", "MB", "bytes/event"
    );
    for log in &report.logs {
        println!(
            "{:<48} {:>6} {:>7} {:>10} {:>11} {:>9.1} {:>11.1}",
            log.name,
            log.fields,
            log.windows,
            log.keys,
            log.events,
            mb(log.bytes),
            log.bytes as f64 / log.events.max(1) as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(config: &Config, bundle: &Path) -> Result<ExitCode> {
    let text = read_bundle(bundle)?;
    let started = std::time::Instant::now();
    let compiler = RuleCompiler::new(&config.event_schema()?);
    match compiler.compile_text(&text, 1) {
        Ok(compiled) => {
            let doc = compiled.doc();
            let (distinct, written) = compiled.condition_counts();
            println!(
                "{}: ok ({} rules, {} features; {distinct} distinct of {written} rule conditions; compiled in {:.1} ms)",
                bundle.display(),
                doc.rules.len(),
                doc.features.len(),
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{}: {e}", bundle.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `explicit`, or `<output>.<suffix>` (just `<suffix>` when the output is stdout).
fn side_output(output: &Path, explicit: Option<&Path>, suffix: &str) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None if output.as_os_str() == "-" => PathBuf::from(suffix),
        None => {
            let mut name = output.as_os_str().to_owned();
            name.push(".");
            name.push(suffix);
            PathBuf::from(name)
        }
    }
}

fn score(
    config: &Config,
    bundle: &Path,
    input: &Path,
    output: &Path,
    dlq: Option<&Path>,
    late: Option<&Path>,
) -> Result<ExitCode> {
    let schema = config.event_schema()?;
    let compiled = RuleCompiler::new(&schema)
        .compile_text(&read_bundle(bundle)?, 1)
        .with_context(|| format!("in {}", bundle.display()))?;
    let rules = Arc::new(RuleTable::new(compiled));
    let dlq = side_output(output, dlq, "dlq.jsonl");
    let late = side_output(output, late, "late.jsonl");
    let mut source = JsonLinesSource::open(input)?;
    let mut sink = JsonLinesSink::create(output, &dlq, &late)?;
    let mut pipeline = Pipeline::new(config, rules, "file")?;
    let summary = riskstream_pipeline::run(&mut source, &mut pipeline, &mut sink)?;
    // A state directory that cannot be written (a full disk) must not look like a success: a
    // later `score --state` would continue from incomplete state.
    pipeline.close().with_context(|| match &config.state.dir {
        Some(dir) => format!(
            "the feature state could not be written to {}; the directory is incomplete: free space and score again from an empty directory",
            dir.display()
        ),
        None => "the feature state could not be written to its temporary directory".to_string(),
    })?;
    eprintln!("{summary}");
    if summary.dead_letter_count() > 0 {
        eprintln!("dead letters written to {}", dlq.display());
    }
    if summary.late > 0 {
        eprintln!("late events written to {}", late.display());
    }
    Ok(ExitCode::SUCCESS)
}

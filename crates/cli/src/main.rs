//! `riskstream`: the command line. Parses arguments, loads configuration, wires the stages.
//!
//! It owns no pipeline logic: every command builds the stages from the library crates and runs
//! them. Errors end up here and are printed with their causes for a person to act on.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use riskstream_common::Config;
use riskstream_pipeline::{JsonLinesSink, JsonLinesSource, Pipeline};
use riskstream_rules::{RuleCompiler, RuleTable};

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
    /// Check a rule bundle against the configured event schema and print its problems.
    Validate {
        /// Rule bundle (YAML or JSON).
        #[arg(long)]
        bundle: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RISKSTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
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
    }
}

fn read_bundle(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read rule bundle {}", path.display()))
}

fn validate(config: &Config, bundle: &Path) -> Result<ExitCode> {
    let compiler = RuleCompiler::new(&config.event_schema()?);
    match compiler.compile_text(&read_bundle(bundle)?, 1) {
        Ok(compiled) => {
            let doc = compiled.doc();
            println!(
                "{}: ok ({} rules, {} features)",
                bundle.display(),
                doc.rules.len(),
                doc.features.len()
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
    eprintln!("{summary}");
    if summary.dead_letter_count() > 0 {
        eprintln!("dead letters written to {}", dlq.display());
    }
    if summary.late > 0 {
        eprintln!("late events written to {}", late.display());
    }
    Ok(ExitCode::SUCCESS)
}

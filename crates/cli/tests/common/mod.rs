//! What the process-level tests share: the `riskstream` binary, the embedded broker in a
//! process of its own, free ports and signals.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn riskstream() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_riskstream"));
    // The tests compare every feature of every verdict with a reference, so verdicts list them
    // all (`verdict.features` defaults to the fired rules' features).
    cmd.env_remove("RISKSTREAM_CONFIG")
        .env("RISKSTREAM_LOG", "info")
        .env("RISKSTREAM__VERDICT__FEATURES", "all");
    cmd
}

/// `riskstream --config CONFIG run --bundle BUNDLE`, its stderr appended to `log`.
pub fn spawn_run(config: &Path, bundle: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    riskstream()
        .arg("--config")
        .arg(config)
        .args(["run", "--bundle"])
        .arg(bundle)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("riskstream run starts")
}

/// `riskstream broker` in a process of its own, and its bootstrap address.
pub struct Broker {
    pub child: Child,
    pub address: String,
}

impl Broker {
    /// With the configured topics (control topic included).
    pub fn start(config: &Path) -> Broker {
        Self::start_with(config, &["--configured-topics"])
    }

    /// With the topics `args` ask for (`--topic NAME:PARTITIONS`, `--configured-topics`).
    pub fn start_with(config: &Path, args: &[&str]) -> Broker {
        let mut child = riskstream()
            .arg("--config")
            .arg(config)
            .arg("broker")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("broker starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("broker prints its address");
        Broker {
            child,
            address: line.trim().to_string(),
        }
    }

    /// Stops the broker process dead (SIGSTOP): connections stay open, nothing answers.
    pub fn stall(&self) {
        signal(&self.child, "STOP");
    }

    /// Lets a stalled broker go on (SIGCONT).
    pub fn resume(&self) {
        signal(&self.child, "CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        signal(&self.child, "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `SIG<name>` to `child`.
pub fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status();
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether two feature values agree (numbers within 1e-9 relative).
pub fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// Whether a verdict's `features` hold every value of `expected` (an uninterrupted run's).
pub fn same_features(expected: &serde_json::Value, features: &serde_json::Value) -> bool {
    expected
        .as_object()
        .expect("features")
        .iter()
        .all(|(k, v)| close(v, &features[k]))
}

/// Asserts that every verdict — `(event id, features)`, repeats included — carries the
/// features `reference` (an uninterrupted run) gives its event.
pub fn assert_same_features<'a>(
    what: &str,
    verdicts: impl IntoIterator<Item = (&'a String, &'a serde_json::Value)>,
    reference: impl Fn(&str) -> Option<&'a serde_json::Value>,
) {
    let mut differing = Vec::new();
    for (id, features) in verdicts {
        let expected =
            reference(id).unwrap_or_else(|| panic!("{what}: verdict for unknown event {id}"));
        if !same_features(expected, features) {
            differing.push((id.clone(), features.clone(), expected.clone()));
        }
    }
    assert!(
        differing.is_empty(),
        "{what}: {} verdicts differ from the uninterrupted run, e.g. {:?}",
        differing.len(),
        &differing[..differing.len().min(3)]
    );
}

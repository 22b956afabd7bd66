#!/usr/bin/env bash
# The test command: installs what a fresh Debian machine lacks, then checks formatting, lints and
# runs every test. Safe to run repeatedly; the cargo target directory persists outside the clone
# so that later runs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

# The S3 checkpoint test (crates/checkpoint/tests/s3.rs) runs against moto's S3-compatible
# server, installed once into a virtual environment beside the target directory.
if [ -z "${RISKSTREAM_TEST_S3_SERVER:-}" ]; then
  if command -v moto_server >/dev/null 2>&1; then
    RISKSTREAM_TEST_S3_SERVER="$(command -v moto_server)"
  else
    venv="$CARGO_TARGET_DIR/moto-venv"
    if [ ! -x "$venv/bin/moto_server" ]; then
      echo "==> installing moto[server] (S3-compatible server for the checkpoint test) into $venv"
      python3 -m venv "$venv" 2>/dev/null || {
        $([ "$(id -u)" -ne 0 ] && echo sudo) apt-get install -y -qq python3-venv
        python3 -m venv "$venv"
      }
      "$venv/bin/pip" install --quiet "moto[server]"
    fi
    RISKSTREAM_TEST_S3_SERVER="$venv/bin/moto_server"
  fi
  export RISKSTREAM_TEST_S3_SERVER
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
echo "==> deployment assets (compose, Helm, Prometheus, Grafana)"
scripts/deploy-check.sh "$CARGO_TARGET_DIR/debug/riskstream"

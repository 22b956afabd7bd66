#!/usr/bin/env bash
# The test command: installs what a fresh Debian machine lacks, then checks formatting, lints and
# runs every test. Safe to run repeatedly; the cargo target directory persists outside the clone
# so that later runs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked

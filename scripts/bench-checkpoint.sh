#!/usr/bin/env bash
# Checkpoints with about 1 GB of state (benches/src/bin/checkpoint_bench.rs): synchronous pause,
# duration and bytes per checkpoint, the share uploaded when few keys change, restart to first
# verdict; then the latency exactly-once adds (kafka_bench latency with transactions).
#
# Usage: scripts/bench-checkpoint.sh [EVENTS] (default 10000000, W1 from ../shared/bench/gen_w1.py,
# cached in $CARGO_TARGET_DIR/w1/). Needs about 3 GB of free disk there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

n="${1:-10000000}"
ensure_w1_input "$n"
echo "==> cargo build --release (benches)"
cargo build --release --locked -p riskstream -p riskstream-benches --bins
echo "==> checkpoints with W1 ($n events) and long windows"
"$CARGO_TARGET_DIR/release/checkpoint_bench" "$input" "$work/checkpoint-bench" 60
rm -rf "$work/checkpoint-bench"
ensure_w1_input 1000000
echo "==> latency at 50000 events/s, at_least_once"
"$CARGO_TARGET_DIR/release/kafka_bench" latency "$input" 50000 16
for interval in 10000 1000; do
  echo "==> latency at 50000 events/s, exactly_once, a checkpoint (and commit) every $interval ms"
  KAFKA_BENCH_DELIVERY=exactly_once KAFKA_BENCH_CHECKPOINT_INTERVAL_MS=$interval \
    "$CARGO_TARGET_DIR/release/kafka_bench" latency "$input" 50000 16
done

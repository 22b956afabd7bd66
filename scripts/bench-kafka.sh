#!/usr/bin/env bash
# End-to-end benchmark of the Kafka path through the embedded broker on workload W1: the raw
# librdkafka consume rate (the ceiling), pipeline saturation throughput, and produce-to-verdict
# latency at a steady rate.
#
# Usage: scripts/bench-kafka.sh [EVENTS] [RATE] [SECONDS]   (default 1000000 50000 16; the latency
# run needs RATE × (SECONDS + 3) events: it never replays an event time)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

n="${1:-1000000}"
rate="${2:-50000}"
seconds="${3:-16}"
ensure_w1_input "$n"
echo "==> cargo build --release (kafka_bench)"
cargo build --release --locked -p riskstream -p riskstream-benches --bins
bin="$CARGO_TARGET_DIR/release/kafka_bench"
echo "==> raw consume (ceiling)"
"$bin" raw "$input"
echo "==> saturation throughput"
"$bin" saturate "$input"
echo "==> latency at $rate events/s"
"$bin" latency "$input" "$rate" "$seconds"
echo "==> saturation throughput during a burst of rules updates (20 a second)"
"$bin" saturate-reloading "$input"
echo "==> PUT /api/v1/rules response to the first verdict of the new version, at $rate events/s"
"$bin" reload "$input" "$rate" "$seconds"

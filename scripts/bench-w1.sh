#!/usr/bin/env bash
# End-to-end benchmark on workload W1 (benches/w1/bundle.yaml, input from
# ../shared/bench/gen_w1.py): `riskstream score` throughput and peak RSS.
#
# Usage: scripts/bench-w1.sh [EVENTS] (default 1000000). Inputs are generated once and cached in
# $CARGO_TARGET_DIR/w1/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

n="${1:-1000000}"
ensure_w1_input "$n"
command -v /usr/bin/time >/dev/null 2>&1 || {
  $([ "$(id -u)" -ne 0 ] && echo sudo) apt-get install -y -qq time
}

echo "==> cargo build --release"
cargo build --release --locked -p riskstream
bin="$CARGO_TARGET_DIR/release/riskstream"
state="$work/state-$n"
rm -rf "$state"
echo "==> riskstream score (W1, $n events)"
RISKSTREAM__TIME__MAX_OUT_OF_ORDERNESS=2s /usr/bin/time -v "$bin" score \
  --bundle benches/w1/bundle.yaml --input "$input" --output "$work/verdicts-$n.jsonl" \
  --state "$state" 2> "$work/time-$n.txt" || { cat "$work/time-$n.txt" >&2; exit 1; }
grep -E "^(events|dead|too late|rules|elapsed)" "$work/time-$n.txt"
grep -E "Maximum resident set size" "$work/time-$n.txt"

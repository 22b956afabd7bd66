#!/usr/bin/env bash
# End-to-end benchmark on workload W2 (../shared/bench/w2: 200 windowed features over four
# entity kinds, 8 row-level features, 100 rules): `riskstream score` throughput, the pipeline's
# elapsed time against the wall time of the run, peak RSS, verdict bytes; then W1 on the same
# build for comparison.
#
# Usage: scripts/bench-w2.sh [EVENTS] (default 1000000). Inputs are generated once and cached in
# $CARGO_TARGET_DIR/w2/. VERDICT_FEATURES=all|fired|none (default: the configured "fired");
# KEEP_STATE=1 to score into a state directory that is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

n="${1:-1000000}"
w2=../shared/bench/w2
for f in gen_w2.py w2.yaml w2.toml; do
  [ -f "$w2/$f" ] || { echo "missing $w2/$f (the shared W2 workload)" >&2; exit 1; }
done
work="$CARGO_TARGET_DIR/w2"
mkdir -p "$work"
input="$work/w2-$n.jsonl"
if [ ! -s "$input" ]; then
  python3 -c "import numpy" 2>/dev/null || python3 -m pip install --quiet numpy
  echo "==> generating $n W2 events into $input"
  python3 "$w2/gen_w2.py" events "$n" "$input"
fi
command -v /usr/bin/time >/dev/null 2>&1 || {
  $([ "$(id -u)" -ne 0 ] && echo sudo) apt-get install -y -qq time
}

echo "==> cargo build --release"
cargo build --release --locked -p riskstream
bin="$CARGO_TARGET_DIR/release/riskstream"
[ -z "${VERDICT_FEATURES:-}" ] || export RISKSTREAM__VERDICT__FEATURES="$VERDICT_FEATURES"
# The state cache sized to W2's state (2.4 GB at 10M events; the default 512 MB cap holds 1M):
# past its cap every batch writes records out and reads them back. CACHE_BYTES overrides it.
export RISKSTREAM__STATE__CACHE_MAX_BYTES="${CACHE_BYTES:-4294967296}"
echo "==> state.cache_max_bytes = $RISKSTREAM__STATE__CACHE_MAX_BYTES"

echo "==> riskstream validate (W2 bundle)"
"$bin" --config "$w2/w2.toml" validate --bundle "$w2/w2.yaml" | tail -n 3

# As issue 20 ran it: a temporary state directory, removed at exit (nothing written out at the
# end). KEEP_STATE=1 scores into a state directory of its own, written out at the end as a
# later `score --state` would continue from it.
state="$work/state-$n"
rm -rf "$state"
state_args=()
[ -z "${KEEP_STATE:-}" ] || state_args=(--state "$state")
echo "==> riskstream score (W2, $n events${KEEP_STATE:+, state kept})"
start=$(date +%s.%N)
/usr/bin/time -v "$bin" --config "$w2/w2.toml" score --bundle "$w2/w2.yaml" --input "$input" \
  --output "$work/verdicts-$n.jsonl" "${state_args[@]}" 2> "$work/time-$n.txt" \
  || { cat "$work/time-$n.txt" >&2; exit 1; }
end=$(date +%s.%N)
grep -E "^(events|dead|too late|rules|state cache|elapsed)" "$work/time-$n.txt"
awk -v s="$start" -v e="$end" 'BEGIN { printf "wall time: %.3f s\n", e - s }'
grep -E "Maximum resident set size" "$work/time-$n.txt"
bytes=$(stat -c %s "$work/verdicts-$n.jsonl")
awk -v b="$bytes" -v n="$n" 'BEGIN { printf "verdicts: %.1f MB, %.0f bytes each\n", b / 1e6, b / n }'
rm -rf "$state" "$work/verdicts-$n.jsonl"

echo "==> W1 on the same build, for comparison"
scripts/bench-w1.sh "$n"

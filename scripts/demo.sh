#!/usr/bin/env bash
# The main job: builds riskstream (release) and runs `riskstream demo` — an embedded Kafka-protocol
# broker, a generator of payment traffic with four fraud scenarios, the pipeline with the default
# bundle, a live status line and a summary with precision and recall. No external services.
#
# Usage: scripts/demo.sh [riskstream demo options]   (default: --duration 30s)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps

echo "==> cargo build --release"
cargo build --release --locked -p riskstream
bin="$CARGO_TARGET_DIR/release/riskstream"
[ "$#" -gt 0 ] || set -- --duration 30s
echo "==> riskstream demo $*"
exec "$bin" demo "$@"

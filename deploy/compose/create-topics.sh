#!/usr/bin/env bash
# kafka-init: creates riskstream's topics (idempotent) and exits. Partition counts are chosen
# once: the transactions topic's count bounds how many instances can share the work.
set -euo pipefail
bootstrap="${BOOTSTRAP:-kafka:9092}"
topics=/opt/kafka/bin/kafka-topics.sh
create() { # name partitions [config...]
  local name="$1" partitions="$2"
  shift 2
  local configs=()
  for c in "$@"; do configs+=(--config "$c"); done
  "$topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$name" --partitions "$partitions" --replication-factor 1 "${configs[@]}"
}
create transactions 8
create verdicts 8
create labels 8
create dlq 2
create late 2
# The control topic: every published rule bundle, in order, the newest kept per key.
create riskstream.rules 1 cleanup.policy=compact
"$topics" --bootstrap-server "$bootstrap" --list

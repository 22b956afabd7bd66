#!/usr/bin/env bash
# The docker-compose pipeline, live: builds the image, brings docker-compose.yml up with the test
# override (deploy/compose/test.yml: the broker is `riskstream broker`, Prometheus the host's
# Debian binary, Grafana left out, all on host networking), and checks that
#   1. riskstream turns ready and verdicts flow on the verdicts topic;
#   2. Prometheus scraped riskstream's metrics (verdicts counted, the target up);
#   3. a rules change published through the admin API (with the token; refused without it)
#      shows in the verdicts: the new rule fires, under the new rules version;
#   4. SIGTERM stops riskstream cleanly (exit status 0, a final checkpoint logged);
#   5. `docker compose down` leaves no container, network or volume of the project behind.
#
# Needs a Docker engine (started here from Debian's docker.io when none runs and we are root)
# and a base image: BASE_IMAGE (default local/debian:bookworm, made with debootstrap when
# absent), since these machines reach no registry. Takes a few minutes after a release build.
#
# Usage: scripts/deploy-test.sh [--no-build]   (--no-build: test riskstream:deploy-test as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

project=riskstream-deploy-test
export TAG=deploy-test RISKSTREAM_TAG=deploy-test
export BASE_IMAGE="${BASE_IMAGE:-local/debian:bookworm}"
export RISKSTREAM_ADMIN_TOKEN="deploy-test-$RANDOM$RANDOM"
export RUN_DIR
RUN_DIR="$(mktemp -d /tmp/riskstream-deploy-test.XXXXXX)"
chmod 0777 "$RUN_DIR"
admin=http://127.0.0.1:18080
prometheus=http://127.0.0.1:19090
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return
  echo "==> installing $2"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$2"
}
need dockerd docker.io
need kcat kcat
need curl curl
need jq jq
need prometheus prometheus
need debootstrap debootstrap
ensure_compose
compose+=(--project-name "$project" -f docker-compose.yml -f deploy/compose/test.yml)

started_dockerd=""
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "no Docker engine runs: start dockerd" >&2; exit 1; }
  echo "==> starting dockerd (log: $RUN_DIR/dockerd.log)"
  dockerd > "$RUN_DIR/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
  docker info >/dev/null 2>&1 || { tail -20 "$RUN_DIR/dockerd.log" >&2; exit 1; }
fi

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "==> failed; the services' last log lines:" >&2
    "${compose[@]}" logs --no-color --tail 30 >&2 2>&1 || true
  fi
  "${compose[@]}" down --volumes --remove-orphans --timeout 40 >/dev/null 2>&1 || true
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null || true
    wait "$started_dockerd" 2>/dev/null || true
  fi
  rm -rf "$RUN_DIR"
  exit "$rc"
}
trap cleanup EXIT

# Waits until "$@" succeeds, up to $1 seconds; $2 says what is awaited.
wait_for() {
  local seconds="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out after ${seconds}s waiting for $what" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "    $what"
}

# --- the image ---------------------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if [ "$BASE_IMAGE" != local/debian:bookworm ]; then
    docker pull "$BASE_IMAGE"
  else
    mirror="$(grep -h -o -m1 -E 'https?://[^ ]+/debian/?' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1)"
    rootfs="$CARGO_TARGET_DIR/deploy-tools/bookworm-rootfs"
    echo "==> debootstrap bookworm from ${mirror:-http://deb.debian.org/debian} into $rootfs"
    $sudo rm -rf "$rootfs"
    $sudo debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    $sudo tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    $sudo rm -rf "$rootfs"
  fi
fi
for port in 18080 19090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is taken; the test override needs it" >&2
    exit 1
  fi
done
if [ "${1:-}" != --no-build ]; then
  scripts/build-image.sh --quiet >/dev/null
fi
echo "==> riskstream:$TAG built on $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "riskstream:$TAG" | numfmt --to=iec))"
user="$(docker image inspect -f '{{.Config.User}}' "riskstream:$TAG")"
[ "$user" = "10001:10001" ] || { echo "the image runs as '$user', not the riskstream user" >&2; exit 1; }

# --- up ----------------------------------------------------------------------------------------
echo "==> docker compose up"
"${compose[@]}" up --detach --quiet-pull
wait_for 60 "the broker is up" test -s "$RUN_DIR/bootstrap"
brokers="$(head -n 1 "$RUN_DIR/bootstrap")"
wait_for 120 "riskstream is ready (/readyz)" curl -fsS "$admin/readyz"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$admin/healthz")" = 200 ]
wait_for 60 "the container's HEALTHCHECK passes" \
  sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' ${project}-riskstream-1)\" = healthy ]"

verdicts_with() { # true when a verdict on the topic (read from the start) matches jq filter $1
  kcat -C -b "$brokers" -t verdicts -o beginning -e -q -f '%s\n' > "$RUN_DIR/verdicts.jsonl" 2>/dev/null
  jq -n -e "[inputs | select($1)] | length > 0" "$RUN_DIR/verdicts.jsonl"
}
wait_for 60 "verdicts flow" verdicts_with '.tx_id != null'
wait_for 60 "Prometheus scraped riskstream (target up, verdicts counted)" sh -c "
  curl -fsS '$prometheus/api/v1/query?query=up%7Bjob%3D%22riskstream%22%7D%3D%3D1' | jq -e '.data.result | length == 1' &&
  curl -fsS '$prometheus/api/v1/query?query=sum(riskstream_verdicts_total)%3E0' | jq -e '.data.result | length == 1'"
wait_for 30 "Prometheus loaded the alert rules" sh -c \
  "curl -fsS '$prometheus/api/v1/rules' | jq -e '[.data.groups[].rules[] | select(.type == \"alerting\")] | length >= 8'"

# --- a rules change through the admin API -------------------------------------------------------
version="$(curl -fsS "$admin/api/v1/rules" -D "$RUN_DIR/headers" -o "$RUN_DIR/rules.json" && tr -d '\r' < "$RUN_DIR/headers" | sed -n 's/^[Ee][Tt][Aa][Gg]: *"\{0,1\}\([0-9]*\)"\{0,1\}$/\1/p')"
[ -n "$version" ] || { echo "GET /api/v1/rules gave no ETag" >&2; exit 1; }
# The default bundle (what the instance runs) with one more rule at the end of its rules.
cat > "$RUN_DIR/probe.yaml" <<'EOF'
  - id: deploy_test_probe
    description: Added by scripts/deploy-test.sh; fires on every payment
    when: "amount >= 0"
    score: 1
    mode: shadow
EOF
awk -v probe="$RUN_DIR/probe.yaml" '
  /^decision:/ { while ((getline line < probe) > 0) print line }
  { print }' config/rules/default.yaml > "$RUN_DIR/bundle.yaml"
grep -q deploy_test_probe "$RUN_DIR/bundle.yaml" || { echo "cannot add the probe rule" >&2; exit 1; }
status="$(curl -s -o "$RUN_DIR/put.json" -w '%{http_code}' -X PUT -H "If-Match: \"$version\"" \
  --data-binary @"$RUN_DIR/bundle.yaml" "$admin/api/v1/rules")"
[ "$status" = 401 ] || { echo "a rules change without the token got $status, not 401" >&2; exit 1; }
status="$(curl -s -o "$RUN_DIR/put.json" -w '%{http_code}' -X PUT -H "If-Match: \"$version\"" \
  -H "Authorization: Bearer $RISKSTREAM_ADMIN_TOKEN" -H 'X-Rules-Comment: deploy test' \
  --data-binary @"$RUN_DIR/bundle.yaml" "$admin/api/v1/rules")"
case "$status" in
  200 | 201) ;;
  *) echo "the rules change got $status: $(cat "$RUN_DIR/put.json")" >&2; exit 1 ;;
esac
new_version=$((version + 1))
echo "    rules version $version -> $new_version published"
wait_for 60 "verdicts under rules version $new_version fire deploy_test_probe" verdicts_with \
  ".rules_version == $new_version and any(.fired[]; .rule_id == \"deploy_test_probe\")"
wait_for 30 "Prometheus sees rules version $new_version" sh -c \
  "curl -fsS '$prometheus/api/v1/query?query=max(riskstream_rules_version)' | jq -e '.data.result[0].value[1] == \"$new_version\"'"

# --- stop and down -----------------------------------------------------------------------------
echo "==> SIGTERM to riskstream"
"${compose[@]}" stop --timeout 40 riskstream >/dev/null 2>&1
code="$(docker inspect -f '{{.State.ExitCode}}' "${project}-riskstream-1")"
[ "$code" = 0 ] || { echo "riskstream exited with status $code after SIGTERM" >&2; exit 1; }
"${compose[@]}" logs --no-color riskstream > "$RUN_DIR/riskstream.log" 2>&1
# The drain: a final checkpoint, then the offsets committed, then the summary.
for line in "checkpoint [0-9]* complete" "offsets committed at shutdown" "verdicts: [1-9]"; do
  grep -q "$line" "$RUN_DIR/riskstream.log" \
    || { echo "riskstream's log lacks '$line' after SIGTERM" >&2; exit 1; }
done
echo "    exit status 0, final checkpoint and offsets committed"
echo "==> docker compose down"
"${compose[@]}" down --volumes --remove-orphans --timeout 40 >/dev/null 2>&1
left="$(docker ps -a -q --filter "label=com.docker.compose.project=$project")"
left+="$(docker network ls -q --filter "label=com.docker.compose.project=$project")"
left+="$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$left" ] || { echo "docker compose down left behind: $left" >&2; exit 1; }
echo "    nothing of $project is left"
echo "==> deploy test passed"

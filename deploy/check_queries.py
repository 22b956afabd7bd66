#!/usr/bin/env python3
"""Checks the PromQL of the Grafana dashboard and the alert rules against riskstream's metrics.

  check_queries.py rules DASHBOARD OUT        writes every dashboard query (Grafana variables
                                              replaced) as a recording rule to OUT, for
                                              `promtool check rules OUT`
  check_queries.py names METRICS FILE...      every riskstream_* metric named in the dashboard
                                              or alert files exists in METRICS (a /metrics
                                              scrape), with every label the queries group or
                                              filter it by
  check_queries.py alerts ALERTS TESTS        every alert of ALERTS has a `promtool test rules`
                                              case in TESTS

Used by scripts/deploy-check.sh; needs PyYAML for rule files.
"""

import json
import re
import sys

# Grafana's variables, replaced by values PromQL accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
}

METRIC = re.compile(r"\b(riskstream_[a-z0-9_]+)\b")
# `by (a, b)` / `without (a)` / `on (a)` / `ignoring (a)` clauses.
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
# `metric{label="x", other=~"y"}` selectors.
SELECTOR = re.compile(r"\b(riskstream_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels Prometheus adds or histograms carry: not in riskstream's own exposition.
IMPLICIT_LABELS = {"job", "instance", "le", "quantile"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_queries(path):
    """(where, expr) of every PromQL expression in a dashboard: panels, rows' panels,
    annotations. Template variable queries (label_values) are checked for metric names only."""
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)
    out = []

    def panels(items):
        for panel in items:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f'panel "{panel.get("title")}" {target.get("refId")}', target["expr"]))
            panels(panel.get("panels", []))

    panels(dashboard.get("panels", []))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append((f'annotation "{annotation.get("name")}"', annotation["expr"]))
    return dashboard, out


def substitute(expr):
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise SystemExit(f"unknown Grafana variable left in: {expr}")
    return expr


def write_rules(dashboard_path, out_path):
    _, queries = dashboard_queries(dashboard_path)
    if not queries:
        raise SystemExit(f"{dashboard_path}: no queries found")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (where, expr) in enumerate(queries):
        lines.append(f"      # {where}")
        lines.append(f"      - record: riskstream:dashboard_query:{n}")
        lines.append(f"        expr: {json.dumps(substitute(expr))}")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(queries)} dashboard queries written to {out_path}")


def exposition(path):
    """Metric name -> label names seen, from Prometheus text exposition."""
    metrics = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            m = sample.match(line)
            if not m:
                continue
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
            metrics.setdefault(m.group(1), set()).update(labels)
    return metrics


def exprs_of(path):
    if path.endswith(".json"):
        dashboard, queries = dashboard_queries(path)
        exprs = [expr for _, expr in queries]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            if isinstance(query, str) and METRIC.search(query):
                exprs.append(query)
        return exprs
    # Alert rules (a Prometheus rule file): every rule's expr.
    import yaml  # PyYAML: in the environment of scripts/deploy-check.sh

    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    return [
        rule["expr"]
        for group in document.get("groups", [])
        for rule in group.get("rules", [])
        if "expr" in rule
    ]


def check_names(metrics_path, files):
    metrics = exposition(metrics_path)
    problems, checked = [], set()

    def known(name):
        if name in metrics:
            return name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] + "_bucket" in metrics:
                return name
        return None

    for path in files:
        exprs = exprs_of(path)
        if not exprs:
            problems.append(f"{path}: no expressions found")
        for expr in exprs:
            names = set(METRIC.findall(expr))
            for name in names:
                checked.add(name)
                if not known(name):
                    problems.append(f"{path}: {name} is not in {metrics_path} ({expr.strip()})")
            # Labels: in selectors of that metric, and in grouping clauses of a query naming
            # only metrics that all carry them.
            for name, matchers in SELECTOR.findall(expr):
                if not known(name):
                    continue
                for label in MATCHER_LABEL.findall(matchers):
                    if label not in IMPLICIT_LABELS and label not in metrics.get(name, set()):
                        problems.append(f"{path}: {name} has no label `{label}` ({expr.strip()})")
            for clause in GROUPING.findall(expr):
                for label in (l.strip() for l in clause.split(",")):
                    if not label or label in IMPLICIT_LABELS:
                        continue
                    carriers = [n for n in names if label in metrics.get(n, set())]
                    if names and not carriers:
                        problems.append(f"{path}: no metric of the query has label `{label}` ({expr.strip()})")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(1)
    print(f"{len(checked)} metric names and their labels found in {metrics_path}")


def check_alert_tests(alerts_path, tests_path):
    with open(alerts_path, encoding="utf-8") as f:
        alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", f.read(), re.M))
    with open(tests_path, encoding="utf-8") as f:
        tested = set(re.findall(r"alertname:\s*(\S+)", f.read()))
    missing = sorted(alerts - tested)
    if not alerts:
        raise SystemExit(f"{alerts_path}: no alerts found")
    if missing:
        raise SystemExit(f"alerts without a test in {tests_path}: {', '.join(missing)}")
    print(f"{len(alerts)} alerts, each with a unit test")


def main(argv):
    if len(argv) >= 3 and argv[0] == "rules":
        write_rules(argv[1], argv[2])
    elif len(argv) >= 3 and argv[0] == "names":
        check_names(argv[1], argv[2:])
    elif len(argv) == 3 and argv[0] == "alerts":
        check_alert_tests(argv[1], argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

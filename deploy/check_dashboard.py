#!/usr/bin/env python3
"""Check the Grafana dashboard(s) in deploy/grafana/dashboards/ (Grafana's provisioning format).

Checks, for every dashboard JSON file:
  * it parses, has a title, a uid, a schemaVersion and a list of panels (rows may nest panels);
  * panel ids are unique, every non-row panel has a gridPos and at least one PromQL target;
  * every datasource reference names the provisioned Prometheus datasource uid
    (deploy/grafana/provisioning/datasources/*.yml) or a dashboard variable;
  * every metric named in a panel query or a template-variable query is one finserve exports:
    finserve_* from the list below (histograms with _bucket/_sum/_count) or process_*;
    with --metrics-file FILE (a /metrics scrape), metric names are checked against what that
    scrape really exposes instead (plus process_* and the histogram suffixes);
  * every `route` label matcher names the label's values, the routes' paths (`/v1/sentiment`,
    ..., `unmatched`): a regex matcher must match at least one of them;
  * the panels the deployment docs promise are there (request rate, latency quantiles, backlog:
    queue size, queued inputs and oldest wait, batch size, generated tokens, sentiment label mix,
    top-label confidence, memory).

Exit 0 when all pass; otherwise prints one line per problem and exits 1. Standard library only.

    python3 deploy/check_dashboard.py [--metrics-file scrape.txt] [DASHBOARD.json ...]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARDS = os.path.join(HERE, "grafana", "dashboards", "*.json")
DATASOURCES_GLOB = os.path.join(HERE, "grafana", "provisioning", "datasources", "*.y*ml")

# name -> type: every metric finserve's /metrics exposes (src/metrics.rs; README's metrics list)
FINSERVE_METRICS = {
    "finserve_requests_total": "counter",
    "finserve_errors_total": "counter",
    "finserve_cancelled_total": "counter",
    "finserve_request_duration_seconds": "histogram",
    "finserve_tokenization_duration_seconds": "histogram",
    "finserve_queue_duration_seconds": "histogram",
    "finserve_inference_duration_seconds": "histogram",
    "finserve_input_tokens": "histogram",
    "finserve_generated_tokens_total": "counter",
    "finserve_time_per_output_token_seconds": "histogram",
    "finserve_queue_size": "gauge",
    "finserve_queue_inputs": "gauge",
    "finserve_queue_oldest_seconds": "gauge",
    "finserve_in_flight_requests": "gauge",
    "finserve_batch_size": "histogram",
    "finserve_batch_padded_tokens": "histogram",
    "finserve_forward_duration_seconds": "histogram",
    "finserve_sentiment_predictions_total": "counter",
    "finserve_sentiment_top_score": "histogram",
    "finserve_model_load_seconds": "gauge",
    "finserve_lora_merge_seconds": "gauge",
    "finserve_engine_up": "gauge",
    "finserve_failed_batches_total": "counter",
    "finserve_failed_batches_in_a_row": "gauge",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# The values of the `route` label (src/http/route.rs): each route's path, one spelling per route.
# Before, some histograms used other names (`sentiment`, `generate`, `cmpl`, `chatcmpl`, ...);
# a matcher on `route` must name these values.
ROUTES = {
    "/v1/sentiment", "/v1/generate", "/tokenize", "/decode", "/v1/completions",
    "/v1/chat/completions", "/v1/models", "/info", "/health", "/ready", "/metrics",
    "/openapi.json", "/", "/docs", "unmatched",
}
ROUTE_MATCHER = re.compile(r'\broute\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

# base metrics each of these panels' queries must mention (any one of them per entry)
REQUIRED_COVERAGE = {
    "request rate by route and status": ["finserve_requests_total"],
    "latency quantiles": ["finserve_request_duration_seconds_bucket"],
    "queue size": ["finserve_queue_size"],
    "queued inputs": ["finserve_queue_inputs"],
    "oldest waiting request": ["finserve_queue_oldest_seconds"],
    "batch size": ["finserve_batch_size_bucket", "finserve_batch_size_sum"],
    "generated tokens/s": ["finserve_generated_tokens_total"],
    "sentiment label mix": ["finserve_sentiment_predictions_total"],
    "top-label confidence": ["finserve_sentiment_top_score_bucket"],
    "memory": ["process_resident_memory_bytes"],
}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def strip_promql(expr: str) -> str:
    """Remove everything from a PromQL expression that is not a metric name, function or
    keyword: string literals, label matchers, grouping label lists, ranges, numbers,
    Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    s = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", " ", s)   # $__rate_interval, ${x}
    s = re.sub(r"\{[^{}]*\}", " ", s)                                 # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)                               # ranges / subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", s)
    s = re.sub(r"(?<![A-Za-z0-9_:])\d[0-9a-zA-Z_.]*", " ", s)        # numbers, durations, 1e-9
    return s


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (or a Grafana label_values()/metrics()
    variable query)."""
    # Grafana variable queries: label_values(metric{...}, label) / label_values(label)
    m = re.fullmatch(r"\s*label_values\((.*)\)\s*", expr, flags=re.S)
    if m:
        args = m.group(1)
        depth, split = 0, None
        for i, ch in enumerate(args):
            depth += ch in "({["
            depth -= ch in ")}]"
            if ch == "," and depth == 0:
                split = i
        expr = args[:split] if split is not None else ""
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", expr, flags=re.S)
    if m:
        expr = m.group(1)
    s = strip_promql(expr)
    names = set()
    for tok in IDENT.finditer(s):
        name = tok.group(0)
        rest = s[tok.end():].lstrip()
        if rest.startswith("("):          # function or aggregation
            continue
        if name in AGGREGATIONS and re.match(r"(by|without)\b", rest):   # sum by (x) (...)
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    # a bare {__name__="x"} selector
    for m in re.finditer(r'__name__\s*=\s*"([^"]+)"', expr):
        names.add(m.group(1))
    return names


def route_problems(expr: str) -> list[str]:
    """`route` label matchers in `expr` that name no value finserve gives that label."""
    problems = []
    for m in ROUTE_MATCHER.finditer(expr):
        op, value = m.group(1), re.sub(r"\\(.)", r"\1", m.group(2))
        if "$" in value:                  # a Grafana variable: its values come from the data
            continue
        if op in ("=", "!="):
            if value not in ROUTES:
                problems.append(f"route {op}\"{value}\" is not a route label value ({sorted(ROUTES)})")
            continue
        try:
            pattern = re.compile(value)
        except re.error as e:
            problems.append(f"route {op}\"{value}\" is not a valid regex: {e}")
            continue
        if not any(pattern.fullmatch(r) for r in ROUTES):
            problems.append(f"route {op}\"{value}\" matches no route label value ({sorted(ROUTES)})")
    return problems


def allowed_from_scrape(path: str) -> set[str]:
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4:
                    names.add(parts[2])
            elif line.strip() and not line.startswith("#"):
                names.add(re.split(r"[{\s]", line, 1)[0])
    return names


def is_allowed(name: str, scraped: set[str] | None) -> bool:
    if name.startswith("process_"):
        return True
    if scraped is not None:
        if name in scraped:
            return True
        return any(name.endswith(suf) and name[: -len(suf)] in scraped for suf in HISTOGRAM_SUFFIXES)
    if FINSERVE_METRICS.get(name) in ("counter", "gauge"):
        return True
    for suf in HISTOGRAM_SUFFIXES:
        base = name[: -len(suf)] if name.endswith(suf) else None
        if base and FINSERVE_METRICS.get(base) == "histogram":
            return True
    return False


def provisioned_datasource_uids() -> set[str]:
    uids = set()
    for path in glob.glob(DATASOURCES_GLOB):
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\s*uid:\s*['\"]?([A-Za-z0-9_.-]+)", line)
                if m:
                    uids.add(m.group(1))
    return uids


def iter_panels(panels):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []) or [])


def check_datasource(ds, where, ds_uids, problems):
    if ds is None:
        return
    if isinstance(ds, str):          # legacy: datasource name or "${DS}"
        if not ds.startswith("$"):
            problems.append(f"{where}: datasource given by name {ds!r}; use {{type, uid}}")
        return
    uid = ds.get("uid", "")
    if ds.get("type") == "grafana" or str(uid).startswith("$") or uid in ("-- Grafana --", "grafana"):
        return
    if ds.get("type") != "prometheus":
        problems.append(f"{where}: datasource type {ds.get('type')!r} is not prometheus")
    if ds_uids and uid not in ds_uids:
        problems.append(f"{where}: datasource uid {uid!r} is not provisioned ({sorted(ds_uids)})")


def check_dashboard(path: str, scraped: set[str] | None, ds_uids: set[str]) -> list[str]:
    problems: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return [f"{path}: cannot load: {e}"]
    if "dashboard" in dash and "panels" not in dash:
        problems.append(f"{path}: wrapped in {{\"dashboard\": ...}} (API format); provisioning wants the bare model")
        dash = dash["dashboard"]
    for key in ("title", "uid", "schemaVersion", "panels"):
        if key not in dash:
            problems.append(f"{path}: missing {key!r}")
    if not isinstance(dash.get("panels", []), list) or not dash.get("panels"):
        problems.append(f"{path}: no panels")
        return problems
    seen_ids: set = set()
    used: set[str] = set()
    n_queries = 0
    for p in iter_panels(dash["panels"]):
        where = f"{os.path.basename(path)}: panel {p.get('id')} {p.get('title', '')!r}"
        pid = p.get("id")
        if pid is None:
            problems.append(f"{where}: no id")
        elif pid in seen_ids:
            problems.append(f"{where}: duplicate id")
        seen_ids.add(pid)
        if "gridPos" not in p:
            problems.append(f"{where}: no gridPos")
        if p.get("type") == "row":
            continue
        if not p.get("type"):
            problems.append(f"{where}: no type")
        check_datasource(p.get("datasource"), where, ds_uids, problems)
        targets = p.get("targets") or []
        exprs = [t.get("expr", "") for t in targets if not t.get("hide")]
        if not exprs or not all(e.strip() for e in exprs):
            problems.append(f"{where}: every panel needs non-empty PromQL targets")
        for t in targets:
            check_datasource(t.get("datasource"), f"{where} target {t.get('refId')}", ds_uids, problems)
            expr = t.get("expr", "")
            if not expr.strip():
                continue
            n_queries += 1
            if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                problems.append(f"{where}: unbalanced brackets in {expr!r}")
            for problem in route_problems(expr):
                problems.append(f"{where}: {problem} in {expr!r}")
            names = metric_names(expr)
            if not names:
                problems.append(f"{where}: query names no metric: {expr!r}")
            for name in sorted(names):
                used.add(name)
                if not is_allowed(name, scraped):
                    problems.append(f"{where}: unknown metric {name!r} in {expr!r}")
    for var in (dash.get("templating", {}) or {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        where = f"{os.path.basename(path)}: variable {var.get('name')!r}"
        check_datasource(var.get("datasource"), where, ds_uids, problems)
        for name in sorted(metric_names(q)):
            if not is_allowed(name, scraped):
                problems.append(f"{where}: unknown metric {name!r} in {q!r}")
    for what, needed in REQUIRED_COVERAGE.items():
        if not any(n in used for n in needed):
            problems.append(f"{path}: no panel shows {what} (one of {needed})")
    if not problems:
        print(f"ok: {path}: {len(seen_ids)} panels, {n_queries} queries, metrics: {', '.join(sorted(used))}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboards", nargs="*", help=f"default: {DEFAULT_DASHBOARDS}")
    ap.add_argument("--metrics-file", help="a /metrics scrape; check names against what it exposes")
    args = ap.parse_args(argv)
    paths = args.dashboards or sorted(glob.glob(DEFAULT_DASHBOARDS))
    if not paths:
        print(f"no dashboards found ({DEFAULT_DASHBOARDS})", file=sys.stderr)
        return 1
    scraped = allowed_from_scrape(args.metrics_file) if args.metrics_file else None
    if scraped is not None and not any(n.startswith("finserve_") for n in scraped):
        print(f"{args.metrics_file}: no finserve_* metric in the scrape", file=sys.stderr)
        return 1
    ds_uids = provisioned_datasource_uids()
    problems = []
    for p in paths:
        problems += check_dashboard(p, scraped, ds_uids)
    for line in problems:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

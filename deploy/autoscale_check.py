#!/usr/bin/env python3
"""End-to-end check of the autoscaling signal, with a real Prometheus (run by autoscale_check.sh).

1. Reads the triggers (query, threshold, metricType) of the KEDA ScaledObject,
   deploy/k8s/components/keda/scaledobject.yaml, and the prometheus-adapter rule and HPA target
   of components/prometheus-adapter: the queries evaluated below are those strings, not copies.
2. Starts finserve (the demo model, --max-batch-size 4) and Debian's `prometheus` on free
   loopback ports. Prometheus scrapes finserve every second and attaches the target labels a
   cluster would (job, namespace, pod: the label matchers the queries use).
3. Overloads the replica: CLIENTS concurrent /v1/generate requests (sampled, max_new_tokens 64)
   are kept outstanding for LOAD seconds, then the clients stop and the backlog drains.
4. While loading and after, evaluates every trigger's query through Prometheus' HTTP API
   (/api/v1/query) and divides it by the replica count as the HPA that KEDA generates does for
   `metricType: AverageValue` (desired replicas = ceil(sum / threshold)); also reads the raw
   gauge from /metrics.

Passes when
* the raw finserve_queue_size reached >= MIN_QUEUE (20) during the overload and is 0 after;
* the queue-size trigger's per-replica value exceeded its threshold by more than the HPA's
  10 % tolerance (the HPA would scale out) during the overload, and fell below 90 % of it (the
  HPA would scale in) after the burst;
* every other trigger's query returned data throughout (KEDA is configured to treat an empty
  result as an error) and fell below its threshold after the burst; whether it crossed is
  reported;
* the prometheus-adapter rule, rendered as the adapter does for one pod, crossed and came back
  the same way (skipped, with a notice, where PyYAML is missing).
Prints PASS or FAIL with the values seen; exit status 0 or 1 (2: could not run).
Only loopback sockets are used; every loop is bounded; every process started is killed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCALEDOBJECT = os.path.join(HERE, "k8s", "components", "keda", "scaledobject.yaml")
ADAPTER_DIR = os.path.join(HERE, "k8s", "components", "prometheus-adapter")
QUEUE = "finserve_queue_size"
TOLERANCE = 0.1          # the HPA's default --horizontal-pod-autoscaler-tolerance
POD = "finserve-autoscale-check-0"

try:
    import yaml  # PyYAML: in .ci/venv; optional
except ImportError:  # pragma: no cover
    yaml = None


def log(msg):
    print(f"[autoscale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- manifests

def keda_triggers(path):
    """[(name, query, threshold, metricType)] of the ScaledObject, plus (min, max) replicas."""
    text = open(path, encoding="utf-8").read()
    if yaml is not None:
        so = yaml.safe_load(text)
        spec = so["spec"]
        trig = [(t.get("name", f"trigger{i}"), t["metadata"]["query"], float(t["metadata"]["threshold"]),
                 t.get("metricType", "AverageValue")) for i, t in enumerate(spec["triggers"])]
        return trig, (spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100))
    # no PyYAML: the file's own simple layout (one key per line, triggers last) is enough
    trig, cur = [], None
    after_triggers = False
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if re.match(r"\s*triggers:\s*$", line):
            after_triggers = True
            continue
        if not after_triggers:
            continue
        if re.match(r"\s*-\s*type:", line):
            if cur:
                trig.append(cur)
            cur = {}
        m = re.match(r"\s*(name|metricType|query|threshold):\s*(.*?)\s*$", line)
        if m and cur is not None:
            cur[m.group(1)] = m.group(2).strip("\"'")
    if cur:
        trig.append(cur)
    trig = [(t.get("name", f"trigger{i}"), t["query"], float(t["threshold"]), t.get("metricType", "AverageValue"))
            for i, t in enumerate(trig)]
    lo = re.search(r"minReplicaCount:\s*(\d+)", text)
    hi = re.search(r"maxReplicaCount:\s*(\d+)", text)
    return trig, (int(lo.group(1)) if lo else 0, int(hi.group(1)) if hi else 100)


def adapter_rules():
    """[(metric, rendered-for-one-pod query template, HPA averageValue)] or None without PyYAML."""
    if yaml is None:
        return None
    values = yaml.safe_load(open(os.path.join(ADAPTER_DIR, "adapter-values.yaml"), encoding="utf-8"))
    kust = yaml.safe_load(open(os.path.join(ADAPTER_DIR, "kustomization.yaml"), encoding="utf-8"))
    targets = {}
    for p in kust["patches"]:
        for op in yaml.safe_load(p["patch"]):
            if op.get("path") == "/spec/metrics":
                for m in op["value"]:
                    targets[m["pods"]["metric"]["name"]] = float(m["pods"]["target"]["averageValue"])
    out = []
    for r in values["rules"]["custom"]:
        name = r["name"]["as"]
        if name in targets:
            out.append((name, r["metricsQuery"], targets[name]))
    return out


def render_adapter_query(template, series, namespace):
    """The query prometheus-adapter sends for `kubectl get --raw .../pods/*/<metric>`."""
    return (template.replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{POD}"')
            .replace("<<.GroupBy>>", "pod"))


def equality_matchers(queries):
    labels = {}
    for q in queries:
        for k, v in re.findall(r'(\w+)="([^"]*)"', q):
            labels.setdefault(k, v)
    return labels


# ------------------------------------------------------------------------------ processes

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what, fn, timeout, proc=None, logfile=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = open(logfile, errors="replace").read()[-3000:] if logfile else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if fn():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not ready after {timeout}s")


class Procs:
    """Processes this check started; all are killed on exit, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, logfile, **kw):
        log(f"starting {name}: {' '.join(argv)}")
        f = open(logfile, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.procs.clear()


def scalar(result):
    """Value of an instant query that must return exactly one sample (None: no data)."""
    if result["resultType"] == "scalar":
        return float(result["result"][1])
    vec = result["result"]
    if not vec:
        return None
    if len(vec) != 1:
        raise ValueError(f"query returned {len(vec)} series, KEDA needs exactly one: {vec}")
    return float(vec[0]["value"][1])


def raw_gauge(metrics_text, name):
    """Sum of the gauge's series in a /metrics text (None: not exported)."""
    vals = re.findall(rf"^{name}(?:{{[^}}]*}})?\s+([0-9.eE+-]+)\s*$", metrics_text, re.M)
    return sum(float(v) for v in vals) if vals else None


# ----------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finserve", required=True)
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    ap.add_argument("--scaledobject", default=SCALEDOBJECT)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--min-queue", type=float, default=20.0)
    ap.add_argument("--settle-seconds", type=float, default=30.0,
                    help="how long the queries may take to come back below the thresholds")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, TSDB)")
    args = ap.parse_args()

    for exe in (args.finserve, args.prometheus):
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            log(f"cannot run: {exe} is not an executable file")
            return 2

    triggers, (min_rep, max_rep) = keda_triggers(args.scaledobject)
    queue_trig = [t for t in triggers if QUEUE + "{" in t[1]]
    if not queue_trig:
        log(f"cannot run: no trigger on {QUEUE} in {args.scaledobject}")
        return 2
    rules = adapter_rules()
    labels = equality_matchers([t[1] for t in triggers] + [r[1] for r in rules or []])
    job = labels.pop("job", "finserve")
    namespace = labels.get("namespace", "default")
    labels.update({"namespace": namespace, "pod": POD})
    adapter_queries = [(n, render_adapter_query(tmpl, n, namespace), thr) for n, tmpl, thr in rules or []]

    log(f"ScaledObject {os.path.relpath(args.scaledobject, ROOT)}: replicas {min_rep}..{max_rep}")
    for name, q, thr, mt in triggers:
        log(f"  trigger {name}: {q}  threshold {thr:g} ({mt}: per replica)")
    if rules is None:
        log("  PyYAML missing: prometheus-adapter rules not checked")
    for name, q, thr in adapter_queries:
        log(f"  adapter {name}: {q}  HPA averageValue {thr:g} per pod")

    tmp = tempfile.mkdtemp(prefix="finserve-autoscale.")
    procs = Procs()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    stop = threading.Event()
    threads = []
    try:
        fport, pport = free_port(), free_port()
        base = f"http://127.0.0.1:{fport}"
        flog = os.path.join(tmp, "finserve.log")
        env = dict(os.environ, HF_HUB_OFFLINE="1", FINSERVE_HOME=ROOT, FINSERVE_LOG="info")
        for k in ("FINSERVE_MODEL", "FINSERVE_ADAPTER", "FINSERVE_API_KEY", "FINSERVE_API_KEY_FILE",
                  "FINSERVE_VARIANTS", "FINSERVE_METRICS_PORT", "FINSERVE_OTLP_ENDPOINT"):
            env.pop(k, None)
        fin = procs.start("finserve", [args.finserve, "serve", "--host", "127.0.0.1", "--port", str(fport),
                                       "--max-batch-size", str(args.max_batch_size),
                                       "--max-new-tokens", str(args.max_new_tokens),
                                       "--request-timeout-ms", "120000"],
                          flog, cwd=ROOT, env=env)
        wait_for("finserve /ready", lambda: http("GET", base + "/ready", timeout=2)[0] == 200, 120, fin, flog)
        log(f"finserve ready on {base}")

        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    f"scrape_configs:\n  - job_name: {json.dumps(job)}\n    scrape_interval: 1s\n"
                    f"    scrape_timeout: 1s\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{fport}']\n        labels: {json.dumps(labels)}\n")
        plog = os.path.join(tmp, "prometheus.log")
        prom = procs.start("prometheus", [args.prometheus, f"--config.file={cfg}",
                                          f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                                          f"--web.listen-address=127.0.0.1:{pport}"], plog)
        api = f"http://127.0.0.1:{pport}/api/v1"

        def query(q):
            status, body = http("GET", f"{api}/query?{urllib.parse.urlencode({'query': q})}", timeout=5)
            r = json.loads(body)
            if status != 200 or r.get("status") != "success":
                raise RuntimeError(f"Prometheus rejected {q!r}: {status} {body[:300]!r}")
            return scalar(r["data"])

        def scraped():
            return query(f'count(up{{job="{job}"}} == 1)') == 1 and query(f'{QUEUE}{{job="{job}"}}') is not None

        wait_for("Prometheus scraping finserve", scraped, 60, prom, plog)
        log(f"Prometheus on 127.0.0.1:{pport} scrapes finserve every 1s with labels job={job} {labels}")
        replicas = 1   # one finserve process = one replica; the HPA divides AverageValue metrics by it

        def sample():
            s = {}
            for name, q, thr, _ in triggers:
                v = query(q)
                s[name] = None if v is None else v / replicas
            for name, q, thr in adapter_queries:
                v = query(q)
                s["adapter:" + name] = v   # one pod: the per-pod average is its value
            return s

        before = sample()
        log(f"idle: {fmt(before)}")

        # ---- overload
        body = {"inputs": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding "
                          "period in 2007 , representing 7.7 % of net sales .",
                "parameters": {"max_new_tokens": args.max_new_tokens, "do_sample": True,
                               "temperature": 3.0, "details": True}}
        stats = {"ok": 0, "err": 0, "tokens": 0, "codes": {}}
        lock = threading.Lock()
        load_end = time.monotonic() + args.load_seconds

        def client(i):
            n = 0
            while not stop.is_set() and time.monotonic() < load_end and n < 10_000:
                n += 1
                b = dict(body, parameters=dict(body["parameters"], seed=i * 100_000 + n))
                try:
                    code, out = http("POST", base + "/v1/generate", b, timeout=150)
                except OSError as e:
                    code, out = f"{type(e).__name__}", b""
                with lock:
                    if code == 200:
                        stats["ok"] += 1
                        try:
                            r = json.loads(out)
                            r = r[0] if isinstance(r, list) else r
                            stats["tokens"] += int(r.get("details", {}).get("generated_tokens", 0))
                        except (ValueError, AttributeError, TypeError):
                            pass
                    else:
                        stats["err"] += 1
                        stats["codes"][str(code)] = stats["codes"].get(str(code), 0) + 1

        log(f"overload: {args.clients} clients keep /v1/generate requests outstanding for "
            f"{args.load_seconds:g}s (max_new_tokens {args.max_new_tokens}, --max-batch-size {args.max_batch_size})")
        t0 = time.monotonic()
        for i in range(args.clients):
            t = threading.Thread(target=client, args=(i,), daemon=True)
            t.start()
            threads.append(t)
        peak = {}
        raw_max = 0.0
        raw_seen = False
        next_q = 0.0
        while time.monotonic() < load_end:
            code, text = http("GET", base + "/metrics", timeout=5)
            v = raw_gauge(text.decode(errors="replace"), QUEUE) if code == 200 else None
            if v is not None:
                raw_seen = True
                raw_max = max(raw_max, v)
            if time.monotonic() >= next_q:
                s = sample()
                for k, x in s.items():
                    if x is not None:
                        peak[k] = max(peak.get(k, float("-inf")), x)
                    else:
                        peak.setdefault(k + " (empty results)", 0)
                        peak[k + " (empty results)"] += 1
                log(f"  t={time.monotonic() - t0:5.1f}s raw {QUEUE}={v}  {fmt(s)}")
                next_q = time.monotonic() + 2.0
            time.sleep(0.2)
        log("clients stop sending; waiting for the backlog to drain")
        drain_deadline = time.monotonic() + 150
        for t in threads:
            t.join(timeout=max(0.1, drain_deadline - time.monotonic()))
        drained = not any(t.is_alive() for t in threads)
        with lock:
            total = stats["ok"] + stats["err"]
            log(f"requests: {total} sent, {stats['ok']} answered 200, {stats['err']} failed {stats['codes']}; "
                f"{stats['tokens'] / max(1, stats['ok']):.1f} tokens per answer; "
                f"{time.monotonic() - t0:.1f}s with load")

        # ---- after the burst
        settle_end = time.monotonic() + args.settle_seconds
        after, after_raw = None, None
        while True:
            after = sample()
            code, text = http("GET", base + "/metrics", timeout=5)
            after_raw = raw_gauge(text.decode(errors="replace"), QUEUE) if code == 200 else None
            below = all(x is not None and x < (1 - TOLERANCE) * thr
                        for (name, _, thr, _) in triggers for x in [after[name]])
            below = below and all(after["adapter:" + n] is not None and after["adapter:" + n] < (1 - TOLERANCE) * thr
                                  for n, _, thr in adapter_queries)
            if (below and after_raw == 0) or time.monotonic() >= settle_end:
                break
            time.sleep(1.0)
        log(f"after the burst: raw {QUEUE}={after_raw}  {fmt(after)}")

        # ---- verdict
        failures, notes = [], []
        if not raw_seen:
            failures.append(f"/metrics has no {QUEUE}")
        if raw_max < args.min_queue:
            failures.append(f"raw {QUEUE} peaked at {raw_max:g} under {args.clients} concurrent generations with "
                            f"--max-batch-size {args.max_batch_size}; expected >= {args.min_queue:g} waiting")
        if after_raw != 0:
            failures.append(f"raw {QUEUE} is {after_raw} after the backlog drained (expected 0)")
        if not drained:
            failures.append("the load clients did not finish within 150 s of the end of the load")
        if stats["ok"] == 0:
            failures.append("no /v1/generate request succeeded")
        for name, q, thr, _ in triggers:
            pk = peak.get(name)
            empties = peak.get(name + " (empty results)", 0)
            a = after[name]
            primary = (name, q, thr, _) in queue_trig
            desired = None if pk is None else min(max(math.ceil(pk / thr * replicas), min_rep), max_rep)
            line = (f"trigger {name}: peak {pk if pk is None else round(pk, 2)} per replica "
                    f"(threshold {thr:g}, HPA would want {desired} replicas), after {a if a is None else round(a, 2)}")
            if empties:
                failures.append(f"trigger {name}: {empties} empty results for {q!r} during the load "
                                "(KEDA, with ignoreNullValues false, would report errors and fall back)")
            if pk is None or pk <= (1 + TOLERANCE) * thr:
                (failures if primary else notes).append(
                    line + f": never above threshold x {1 + TOLERANCE:g} during the overload")
            else:
                notes.append(line + ": crossed")
            if a is None or a >= (1 - TOLERANCE) * thr:
                failures.append(line + f": not back below threshold x {1 - TOLERANCE:g} "
                                       f"{args.settle_seconds:g}s after the burst")
        for name, q, thr in adapter_queries:
            k = "adapter:" + name
            pk, a = peak.get(k), after[k]
            primary = name == QUEUE
            line = (f"adapter metric {name}: peak {pk if pk is None else round(pk, 2)} per pod "
                    f"(averageValue {thr:g}), after {a if a is None else round(a, 2)}")
            if pk is None or pk <= (1 + TOLERANCE) * thr:
                (failures if primary else notes).append(line + ": never above target during the overload")
            else:
                notes.append(line + ": crossed")
            if a is None or a >= (1 - TOLERANCE) * thr:
                failures.append(line + ": not back below target after the burst")

        print(f"raw {QUEUE}: max {raw_max:g} during the overload, {after_raw} after")
        for n in notes:
            print(n)
        if failures:
            for f in failures:
                print(f"FAIL: {f}")
            print(f"autoscale_check: FAIL ({len(failures)} problem(s)"
                  + (f"; logs in {tmp})" if args.keep else "; --keep keeps the logs)"))
            return 1
        print("autoscale_check: PASS (the ScaledObject's queries crossed their thresholds under "
              "overload and came back after it)")
        return 0
    except (RuntimeError, ValueError, KeyboardInterrupt) as e:
        log(f"FAIL: {e}")
        print(f"autoscale_check: FAIL ({e})")
        return 1
    finally:
        stop.set()
        procs.stop_all()
        for t in threads:
            t.join(timeout=5)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def fmt(sample):
    return "  ".join(f"{k}={'empty' if v is None else round(v, 2)}" for k, v in sample.items())


if __name__ == "__main__":
    sys.exit(main())

"""Soak benchmark: drive a freshly started finserve above capacity and check that it stays healthy.

    python3 benches/soak.py --duration 300 --clients 64 --max-concurrent-requests 32 [--json]

Starts the release binary on a free local port with the demo model (models/demo), waits for
GET /ready, then runs --clients threads for a warm-up plus --duration seconds, each looping over a
seeded random mix of POST /v1/sentiment (one or several test.csv sentences), POST /v1/generate,
streaming /v1/generate (server-sent events) and streams the client drops after the first event.
--max-concurrent-requests is kept below --clients so the server must answer some requests 429.
It records statuses and latencies per kind, counts transport failures as "lost", samples the
server's RSS, scrapes the finserve_queue_size / finserve_in_flight_requests gauges once the load
has stopped, stops the server with SIGTERM and prints a report, a README table and a verdict.
With --audit-log PATH the server also writes its audit log there, and the verdict adds that the log
holds exactly one record for every answered request (by `x-request-id`; a stream the client dropped
may or may not have one, as it may have ended first), no other record, and no dropped record.
Clients keep their connections alive across requests, 429s included (a server that dropped a
keep-alive connection after a 429 would lose the client's next request), and back off after a 429.
Standard library only. Not a test: it asserts nothing, but exits 1 when the goal is missed
(only 200/429, nothing lost, RSS growth under 10 %, gauges back to 0).
"""

import argparse
import csv
import http.client
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("sentiment", "generate", "stream", "stream_disconnect")
SPEED_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
               "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
GAUGES = ("finserve_queue_size", "finserve_in_flight_requests")


def default_binary() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    if target and (Path(target) / "release/finserve").exists():
        return Path(target) / "release/finserve"
    return ROOT / "target/release/finserve"


def cpu_info() -> dict:
    info = {"model": "unknown", "cores": os.cpu_count(), "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["model"] == "unknown":
                info["model"] = value.strip()
            elif key.strip() == "flags":
                have = set(value.split())
                info["flags"] = [f for f in SPEED_FLAGS if f in have]
                break
    except OSError:
        pass
    return info


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


class Stats:
    """Per-kind status counts, latencies of the 200s and lost requests; shared by the clients."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status = defaultdict(Counter)  # kind -> status (int, or "sse:<error_type>") -> count
        self.latency = defaultdict(list)  # kind -> seconds, 200s only
        self.lost = defaultdict(Counter)  # kind -> reason -> count

    def add(self, kind: str, status, seconds: float) -> None:
        with self.lock:
            self.status[kind][status] += 1
            if status == 200:
                self.latency[kind].append(seconds)

    ids: list = []  # (kind, x-request-id) of every 200, warm-up included (list.append is atomic)

    def add_lost(self, kind: str, reason: str) -> None:
        with self.lock:
            self.lost[kind][reason] += 1


class IncompleteStream(Exception):
    """The event stream ended without the final `generated_text` event."""


def one_request(conn: http.client.HTTPConnection, kind: str, rng: random.Random, texts: list[str],
                gen_tokens: int, ids: list) -> tuple[object, bool]:
    """Sends one request of `kind`; returns (status, whether the connection may be reused). The
    request id of a 200 goes to `ids` as (kind, id)."""
    if kind == "sentiment":
        n = 1 if rng.random() < 0.5 else rng.randint(2, 8)
        body = {"inputs": rng.choice(texts) if n == 1 else rng.sample(texts, n)}
        path = "/v1/sentiment"
    else:
        body = {"inputs": rng.choice(texts), "parameters": {"max_new_tokens": rng.randint(1, gen_tokens)}}
        body["stream"] = kind != "generate"
        path = "/v1/generate"
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if kind in ("sentiment", "generate") or resp.status != 200:
        resp.read()
        if resp.status == 200:
            ids.append((kind, resp.getheader("x-request-id")))
        return resp.status, not resp.will_close
    for raw in resp:  # server-sent events: "data: {...}" lines, blank lines, ":" keep-alives
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        if kind == "stream_disconnect":
            ids.append((kind, resp.getheader("x-request-id")))
            resp.close()  # drop the connection mid-stream on purpose
            conn.close()
            return 200, False
        event = json.loads(line[5:])
        if "error" in event:
            resp.read()
            return f"sse:{event.get('error_type', 'unknown')}", not resp.will_close
        if event.get("generated_text") is not None:
            resp.read()
            ids.append((kind, resp.getheader("x-request-id")))
            return 200, not resp.will_close
    raise IncompleteStream()


def client(port: int, idx: int, args, texts: list[str], stats: Stats, record_from: float, stop_at: float) -> None:
    rng = random.Random(args.seed * 1000 + idx)
    weights = (args.mix_sentiment, args.mix_generate, args.mix_stream, args.mix_disconnect)
    conn = None
    while time.monotonic() < stop_at:
        kind = rng.choices(KINDS, weights)[0]
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
        start = time.monotonic()
        try:
            status, reuse = one_request(conn, kind, rng, texts, args.gen_tokens, stats.ids)
        except (OSError, http.client.HTTPException, ValueError, IncompleteStream) as e:
            status, reuse = None, False  # timeout, reset, broken pipe, cut or garbled response
            if start >= record_from:
                stats.add_lost(kind, type(e).__name__)
        if status is not None and start >= record_from:
            stats.add(kind, status, time.monotonic() - start)
        if status == 429:
            time.sleep(rng.uniform(args.backoff_ms / 4000, args.backoff_ms / 1000))
        if not reuse:
            conn.close()
            conn = None
    if conn:
        conn.close()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", type=Path, default=default_binary())
    ap.add_argument("--duration", type=float, default=300, help="measured seconds of load")
    ap.add_argument("--warmup", type=float, default=10, help="seconds of unrecorded load before RSS start")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-concurrent-requests", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=16, help="clients ask max_new_tokens in 1..N (also the server cap)")
    ap.add_argument("--mix-sentiment", type=float, default=0.4)
    ap.add_argument("--mix-generate", type=float, default=0.25)
    ap.add_argument("--mix-stream", type=float, default=0.25)
    ap.add_argument("--mix-disconnect", type=float, default=0.1)
    ap.add_argument("--backoff-ms", type=float, default=200, help="a client sleeps 1/4 to all of this after a 429")
    ap.add_argument("--timeout", type=float, default=120, help="client socket timeout, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--data", type=Path, default=ROOT / "models/data/test.csv")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--audit-log", type=Path, help="have the server audit to this file and check it")
    args = ap.parse_args()
    with args.data.open(newline="", encoding="utf-8") as f:
        texts = [r["sentence"] for r in csv.DictReader(f)]

    if not args.binary.is_file():
        sys.exit(f"no server binary at {args.binary}: build it with `cargo build --release` or pass --binary")
    port = free_port()
    cmd = [str(args.binary), "--host", "127.0.0.1", "--port", str(port),
           "--max-concurrent-requests", str(args.max_concurrent_requests),
           "--max-new-tokens", str(args.gen_tokens), *args.server_arg]
    if args.audit_log:
        args.audit_log.unlink(missing_ok=True)
        cmd += ["--audit-log", str(args.audit_log)]
    log = tempfile.NamedTemporaryFile("w+b", prefix="finserve-soak-", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            if get(port, "/ready")[0] == 200:
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            sys.stderr.write(f"server did not become ready (exit {server.wait()}); log {log.name}:\n")
            sys.stderr.write(Path(log.name).read_text(errors="replace")[-4000:])
            return 1
        time.sleep(0.2)

    stats = Stats()
    t0 = time.monotonic()
    record_from, stop_at = t0 + args.warmup, t0 + args.warmup + args.duration
    threads = [threading.Thread(target=client, args=(port, i, args, texts, stats, record_from, stop_at), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, record_from - time.monotonic()))
    rss_start = rss_peak = rss_kib(server.pid) or 0
    while time.monotonic() < stop_at:
        rss_peak = max(rss_peak, rss_kib(server.pid) or 0)
        time.sleep(min(1.0, max(0.0, stop_at - time.monotonic())))
    for t in threads:
        t.join()
    rss_end = rss_kib(server.pid) or 0
    rss_peak = max(rss_peak, rss_end)
    time.sleep(2)
    gauges = {}
    try:
        _, text = get(port, "/metrics")
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in GAUGES:
                gauges[name] = float(value)
            elif name.startswith("finserve_audit_records_dropped_total"):
                gauges["audit_dropped"] = gauges.get("audit_dropped", 0.0) + float(value)
    except OSError as e:
        gauges["error"] = str(e)
    server.send_signal(signal.SIGTERM)
    try:
        exit_code = server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        exit_code = f"killed after 60 s ({server.wait()})"
    log_text = Path(log.name).read_text(errors="replace")

    kinds = {}
    for kind in KINDS:
        st = stats.status[kind]
        kinds[kind] = {"requests": sum(st.values()) + sum(stats.lost[kind].values()),
                       "status": {str(k): v for k, v in sorted(st.items(), key=str)},
                       "lost": dict(stats.lost[kind]),
                       "p50_ms": pct(stats.latency[kind], 0.50), "p99_ms": pct(stats.latency[kind], 0.99)}
    statuses = {s for k in KINDS for s in stats.status[k]}
    lost = sum(sum(c.values()) for c in stats.lost.values())
    growth = 100 * (rss_end - rss_start) / rss_start if rss_start else None
    checks = {
        "only_200_429": statuses <= {200, 429},
        "zero_lost": lost == 0,
        "rss_growth_under_10pct": growth is not None and growth < 10,
        "gauges_zero": all(gauges.get(g) == 0 for g in GAUGES),
    }
    audit = None
    if args.audit_log:
        records = Counter(json.loads(line)["request_id"]
                          for line in args.audit_log.read_text().splitlines())
        answered = {i for k, i in stats.ids if k != "stream_disconnect"}
        dropped = {i for k, i in stats.ids if k == "stream_disconnect"}
        audit = {"records": sum(records.values()), "answered": len(answered),
                 "dropped_streams_recorded": len(set(records) & dropped),
                 "dropped_streams": len(dropped),
                 "missing": len(answered - set(records)),
                 "duplicated": sum(1 for n in records.values() if n > 1),
                 "unexpected": len(set(records) - answered - dropped),
                 "dropped_metric": gauges.get("audit_dropped", 0.0)}
        checks["audit_one_record_per_answer"] = (audit["missing"] == 0 and audit["duplicated"] == 0
                                                 and audit["unexpected"] == 0
                                                 and audit["dropped_metric"] == 0)
    result = {
        "cpu": cpu_info(), "command": shlex.join(sys.argv), "server_command": shlex.join(cmd),
        "duration_s": args.duration, "warmup_s": args.warmup, "clients": args.clients, "seed": args.seed,
        "kinds": kinds, "saw_429": 429 in statuses, "lost": lost,
        "rss_kib": {"start": rss_start, "end": rss_end, "peak": rss_peak, "growth_pct": growth},
        "gauges_after": gauges, "server_exit_code": exit_code, "audit": audit,
        "server_log_warnings": sum(any(f" {w} " in l or f'"{w}"' in l for w in ("WARN", "ERROR"))
                                   for l in log_text.splitlines()),
        "checks": checks, "goal_met": all(checks.values()), "server_log": log.name,
    }
    if result["goal_met"] and not result["server_log_warnings"]:
        os.unlink(log.name)  # a long soak logs every request: keep the log only when it matters
        result["server_log"] = None
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 0 if result["goal_met"] else 1


def report(r: dict) -> None:
    ms = lambda v: "-" if v is None else f"{v:.1f}"
    mib = lambda k: f"{k / 1024:.1f} MiB"
    print(f"CPU: {r['cpu']['model']} ({r['cpu']['cores']} cores), flags: {' '.join(r['cpu']['flags']) or 'none'}")
    print(f"command: {r['command']}")
    print(f"server:  {r['server_command']}" + (f"  (log {r['server_log']})" if r["server_log"] else ""))
    print(f"load: {r['clients']} clients, {r['warmup_s']:g} s warm-up + {r['duration_s']:g} s measured, seed {r['seed']}")
    print()
    for kind, k in r["kinds"].items():
        mix = ", ".join(f"{s}: {n}" for s, n in k["status"].items()) or "none"
        lost = ", ".join(f"{why}: {n}" for why, n in k["lost"].items()) or "0"
        print(f"{kind:18} {k['requests']:6} requests  statuses {{{mix}}}  lost {lost}  "
              f"p50 {ms(k['p50_ms'])} ms  p99 {ms(k['p99_ms'])} ms")
    rss = r["rss_kib"]
    growth = "-" if rss["growth_pct"] is None else f"{rss['growth_pct']:+.1f} %"
    print(f"\nRSS: start {mib(rss['start'])}, end {mib(rss['end'])}, peak {mib(rss['peak'])}, growth {growth}")
    print("gauges 2 s after the load: " + ", ".join(f"{g} = {v:g}" if isinstance(v, float) else f"{g}: {v}"
                                                  for g, v in r["gauges_after"].items()))
    print(f"server exit code after SIGTERM: {r['server_exit_code']}; WARN/ERROR lines in its log: {r['server_log_warnings']}")
    if not r["saw_429"]:
        print("note: no 429 seen: the load did not reach --max-concurrent-requests")
    if r["audit"]:
        a = r["audit"]
        print(f"audit log: {a['records']} records for {a['answered']} answered requests "
              f"(+ {a['dropped_streams_recorded']} of {a['dropped_streams']} dropped streams that had ended); "
              f"missing {a['missing']}, duplicated {a['duplicated']}, unexpected {a['unexpected']}, "
              f"dropped (metric) {a['dropped_metric']:g}")
    print("\n| kind | requests | 200 | 429 | other | lost | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, k in r["kinds"].items():
        st = k["status"]
        other = sum(n for s, n in st.items() if s not in ("200", "429"))
        print(f"| {kind} | {k['requests']} | {st.get('200', 0)} | {st.get('429', 0)} | {other} | "
              f"{sum(k['lost'].values())} | {ms(k['p50_ms'])} | {ms(k['p99_ms'])} |")
    print(f"\nRSS {mib(rss['start'])} → {mib(rss['end'])} (peak {mib(rss['peak'])}, {growth}); "
          + ", ".join(f"`{g}` {v:g}" for g, v in r["gauges_after"].items() if isinstance(v, float)) + " after the load.")
    failed = [name for name, ok in r["checks"].items() if not ok]
    print(f"\nVERDICT: {'PASS' if r['goal_met'] else 'FAIL'} "
          f"(only 200/429, 0 lost, RSS growth < 10 %, gauges 0){': failed ' + ', '.join(failed) if failed else ''}")


if __name__ == "__main__":
    sys.exit(main())

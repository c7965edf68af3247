"""Interactive latency beside a backfill, against a running finserve.

    python3 benches/priority.py --url http://127.0.0.1:8080 --seconds 20

Measures single-sentence /v1/sentiment requests from `--interactive` clients for `--seconds`,
first alone, then while `--batch` clients send batch-priority requests back to back (each
`--batch-inputs` sentences, `"priority": "batch"`), and once more with those same backfill
requests sent as interactive, to show what the priority buys. Prints p50/p99 of the interactive
requests in each phase and the backfill's throughput. Standard library only. Not a test: it
reports numbers, it asserts nothing.
"""

import argparse
import http.client
import json
import platform
import threading
import time
from urllib.parse import urlparse

TEXT = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period ."


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags"))
        wanted = [f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx512_bf16", "amx", "avx2"))]
        return f"{name} ({' '.join(sorted(set(wanted)))})"
    except (OSError, StopIteration):
        return platform.processor()


def post(conn, body):
    conn.request("POST", "/v1/sentiment", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {data[:200]}")


def clients(url, n, seconds, body, latencies=None, counter=None):
    target = urlparse(url)
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
        while time.perf_counter() < stop:
            start = time.perf_counter()
            post(conn, body)
            with lock:
                if latencies is not None:
                    latencies.append(time.perf_counter() - start)
                if counter is not None:
                    counter[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def phase(url, args, backfill_priority):
    latencies, done = [], [0]
    threads = []
    if backfill_priority:
        body = {"inputs": [TEXT] * args.batch_inputs, "parameters": {"priority": backfill_priority}}
        threads += clients(url, args.batch, args.seconds, body, counter=done)
        time.sleep(1)  # let the backfill fill the queue first
    threads += clients(url, args.interactive, args.seconds, {"inputs": TEXT}, latencies=latencies)
    for t in threads:
        t.join()
    s = sorted(latencies)
    pct = lambda p: s[min(len(s) - 1, int(p * len(s)))] * 1000
    return len(s), pct(0.5), pct(0.99), done[0] * args.batch_inputs / args.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--interactive", type=int, default=2, help="interactive clients")
    ap.add_argument("--batch", type=int, default=4, help="backfill clients")
    ap.add_argument("--batch-inputs", type=int, default=32, help="sentences per backfill request")
    args = ap.parse_args()
    phases = [("idle", None), ("beside a batch-priority backfill", "batch"),
              ("beside the same backfill sent as interactive", "interactive")]
    print(f"CPU: {cpu()}; {args.interactive} interactive clients, {args.batch} backfill clients x "
          f"{args.batch_inputs} sentences, {args.seconds:.0f} s per phase")
    print("| interactive requests | count | p50 (ms) | p99 (ms) | p99 vs idle | backfill (sentences/s) |")
    print("|---|---|---|---|---|---|")
    idle_p99 = None
    for name, prio in phases:
        n, p50, p99, rate = phase(args.url, args, prio)
        idle_p99 = idle_p99 or p99
        print(f"| {name} | {n} | {p50:.1f} | {p99:.1f} | {p99 / idle_p99:.2f}x | {rate:.0f} |")


if __name__ == "__main__":
    main()

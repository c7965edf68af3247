"""Sentiment latency while variants are merged at runtime, against a running finserve.

    python3 benches/variant_merge.py --url http://127.0.0.1:8080 --admin-key KEY --adapter ADAPTER

The server must run with `--admin-api-key KEY --adapter-root DIR`, ADAPTER a directory under DIR.
Sends single-sentence /v1/sentiment requests from `--concurrency` threads for `--seconds`, first
with nothing else going on, then while a variant of ADAPTER is merged (POST /v1/adapters) and
dropped (DELETE) back to back, and prints p50/p99 of each phase and how long the merges took.
Standard library only. Not a test: it reports numbers, it asserts nothing.
"""

import argparse
import http.client
import json
import platform
import threading
import time
from urllib.parse import urlparse


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


def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, data


def measure(url, seconds, concurrency, text):
    target = urlparse(url)
    latencies, stop = [], time.perf_counter() + seconds
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        mine = []
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status, data = request(conn, "POST", "/v1/sentiment", {"inputs": text})
            if status != 200:
                raise RuntimeError(f"status {status}: {data[:200]}")
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    return threads, latencies


def summary(latencies):
    s = sorted(latencies)
    pct = lambda p: s[min(len(s) - 1, int(p * len(s)))] * 1000
    return len(s), pct(0.5), pct(0.99)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--admin-key", required=True)
    ap.add_argument("--adapter", required=True, help="a directory under the server's --adapter-root")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--text", default="Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .")
    args = ap.parse_args()
    target = urlparse(args.url)
    admin = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
    key = {"x-api-key": args.admin_key}

    threads, idle = measure(args.url, args.seconds, args.concurrency, args.text)
    for t in threads:
        t.join()

    threads, busy = measure(args.url, args.seconds, args.concurrency, args.text)
    merges = []
    stop = time.perf_counter() + args.seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        status, data = request(admin, "POST", "/v1/adapters",
                               {"name": "bench-merge", "adapters": [{"path": args.adapter}]}, key)
        if status != 201:
            raise RuntimeError(f"load: {status} {data[:300]}")
        merges.append(time.perf_counter() - start)
        status, data = request(admin, "DELETE", "/v1/adapters/bench-merge", None, key)
        if status != 204:
            raise RuntimeError(f"unload: {status} {data[:300]}")
    for t in threads:
        t.join()

    print(f"CPU: {cpu()}; {args.concurrency} sentiment clients, {args.seconds:.0f} s per phase")
    print("| phase | requests | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|")
    for name, lat in [("idle", idle), ("merging back to back", busy)]:
        n, p50, p99 = summary(lat)
        print(f"| {name} | {n} | {p50:.1f} | {p99:.1f} |")
    merges.sort()
    print(f"merges: {len(merges)}, median {merges[len(merges) // 2] * 1000:.0f} ms (POST until the variant serves)")


if __name__ == "__main__":
    main()

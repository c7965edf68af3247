"""Load benchmark for a running finserve: throughput and latency percentiles of /v1/sentiment.

    python3 benches/load.py --url http://127.0.0.1:8080 --requests 400 --concurrency 1 8 32

Sends single-sentence requests drawn from the held-out test split (models/data/test.csv) from a
thread pool; standard library only. Not a test: it reports numbers, it asserts nothing.
"""

import argparse
import csv
import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse


def sentences(path: Path, n: int) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r["sentence"] for r in csv.DictReader(f)]
    return [rows[i % len(rows)] for i in range(n)]


def run(url: str, texts: list[str], concurrency: int) -> dict:
    target = urlparse(url)
    local = threading.local()

    def one(text: str) -> float:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        body = json.dumps({"inputs": text})
        start = time.perf_counter()
        conn.request("POST", "/v1/sentiment", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(one, texts))
    wall = time.perf_counter() - start
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "throughput_rps": len(texts) / wall,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.mean(latencies) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "models/data/test.csv")
    args = ap.parse_args()
    texts = sentences(args.data, args.requests)
    run(args.url, texts[:20], 4)  # warm the connection pool and the server
    print("| concurrency | requests | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for c in args.concurrency:
        r = run(args.url, texts, c)
        print(f"| {c} | {r['requests']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} |")


if __name__ == "__main__":
    main()

"""finserve against transformers and CTranslate2, side by side, in one run on one machine.

    python3 -m venv .bench-venv && .bench-venv/bin/pip install -r benches/requirements.txt
    cargo build --release
    .bench-venv/bin/python benches/compare.py [--rounds 3] [--out bench-results.md]

Builds (once per tokenizer, cached under target/compare-SHAPE) a random model of mt0-small's shape
(d_model 512, 8+8 layers, 6x64 heads, d_ff 1024, vocab 250112), or with `--shape base` mt0-base's (768,
12+12, 12x64, 2048) or `--shape large` mt0-large's (1024, 24+24, 16x64, 2816), with a random q,v LoRA
adapter, converts it to
CTranslate2, and measures on the same 64 Financial PhraseBank sentences (models/data/test.csv),
tokenized by the same tokenizer.json for every engine, in sentences per second:

- sentiment: finserve over HTTP (16 inputs per request, or 1) against the peers scoring the three
  label sequences (`negative`/`neutral`/`positive` + EOS) for a batch of 16 (or 1);
- generate (3 new tokens, greedy): 16 concurrent HTTP clients (or 1) against the peers generating
  for a batch of 16 (or 1); no log-probabilities are asked of finserve (no `details`), as the
  peers compute none (with them finserve computes every logit of every step);
- bulk (`--only-bulk` measures only this): `finserve predict` on 1,024 PhraseBank sentences of the
  training pool (models/data/train_pool.csv; CSV in, JSON Lines out, its own rows/s, which counts
  reading, tokenizing, scoring and writing but not loading the model) against CTranslate2
  `score_batch` of the three label sequences over the same sentences, pre-tokenized (its
  tokenization is not timed), at its best `max_batch_size` of 8, 16, 32 and 64 sentences (one
  pass each picks it, then the median of `--rounds` passes at it): f32 vs fp32, q8 vs int8;
- finserve only (no peer has them): entity-level scoring, 4 targets per sentence (4 of its words,
  as spans; 16 sentences per request) in targets/s, and `long_input: sentences` on a 3,000-token
  document made of the same test sentences, in sentences/s; each next to plain scoring of the
  same sentences, 16 per request.

finserve runs the release binary (f32, then `--quantize q8`, then `--dtype bf16` where the CPU has
AVX512-BF16, then `--no-adapter`), the peers run
in-process with every core (torch's default threads, CTranslate2 `intra_threads` = cores). Each
server's resident memory once ready and its peak until then (loading and merging), and both again
after its run, are read from /proc. Numbers are medians of `--rounds` passes over the sentences.
Before each engine runs, the machine's pace (one core's memory and compute speed on a fixed scan)
is measured and reported beside the others: on shared hosts the speed drifts by minutes, and a
ratio between engines measured at different paces says little. `--passes N` runs every engine N
times in turn (all of finserve's runs, then the peers, then again) and reports the median of the
passes, so that a slow phase falls on every engine rather than on one (the bulk row runs once).
With `--baseline BINARY` (e.g. a release build of the previous commit) the same f32 and q8 runs
are repeated with that binary right after the current one's, and the report adds their ratios:
how a change moved finserve's own speed on this machine, in the same run.
`--only-modes` measures only the finserve-only rows (no peers, no CTranslate2 conversion);
`--only-bulk` only the bulk row, `--no-bulk` all but it.
Not a test: it reports, it asserts nothing.
"""

import argparse
import csv
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["negative", "neutral", "positive"]
BATCH = 16
NEW_TOKENS = 3


def cpu_flags() -> str:
    flags = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return f"{model}, {os.cpu_count()} cores, " + " ".join(f for f in wanted if f in flags)


def has_bf16() -> bool:
    """Whether finserve can serve `--dtype bf16` on this CPU (AVX512-BF16)."""
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text()


def build_model(work: Path, shape: str, convert: bool = True) -> tuple[Path, Path, Path]:
    base, adapter, ct2 = work / "base", work / "adapter", work / "ct2"
    tokenizer = ROOT / "models/demo/base/tokenizer.json"
    # The cache is only valid for the tokenizer it was built with: finserve reads the copy in
    # `base`, CTranslate2 its converted vocabulary, the peers' inputs come from `tokenizer`.
    cached = base / "tokenizer.json"
    if not (cached.exists() and cached.read_bytes() == tokenizer.read_bytes()):
        shutil.rmtree(work, ignore_errors=True)
    if not (base / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "benches/make_mt0_small.py"), str(work),
                        str(tokenizer)], check=True, env={**os.environ, "MT0_SHAPE": shape})
    if convert and not (ct2 / "model.bin").exists():
        import ctranslate2.converters
        ctranslate2.converters.TransformersConverter(str(base)).convert(str(ct2), force=True)
    return base, adapter, ct2


def sentences(n: int) -> list[str]:
    with (ROOT / "models/data/test.csv").open(newline="", encoding="utf-8") as f:
        return [r["sentence"] for r in csv.DictReader(f)][:n]


def pace() -> tuple[float, float]:
    """The machine's pace right now, one core, best of 3: GB/s of `memchr` over 256 MB (memory
    bound) and of counting a byte in it (core bound). This machine's speed drifts (shared hosts);
    printed next to each engine, it shows when a ratio compares a slow phase with a fast one."""
    buf = b"\x02" * (256 << 20)
    best = [0.0, 0.0]
    for _ in range(3):
        for i, scan in enumerate((lambda: buf.find(1), lambda: buf.count(1))):
            t = time.perf_counter()
            scan()
            best[i] = max(best[i], len(buf) / (time.perf_counter() - t) / 1e9)
    return best[0], best[1]


def timed(fn, rounds: int, n: int) -> float:
    """Median sentences per second of `fn` (which handles `n` sentences) over `rounds` runs."""
    fn()
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


class Server:
    """The finserve release binary on a free local port."""

    def __init__(self, binary: Path, base: Path, adapter: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [str(binary), "--model", str(base), "--host", "127.0.0.1", "--port", str(self.port),
                "--max-batch-size", "32", "--max-concurrent-requests", "256", *extra]
        if "--no-adapter" not in extra:
            args += ["--adapter", str(adapter)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, env={**os.environ, "FINSERVE_LOG": "warn"})
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"finserve exited: {self.log.read().decode()[-2000:]}")
            try:
                if self.get("/ready")[0] == 200:
                    self.ready_mb = self.rss_mb()
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("finserve did not become ready")

    def get(self, path: str):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

    def post(self, conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
        return json.loads(data)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def rss_mb(self) -> tuple[float, float]:
        """(resident now, peak since start), in MB; `ready_mb` holds both as they were once ready,
        where the peak is loading's and merging's."""
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ":" in line)
        mb = lambda key: int(status[key].split()[0]) / 1024
        return mb("VmRSS"), mb("VmHWM")

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


def finserve_rates(server: Server, texts: list[str], rounds: int) -> dict:
    n = len(texts)
    conns = [server.conn() for _ in range(BATCH)]

    def sentiment_batched():
        for i in range(0, n, BATCH):
            server.post(conns[0], "/v1/sentiment", {"inputs": texts[i:i + BATCH]})

    def sentiment_single():
        for t in texts:
            server.post(conns[0], "/v1/sentiment", {"inputs": t})

    def generate(concurrency: int):
        def client(k: int):
            for t in texts[k::concurrency]:
                out = server.post(conns[k], "/v1/generate", {
                    "inputs": t, "parameters": {"max_new_tokens": NEW_TOKENS}})
                assert "generated_text" in out
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(client, range(concurrency)))

    return {
        "sent16": timed(sentiment_batched, rounds, n),
        "sent1": timed(sentiment_single, rounds, n),
        "gen16": timed(lambda: generate(BATCH), rounds, n),
        "gen1": timed(lambda: generate(1), rounds, n),
    }


def target_spans(text: str) -> list[dict]:
    """Four distinct words of `text` as character spans (the longest first)."""
    import re
    words = sorted({m.group(): m.span() for m in re.finditer(r"[A-Za-z]{3,}", text)}.values(),
                   key=lambda s: s[0] - s[1])
    return [{"start": a, "end": b} for a, b in words[:4]]


def document(texts: list[str], tokens: int) -> tuple[str, list[str]]:
    """Test sentences joined (cycling) until the text has `tokens` tokens: the text and its sentences."""
    _, ids, _ = tokenize(texts)
    parts, count, i = [], 0, 0
    while count < tokens:
        parts.append(texts[i % len(texts)])
        count += len(ids[i % len(texts)])
        i += 1
    return " ".join(parts), parts


def finserve_mode_rates(server: Server, texts: list[str], rounds: int) -> dict:
    """Entity-level and sentence-mode throughput, each with plain scoring of the same sentences."""
    conn = server.conn()
    usable = [t for t in texts if len(target_spans(t)) == 4]
    targets = 4 * len(usable)

    def entity():
        for i in range(0, len(usable), BATCH):
            chunk = usable[i:i + BATCH]
            out = server.post(conn, "/v1/sentiment", {
                "inputs": chunk, "parameters": {"targets": [target_spans(t) for t in chunk]}})
            assert all(len(o) == 4 for o in out)

    def plain(sents):
        def run():
            for i in range(0, len(sents), BATCH):
                server.post(conn, "/v1/sentiment", {"inputs": sents[i:i + BATCH]})
        return run

    doc, parts = document(texts, 3000)

    def sentences_mode():
        out = server.post(conn, "/v1/sentiment", {"inputs": doc, "parameters": {"long_input": "sentences"}})
        found.append(len(out[0]["sentences"]))

    found = []

    return {
        "targets": timed(entity, rounds, targets),
        "targets_plain": timed(plain(usable), rounds, len(usable)),
        "doc": timed(sentences_mode, rounds, len(parts)),
        "doc_plain": timed(plain(parts), rounds, len(parts)),
        "doc_sentences": len(parts),
        "doc_found": found[0],
    }


def modes_table(modes: dict) -> list[str]:
    """The finserve-only rows: entity-level and sentences-mode throughput against plain scoring."""
    f, q = modes["finserve f32"], modes["finserve q8"]
    lines = [
        "finserve only, f32 / q8: entity-level scoring, 4 targets per sentence, 16 sentences per request; "
        f"`long_input: sentences` on one 3,000-token document of {f['doc_sentences']:.0f} test sentences "
        f"(the server found {f['doc_found']:.0f}); each against plain scoring of the same sentences, 16 per "
        "request.",
        "",
        "| work | f32 | q8 | f32 vs plain | q8 vs plain |",
        "|---|---|---|---|---|",
    ]
    for key, plain_key, title in [("targets", "targets_plain", "entity-level, targets/s"),
                                  ("doc", "doc_plain", "sentences mode, document sentences/s")]:
        lines.append(f"| {title} | {f[key]:.1f} | {q[key]:.1f} | {f[key] / f[plain_key]:.2f}x "
                     f"(plain {f[plain_key]:.1f}/s) | {q[key] / q[plain_key]:.2f}x (plain {q[plain_key]:.1f}/s) |")
    return lines


def tokenize(texts: list[str]):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ROOT / "models/demo/base/tokenizer.json"))
    ids = [tok.encode(t).ids for t in texts]
    labels = [tok.encode(l).ids for l in LABELS]
    return tok, ids, labels


def transformers_rates(base: Path, texts: list[str], rounds: int) -> dict:
    import torch
    from transformers import AutoModelForSeq2SeqLM
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base)).eval()
    for stack in (model.encoder, model.decoder):
        stack.embed_tokens.weight = model.shared.weight
    _, ids, labels = tokenize(texts)
    width = max(len(l) for l in labels)

    def pad(rows):
        m = max(len(r) for r in rows)
        t = torch.tensor([r + [0] * (m - len(r)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        return t, (torch.arange(m)[None, :] < lengths[:, None]).long()

    def score(batch):
        x, mask = pad(batch)
        enc = model.encoder(input_ids=x, attention_mask=mask).last_hidden_state
        b, L = len(batch), len(labels)
        enc = enc.repeat_interleave(L, 0)
        mask_l = mask.repeat_interleave(L, 0)
        dec = torch.tensor([[0] + l[:-1] + [0] * (width - len(l)) for l in labels] * b)
        tgt = torch.tensor([l + [0] * (width - len(l)) for l in labels] * b)
        logits = model(encoder_outputs=(enc,), attention_mask=mask_l, decoder_input_ids=dec).logits
        lp = logits.log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
        keep = torch.tensor([[1.0] * len(l) + [0.0] * (width - len(l)) for l in labels] * b)
        return (lp * keep).sum(-1).view(b, L).softmax(-1)

    def gen(batch):
        x, mask = pad(batch)
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)

    n = len(ids)
    with torch.inference_mode():
        return {
            "sent16": timed(lambda: [score(ids[i:i + BATCH]) for i in range(0, n, BATCH)], rounds, n),
            "sent1": timed(lambda: [score([r]) for r in ids], rounds, n),
            "gen16": timed(lambda: [gen(ids[i:i + BATCH]) for i in range(0, n, BATCH)], rounds, n),
            "gen1": timed(lambda: [gen([r]) for r in ids], rounds, n),
        }


def ctranslate2_rates(ct2: Path, texts: list[str], rounds: int, compute_type: str) -> dict:
    import ctranslate2
    tok, ids, labels = tokenize(texts)
    tr = ctranslate2.Translator(str(ct2), device="cpu", compute_type=compute_type,
                                intra_threads=os.cpu_count(), inter_threads=1)
    src = [[tok.id_to_token(i) for i in r] for r in ids]
    tgts = [[tok.id_to_token(i) for i in l] for l in labels]

    def score(batch):
        pairs_src = [s for s in batch for _ in tgts]
        pairs_tgt = [t for _ in batch for t in tgts]
        return tr.score_batch(pairs_src, pairs_tgt, max_batch_size=len(pairs_src))

    def gen(batch):
        return tr.translate_batch(batch, beam_size=1, max_decoding_length=NEW_TOKENS,
                                  max_batch_size=len(batch))

    n = len(src)
    return {
        "sent16": timed(lambda: [score(src[i:i + BATCH]) for i in range(0, n, BATCH)], rounds, n),
        "sent1": timed(lambda: [score([r]) for r in src], rounds, n),
        "gen16": timed(lambda: [gen(src[i:i + BATCH]) for i in range(0, n, BATCH)], rounds, n),
        "gen1": timed(lambda: [gen([r]) for r in src], rounds, n),
    }


BULK = 1024


def bulk_sentences() -> list[str]:
    with (ROOT / "models/data/train_pool.csv").open(newline="", encoding="utf-8") as f:
        return [r["sentence"] for r in csv.DictReader(f)][:BULK]


def finserve_bulk(binary: Path, base: Path, adapter: Path, texts: list[str], rounds: int,
                  *extra: str) -> float:
    """Median rows/s that `finserve predict` reports over `rounds` runs (after one warm-up run)."""
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "bulk.csv"
        with data.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["sentence"])
            w.writerows([t] for t in texts)
        rates = []
        for i in range(rounds + 1):
            out = Path(d) / f"out-{i}.jsonl"
            run = subprocess.run(
                [str(binary), "predict", "--model", str(base), "--adapter", str(adapter),
                 "--data", str(data), "--out", str(out), "--max-batch-size", "32", *extra],
                capture_output=True, text=True, env={**os.environ, "FINSERVE_LOG": "warn"})
            if run.returncode != 0:
                raise RuntimeError(f"finserve predict failed: {run.stderr[-2000:]}")
            rows = sum(1 for _ in out.open())
            if rows != len(texts):
                raise RuntimeError(f"finserve predict wrote {rows} rows of {len(texts)}")
            # "N rows scored into ..., T s (R rows/s)"
            rate = float(run.stdout.rsplit("(", 1)[1].split()[0])
            if i > 0:
                rates.append(rate)
        return statistics.median(rates)


def ctranslate2_bulk(ct2: Path, texts: list[str], rounds: int, compute_type: str) -> tuple[float, int]:
    """(median sentences/s, the batch size of sentences that gave it) of CTranslate2 score_batch."""
    import ctranslate2
    tok, ids, labels = tokenize(texts)
    tr = ctranslate2.Translator(str(ct2), device="cpu", compute_type=compute_type,
                                intra_threads=os.cpu_count(), inter_threads=1)
    src = [[tok.id_to_token(i) for i in r] for r in ids]
    tgts = [[tok.id_to_token(i) for i in l] for l in labels]
    pairs_src = [s for s in src for _ in tgts]
    pairs_tgt = [t for _ in src for t in tgts]
    n = len(src)

    def rate(batch: int) -> float:
        t = time.perf_counter()
        # CTranslate2 sorts the examples by length and splits them into batches of this many.
        tr.score_batch(pairs_src, pairs_tgt, max_batch_size=batch * len(tgts))
        return n / (time.perf_counter() - t)

    first = {batch: rate(batch) for batch in (8, 16, 32, 64)}
    best = max(first, key=first.get)
    return statistics.median([first[best]] + [rate(best) for _ in range(rounds - 1)]), best


def bulk_table(bulk: dict) -> list[str]:
    f32, q8 = bulk["finserve f32"], bulk["finserve q8"]
    (fp32, b32), (int8, b8) = bulk["CTranslate2 fp32"], bulk["CTranslate2 int8"]
    bf16 = bulk.get("finserve bf16")
    return [
        f"Bulk: {BULK} sentences of models/data/train_pool.csv, sentences/s (finserve predict: CSV in, JSON Lines "
        "out, model loading not counted; CTranslate2: score_batch of the 3 label sequences on pre-tokenized "
        "input, its best max_batch_size).",
        "",
        "| bulk | finserve f32 | finserve q8 | finserve bf16 | CTranslate2 fp32 | CTranslate2 int8 | f32 vs CT2 fp32 "
        "| q8 vs CT2 int8 |",
        "|---|---|---|---|---|---|---|---|",
        f"| `finserve predict` / `score_batch` | {f32:.1f} | {q8:.1f} | "
        + (f"{bf16:.1f}" if bf16 else "(no AVX512-BF16)")
        + f" | {fp32:.1f} (batch {b32}) | {int8:.1f} (batch {b8}) | {f32 / fp32:.2f}x | {q8 / int8:.2f}x |",
    ]


ROWS = [
    ("sent16", "sentiment, 16 inputs per request / score 3 labels, batch 16"),
    ("sent1", "sentiment, 1 input per request / score, batch 1"),
    ("gen16", f"16 concurrent generate ({NEW_TOKENS} tokens) / generate, batch 16"),
    ("gen1", f"1 generate ({NEW_TOKENS} tokens) at a time / generate, batch 1"),
]


def passes_note(passes: int) -> str:
    return f", median of {passes} passes run in turn" if passes > 1 else ""


def median_of(passes: list[dict], part: str) -> dict:
    """Each engine's rates in `part`, the median over the passes."""
    return {name: {key: statistics.median(p[part][name][key] for p in passes) for key in rates}
            for name, rates in passes[0][part].items()}


def one_pass(runs: list, base: Path, adapter: Path, ct2: Path, texts: list[str], args) -> dict:
    """Every engine once, one after the other: finserve's runs, then the peers. `results` and
    `modes` hold each engine's rates, `rss` finserve's memory, `paces` the machine's pace just
    before each engine."""
    results, rss, modes, paces = {}, {}, {}, {}
    for exe, name, extra in runs:
        paces[name] = pace()
        server = Server(exe, base, adapter, *extra)
        try:
            if not args.only_modes:
                results[name] = finserve_rates(server, texts, args.rounds)
            if name in ("finserve f32", "finserve q8"):
                modes[name] = finserve_mode_rates(server, texts, args.rounds)
            rss[name] = (*server.ready_mb, *server.rss_mb())
        finally:
            server.close()
        print(f"{name}: {results.get(name)} {modes.get(name)}", file=sys.stderr)
    if not args.only_modes:
        paces["transformers fp32"] = pace()
        results["transformers fp32"] = transformers_rates(base, texts, args.rounds)
        print(f"transformers: {results['transformers fp32']}", file=sys.stderr)
        paces["CTranslate2 fp32"] = pace()
        results["CTranslate2 fp32"] = ctranslate2_rates(ct2, texts, args.rounds, "float32")
        paces["CTranslate2 int8"] = pace()
        results["CTranslate2 int8"] = ctranslate2_rates(ct2, texts, args.rounds, "int8")
        print(f"CTranslate2: {results['CTranslate2 fp32']} {results['CTranslate2 int8']}", file=sys.stderr)
    return {"results": results, "rss": rss, "modes": modes, "paces": paces}


def main() -> None:
    ap = argparse.ArgumentParser()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    ap.add_argument("--finserve", default=str(target / "release/finserve"))
    ap.add_argument("--shape", choices=["small", "base", "large"], default="small",
                    help="the random model's shape: mt0-small, mt0-base or mt0-large")
    ap.add_argument("--work", help="where the model is built (default: target/compare-SHAPE)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1,
                    help="run every engine this many times in turn and report the median of the passes")
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--baseline", help="another finserve binary to compare with (f32 and q8)")
    ap.add_argument("--only-modes", action="store_true",
                    help="measure only finserve's entity-level and sentences rows (no peers)")
    ap.add_argument("--no-bulk", action="store_true",
                    help="leave out the bulk row (the slowest part at the larger shapes)")
    ap.add_argument("--only-bulk", action="store_true",
                    help="measure only the bulk row (finserve predict against CTranslate2 score_batch)")
    args = ap.parse_args()
    if args.passes < 1 or args.rounds < 1:
        ap.error("--passes and --rounds must be at least 1")
    binary = Path(args.finserve)
    work = Path(args.work or ROOT / f"target/compare-{args.shape}")
    work.mkdir(parents=True, exist_ok=True)
    base, adapter, ct2 = build_model(work, args.shape, convert=not args.only_modes)
    texts = sentences(args.sentences)
    bulk = {}
    if not args.only_modes and not args.no_bulk:
        archive = bulk_sentences()
        bulk["finserve f32"] = finserve_bulk(binary, base, adapter, archive, args.rounds)
        bulk["finserve q8"] = finserve_bulk(binary, base, adapter, archive, args.rounds, "--quantize", "q8")
        if has_bf16():
            bulk["finserve bf16"] = finserve_bulk(binary, base, adapter, archive, args.rounds, "--dtype", "bf16")
        bulk["CTranslate2 fp32"] = ctranslate2_bulk(ct2, archive, args.rounds, "float32")
        bulk["CTranslate2 int8"] = ctranslate2_bulk(ct2, archive, args.rounds, "int8")
        print(f"bulk: {bulk}", file=sys.stderr)
    if args.only_bulk:
        import ctranslate2
        print(f"Machine: {cpu_flags()}; CTranslate2 {ctranslate2.__version__}; {args.shape} shape; "
              f"median of {args.rounds} rounds.\n")
        print("\n".join(bulk_table(bulk)))
        return

    # Entity-level scoring needs a target template; the random adapter was never trained with
    # one, so this measures cost, not quality.
    template = work / "target_template.json"
    template.write_text(json.dumps({"template": "{target} : {text}", "mark": ["<<", ">>"]}))
    with_template = ("--target-template", str(template))
    runs = [(binary, "finserve f32", with_template),
            (binary, "finserve q8", ("--quantize", "q8", *with_template)),
            (binary, "finserve f32 --no-adapter", ("--no-adapter",))]
    if has_bf16() and not args.only_modes:
        runs.insert(2, (binary, "finserve bf16", ("--dtype", "bf16")))
    if args.baseline:
        runs[2:2] = [(Path(args.baseline), "baseline f32", ()),
                     (Path(args.baseline), "baseline q8", ("--quantize", "q8"))]
    if args.only_modes:
        runs = runs[:2]
    passes = [one_pass(runs, base, adapter, ct2, texts, args) for _ in range(args.passes)]
    results, modes = median_of(passes, "results"), median_of(passes, "modes")
    rss = passes[0]["rss"]
    if args.only_modes:
        print(f"Machine: {cpu_flags()}; {len(texts)} sentences, median of {args.rounds} rounds"
              f"{passes_note(args.passes)}.\n")
        print("\n".join(modes_table(modes)))
        return

    import ctranslate2
    import torch
    import transformers
    cols = ["finserve f32", "finserve q8", "transformers fp32", "CTranslate2 fp32", "CTranslate2 int8"]
    if "finserve bf16" in results:
        cols.insert(2, "finserve bf16")
    lines = [
        f"Machine: {cpu_flags()}; {args.shape} shape; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, CTranslate2 {ctranslate2.__version__}; "
        f"{len(texts)} sentences, median of {args.rounds} rounds{passes_note(args.passes)}, sentences/s.",
        "",
        "| work (finserve / peers) | " + " | ".join(cols) + " | f32 vs CT2 fp32 | f32 vs transformers | q8 vs CT2 int8 |",
        "|---|" + "---|" * (len(cols) + 3),
    ]
    for key, title in ROWS:
        r = {c: results[c][key] for c in cols}
        lines.append(
            f"| {title} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
            + f" | {r['finserve f32'] / r['CTranslate2 fp32']:.2f}x"
            + f" | {r['finserve f32'] / r['transformers fp32']:.2f}x"
            + f" | {r['finserve q8'] / r['CTranslate2 int8']:.2f}x |")
    lines += ([""] + bulk_table(bulk) if bulk else []) + [""] + modes_table(modes)
    na = results["finserve f32 --no-adapter"]
    lines += [
        "",
        "Merged adapter vs `--no-adapter` (finserve f32): "
        + ", ".join(f"{key} {results['finserve f32'][key]:.1f} vs {na[key]:.1f}" for key, _ in ROWS) + ".",
    ]
    if args.baseline:
        lines.append(
            "This build vs `--baseline` (sentences/s, ratio): "
            + "; ".join(
                f"{kind} {key} {results['finserve ' + kind][key]:.1f} vs "
                f"{results['baseline ' + kind][key]:.1f} "
                f"({results['finserve ' + kind][key] / results['baseline ' + kind][key]:.2f}x)"
                for kind in ("f32", "q8") for key, _ in ROWS) + ".")
    lines += [
        "Machine pace just before each engine ran (one core, GB/s: memchr over 256 MB / counting a "
        "byte in it; compare ratios only between engines measured at a similar pace): "
        + "; ".join(f"pass {i + 1}: " + ", ".join(f"{k} {m:.1f} / {c:.2f}" for k, (m, c) in p["paces"].items())
                    for i, p in enumerate(passes)) + ".",
        "Resident memory once ready / peak while loading and merging / after the run / peak of the run: "
        + ", ".join(f"{k} {ready:.0f} / {load:.0f} / {now:.0f} / {peak:.0f} MB"
                    for k, (ready, load, now, peak) in rss.items()) + ".",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()

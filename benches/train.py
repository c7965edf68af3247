#!/usr/bin/env python3
"""Training speed: `finserve train` against torch + transformers + peft, same model, same data,
same recipe, same machine, one after the other.

    cargo build --release
    /var/tmp/bench-venv/bin/python benches/train.py [--epochs 1] [--batch-size 32]

Both train LoRA (r=8, alpha=32, dropout 0.1, targets q,k,v,o,wi_0,wi_1,wo) on the demo base
(models/demo/base) with the high-agreement Financial PhraseBank training sentences (agreement
>= 75 %, what the demo adapter is trained on), batches of 32 with length bucketing, AdamW with
gradient clipping at 1.0. Tokens are input tokens plus label tokens (EOS included), counted the
same way on both sides; time is the training steps only (no evaluation, no loading). Prints the
CPU flags with the figures, as the machines that run this differ.
"""
import argparse
import csv
import json
import math
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, MT5ForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "models" / "demo" / "base"
TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
BINARY = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "finserve"


def cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))))


def rows():
    with open(REPO / "models" / "data" / "train_pool.csv", newline="") as f:
        return [(r["sentence"], r["label"]) for r in csv.DictReader(f) if int(r["agree"]) >= 75]


def torch_tokens_per_second(data, epochs, batch_size, seed):
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(BASE)
    model = MT5ForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32)
    cfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                     target_modules=TARGETS)
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    examples = [(tok(t, truncation=True, max_length=256).input_ids, tok(l).input_ids) for t, l in data]
    opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.01)
    total = math.ceil(len(examples) / batch_size) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    rng = random.Random(seed)
    model.train()
    tokens, seconds = 0, 0.0
    for _ in range(epochs):
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        batches = []
        for c in range(0, len(idx), batch_size * 50):
            part = sorted(idx[c:c + batch_size * 50], key=lambda i: len(examples[i][0]))
            batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(batches)
        for b in batches:
            xs, ys = [examples[i][0] for i in b], [examples[i][1] for i in b]
            t, u = max(map(len, xs)), max(map(len, ys))
            ids = torch.zeros(len(b), t, dtype=torch.long)
            att = torch.zeros(len(b), t, dtype=torch.long)
            lab = torch.full((len(b), u), -100, dtype=torch.long)
            for k, (x, y) in enumerate(zip(xs, ys)):
                ids[k, :len(x)] = torch.tensor(x)
                att[k, :len(x)] = 1
                lab[k, :len(y)] = torch.tensor(y)
            start = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            seconds += time.perf_counter() - start
            tokens += sum(map(len, xs)) + sum(map(len, ys))
    return tokens / seconds


def finserve_tokens_per_second(data, epochs, batch_size, seed):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            w.writerows(data)
        out = subprocess.run(
            [str(BINARY), "train", "--json-logs",
             "--model", str(BASE), "--data", str(path), "--out", str(Path(tmp) / "adapter"),
             "--target-modules", ",".join(TARGETS), "--r", "8", "--lora-alpha", "32",
             "--lora-dropout", "0.1", "--epochs", str(epochs), "--batch-size", str(batch_size),
             "--lr", "1.5e-3", "--max-grad-norm", "1.0", "--seed", str(seed)],
            capture_output=True, text=True, check=True, env={**os.environ, "FINSERVE_LOG": "info"})
    rates = []
    for line in out.stderr.splitlines() + out.stdout.splitlines():
        try:
            fields = json.loads(line).get("fields", {})
        except json.JSONDecodeError:
            continue
        if fields.get("message") == "epoch done":
            rates.append(fields["tokens_per_second"])
    if not rates:
        raise SystemExit("finserve train logged no epoch:\n" + out.stderr[-2000:])
    return sum(rates) / len(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    data = rows()
    threads = torch.get_num_threads()
    ours = finserve_tokens_per_second(data, args.epochs, args.batch_size, args.seed)
    theirs = torch_tokens_per_second(data, args.epochs, args.batch_size, args.seed)
    print(f"CPU flags: {cpu_flags()}")
    print(f"{len(data)} examples, {args.epochs} epoch(s), batch {args.batch_size}, torch threads {threads}")
    print(f"finserve train      {ours:9.0f} tokens/s")
    print(f"torch + peft        {theirs:9.0f} tokens/s")
    print(f"ratio               {ours / theirs:9.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference evaluation of the demo model with the same scoring rule as the finserve server.

    HF_HUB_OFFLINE=1 /work/venv/bin/python models/eval_reference.py [--base models/demo/base]
        [--adapter models/demo/adapter] [--test models/data/test.csv] [--json out.json]

Scoring rule: for each label in (negative, neutral, positive) the label's token sequence is the tokenizer
encoding of the label word incl. </s>; its score is log P(label tokens | sentence), teacher forced with decoder
input [decoder_start] + label[:-1], full-vocabulary log-softmax, summed over the label tokens. The three scores
are renormalised with a softmax; prediction = argmax. Evaluated for the base model alone and for the
base + adapter merged with PEFT merge_and_unload().
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer
from transformers import MT5ForConditionalGeneration

HERE = Path(__file__).resolve().parent
LABELS = ["negative", "neutral", "positive"]


def load_base(path):
    model = MT5ForConditionalGeneration.from_pretrained(str(path), torch_dtype=torch.float32)
    # mt0 layout: both stacks read `shared` (transformers 5 re-ties these itself; be explicit anyway)
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
    model.eval()
    return model


def load_merged(base_path, adapter_path):
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_base(base_path), str(adapter_path))
    model = model.merge_and_unload()
    model.eval()
    return model


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["sentence"], r["label"]) for r in csv.DictReader(f)]


@torch.no_grad()
def label_logprobs(model, tok, sentences, batch_size=64, max_len=256):
    """Returns a [N, 3] tensor of summed label log-probs (float64)."""
    label_ids = [tok.encode(l).ids for l in LABELS]
    L = max(len(x) for x in label_ids)
    dec = torch.zeros(len(LABELS), L, dtype=torch.long)
    tgt = torch.zeros(len(LABELS), L, dtype=torch.long)
    tmask = torch.zeros(len(LABELS), L, dtype=torch.float64)
    for j, ids in enumerate(label_ids):
        d = [0] + ids[:-1]
        dec[j, :len(d)] = torch.tensor(d)
        tgt[j, :len(ids)] = torch.tensor(ids)
        tmask[j, :len(ids)] = 1.0
    out = []
    for i in range(0, len(sentences), batch_size):
        encs = [tok.encode(s).ids[:max_len] for s in sentences[i:i + batch_size]]
        n = len(encs)
        T = max(len(e) for e in encs)
        ids = torch.zeros(n, T, dtype=torch.long)
        att = torch.zeros(n, T, dtype=torch.long)
        for k, e in enumerate(encs):
            ids[k, :len(e)] = torch.tensor(e)
            att[k, :len(e)] = 1
        enc = model.get_encoder()(input_ids=ids, attention_mask=att).last_hidden_state
        nl = len(LABELS)
        enc_r = enc.repeat_interleave(nl, 0)
        att_r = att.repeat_interleave(nl, 0)
        dec_r = dec.repeat(n, 1)
        logits = model(encoder_outputs=(enc_r,), attention_mask=att_r, decoder_input_ids=dec_r,
                       use_cache=False).logits
        lsm = torch.log_softmax(logits.double(), dim=-1)
        g = lsm.gather(-1, tgt.repeat(n, 1).unsqueeze(-1)).squeeze(-1) * tmask.repeat(n, 1)
        out.append(g.sum(-1).view(n, nl))
    return torch.cat(out)


def metrics(gold, pred):
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = {}
    for l in LABELS:
        tp = sum(g == l and p == l for g, p in zip(gold, pred))
        fp = sum(g != l and p == l for g, p in zip(gold, pred))
        fn = sum(g == l and p != l for g, p in zip(gold, pred))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s[l] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"accuracy": acc, "macro_f1": sum(f1s.values()) / len(f1s), "f1": f1s, "n": len(gold),
            "confusion": {g: {p: sum(1 for a, b in zip(gold, pred) if a == g and b == p) for p in LABELS}
                          for g in LABELS}}


def evaluate(model, tok, rows):
    lp = label_logprobs(model, tok, [s for s, _ in rows])
    probs = torch.softmax(lp, dim=-1)
    pred = [LABELS[i] for i in probs.argmax(-1).tolist()]
    return metrics([l for _, l in rows], pred), probs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=str(HERE / "demo" / "base"))
    ap.add_argument("--adapter", default=str(HERE / "demo" / "adapter"))
    ap.add_argument("--test", default=str(HERE / "data" / "test.csv"))
    ap.add_argument("--json", help="write the metrics here")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = Tokenizer.from_file(str(Path(args.base) / "tokenizer.json"))
    rows = read_rows(args.test)
    res = {}
    res["base"], _ = evaluate(load_base(args.base), tok, rows)
    res["merged"], _ = evaluate(load_merged(args.base, args.adapter), tok, rows)
    for k, v in res.items():
        print(f"{k:7s} accuracy {v['accuracy']:.4f}  macro-F1 {v['macro_f1']:.4f}  "
              + "  ".join(f"F1[{l}] {v['f1'][l]:.3f}" for l in LABELS))
        print(f"        confusion (gold -> pred): {v['confusion']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

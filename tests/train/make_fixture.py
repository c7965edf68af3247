#!/usr/bin/env python3
"""Reference numbers for `finserve train`, computed with torch + transformers + peft.

    /var/tmp/bench-venv/bin/python tests/train/make_fixture.py

For one batch on the small fixture mT5 (tests/parity/fixtures/mt5_base) with LoRA on `q,v` and
on every linear module, with dropout off: the initial LoRA factors (B random, so that A gets a
gradient too), the loss transformers computes for `labels`, the gradient of every LoRA tensor,
and the factors after one torch AdamW step. Written to tests/train/fixtures/<case>.safetensors
with the batch and settings in <case>.json; tests/train.rs checks finserve against them.
CPU only, fixed seeds: rerunning gives the same numbers.
"""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import save_file
from transformers import AutoTokenizer, MT5ForConditionalGeneration

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "parity" / "fixtures" / "mt5_base"
OUT = HERE / "fixtures"

TEXTS = [
    "Operating profit rose to EUR 13.1 mn .",
    "Net sales fell .",
    "The company will hold its annual meeting in Helsinki on Tuesday .",
]
LABELS = ["positive", "negative", "neutral"]
CASES = {
    "qv": ["q", "v"],
    "all_linear": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}
LR, WEIGHT_DECAY = 1e-2, 0.01


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(BASE)
    inputs = [tok(t).input_ids for t in TEXTS]
    targets = [tok(l).input_ids for l in LABELS]
    t, u = max(map(len, inputs)), max(map(len, targets))
    ids = torch.zeros(len(inputs), t, dtype=torch.long)
    mask = torch.zeros(len(inputs), t, dtype=torch.long)
    labels = torch.full((len(inputs), u), -100, dtype=torch.long)
    for i, (x, y) in enumerate(zip(inputs, targets)):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    OUT.mkdir(exist_ok=True)
    for case, modules in CASES.items():
        model = MT5ForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32)
        cfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules=modules)
        pm = get_peft_model(model, cfg)
        pm.eval()  # dropout off; gradients still flow
        gen = torch.Generator().manual_seed(1)
        tensors = {}
        params = {}
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            key = name.replace(".default", "").replace("base_model.model.", "")
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            params[key] = p
            tensors[f"init.{key}"] = p.detach().clone()
        opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WEIGHT_DECAY)
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        for key, p in params.items():
            tensors[f"grad.{key}"] = p.grad.detach().clone()
        opt.step()
        for key, p in params.items():
            tensors[f"step.{key}"] = p.detach().clone()
        save_file(tensors, str(OUT / f"{case}.safetensors"))
        meta = {
            "inputs": inputs,
            "targets": targets,
            "target_modules": modules,
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "loss": out.loss.item(),
            "modules": sorted({k.rsplit(".lora_", 1)[0] for k in params}),
        }
        (OUT / f"{case}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(case, "loss", meta["loss"], "modules", len(meta["modules"]))


if __name__ == "__main__":
    main()

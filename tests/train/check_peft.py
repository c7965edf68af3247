#!/usr/bin/env python3
"""Loads the adapter `finserve train` wrote (tests/train/fixtures/trained/) with PEFT and writes
the logits PEFT computes with it, for tests/train.rs to compare with finserve's merged model.

    target/debug/finserve train --model tests/parity/fixtures/mt5_base \
        --data tests/train/fixtures/tiny.csv --out tests/train/fixtures/trained \
        --epochs 2 --batch-size 8 --seed 7 --target-modules q,k,v,o --lr 5e-3
    /var/tmp/bench-venv/bin/python tests/train/check_peft.py

Fails unless every tensor of the file lands in a LoRA parameter of the model, and every LoRA
parameter of the model comes from the file.
"""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MT5ForConditionalGeneration

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "parity" / "fixtures" / "mt5_base"
ADAPTER = HERE / "fixtures" / "trained"
TEXTS = ["Operating profit rose to EUR 13.1 mn .", "Net sales fell ."]
TARGETS = ["positive", "negative"]


def main():
    tok = AutoTokenizer.from_pretrained(BASE)
    base = MT5ForConditionalGeneration.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, ADAPTER)
    model.eval()
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    saved = load_file(str(ADAPTER / "adapter_model.safetensors"))
    if set(params) != set(saved):
        raise SystemExit(f"PEFT's LoRA parameters and the file differ: {set(params) ^ set(saved)}")
    for name, t in saved.items():
        if not torch.equal(params[name].detach(), t):
            raise SystemExit(f"{name} was not loaded as saved")
    loaded = params
    out = {}
    meta = {"inputs": [], "decoder_inputs": []}
    with torch.no_grad():
        for i, (text, target) in enumerate(zip(TEXTS, TARGETS)):
            ids = tok(text, return_tensors="pt").input_ids
            labels = tok(target, return_tensors="pt").input_ids
            dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), labels[:, :-1]], dim=1)
            logits = model(input_ids=ids, decoder_input_ids=dec).logits[0]
            out[f"logits.{i}"] = logits.contiguous()
            meta["inputs"].append(ids[0].tolist())
            meta["decoder_inputs"].append(dec[0].tolist())
    save_file(out, str(HERE / "fixtures" / "peft_logits.safetensors"))
    meta["lora_parameters"] = len(loaded)
    (HERE / "fixtures" / "peft_logits.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("PEFT loaded", len(loaded), "LoRA tensors; logits written")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train the embedded demo model: a small mT5 (mt0-like layout) + a PEFT LoRA sentiment adapter.

    python3 models/split.py
    HF_HUB_OFFLINE=1 nice -n 10 /work/venv/bin/python models/train.py --epochs1 6 --epochs2 10 --lr1 1e-3 --lr2 3e-3
    HF_HUB_OFFLINE=1 /work/venv/bin/python models/eval_reference.py

CPU only, fixed seeds, no network. Reads models/data/train_pool.csv (written by split.py; never contains a
test sentence) and writes models/demo/base/ and models/demo/adapter/. See models/README.md.

Recipe
  tokenizer : SentencePiece unigram (vocab 4000, nmt_nfkc) trained on the training-pool sentences only, converted
              to a mT5-style tokenizer.json. Model vocab = 4000 + 100 sentinel ids (used only for denoising).
  stage 1   : base model from scratch. Multitask: T5 span corruption on a random sample of training-pool
              sentences per epoch, plus supervised sentiment (sentence -> "negative"/"neutral"/"positive" + </s>)
              on the low-agreement part of the pool only (highest agreement level 50% or 66%). Two embedding
              dims are initialised with naive-Bayes log-count ratios from that same low-agreement part.
  stage 2   : LoRA (r=8, alpha=32, dropout 0.1, targets q,k,v,o,wi_0,wi_1,wo) on the high-agreement part
              (AllAgree + 75Agree sentences of the pool, minus a small dev set), base frozen.
"""
import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import MT5Config, MT5ForConditionalGeneration

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_reference as ev  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
SEED = 1234
TOK_VOCAB = 4000
N_SENTINELS = 100
MAX_LEN = 64


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ------------------------------------------------------------------------------------------------ tokenizer

def build_tokenizer(sentences, out_dir):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram", vocab_size=TOK_VOCAB,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    model_bytes = buf.getvalue()
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    assert [v[0] for v in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("</s>", special=True),
                            AddedToken("<unk>", special=True)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "spiece.model").write_bytes(model_bytes)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": 512, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    mism = sum(tok.encode(s).ids != sp.encode(s) + [1] for s in sentences[:2000])
    log(f"tokenizer: vocab {tok.get_vocab_size()}, mismatches vs sentencepiece on 2000 sentences: {mism}")
    for l in LABELS:
        e = tok.encode(l)
        log(f"  label {l!r} -> {e.tokens} {e.ids}")
    return tok


# ------------------------------------------------------------------------------------------------ data

def read_pool():
    with open(HERE / "data" / "train_pool.csv", newline="", encoding="utf-8") as f:
        return [(r["sentence"], r["label"], int(r["agree"])) for r in csv.DictReader(f)]


def span_corrupt(ids, rng, vocab_size, density=0.15, mean_span=3.0):
    """T5-style span corruption on a token list without </s>. Returns (input ids, target ids), both + </s>."""
    n = len(ids)
    n_noise = max(1, int(round(n * density)))
    n_spans = max(1, int(round(n_noise / mean_span)))
    n_noise = min(n_noise, n - 1) if n > 1 else 1
    if n <= 2:
        return ids + [1], [vocab_size - 1] + ids + [1]
    # random segmentation of noise / non-noise lengths (as in T5's random_spans_noise_mask)
    n_spans = min(n_spans, n_noise, n - n_noise)

    def seg(total, k):
        cuts = sorted(rng.sample(range(1, total), k - 1)) if k > 1 else []
        b = [0] + cuts + [total]
        return [b[i + 1] - b[i] for i in range(k)]
    noise_lens = seg(n_noise, n_spans)
    keep_lens = seg(n - n_noise, n_spans)
    inp, tgt, pos = [], [], 0
    for k in range(n_spans):
        inp += ids[pos:pos + keep_lens[k]]
        pos += keep_lens[k]
        sentinel = vocab_size - 1 - k
        inp.append(sentinel)
        tgt.append(sentinel)
        tgt += ids[pos:pos + noise_lens[k]]
        pos += noise_lens[k]
    tgt.append(vocab_size - 1 - n_spans)
    return inp + [1], tgt + [1]


def batches(examples, batch_size, rng):
    """Length-bucketed shuffled batches of (input ids, target ids)."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    out = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c:c + chunk], key=lambda i: len(examples[i][0]))
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(out)
    for b in out:
        xs = [examples[i][0][:MAX_LEN] for i in b]
        ys = [examples[i][1][:MAX_LEN] for i in b]
        T, U = max(map(len, xs)), max(map(len, ys))
        ids = torch.zeros(len(b), T, dtype=torch.long)
        att = torch.zeros(len(b), T, dtype=torch.long)
        lab = torch.full((len(b), U), -100, dtype=torch.long)
        for k, (x, y) in enumerate(zip(xs, ys)):
            ids[k, :len(x)] = torch.tensor(x)
            att[k, :len(x)] = 1
            lab[k, :len(y)] = torch.tensor(y)
        yield ids, att, lab


def run_epochs(model, params, make_examples, epochs, lr, batch_size, rng, tag, warmup=100, eval_fn=None):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n_per_epoch = math.ceil(len(make_examples(0)) / batch_size)
    total = n_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / max(1, total - warmup)))
    step = 0
    for ep in range(epochs):
        model.train()
        t0, tot, nb = time.time(), 0.0, 0
        for ids, att, lab in batches(make_examples(ep), batch_size, rng):
            loss = model(input_ids=ids, attention_mask=att, labels=lab, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            tot += loss.item()
            nb += 1
        msg = f"{tag} epoch {ep + 1}/{epochs} loss {tot / nb:.4f} ({time.time() - t0:.0f}s, {nb} steps)"
        if eval_fn is not None:
            model.eval()
            msg += " " + eval_fn()
        log(msg)


# ------------------------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "demo"))
    ap.add_argument("--epochs1", type=int, default=6)
    ap.add_argument("--epochs2", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dec-layers", type=int, default=1)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--denoise-per-epoch", type=int, default=600)
    ap.add_argument("--nb-init", type=float, default=3.0)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=1.5e-3)
    ap.add_argument("--bench", action="store_true", help="time a few steps and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_all(SEED)
    t_start = time.time()
    out = Path(args.out)
    base_dir, adapter_dir = out / "base", out / "adapter"
    if not args.bench:
        for d in (base_dir, adapter_dir):
            if d.exists():
                shutil.rmtree(d)

    pool = read_pool()
    rng = random.Random(SEED)
    high = [r for r in pool if r[2] >= 75]
    low = [r for r in pool if r[2] < 75]
    high_sorted = sorted(high)
    rng.shuffle(high_sorted)
    dev = sorted([r for r in high_sorted if r[2] == 100][:150])  # dev: 150 AllAgree sentences of the pool
    dev_set = {r[0] for r in dev}
    adapter_train = [r for r in high if r[0] not in dev_set]
    log(f"pool {len(pool)}: base-supervised (agree<75) {len(low)}, adapter-train (agree>=75) {len(adapter_train)}, "
        f"dev {len(dev)}")

    tok_dir = base_dir if not args.bench else Path("/tmp/finserve_bench_tok")
    tok = build_tokenizer([r[0] for r in pool], tok_dir)
    V = tok.get_vocab_size() + N_SENTINELS
    enc = {r[0]: tok.encode(r[0]).ids[:-1] for r in pool}  # without </s>
    lab_ids = {l: tok.encode(l).ids for l in LABELS}

    cfg = MT5Config(
        vocab_size=V, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=args.d_ff, num_layers=args.layers,
        num_decoder_layers=args.dec_layers, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu", is_encoder_decoder=True, decoder_start_token_id=0, eos_token_id=1,
        pad_token_id=0, tie_word_embeddings=False)
    cfg.tie_word_embeddings = False
    model = MT5ForConditionalGeneration(cfg)
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
    with torch.no_grad():  # HF's default untied lm_head init (std 1) gives huge initial logits (loss ~14)
        model.lm_head.weight.mul_(args.d_model ** -0.5)
    if args.nb_init:
        # Data-informed init: embedding dims 0 and 1 = naive-Bayes log-count ratios (positive vs rest, negative
        # vs rest) of each token, computed on the stage-1 supervised sentences only. Without it the tiny
        # from-scratch model stays at the majority class for far longer than the CPU budget allows.
        cnt = {l: torch.ones(V) for l in LABELS}
        for s, l, _ in low:
            for t in enc[s]:
                cnt[l][t] += 1
        with torch.no_grad():
            for dim, l in enumerate(["positive", "negative"]):
                rest = sum(cnt[o] for o in LABELS if o != l)
                r = torch.log(cnt[l] / cnt[l].sum()) - torch.log(rest / rest.sum())
                model.shared.weight[:, dim] = args.nb_init * r / r.std()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model params {n_params / 1e6:.2f}M (vocab {V})")

    def dev_eval(m):
        def f():
            met, _ = ev.evaluate(m, tok, [(s, l) for s, l, _ in dev])
            return f"dev acc {met['accuracy']:.3f} F1 {met['macro_f1']:.3f}"
        return f

    # ---------------- stage 1
    drng = random.Random(SEED + 1)

    def stage1_examples(ep):
        part = drng.sample(pool, min(args.denoise_per_epoch, len(pool)))
        ex = [span_corrupt(enc[r[0]], drng, V) for r in part]
        ex += [(enc[s] + [1], lab_ids[l]) for s, l, _ in low]
        return ex

    if args.bench:
        ex = stage1_examples(0)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        t0 = time.time()
        for k, (ids, att, lab) in enumerate(batches(ex, 32, rng)):
            loss = model(input_ids=ids, attention_mask=att, labels=lab, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if k == 19:
                break
        dt = (time.time() - t0) / 20
        log(f"bench: {dt:.3f}s/step of 32; epoch of {len(ex)} examples ~ {dt * len(ex) / 32:.0f}s")
        return 0

    run_epochs(model, list(model.parameters()), stage1_examples, args.epochs1, args.lr1, 32, rng, "stage1",
               warmup=100, eval_fn=dev_eval(model))
    model.eval()
    model.save_pretrained(str(base_dir))
    # make the checkpoint look like mt0: shared.weight + lm_head.weight, no *.embed_tokens.weight
    for f in base_dir.glob("*.safetensors"):
        sd = load_file(str(f))
        keep = {k: v.contiguous() for k, v in sd.items() if "embed_tokens" not in k}
        if len(keep) != len(sd):
            save_file(keep, str(f), metadata={"format": "pt"})
    keys = set(load_file(str(base_dir / "model.safetensors")).keys())
    assert "shared.weight" in keys and "lm_head.weight" in keys and not any("embed_tokens" in k for k in keys)
    log(f"stage 1 done at {time.time() - t_start:.0f}s")

    # ---------------- stage 2 (LoRA)
    from peft import LoraConfig, TaskType, get_peft_model
    seed_all(SEED + 2)
    base = ev.load_base(base_dir)
    lcfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                      target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
    pm = get_peft_model(base, lcfg)
    pm.print_trainable_parameters()
    sup = [(enc[s] + [1], lab_ids[l]) for s, l, _ in adapter_train]
    trainable = [p for p in pm.parameters() if p.requires_grad]
    run_epochs(pm, trainable, lambda ep: sup, args.epochs2, args.lr2, 32, rng, "stage2", warmup=50,
               eval_fn=dev_eval(pm))
    pm.eval()
    pm.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)
    p = adapter_dir / "adapter_config.json"
    j = json.loads(p.read_text())
    j["base_model_name_or_path"] = "models/demo/base"
    j["target_modules"] = sorted(j["target_modules"])
    p.write_text(json.dumps(j, indent=2, sort_keys=True) + "\n")
    elapsed = time.time() - t_start
    log(f"training done in {elapsed:.0f}s")
    (out / "training_log.json").write_text(json.dumps({
        "seconds": round(elapsed), "epochs1": args.epochs1, "epochs2": args.epochs2, "lr1": args.lr1, "lr2": args.lr2,
        "denoise_per_epoch": args.denoise_per_epoch, "nb_init": args.nb_init, "params": n_params,
        "vocab_size": V, "d_model": args.d_model, "layers": args.layers, "dec_layers": args.dec_layers, "d_ff": args.d_ff,
        "base_supervised": len(low), "adapter_train": len(adapter_train), "dev": len(dev),
        "torch_threads": args.threads}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

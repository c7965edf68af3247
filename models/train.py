#!/usr/bin/env python3
"""Train the embedded demo model's base: a small mT5 (mt0-like layout) that reads PhraseBank sentences and
finance tweets; its LoRA sentiment adapter is then trained by `finserve train` (see models/README.md).

    python3 models/split.py && python3 models/split_tweets.py
    HF_HUB_OFFLINE=1 /path/to/venv/bin/python models/train.py
    finserve train --model models/demo/base --data models/work/adapter_train.csv \
        --eval-data models/work/dev.csv --out models/demo/adapter --target-modules all-linear \
        --lr 1e-3 --epochs 15 --batch-size 32 --seed 1

CPU only, fixed seeds, no network. Reads models/data/train_pool.csv and models/data/tweets_train_pool.csv
(written by the split scripts; neither contains a test sentence or tweet), writes models/demo/base/ and, under
--work (git-ignored), the adapter's training and dev CSVs. With --stage2 it also trains the same adapter with
torch + peft into --work/python-adapter, as a cross-check of `finserve train`.

Recipe
  tokenizer : SentencePiece unigram (6000 pieces, nmt_nfkc) trained on the texts of both training pools, converted
              to a mT5-style tokenizer.json whose first normalizer maps every link to "http" (tweets end in
              t.co links: random characters). Model vocab = 6000 + 100 sentinel ids (used only for denoising).
  stage 1   : base model from scratch. Multitask: T5 span corruption on 2000 random training texts per epoch,
              plus supervised sentiment (text -> "negative"/"neutral"/"positive" + </s>) on the low-agreement
              PhraseBank sentences (agreement 50% or 66%) and half of the training tweets. Embedding dims 0-1
              start as naive-Bayes log-count ratios of those supervised texts, the other dims as PPMI-SVD word
              vectors of all training texts.
  adapter   : LoRA (r=8, alpha=32, dropout 0.1, all linear modules) on the high-agreement PhraseBank sentences
              (AllAgree + 75Agree, minus a 150-sentence dev set) and every training tweet but a 400-tweet dev set,
              base frozen.
"""
import argparse
import csv
import io
import json
import math
import os
import random
import re
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
N_SENTINELS = 100
MAX_LEN = 64


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ------------------------------------------------------------------------------------------------ tokenizer

URL = r"https?://\S+"  # tweets end in t.co links: random characters that carry no sentiment


def normalize(s):
    """What the tokenizer's first normalizer does, applied to SentencePiece's training text."""
    return re.sub(URL, "http", s)


def build_tokenizer(sentences, out_dir, vocab_size):
    sentences = [normalize(s) for s in sentences]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    model_bytes = buf.getvalue()
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    assert [v[0] for v in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(URL), "http"),
                                           normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
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


def read_tweets():
    with open(HERE / "data" / "tweets_train_pool.csv", newline="", encoding="utf-8") as f:
        return [(r["sentence"], r["label"]) for r in csv.DictReader(f)]


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(rows)


def ppmi_svd(seqs, vocab, dims, window=4):
    """Word vectors from co-occurrence statistics: truncated SVD of the positive PMI matrix of token ids
    that occur within `window` positions of each other. Gives the from-scratch model's embeddings a head start
    on which pieces mean similar things, from text alone."""
    co = np.zeros((vocab, vocab), dtype=np.float64)
    for ids in seqs:
        a = np.asarray(ids)
        for d in range(1, window + 1):
            if len(a) > d:
                np.add.at(co, (a[:-d], a[d:]), 1.0 / d)
    co += co.T
    row = co.sum(1, keepdims=True)
    col = row.T ** 0.75
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * (col.sum()) / (row * col))
    pmi[~np.isfinite(pmi)] = 0.0
    pmi = np.maximum(pmi, 0.0)
    u, sv, _ = np.linalg.svd(pmi.astype(np.float32), full_matrices=False)
    e = u[:, :dims] * np.sqrt(sv[:dims])
    return e / (e.std() + 1e-12)


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
    ap.add_argument("--work", default=str(HERE / "work"),
                    help="where the adapter's training and dev CSVs go (git-ignored)")
    ap.add_argument("--epochs1", type=int, default=10)
    ap.add_argument("--epochs2", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=6000)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dec-layers", type=int, default=1)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--denoise-per-epoch", type=int, default=2000)
    ap.add_argument("--tweets-in-base", type=float, default=0.5,
                    help="fraction of the tweets pool whose labels stage 1 also learns")
    ap.add_argument("--nb-init", type=float, default=3.0)
    ap.add_argument("--svd-init", action=argparse.BooleanOptionalAction, default=True,
                    help="PPMI-SVD word vectors in the other embedding dims")
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--stage2", action="store_true",
                    help="also train the adapter with torch + peft into --work/python-adapter (a cross-check)")
    ap.add_argument("--data-only", action="store_true",
                    help="only write the adapter's training and dev sets into --work (no base training)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_all(SEED)
    t_start = time.time()
    out, work = Path(args.out), Path(args.work)
    base_dir, adapter_dir = out / "base", work / "python-adapter"
    for d in () if args.data_only else (base_dir, adapter_dir):
        if d.exists():
            shutil.rmtree(d)

    pool = read_pool()
    tweets = read_tweets()
    rng = random.Random(SEED)
    high = [r for r in pool if r[2] >= 75]
    low = [(s, l) for s, l, a in pool if a < 75]
    high_sorted = sorted(high)
    rng.shuffle(high_sorted)
    dev = sorted([r for r in high_sorted if r[2] == 100][:150])  # dev: 150 AllAgree sentences of the pool
    dev_set = {r[0] for r in dev}
    adapter_pb = [(s, l) for s, l, _ in high if s not in dev_set]
    dev = [(s, l) for s, l, _ in dev]
    tw = sorted(tweets)
    rng.shuffle(tw)
    tweets_dev, tw = sorted(tw[:400]), tw[400:]
    tweets_base = tw[:int(len(tw) * args.tweets_in_base)]
    adapter_rows = adapter_pb + tw
    rng.shuffle(adapter_rows)
    write_rows(work / "adapter_train.csv", adapter_rows)
    write_rows(work / "dev.csv", dev + tweets_dev)
    if args.data_only:
        return
    log(f"PhraseBank pool {len(pool)}: base-supervised (agree<75) {len(low)}, adapter (agree>=75) {len(adapter_pb)}, "
        f"dev {len(dev)}; tweets pool {len(tweets)}: base-supervised {len(tweets_base)}, adapter {len(tw)}, "
        f"dev {len(tweets_dev)}")
    base_sup = low + tweets_base

    texts = [r[0] for r in pool] + [s for s, _ in tweets]
    tok = build_tokenizer(texts, base_dir, args.vocab)
    V = tok.get_vocab_size() + N_SENTINELS
    enc = {s: tok.encode(s).ids[:-1] for s in texts}  # without </s>
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
    if args.svd_init:
        t0 = time.time()
        vecs = ppmi_svd([enc[s] for s in texts], V, args.d_model - 2)
        with torch.no_grad():
            model.shared.weight[:, 2:] = torch.from_numpy(vecs).float()
        log(f"PPMI-SVD init of {args.d_model - 2} embedding dims in {time.time() - t0:.0f}s")
    if args.nb_init:
        # Data-informed init: embedding dims 0 and 1 = naive-Bayes log-count ratios (positive vs rest, negative
        # vs rest) of each token, computed on the stage-1 supervised sentences only. Without it the tiny
        # from-scratch model stays at the majority class for far longer than the CPU budget allows.
        cnt = {l: torch.ones(V) for l in LABELS}
        for s, l in base_sup:
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
            a, _ = ev.evaluate(m, tok, dev)
            b, _ = ev.evaluate(m, tok, tweets_dev)
            return (f"dev PhraseBank acc {a['accuracy']:.3f} F1 {a['macro_f1']:.3f}, "
                    f"tweets acc {b['accuracy']:.3f} F1 {b['macro_f1']:.3f}")
        return f

    # ---------------- stage 1
    drng = random.Random(SEED + 1)

    def stage1_examples(ep):
        part = drng.sample(texts, min(args.denoise_per_epoch, len(texts)))
        ex = [span_corrupt(enc[s], drng, V) for s in part]
        ex += [(enc[s] + [1], lab_ids[l]) for s, l in base_sup]
        return ex

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
    log_info = {
        "epochs1": args.epochs1, "lr1": args.lr1, "denoise_per_epoch": args.denoise_per_epoch,
        "nb_init": args.nb_init, "svd_init": args.svd_init, "params": n_params, "vocab_size": V,
        "d_model": args.d_model, "layers": args.layers, "dec_layers": args.dec_layers, "d_ff": args.d_ff,
        "base_supervised_phrasebank": len(low), "base_supervised_tweets": len(tweets_base),
        "adapter_train": len(adapter_rows), "dev": len(dev) + len(tweets_dev), "torch_threads": args.threads}

    if args.stage2:
        # ---------------- stage 2 (LoRA), the Python cross-check of `finserve train`
        from peft import LoraConfig, TaskType, get_peft_model
        seed_all(SEED + 2)
        base = ev.load_base(base_dir)
        lcfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                          target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
        pm = get_peft_model(base, lcfg)
        pm.print_trainable_parameters()
        sup = [(enc[s] + [1], lab_ids[l]) for s, l in adapter_rows]
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
        log_info.update(epochs2=args.epochs2, lr2=args.lr2)
    elapsed = time.time() - t_start
    log(f"training done in {elapsed:.0f}s")
    (out / "training_log.json").write_text(json.dumps({"seconds": round(elapsed), **log_info}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

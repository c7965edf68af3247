#!/usr/bin/env python3
"""Build the parity fixtures for finserve (tiny mT5 / T5 models + PEFT LoRA adapters).

CPU only, offline, fixed seeds. Run from anywhere:

    HF_HUB_OFFLINE=1 /work/venv/bin/python tests/parity/make_fixtures.py
    HF_HUB_OFFLINE=1 /work/venv/bin/python tests/parity/make_fixtures.py --finserve target/release/finserve

See tests/parity/README.md for what every file contains.
"""
import argparse
import copy
import csv
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import transformers
import peft
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSeq2SeqLM, MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = HERE / "fixtures"
DATA = Path(os.environ.get("FPB_DIR", "/work/shared/data/financial_phrasebank"))
if not DATA.exists():
    DATA = REPO / "models" / "data" / "financial_phrasebank"

LABELS = ["negative", "neutral", "positive"]
N_DEC = 8  # decoder positions in the logits fixtures
GREEDY_MAX_NEW = 32
GREEDY_MIN_OK = 24
TARGET_LENS = [3, 15, 45]


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def f32list(t):
    """float32 tensor -> list of Python floats printed with numpy's shortest *float32* round-trip repr.

    Parsing a number as f32 (or as f64 and rounding to f32) gives back the exact float32 bits."""
    a = t.detach().to(torch.float32).cpu().numpy().reshape(-1)
    return [float(str(x)) for x in a]


def dump_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def read_csv(name):
    with open(DATA / name, newline="", encoding="utf-8") as f:
        return [(r["sentence"], r["label"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

NORM_RULES = (
    # a small NFKC-like rule set (the full nmt_nfkc charsmap would add ~300 KB to every tokenizer.json);
    # enough to exercise the Precompiled normalizer: 1->1, 1->many and many->1 code point mappings.
    [("9", "20"), ("A", "20"), ("D", "20"), ("A0", "20"), ("3000", "20"),
     ("FB01", "66 69"), ("FB02", "66 6C"), ("BD", "31 2044 32"), ("2126", "3A9"), ("61 308", "E4"),
     ("41 308", "C4"), ("6F 308", "F6"), ("2024", "2E"), ("2026", "2E 2E 2E")]
    + [(f"{c:X}", f"{c - 0xFF01 + 0x21:X}") for c in range(0xFF01, 0xFF5F)]  # full-width ASCII
)


def _rules_tsv():
    p = Path(tempfile.gettempdir()) / "finserve_spm_rules.tsv"
    p.write_text("".join(f"{a}\t{b}\n" for a, b in NORM_RULES))
    return p


def train_spm(sentences, vocab_size, extra_args=None):
    """Train a SentencePiece unigram model in memory; returns the serialized ModelProto bytes."""
    buf = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        normalization_rule_tsv=str(_rules_tsv()),
        num_threads=1,
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    if extra_args:
        kwargs.update(extra_args)
    spm.SentencePieceTrainer.train(**kwargs)
    return buf.getvalue()


def spm_to_tokenizer(model_bytes):
    """SentencePiece unigram proto -> tokenizers.Tokenizer with the same structure as mT5's tokenizer.json."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    assert vocab[0][0] == "<pad>" and vocab[1][0] == "</s>" and vocab[2][0] == "<unk>", vocab[:3]
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(charsmap),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("</s>", special=True),
                            AddedToken("<unk>", special=True)])
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    return tok, proto


def build_tokenizer(report):
    rows = read_csv("phrasebank_allagree.csv")
    seen, sents = set(), []
    for s, _ in rows:
        if s not in seen:
            seen.add(s)
            sents.append(s)
    train = sents[:400]
    model_bytes = train_spm(train, 250)
    tok, proto = spm_to_tokenizer(model_bytes)
    path = OUT / "tokenizer.json"
    tok.save(str(path), pretty=True)
    tok = Tokenizer.from_file(str(path))
    # cross-check against the sentencepiece library itself on all training sentences + extras
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    mism = 0
    for s in sents[:1000]:
        a = tok.encode(s).ids
        b = sp.encode(s) + [1]
        if a != b:
            mism += 1
    report["tokenizer_vs_sentencepiece_mismatches_of_1000"] = mism
    report["tokenizer_vocab_size"] = tok.get_vocab_size()
    enc = {l: tok.encode(l) for l in LABELS}
    report["label_pieces"] = {l: list(zip(e.tokens, e.ids)) for l, e in enc.items()}
    firsts = [e.ids[0] for e in enc.values()]
    multi = [len(e.ids) > 2 for e in enc.values()]
    assert len(set(firsts)) < 3 or all(multi), "labels neither share a first piece nor are multi-piece"
    return tok, model_bytes, sents


def tokenizer_cases(tok):
    cases = [
        "", " ", "Operating profit rose .", "  Operating   profit\trose .  ", "negative", "neutral", "positive",
        "Sepp+ñl+ñ said EUR 5.7 mn .", "W+ñrtsil+ñ x20ac 1,000", "ＡＢＣ １２３ ﬁnance",  # NFKC via charsmap
        "Zürich £ 12 ½", "日本語 🙂", "Line\nbreak", "a  b   c    d",
    ]
    out = []
    for s in cases:
        e = tok.encode(s)
        out.append({"text": s, "ids": e.ids, "tokens": e.tokens,
                    "decoded": tok.decode(e.ids, skip_special_tokens=True)})
    dump_json(OUT / "tokenizer_cases.json", {"cases": out})


# ---------------------------------------------------------------------------------------------
# base models
# ---------------------------------------------------------------------------------------------

def retie_mt0(model):
    """mt0 layout: untied lm_head, but both stacks read `shared`."""
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
    return model


def perturb_norms(model, gen, scale=0.1):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=gen))


def make_mt5(vocab_tok, seed, lm_scale):
    seed_all(seed)
    cfg = MT5Config(
        vocab_size=vocab_tok + 6, d_model=32, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
    )
    cfg.tie_word_embeddings = False
    model = MT5ForConditionalGeneration(cfg)
    retie_mt0(model)
    gen = torch.Generator().manual_seed(seed + 1)
    perturb_norms(model, gen)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_scale)
    model.eval()
    return model


def make_t5(vocab_tok, seed):
    seed_all(seed)
    cfg = T5Config(
        vocab_size=vocab_tok + 4, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="relu", is_encoder_decoder=True,
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    )
    model = T5ForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    perturb_norms(model, gen)
    model.eval()
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    return model


def clean_safetensors_dir(d, drop_prefixes=("encoder.embed_tokens.", "decoder.embed_tokens.")):
    """Strip *.embed_tokens.weight from every safetensors file (and the index) so the checkpoint looks like mt0."""
    removed = []
    for f in sorted(d.glob("*.safetensors")):
        sd = load_file(str(f))
        keep = {k: v.contiguous() for k, v in sd.items() if not k.startswith(drop_prefixes)}
        if len(keep) != len(sd):
            removed += [k for k in sd if k not in keep]
            save_file(keep, str(f), metadata={"format": "pt"})
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        j = json.loads(idx.read_text())
        j["weight_map"] = {k: v for k, v in j["weight_map"].items() if not k.startswith(drop_prefixes)}
        total = 0
        for f in sorted(d.glob("*.safetensors")):
            total += sum(t.numel() * t.element_size() for t in load_file(str(f)).values())
        j.setdefault("metadata", {})["total_size"] = total
        idx.write_text(json.dumps(j, indent=2, sort_keys=True) + "\n")
    return removed


def saved_keys(d):
    keys = []
    for f in sorted(d.glob("*.safetensors")):
        keys += list(load_file(str(f)).keys())
    return sorted(keys)


def load_base(d, kind):
    cls = MT5ForConditionalGeneration if kind == "mt5" else T5ForConditionalGeneration
    model, info = cls.from_pretrained(str(d), output_loading_info=True, torch_dtype=torch.float32)
    if kind == "mt5":
        retie_mt0(model)
    model.eval()
    return model, info


def save_base(model, d, tok_path, kind, **kw):
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(str(d), **kw)
    if kind == "mt5":
        # transformers 5 may write tie_word_embeddings=true for MT5; real mt0 configs say false.
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tie_word_embeddings"] = False
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    removed = clean_safetensors_dir(d) if kind == "mt5" else []
    shutil.copy(tok_path, d / "tokenizer.json")
    gc = d / "generation_config.json"
    return removed


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# computing references
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def logits_of(model, ids, dec):
    out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                decoder_input_ids=torch.tensor([dec]), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def greedy(model, ids, n=GREEDY_MAX_NEW):
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, num_beams=1, use_cache=False,
                         decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    seq = out[0].tolist()
    assert seq[0] == 0
    return seq[1:]


@torch.no_grad()
def label_scores(model, ids, label_ids):
    lps = []
    for tgt in label_ids:
        dec = [0] + tgt[:-1]
        lg = logits_of(model, ids, dec)
        lsm = torch.log_softmax(lg.double(), dim=-1)  # summed in f64 from f32 logits
        lps.append(float(sum(lsm[i, t] for i, t in enumerate(tgt))))
    m = max(lps)
    ex = [np.exp(x - m) for x in lps]
    z = sum(ex)
    return lps, [e / z for e in ex]


def pick_inputs(tok, sents):
    cands = list(sents) + sorted({" ".join(s.split()[:k]) for s in sents[:300] for k in (1, 2)})
    lens = [(len(tok.encode(s).ids), s) for s in cands]
    chosen = []
    for target in TARGET_LENS:
        # prefer sentences with a non-ASCII char for the longest input (exercises the charsmap)
        cands = sorted(lens, key=lambda x: (abs(x[0] - target), x[1]))
        if target == TARGET_LENS[-1]:
            na = [c for c in cands if any(ord(ch) > 127 for ch in c[1]) and abs(c[0] - target) <= 6]
            if na:
                cands = na
        chosen.append(cands[0][1])
    return chosen


def bucket_tables():
    """HF's relative-position buckets (T5Attention._relative_position_bucket) for relative positions
    memory_pos - query_pos in [-300, 300], for the bucket configs used here and by real (m)T5/mt0."""
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-300, 301)
    tables = []
    for bidirectional in (True, False):
        for nb, md in ((8, 16), (16, 32), (32, 128)):
            b = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb,
                                                      max_distance=md)
            tables.append({"bidirectional": bidirectional, "num_buckets": nb, "max_distance": md,
                           "relative_position_min": -300, "buckets": b.tolist()})
    dump_json(OUT / "relative_buckets.json", {"note": "relative_position = memory(key) position - query position; "
                                             "encoder uses bidirectional=True, decoder self-attention False",
                                             "tables": tables})


def build_case(name, base_name, adapters, inputs, tok, base_model, peft_model, label_ids, dec_tails, report):
    peft_model.eval()
    merged = copy.deepcopy(peft_model).merge_and_unload() if adapters else base_model
    merged.eval()
    rec = {
        "model": base_name,
        "adapters": adapters,
        "inputs": inputs,
        "input_ids": [tok.encode(s).ids for s in inputs],
        "decoder_input_ids": [],
        "logits": [],
        "merged_logits": [],
        "greedy_max_new_tokens": GREEDY_MAX_NEW,
        "greedy": [],
        "labels": LABELS,
        "label_ids": label_ids,
        "label_logprobs": [],
        "label_probs": [],
        "vocab_size": base_model.config.vocab_size,
        "notes": "logits: PEFT model with runtime (unmerged) LoRA, batch of 1, no padding; merged_logits: "
                 "merge_and_unload(); greedy from the merged model; label_* from the unmerged PEFT model "
                 "(log_softmax over the full vocab, summed over target positions incl. </s>).",
    }
    max_diff_merge, max_diff_base, min_greedy, max_abs = 0.0, 0.0, 99, 0.0
    for i, ids in enumerate(rec["input_ids"]):
        dec = [0] + dec_tails[i]
        rec["decoder_input_ids"].append(dec)
        lg = logits_of(peft_model, ids, dec)
        mg = logits_of(merged, ids, dec)
        bg = logits_of(base_model, ids, dec)
        max_diff_merge = max(max_diff_merge, float((lg - mg).abs().max()))
        max_diff_base = max(max_diff_base, float((mg - bg).abs().max()))
        max_abs = max(max_abs, float(lg.abs().max()))
        rec["logits"].append([f32list(r) for r in lg])
        rec["merged_logits"].append([f32list(r) for r in mg])
        g = greedy(merged, ids)
        g2 = greedy(peft_model, ids) if adapters else g
        if g != g2:
            report.setdefault("warnings", []).append(f"{name}: greedy differs unmerged vs merged for input {i}")
        n_before_eos = g.index(1) if 1 in g else len(g)
        min_greedy = min(min_greedy, n_before_eos)
        rec["greedy"].append(g)
        lps, ps = label_scores(peft_model, ids, label_ids)
        lps_m, ps_m = label_scores(merged, ids, label_ids)
        assert max(abs(a - b) for a, b in zip(ps, ps_m)) < 1e-4
        rec["label_logprobs"].append(lps)
        rec["label_probs"].append(ps)
    rel = max_diff_merge / max(1.0, max_abs)
    assert rel < 2e-5, (name, max_diff_merge, max_abs)
    if adapters:
        assert max_diff_base > 1e-2, (name, "adapter does not change the logits", max_diff_base)
    assert min_greedy >= GREEDY_MIN_OK, (name, "greedy hit EOS early", min_greedy)
    dump_json(OUT / name / "reference.json", rec)
    report["cases"][name] = {
        "max|unmerged-merged|": max_diff_merge, "max|logit|": max_abs, "max|merged-base|": max_diff_base,
        "greedy_tokens_before_eos_min": min_greedy,
        "label_probs": [[round(p, 4) for p in ps] for ps in rec["label_probs"]],
        "input_lens": [len(x) for x in rec["input_ids"]],
    }
    return merged


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------

def make_adapter(base, cfg, seed, b_scale=1.0, tweak=None):
    """LoRA with non-zero A and B, sized so that scaling * B @ A has entries of about `0.6 * b_scale` times
    the std of the wrapped base weight (big enough to move the logits clearly, small enough to keep the
    tiny random model well conditioned, so f32 noise stays ~1e-5)."""
    seed_all(seed)
    m = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                r, sc = mod.r["default"], mod.scaling["default"]
                w_std = float(mod.get_base_layer().weight.std())
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                A.copy_(torch.randn(A.shape, generator=gen))
                # entries of B @ A ~ std_B * sqrt(r)
                B.copy_(torch.randn(B.shape, generator=gen) * (0.6 * b_scale * w_std / (sc * math.sqrt(r))))
    if tweak:
        tweak(m, gen)
    m.eval()
    return m


def lora_summary(m):
    out = {}
    for n, mod in m.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[n.replace("base_model.model.", "")] = {"r": mod.r["default"], "scaling": mod.scaling["default"]}
    return out


def tidy_adapter_dir(d, base_name):
    """Make the saved adapter reproducible: no auto-generated README, no absolute path, sorted target list
    (PEFT stores target_modules from a Python set, whose order depends on PYTHONHASHSEED)."""
    (d / "README.md").unlink(missing_ok=True)
    p = d / "adapter_config.json"
    j = json.loads(p.read_text())
    j["base_model_name_or_path"] = base_name
    for k in ("target_modules", "modules_to_save"):
        if isinstance(j.get(k), list):
            j[k] = sorted(j[k])
    p.write_text(json.dumps(j, indent=2, sort_keys=True) + "\n")


def check_saved_adapter(d, want_bin):
    files = sorted(p.name for p in d.iterdir())
    if want_bin:
        assert "adapter_model.bin" in files and "adapter_model.safetensors" not in files, files
    else:
        assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files, files
    return files


# ---------------------------------------------------------------------------------------------
# export check (--finserve)
# ---------------------------------------------------------------------------------------------

def export_check(binary, case, base_dir, adapter_dir, kind, ref_merged, inputs_ids, dec):
    tmp = Path(tempfile.mkdtemp(prefix=f"finserve-merge-{case}-"))
    out = tmp / "out"
    cmd = [binary, "merge", "--model", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    print("running:", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL {case}: finserve merge exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return False
    cls = MT5ForConditionalGeneration if kind == "mt5" else T5ForConditionalGeneration
    model, info = cls.from_pretrained(str(out), output_loading_info=True, torch_dtype=torch.float32)
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    if kind == "mt5":
        retie_mt0(model)
    allowed_missing = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if kind == "t5":
        allowed_missing |= {"lm_head.weight"}
    ok = True
    if set(missing) - allowed_missing or unexpected:
        print(f"FAIL {case}: missing={missing} unexpected={unexpected}")
        ok = False
    model.eval()
    worst = 0.0
    for ids, d in zip(inputs_ids, dec):
        a = logits_of(model, ids, d)
        b = logits_of(ref_merged, ids, d)
        worst = max(worst, float((a - b).abs().max()))
    if worst > 1e-5:
        print(f"FAIL {case}: max |finserve merged - peft merged| = {worst:.3g}")
        ok = False
    print(f"{'PASS' if ok else 'FAIL'} export {case}: max diff {worst:.3g}, missing={missing}")
    shutil.rmtree(tmp, ignore_errors=True)
    return ok


def run_export_checks(binary):
    """`finserve merge` must give the same model as PEFT merge_and_unload(), for mt5_qv and t5_qv."""
    ok = True
    for case, base_name, adapter, kind in (("mt5_qv", "mt5_base", "qv", "mt5"), ("t5_qv", "t5_base", "t5_qv", "t5")):
        ref = json.loads((OUT / case / "reference.json").read_text())
        base, _ = load_base(OUT / base_name, kind)
        merged = PeftModel.from_pretrained(base, str(OUT / "adapters" / adapter)).merge_and_unload()
        merged.eval()
        ok &= export_check(binary, case, OUT / base_name, OUT / "adapters" / adapter, kind, merged,
                           ref["input_ids"], ref["decoder_input_ids"])
    print("EXPORT CHECK:", "PASS" if ok else "FAIL")
    return ok


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--finserve", help="path to the finserve binary: also run the merge export check")
    ap.add_argument("--out", help="output dir (default tests/parity/fixtures)")
    ap.add_argument("--check-only", action="store_true",
                    help="do not regenerate anything; only run the --finserve export check on existing fixtures")
    args = ap.parse_args()
    global OUT
    if args.out:
        OUT = Path(args.out).resolve()
    if args.check_only:
        if not args.finserve:
            ap.error("--check-only needs --finserve")
        return 0 if run_export_checks(args.finserve) else 1
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "sentencepiece": spm.__version__,
                           "tokenizers": __import__("tokenizers").__version__},
              "cases": {}}

    tok, model_bytes, sents = build_tokenizer(report)
    tok_path = OUT / "tokenizer.json"
    tokenizer_cases(tok)
    bucket_tables()
    V = tok.get_vocab_size()
    inputs = pick_inputs(tok, sents)
    label_ids = [tok.encode(l).ids for l in LABELS]
    gen = torch.Generator().manual_seed(1234)
    dec_tails = [torch.randint(3, V, (N_DEC - 1,), generator=gen).tolist() for _ in inputs]

    # ---- mT5 base: search a seed whose greedy output never hits EOS early (base and all adapters are checked
    # later by assertions; the seed search only looks at the base).
    best = None  # (min distinct tokens over the inputs, seed)
    for seed in range(100, 140):
        cand = make_mt5(V, seed, lm_scale=0.2)
        div = 99
        for s in inputs:
            g = greedy(cand, tok.encode(s).ids)
            div = min(div, -1 if 1 in g[:GREEDY_MAX_NEW] else len(set(g)))
        if best is None or div > best[0]:
            best = (div, seed)
        if div >= 10:
            break
    assert best[0] > 0, best
    mt5 = make_mt5(V, best[1], lm_scale=0.2)
    report["mt5_seed"] = best[1]
    report["mt5_seed_min_distinct_greedy_tokens"] = best[0]
    assert mt5 is not None
    d_mt5 = OUT / "mt5_base"
    removed = save_base(mt5, d_mt5, tok_path, "mt5")
    report["mt5_saved_keys_stripped"] = removed
    keys = saved_keys(d_mt5)
    assert "shared.weight" in keys and "lm_head.weight" in keys and not any("embed_tokens" in k for k in keys), keys
    mt5, info = load_base(d_mt5, "mt5")
    report["mt5_reload_missing_keys"] = sorted(info["missing_keys"])
    report["mt5_reload_unexpected_keys"] = sorted(info["unexpected_keys"])

    # sharded copy
    d_sh = OUT / "mt5_base_sharded"
    save_base(mt5, d_sh, tok_path, "mt5", max_shard_size="100KB")
    shards = sorted(p.name for p in d_sh.glob("*.safetensors"))
    assert len(shards) >= 2 and (d_sh / "model.safetensors.index.json").exists(), shards
    assert saved_keys(d_sh) == keys
    m2, _ = load_base(d_sh, "mt5")
    assert same_weights(mt5, m2)
    report["sharded_files"] = shards

    # pytorch_model.bin copy
    d_bin = OUT / "mt5_base_bin"
    if d_bin.exists():
        shutil.rmtree(d_bin)
    d_bin.mkdir()
    sd = {}
    for f in sorted(d_mt5.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    torch.save({k: sd[k].clone().contiguous() for k in sorted(sd)}, d_bin / "pytorch_model.bin")
    shutil.copy(d_mt5 / "config.json", d_bin / "config.json")
    if (d_mt5 / "generation_config.json").exists():
        shutil.copy(d_mt5 / "generation_config.json", d_bin / "generation_config.json")
    shutil.copy(tok_path, d_bin / "tokenizer.json")
    m3, _ = load_base(d_bin, "mt5")
    assert same_weights(mt5, m3)

    # ---- T5 v1.0 base
    t5 = make_t5(V, 300)
    d_t5 = OUT / "t5_base"
    save_base(t5, d_t5, tok_path, "t5")
    report["t5_saved_keys"] = saved_keys(d_t5)
    t5, info = load_base(d_t5, "t5")
    report["t5_reload_missing_keys"] = sorted(info["missing_keys"])
    assert t5.lm_head.weight.data_ptr() == t5.shared.weight.data_ptr()

    # ---- adapters
    A = OUT / "adapters"
    ST = TaskType.SEQ_2_SEQ_LM
    specs = {}
    specs["qv"] = (mt5, LoraConfig(task_type=ST, r=4, lora_alpha=8, target_modules=["q", "v"],
                                   lora_dropout=0.0, init_lora_weights=False), 11, None, False)
    specs["all_patterns"] = (mt5, LoraConfig(
        task_type=ST, r=4, lora_alpha=16, use_rslora=True, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        rank_pattern={"decoder.block.2.layer.1.EncDecAttention.q": 2, "wo": 6},
        alpha_pattern={"EncDecAttention.q": 4, "encoder.block.0.layer.0.SelfAttention.k": 32},
    ), 12, None, False)

    def perturb_lm_head(m, gen):
        with torch.no_grad():
            w = m.base_model.model.lm_head.modules_to_save["default"].weight
            w.add_(0.05 * torch.randn(w.shape, generator=gen))
    specs["modules_to_save"] = (mt5, LoraConfig(task_type=ST, r=4, lora_alpha=8, target_modules=["q", "v"],
                                                modules_to_save=["lm_head"], lora_dropout=0.0,
                                                init_lora_weights=False), 13, perturb_lm_head, False)
    specs["qv_bin"] = (mt5, LoraConfig(task_type=ST, r=4, lora_alpha=8, target_modules=["q", "v"],
                                       lora_dropout=0.0, init_lora_weights=False), 14, None, True)
    specs["regex_layers"] = (mt5, LoraConfig(
        task_type=ST, r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=r".*decoder\.block\.1\..*(SelfAttention|EncDecAttention)\.(q|v)"), 15, None, False)
    specs["layers_to_transform"] = (mt5, LoraConfig(
        task_type=ST, r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q", "v", "wo"], layers_to_transform=[1], layers_pattern="block"), 16, None, False)
    specs["t5_qv"] = (t5, LoraConfig(task_type=ST, r=4, lora_alpha=8, target_modules=["q", "v"],
                                     lora_dropout=0.0, init_lora_weights=False), 17, None, False)

    report["adapters"] = {}
    peft_models = {}
    for name, (base, cfg, seed, tweak, as_bin) in specs.items():
        b_scale = 0.5 if tweak == "b_half" else 1.0
        m = make_adapter(base, cfg, seed, b_scale=b_scale, tweak=None if tweak == "b_half" else tweak)
        d = A / name
        if d.exists():
            shutil.rmtree(d)
        m.save_pretrained(str(d), safe_serialization=not as_bin)
        tidy_adapter_dir(d, "t5_base" if base is t5 else "mt5_base")
        files = check_saved_adapter(d, as_bin)
        summ = lora_summary(m)
        assert summ, name
        report["adapters"][name] = {"files": files, "lora_modules": summ}
        # reload from disk exactly as a user would, to make sure the saved adapter is what we test
        base_dir = d_t5 if base is t5 else d_mt5
        kind = "t5" if base is t5 else "mt5"
        fresh, _ = load_base(base_dir, kind)
        pm = PeftModel.from_pretrained(fresh, str(d))
        pm.eval()
        peft_models[name] = pm

    # ---- cases
    cases = [
        ("mt5_plain", "mt5_base", [], mt5, mt5),
        ("mt5_qv", "mt5_base", ["adapters/qv"], mt5, peft_models["qv"]),
        ("mt5_all_patterns", "mt5_base", ["adapters/all_patterns"], mt5, peft_models["all_patterns"]),
        ("mt5_modules_to_save", "mt5_base", ["adapters/modules_to_save"], mt5, peft_models["modules_to_save"]),
        ("mt5_qv_bin", "mt5_base", ["adapters/qv_bin"], mt5, peft_models["qv_bin"]),
        ("mt5_regex_layers", "mt5_base", ["adapters/regex_layers"], mt5, peft_models["regex_layers"]),
        ("mt5_layers_to_transform", "mt5_base", ["adapters/layers_to_transform"], mt5,
         peft_models["layers_to_transform"]),
        ("t5_qv", "t5_base", ["adapters/t5_qv"], t5, peft_models["t5_qv"]),
    ]
    merged_models = {}
    for name, base_name, adapters, base, pm in cases:
        merged_models[name] = build_case(name, base_name, adapters, inputs, tok, base, pm, label_ids, dec_tails,
                                         report)

    dump_json(OUT / "report.json", report)
    sizes = {}
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
    print(json.dumps({k: v for k, v in report.items() if k != "adapters"}, indent=1)[:6000])
    print("total fixture bytes:", total)
    assert total < 3_000_000, total

    ok = True
    if args.finserve:
        ok = run_export_checks(args.finserve)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""finserve against transformers on one GPU: a random mt0-large-shaped model (d_model 1024, 24+24
layers, vocab 250112) with a q,v LoRA adapter, bf16 on both sides, at concurrency 1, 16 and 64.

    benches/gpu.sh build      # here: the cuda binary (target-cuda/release/finserve)
    benches/gpu.sh run        # on the GPU machine: this script

finserve serves over HTTP (`--device cuda --dtype bf16`), N clients each sending one sentence (or
one 3-token greedy generation) at a time; transformers scores the three labels (or generates) for
batches of N in-process, which is the best a client of it could do. Sentences per second on the
same 256 Financial PhraseBank sentences. Not a test: it reports, it asserts nothing.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import LABELS, NEW_TOKENS, ROOT, Server, sentences, tokenize  # noqa: E402

LEVELS = [1, 16, 64]


def build(work: Path) -> tuple[Path, Path]:
    base, adapter = work / "base", work / "adapter"
    if not (base / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "benches/make_mt0_small.py"), str(work),
                        str(ROOT / "models/demo/base/tokenizer.json")],
                       check=True, env={**os.environ, "MT0_SHAPE": "large"})
    return base, adapter


def finserve_rates(binary: Path, base: Path, adapter: Path, texts: list[str]) -> dict:
    server = Server(binary, base, adapter, "--device", "cuda", "--dtype", "bf16",
                    "--max-batch-size", "64", "--max-concurrent-requests", "512")
    try:
        rates = {}
        for n in LEVELS:
            conns = [server.conn() for _ in range(n)]
            for kind, route, body in [
                ("sentiment", "/v1/sentiment", lambda t: {"inputs": t}),
                ("generate", "/v1/generate",
                 lambda t: {"inputs": t, "parameters": {"max_new_tokens": NEW_TOKENS}}),
            ]:
                def client(k):
                    for t in texts[k::n]:
                        server.post(conns[k], route, body(t))
                start = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    list(pool.map(client, range(n)))
                rates[(kind, n)] = len(texts) / (time.perf_counter() - start)
        return rates
    finally:
        server.close()


def transformers_rates(base: Path, texts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForSeq2SeqLM
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base), dtype=torch.bfloat16).to("cuda").eval()
    for stack in (model.encoder, model.decoder):
        stack.embed_tokens.weight = model.shared.weight
    _, ids, labels = tokenize(texts)
    width = max(len(l) for l in labels)

    def pad(rows):
        m = max(len(r) for r in rows)
        t = torch.tensor([r + [0] * (m - len(r)) for r in rows], device="cuda")
        mask = (t != 0).long()
        return t, mask

    def score(batch):
        x, mask = pad(batch)
        enc = model.encoder(input_ids=x, attention_mask=mask).last_hidden_state
        b, L = len(batch), len(labels)
        dec = torch.tensor([[0] + l[:-1] + [0] * (width - len(l)) for l in labels] * b, device="cuda")
        tgt = torch.tensor([l + [0] * (width - len(l)) for l in labels] * b, device="cuda")
        logits = model(encoder_outputs=(enc.repeat_interleave(L, 0),),
                       attention_mask=mask.repeat_interleave(L, 0), decoder_input_ids=dec).logits
        lp = logits.float().log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
        return lp.sum(-1).view(b, L).softmax(-1).cpu()

    def gen(batch):
        x, mask = pad(batch)
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                              do_sample=False, num_beams=1).cpu()

    rates = {}
    with torch.inference_mode():
        score(ids[:2])
        for n in LEVELS:
            for kind, fn in [("sentiment", score), ("generate", gen)]:
                torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(0, len(ids), n):
                    fn(ids[i:i + n])
                torch.cuda.synchronize()
                rates[(kind, n)] = len(ids) / (time.perf_counter() - start)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--finserve", type=Path, default=ROOT / "target-cuda/release/finserve")
    ap.add_argument("--work", type=Path, default=Path("/tmp/finserve-gpu-bench"))
    ap.add_argument("--sentences", type=int, default=256)
    args = ap.parse_args()
    import torch
    gpu = torch.cuda.get_device_name(0)
    base, adapter = build(args.work)
    texts = sentences(args.sentences)
    ours = finserve_rates(args.finserve, base, adapter, texts)
    theirs = transformers_rates(base, texts)
    print(f"GPU: {gpu}; torch {torch.__version__}; mt0-large shape, bf16, {len(texts)} sentences, sentences/s\n")
    print("| work | concurrency / batch | finserve bf16 | transformers bf16 | ratio |")
    print("|---|---|---|---|---|")
    for kind in ["sentiment", "generate"]:
        for n in LEVELS:
            a, b = ours[(kind, n)], theirs[(kind, n)]
            print(f"| {kind} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()

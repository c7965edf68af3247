"""Writes an mt0-small-shaped checkpoint with random weights plus a random PEFT LoRA adapter, for
measuring load/merge time and peak memory at a realistic size without downloading mt0-small.

    python benches/make_mt0_small.py OUT_DIR [TOKENIZER_JSON]
    MT0_SHAPE=base python benches/make_mt0_small.py OUT_DIR [TOKENIZER_JSON]    (mt0-base: 768/2048/12x64, 12+12)
    MT0_SHAPE=large python benches/make_mt0_small.py OUT_DIR [TOKENIZER_JSON]   (mt0-large: 1024/2816/16x64, 24+24)

OUT_DIR/base: config.json (mt5, 512/1024/6x64, 8+8 layers, vocab 250112, untied lm_head),
model.safetensors (shared.weight + lm_head.weight, no embed_tokens copies, like mt0) and the
given tokenizer.json; OUT_DIR/adapter: r=8, alpha=32, q and v, non-zero B.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import save_file
from transformers import MT5Config, MT5ForConditionalGeneration


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    shapes = {
        "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
        "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
        "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
    }
    shape = shapes[os.environ.get("MT0_SHAPE", "small")]
    cfg = MT5Config(vocab_size=250112, feed_forward_proj="gated-gelu", **shape)
    cfg.tie_word_embeddings = False
    model = MT5ForConditionalGeneration(cfg).eval()
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config, indent=2))
    if len(sys.argv) > 2:
        shutil.copy(sys.argv[2], base / "tokenizer.json")
    peft_cfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=32, lora_dropout=0.1,
                          target_modules=["q", "v"], init_lora_weights=False)
    get_peft_model(model, peft_cfg).save_pretrained(str(out / "adapter"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""transformers' MT5 on the same mt0-small shapes as benches/engine.rs, for the README comparison.

Random weights (no download), f32, CPU, torch's default threads. Measures the encoder over a
padded batch and one cached decoder step with a 16-token-deep cache, like the criterion bench
(there the cache stays 16 deep; here it grows to 27 over the runs, a negligible difference).

    /path/to/venv/bin/python benches/transformers_bench.py
"""

import time

import torch
from transformers import MT5Config, MT5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


def timed(fn, reps=10):
    fn()
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    best.sort()
    return best[len(best) // 2]


def main():
    torch.manual_seed(0)
    cfg = MT5Config(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                    num_decoder_layers=8, num_heads=6, feed_forward_proj="gated-gelu")
    cfg.tie_word_embeddings = False
    model = MT5ForConditionalGeneration(cfg).eval()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with torch.inference_mode():
        for batch, length in [(1, 32), (8, 64)]:
            ids = torch.arange(length).repeat(batch, 1) + 100
            mask = torch.ones_like(ids)
            enc = timed(lambda: model.encoder(input_ids=ids, attention_mask=mask))
            hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            prefix = torch.arange(16).repeat(batch, 1)
            out = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=prefix,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values

            def step():
                # The cache grows by one token per call (16 -> 27 over the timed runs).
                model(encoder_outputs=(hidden,), attention_mask=mask,
                      decoder_input_ids=torch.full((batch, 1), 5), past_key_values=cache, use_cache=True)
            dec = timed(step)
            print(f"{batch}x{length}: encoder {enc * 1000:.1f} ms ({batch * length / enc:.0f} tokens/s), "
                  f"decode step {dec * 1000:.1f} ms ({batch / dec:.1f} tokens/s)")


if __name__ == "__main__":
    main()

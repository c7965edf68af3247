"""Drives a running finserve with the real huggingface_hub InferenceClient.

    python tests/clients/hf_client.py http://127.0.0.1:PORT

Exits non-zero (with the assertion) when a response does not parse or does not add up.
"""

import math
import sys

from huggingface_hub import InferenceClient


def main(url: str) -> None:
    labels = {"negative", "neutral", "positive"}

    clf = InferenceClient(model=f"{url}/v1/sentiment")
    out = clf.text_classification("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .")
    assert {o.label for o in out} == labels, out
    assert math.isclose(sum(o.score for o in out), 1.0, abs_tol=1e-6), out
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True), out
    top = clf.text_classification("Sales fell .", top_k=1)
    assert len(top) == 1 and top[0].label in labels, top

    gen = InferenceClient(model=f"{url}/v1/generate")
    plain = gen.text_generation("Profit rose .", max_new_tokens=8)
    assert isinstance(plain, str), plain
    full = gen.text_generation("Profit rose .", max_new_tokens=8, details=True)
    assert full.generated_text == plain, (full.generated_text, plain)
    assert full.details.generated_tokens == len(full.details.tokens), full.details
    assert full.details.finish_reason in ("length", "eos_token", "stop_sequence"), full.details

    pieces = list(gen.text_generation("Profit rose .", max_new_tokens=8, stream=True))
    assert pieces and all(isinstance(p, str) for p in pieces), pieces
    events = list(gen.text_generation("Profit rose .", max_new_tokens=8, stream=True, details=True))
    assert events[-1].generated_text == plain, (events[-1], plain)
    assert events[-1].details.generated_tokens == len(events), events[-1]
    assert all(e.generated_text is None for e in events[:-1])
    print("huggingface_hub client: OK")


if __name__ == "__main__":
    main(sys.argv[1])

"""Drives a running finserve with the real `text_generation` client (TGI's Python client).

    python tests/clients/tgi_client.py http://127.0.0.1:PORT

`text_generation.Client` POSTs every call to its base URL itself (TGI's compatibility route
`POST /`, which dispatches on `stream`: a one-element JSON list, or server-sent events). The
routes `/generate` and `/generate_stream` are then checked directly with `requests`.

Exits non-zero (with the assertion) when a response does not parse or does not add up.
"""

import json
import sys

import requests
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import FinishReason


def events(resp: requests.Response) -> list:
    """The JSON payloads of a server-sent event stream."""
    return [json.loads(line[len("data:"):]) for line in resp.iter_lines(decode_unicode=True)
            if line.startswith("data:")]


def main(url: str) -> None:
    client = Client(base_url=url, timeout=60)
    prompt = "Profit rose 20 % ."
    ended = (FinishReason.Length, FinishReason.EndOfSequenceToken)

    # Greedy generation: the client always asks for details (and decoder_input_details=False).
    out = client.generate(prompt, max_new_tokens=3)
    d = out.details
    assert d.finish_reason in ended, out
    assert 1 <= d.generated_tokens <= 3 and len(d.tokens) == d.generated_tokens, out
    assert d.finish_reason != FinishReason.Length or d.generated_tokens == 3, out
    assert out.generated_text == "".join(t.text for t in d.tokens if not t.special), out
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens), out
    assert d.prefill == [] and d.seed is None, out

    # Streaming gives the same tokens, one event each; only the last carries the text and details.
    stream = list(client.generate_stream(prompt, max_new_tokens=3))
    assert stream and all(e.generated_text is None and e.details is None for e in stream[:-1]), stream
    last = stream[-1]
    assert last.generated_text == "".join(e.token.text for e in stream if not e.token.special), stream
    assert last.generated_text == out.generated_text, (last, out)
    assert [e.token.id for e in stream] == [t.id for t in d.tokens], (stream, out)
    assert last.details.generated_tokens == len(stream), last
    assert last.details.finish_reason == d.finish_reason, (last, out)

    # Seeded sampling is reproducible and reports its seed.
    sampled = [client.generate(prompt, max_new_tokens=8, do_sample=True, seed=7) for _ in range(2)]
    assert sampled[0].generated_text == sampled[1].generated_text, sampled
    assert [t.id for t in sampled[0].details.tokens] == [t.id for t in sampled[1].details.tokens], sampled
    assert all(s.details.seed == 7 for s in sampled), sampled

    # A refused request arrives as TGI's {"error", "error_type": "validation"} (the client's class).
    try:
        client.generate(prompt, max_new_tokens=100000)
    except ValidationError as e:
        assert isinstance(e.args[0], str) and e.args[0], e.args
    else:
        raise AssertionError("max_new_tokens over the limit was accepted")

    # TGI's own routes: /generate answers one object, /generate_stream server-sent events.
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 3, "details": True}}
    resp = requests.post(f"{url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, (resp.status_code, resp.text)
    plain = resp.json()
    assert isinstance(plain, dict) and plain["generated_text"] == out.generated_text, plain
    assert plain["details"]["generated_tokens"] == d.generated_tokens, plain

    with requests.post(f"{url}/generate_stream", json=body, timeout=60, stream=True) as resp:
        assert resp.status_code == 200, (resp.status_code, resp.text)
        assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
        sse = events(resp)
    assert sse and sse[-1]["generated_text"] == out.generated_text, sse
    assert all(e["generated_text"] is None for e in sse[:-1]), sse
    assert sse[-1]["details"]["generated_tokens"] == len(sse), sse
    print("text_generation client: OK")


if __name__ == "__main__":
    main(sys.argv[1])

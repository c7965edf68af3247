"""Drives a running finserve with the real `openai` Python client.

    python tests/clients/openai_client.py http://127.0.0.1:PORT MODEL_NAME

Exits non-zero (with the assertion) when a response does not parse or does not add up.
"""

import sys

import openai


def main(url: str, model: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [model]

    prompt = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length"), plain
    assert plain.usage.completion_tokens == len(choice.logprobs.tokens), plain
    assert "".join(choice.logprobs.tokens) == choice.text, plain
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs), plain

    # Greedy streaming gives the same text, chunk by chunk, ending with a finish reason.
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text, chunks
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason, chunks

    messages = [{"role": "system", "content": "Classify the sentiment."}, {"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True)
    reply = chat.choices[0]
    assert reply.message.role == "assistant", chat
    assert "".join(t.token for t in reply.logprobs.content) == reply.message.content, chat
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.message.content, stream
    assert stream[-1].choices[0].finish_reason == reply.finish_reason, stream

    # Seeded sampling is reproducible.
    sampled = [client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.2, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1], sampled

    # An unknown model is the client's NotFoundError.
    try:
        client.completions.create(model="no-such-model", prompt=prompt, max_tokens=2)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("an unknown model was accepted")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

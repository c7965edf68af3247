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

    # stream_options.include_usage: a last chunk without choices carries the usage.
    counted = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == chat.usage.completion_tokens, counted
    assert counted[-1].usage.prompt_tokens == chat.usage.prompt_tokens, counted
    assert all(c.usage is None for c in counted[:-1]), counted

    # The model digest is the system fingerprint.
    assert chat.system_fingerprint and chat.system_fingerprint.startswith("sha256:"), chat

    # Errors arrive in OpenAI's shape: the SDK's exceptions carry the message, type and param.
    try:
        client.completions.create(model="no-such-model", prompt=prompt, max_tokens=2)
    except openai.NotFoundError as e:
        assert "no-such-model" in e.message and e.code == "model_not_found", e.body
    else:
        raise AssertionError("an unknown model was accepted")
    try:
        client.completions.create(model=model, prompt=prompt, max_tokens=100000)
    except openai.UnprocessableEntityError as e:
        assert e.param == "max_tokens" and e.type == "validation", e.body
        assert "max_tokens" in e.message, e.body
    else:
        raise AssertionError("max_tokens over the limit was accepted")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

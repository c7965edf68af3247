"""Drives a running finserve with the real `langchain_openai` chat and completion models.

    python tests/clients/langchain_client.py http://127.0.0.1:PORT MODEL_NAME

ChatOpenAI sends `max_completion_tokens` (not `max_tokens`) and, only with stream_usage,
`stream_options: {"include_usage": true}`; OpenAI (completions) sends the prompt as a one-element
list with `n: 1`, `top_p: 1`, zero penalties and null `logprobs`/`seed`.

Exits non-zero (with the assertion) when a response does not parse or does not add up.
"""

import sys

import openai
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI, OpenAI


def usage(m) -> tuple:
    u = m.usage_metadata
    return u["input_tokens"], u["output_tokens"], u["total_tokens"]


def main(url: str, model: str) -> None:
    base = f"{url}/v1"
    prompt = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."
    chat = ChatOpenAI(base_url=base, api_key="unused", model=model, temperature=0, max_tokens=3, timeout=60)

    # A plain string prompt: greedy text with its usage, the same as the openai SDK's.
    reply = chat.invoke(prompt)
    assert isinstance(reply.content, str), reply
    assert reply.response_metadata["finish_reason"] in ("stop", "length"), reply
    prompt_tokens, completion_tokens, total = usage(reply)
    assert prompt_tokens >= 1 and 1 <= completion_tokens <= 3 and total == prompt_tokens + completion_tokens, reply
    sdk = openai.OpenAI(base_url=base, api_key="unused").chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=3, temperature=0)
    assert sdk.choices[0].message.content == reply.content, (sdk, reply)

    # Content as a list of parts reads as the same user text.
    parts = chat.invoke([HumanMessage(content=[{"type": "text", "text": prompt}])])
    assert parts.content == reply.content and usage(parts) == usage(reply), (parts, reply)

    # Streaming: the chunks add up to the same message; usage only when asked for.
    chunks = list(chat.stream(prompt))
    assert "".join(c.content for c in chunks) == reply.content, chunks
    merged = sum(chunks[1:], chunks[0])
    assert merged.response_metadata["finish_reason"] == reply.response_metadata["finish_reason"], merged
    assert merged.usage_metadata is None, merged
    counted = list(chat.stream(prompt, stream_usage=True))
    merged = sum(counted[1:], counted[0])
    assert merged.content == reply.content and usage(merged) == usage(reply), merged

    # An unknown model fails with the SDK's exception, carrying OpenAI's error object.
    try:
        ChatOpenAI(base_url=base, api_key="unused", model="no-such-model", max_retries=0).invoke(prompt)
    except openai.NotFoundError as e:
        assert "no-such-model" in e.message and e.code == "model_not_found", e.body
    else:
        raise AssertionError("an unknown model was accepted")

    # The completions model (prompt as a list, top_p 1, zero penalties) gives the SDK's text.
    text = OpenAI(base_url=base, api_key="unused", model=model, temperature=0, max_tokens=3, timeout=60).invoke(prompt)
    plain = openai.OpenAI(base_url=base, api_key="unused").completions.create(
        model=model, prompt=prompt, max_tokens=3, temperature=0)
    assert isinstance(text, str) and text == plain.choices[0].text, (text, plain)
    print("langchain_openai client: OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""The usage of a request whose upstream sent none (a stream cut short before its usage event): estimated
from what the client sent and what it received, with the model's tokenizer (`shared.tokenizer`).

- Prompt: the text of the messages (or prompt), system and tool definitions, plus OpenAI's framing (3 tokens
  per message, 3 to prime the answer); an image part counts `IMAGE_TOKENS` (a 1024×1024 high-detail image on
  OpenAI's scale), never its base64 bytes — the old bytes / 4 estimate overcharged bodies carrying images.
- Output: the text of the deltas the client received (content, refusals, reasoning, tool-call arguments,
  Anthropic text / thinking / partial JSON). The relay keeps at most `SENT_KEPT` bytes of a stream for this;
  past that, the count is scaled by the bytes sent.

The record is marked `estimated`. Runs in a thread (tokenizing a long prompt takes milliseconds).
"""

from __future__ import annotations

from typing import Any

import orjson

from shared import tokenizer
from shared.usage import Usage

__all__ = ["IMAGE_TOKENS", "SENT_KEPT", "estimate_prompt_tokens", "estimate_usage"]

IMAGE_TOKENS = 765
SENT_KEPT = 256 * 1024
_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})


def _prompt_text(body: Any, out: list[str]) -> int:
    """Append the prompt's texts to `out`; returns the tokens counted apart (framing, images)."""
    extra = 3
    if not isinstance(body, dict):
        return extra
    for key in ("system", "prompt", "input", "instructions"):
        extra += _texts(body.get(key), out)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        extra += 3
        if isinstance(message, dict):
            extra += _texts(message.get("content"), out)
            for call in message.get("tool_calls") or () if isinstance(message.get("tool_calls"), list) else ():
                out.append(orjson.dumps(call).decode())
    if body.get("tools"):
        out.append(orjson.dumps(body["tools"]).decode())
    return extra


def _texts(value: Any, out: list[str]) -> int:
    if isinstance(value, str):
        out.append(value)
        return 0
    extra = 0
    if isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                if part.get("type") in _IMAGE_TYPES:
                    extra += IMAGE_TOKENS
                elif isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif part.get("type") in ("tool_result", "tool_use"):
                    out.append(orjson.dumps(part.get("content") or part.get("input") or "").decode())
    return extra


def _received_text(sent: list[bytes]) -> str:
    texts: list[str] = []
    for line in b"".join(sent).split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            event = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        delta = event.get("delta")
        if isinstance(delta, dict) and event.get("type") == "content_block_delta":  # Anthropic
            for key in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(key), str):
                    texts.append(delta[key])
        for choice in event.get("choices") or () if isinstance(event.get("choices"), list) else ():
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):  # legacy completions
                texts.append(choice["text"])
            d = choice.get("delta")
            if not isinstance(d, dict):
                continue
            for key in ("content", "refusal", "reasoning_content", "reasoning"):
                if isinstance(d.get(key), str):
                    texts.append(d[key])
            for call in d.get("tool_calls") or () if isinstance(d.get("tool_calls"), list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    texts.append(function["arguments"])
    return "".join(texts)


def estimate_usage(body: bytes, sent: list[bytes], sent_bytes: int, model: str) -> Usage:
    """The estimated usage of a request (see the module docstring)."""
    name = tokenizer.encoding_for(model)
    if name is not None:
        tokenizer.warm(name)  # once per process; we are in a thread
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    texts: list[str] = []
    extra = _prompt_text(parsed, texts)
    prompt, _ = tokenizer.count("\n".join(texts), model)
    output, _ = tokenizer.count(_received_text(sent), model)
    kept = sum(map(len, sent))
    if sent_bytes > kept > 0:  # only the first SENT_KEPT bytes were kept: scale by what was sent
        output = -(-output * sent_bytes // kept)
    return Usage(input=prompt + extra, output=output, estimated=True)


def estimate_prompt_tokens(parsed: Any, model: str) -> int:
    """The estimated prompt tokens of a request body (parsed), as `estimate_usage` counts them (a thread)."""
    name = tokenizer.encoding_for(model)
    if name is not None:
        tokenizer.warm(name)
    texts: list[str] = []
    extra = _prompt_text(parsed, texts)
    return tokenizer.count("\n".join(texts), model)[0] + extra

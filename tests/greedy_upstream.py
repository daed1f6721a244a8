"""A greedy OpenAI-compatible upstream for the adversarial money tests, served by granian.

Unlike `bench.mock_upstream` (one choice, at most `chunks` tokens), it bills like a real provider does
when a client asks for a lot: every choice of `n` (and every candidate of `best_of`) is billed, each runs to
the output cap the request carries, and a request without a cap writes `GREEDY_TOKENS` tokens (default
20,000: a model that talks until its own context limit). Input is billed as a provider bills it: text at
about 8 bytes a token, and each image part (`image_url`, whatever the length of its URL) at `IMAGE_TOKENS`
(default 1,105: gpt-4o's price of a 2048×2048 image at high detail). The text it sends is short; the usage
it reports is the truth a provider would bill us for. Like OpenAI it refuses `n` above 128 and `best_of`
above 20.

    granian --interface asgi --port 9200 tests.greedy_upstream:app
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

GREEDY_TOKENS = int(os.environ.get("GREEDY_TOKENS", "20000"))
IMAGE_TOKENS = int(os.environ.get("IMAGE_TOKENS", "1105"))
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream")]


def _error(message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}})


def _count(value: Any, name: str, default: int, limit: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ValueError(f"'{name}' must be an integer in 1..{limit}")
    return value


def _plan(body: dict[str, Any], chat: bool) -> tuple[int, int, int]:
    """(choices returned, candidates billed, tokens per candidate)."""
    n = _count(body.get("n"), "n", 1, 128)
    best_of = _count(body.get("best_of"), "best_of", n, 20) if not chat else n
    if best_of < n:
        raise ValueError("'best_of' must be >= 'n'")
    cap = body.get("max_completion_tokens") if chat else None
    cap = cap if cap is not None else body.get("max_tokens")
    tokens = _count(cap, "max_tokens", GREEDY_TOKENS, 10**9) if cap is not None else GREEDY_TOKENS
    return n, best_of, tokens


def _images(messages: Any) -> int:
    """Image parts in chat messages: `{"type": "image_url", ...}` entries of a message's content list."""
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")


async def _send(send, status: int, body: bytes, headers=_JSON) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    path = scope["path"]
    raw = await _read(receive)
    if path == "/health":
        return await _send(send, 200, b'{"ok":true}')
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return await _send(send, 400, _error("the body is not JSON"))
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return await _send(send, 400, _error("'model' is required"))
    prompt = max(1, len(raw) // 8) + IMAGE_TOKENS * _images(body.get("messages"))
    if path == "/v1/embeddings":
        answer = {"object": "list", "model": body["model"],
                  "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
                  "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        return await _send(send, 200, orjson.dumps(answer))
    chat = path == "/v1/chat/completions"
    if not chat and path != "/v1/completions":
        return await _send(send, 404, _error(f"unknown path {path}"))
    try:
        n, billed, tokens = _plan(body, chat)
    except ValueError as exc:
        return await _send(send, 400, _error(str(exc)))
    usage = {"prompt_tokens": prompt, "completion_tokens": billed * tokens,
             "total_tokens": prompt + billed * tokens}
    head = {"id": "greedy-1", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body["model"]}
    if body.get("stream") is not True:
        choices = [{"index": i, "message": {"role": "assistant", "content": "long answer"},
                    "finish_reason": "length"} if chat else
                   {"index": i, "text": "long answer", "finish_reason": "length"} for i in range(n)]
        return await _send(send, 200, orjson.dumps({**head, "choices": choices, "usage": usage}))
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    events = []
    for i in range(n):
        choice = ({"index": i, "delta": {"content": "long answer"}, "finish_reason": "length"} if chat else
                  {"index": i, "text": "long answer", "finish_reason": "length"})
        events.append(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    await send({"type": "http.response.body", "body": b"".join(events)})

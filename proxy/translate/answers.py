"""Non-stream answers: an Anthropic message → an OpenAI chat.completion and back (dict in, dict out)."""

from __future__ import annotations

import time

from proxy.translate.common import (
    Json,
    _anthropic_usage,
    _finish_reason,
    _openai_usage,
    _stop_reason,
    _text_of,
)
from proxy.translate.requests import _openai_assistant_message, _tool_use_blocks, thinking_blocks


def anthropic_to_openai_response(resp: Json, model: str) -> Json:
    """An Anthropic message → an OpenAI chat.completion, reported under `model`."""
    message = _openai_assistant_message(resp.get("content"), strict=False, details=True)
    message["refusal"] = None
    msg_id = resp.get("id") or ""
    return {
        "id": "chatcmpl-" + msg_id.removeprefix("msg_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish_reason(resp.get("stop_reason"))}],
        "usage": _openai_usage(resp.get("usage") or {}),
    }


def openai_to_anthropic_response(resp: Json, model: str) -> Json:
    """An OpenAI chat.completion (first choice) → an Anthropic message, reported under `model`."""
    choices = resp.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[Json] = thinking_blocks(message.get("reasoning_details"))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if not content and isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text_of(message.get("content")) or message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    content.extend(_tool_use_blocks(message.get("tool_calls")))
    return {
        "id": "msg_" + (resp.get("id") or "").removeprefix("chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": _anthropic_usage(resp.get("usage") or {}),
    }


"""Translation between the OpenAI Chat Completions API and the Anthropic Messages API, both directions.

Pure functions and small state machines, no I/O, meant for the hot path:

* requests and non-stream responses are dict in, dict out;
* errors are (status, upstream body bytes) in, client body bytes out;
* streams are objects with `feed(chunk) -> bytes` / `finish() -> bytes` that take raw upstream SSE bytes cut
  anywhere and return the client's SSE bytes; `.usage` (OpenAI-style: prompt_tokens, completion_tokens,
  total_tokens) and `.model` (as reported by the upstream) are filled in as the stream goes, and `.done` says
  whether the message ended properly (a stream cut short gets no finish chunk and no [DONE]);
* what cannot be expressed on the other side raises `TranslationError` (a ValueError: answer 400).

Mapping decisions (see also the tables below):

* stop reasons, Anthropic → OpenAI: end_turn, stop_sequence, pause_turn → "stop"; max_tokens,
  model_context_window_exceeded → "length"; tool_use → "tool_calls"; refusal → "content_filter".
  OpenAI → Anthropic: stop → end_turn (OpenAI does not say whether a stop sequence fired); length → max_tokens;
  tool_calls/function_call → tool_use; content_filter → refusal (Anthropic's documented value for a declined
  answer).
* tool_choice: auto ↔ auto, none ↔ none, required ↔ any, {function: name} ↔ {tool: name};
  parallel_tool_calls=false ↔ disable_parallel_tool_use=true.
* system/developer messages, wherever they are, become Anthropic's top-level `system` (a string for one,
  text blocks for several); Anthropic's `system` becomes one leading system message (blocks joined by a blank line).
* images: data: URLs ↔ base64 sources, other URLs ↔ url sources; OpenAI's `detail` is dropped.
* usage: Anthropic's input_tokens excludes cache reads and writes, OpenAI's prompt_tokens includes them, so
  prompt_tokens = input + cache_creation + cache_read, with prompt_tokens_details.cached_tokens = cache_read.

Lossy on purpose: message `name`, n>1 (rejected), logprobs, seed, penalties, logit_bias, response_format,
reasoning/thinking (dropped both ways), top_k, cache_control towards OpenAI, tool_result `is_error`, images
inside tool results (moved to a user message after the tool messages), temperature above 1 (clamped for
Anthropic), tool-call arguments that are not a JSON object (become {}), stop-sequence identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from shared.money import format_usd
from shared.usage import from_anthropic, merge_anthropic

__all__ = [
    "AnthropicToOpenAIStream",
    "OpenAIToAnthropicStream",
    "TranslationError",
    "anthropic_error_to_openai",
    "anthropic_status_to_openai",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "openai_error_to_anthropic",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
]

Json = dict[str, Any]

_dumps = orjson.dumps
_loads = orjson.loads


class TranslationError(ValueError):
    """The request cannot be expressed in the other API (the relay answers 400 with this message)."""


# ---- shared tables ------------------------------------------------------------------------------------------

_FINISH_FROM_STOP: dict[str, str] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter",
}
_STOP_FROM_FINISH: dict[str, str] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
    "content_filter": "refusal",
}


Pricer = Callable[[Json], int]


def with_cost(usage: Json, pricer: Pricer | None, upstream_usage: Json) -> Json:
    """`usage` for the client with the request's cost added (`cost_micros`, and `cost` as a decimal string of
    USD), priced from the upstream's own usage object; unchanged without a pricer."""
    if pricer is None:
        return usage
    cost = pricer(upstream_usage)
    return {**usage, "cost": format_usd(cost), "cost_micros": cost}


def _finish_reason(stop_reason: str | None) -> str:
    return _FINISH_FROM_STOP.get(stop_reason or "end_turn", "stop")


def _stop_reason(finish_reason: str | None) -> str:
    return _STOP_FROM_FINISH.get(finish_reason or "stop", "end_turn")


def _openai_usage(u: Json) -> Json:
    """Anthropic usage → OpenAI usage (cache reads and writes counted into prompt_tokens), via the one
    normaliser (`shared.usage`)."""
    usage = from_anthropic(u)
    prompt, completion = usage.prompt_total, usage.completion_total
    out: Json = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if usage.cached_input:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_input}
    return out


def _anthropic_usage(u: Json) -> Json:
    """OpenAI usage → Anthropic usage (cached prompt tokens reported as cache reads)."""
    details = u.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    prompt, completion = u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0
    out: Json = {"input_tokens": prompt - cached, "output_tokens": completion}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _parse_arguments(arguments: Any) -> Json:
    """OpenAI's JSON-string tool arguments → Anthropic's input object ({} if not a JSON object)."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = _loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _text_of(content: Any) -> str:
    """A message's content (string or list of parts/blocks) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or p.get("refusal") or "" for p in content if isinstance(p, dict))


# ---- requests: OpenAI → Anthropic ---------------------------------------------------------------------------

def _image_source(url: str) -> Json:
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise TranslationError("image data URLs must be base64-encoded")
        return {"type": "base64", "media_type": header[5:-7], "data": data}
    return {"type": "url", "url": url}


def _anthropic_blocks(content: Any) -> list[Json]:
    """OpenAI message content → Anthropic content blocks (empty text dropped: Anthropic rejects it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    blocks: list[Json] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
            if text:
                block: Json = {"type": "text", "text": text}
                if "cache_control" in part:
                    block["cache_control"] = part["cache_control"]
                blocks.append(block)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise TranslationError("image_url parts need a url")
            blocks.append({"type": "image", "source": _image_source(url)})
        elif kind == "file" and isinstance(part.get("file"), dict) and "file_data" in part["file"]:
            source = _image_source(part["file"]["file_data"])
            blocks.append({"type": "document", "source": source})
        else:
            raise TranslationError(f"unsupported content part type: {kind!r}")
    return blocks


def _tool_use_blocks(tool_calls: Any) -> list[Json]:
    blocks = []
    for call in tool_calls or ():
        fn = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": call.get("id") or "", "name": fn.get("name") or "",
                       "input": _parse_arguments(fn.get("arguments"))})
    return blocks


def _tool_result_block(msg: Json) -> Json:
    content = msg.get("content")
    if isinstance(content, list):
        content = [{"type": "text", "text": p.get("text") or ""} for p in content if isinstance(p, dict)]
    return {"type": "tool_result", "tool_use_id": msg.get("tool_call_id") or "", "content": content or ""}


_ANTHROPIC_TOOL_CHOICE: dict[str, str] = {"auto": "auto", "none": "none", "required": "any"}


def _anthropic_tool_choice(choice: Any, parallel: Any) -> Json | None:
    if choice is None:
        if parallel is not False:
            return None
        choice = "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        out: Json = {"type": "tool", "name": (choice.get("function") or {}).get("name") or ""}
    elif isinstance(choice, str) and choice in _ANTHROPIC_TOOL_CHOICE:
        out = {"type": _ANTHROPIC_TOOL_CHOICE[choice]}
    else:
        raise TranslationError(f"unsupported tool_choice: {choice!r}")
    if parallel is False and choice != "none":  # Anthropic's "none" takes no such flag
        out["disable_parallel_tool_use"] = True
    return out


def openai_to_anthropic_request(body: Json, upstream_model: str, *, default_max_tokens: int = 4096) -> Json:
    """An OpenAI chat.completions request body → an Anthropic /v1/messages request body."""
    if (body.get("n") or 1) != 1:
        raise TranslationError("n > 1 is not supported for this model")
    system: list[Json] = []
    messages: list[Json] = []
    for msg in body.get("messages") or ():
        role = msg.get("role")
        if role == "system" or role == "developer":
            system.extend(_anthropic_blocks(msg.get("content")))
            continue
        if role == "user":
            blocks = _anthropic_blocks(msg.get("content"))
        elif role == "assistant":
            blocks = _anthropic_blocks(msg.get("content")) + _tool_use_blocks(msg.get("tool_calls"))
        elif role == "tool":
            role, blocks = "user", [_tool_result_block(msg)]
        else:
            raise TranslationError(f"unsupported message role: {role!r}")
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)  # Anthropic wants user and assistant turns to alternate
        else:
            messages.append({"role": role, "content": blocks})
    for m in messages:  # a lone plain text block is sent as a string: smaller, and what clients usually write
        content = m["content"]
        if len(content) == 1 and content[0]["type"] == "text" and len(content[0]) == 2:
            m["content"] = content[0]["text"]

    out: Json = {"model": upstream_model, "messages": messages}
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 and len(system[0]) == 2 else system
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = max_tokens if max_tokens else default_max_tokens
    temperature = body.get("temperature")
    if isinstance(temperature, int | float):
        out["temperature"] = temperature if temperature <= 1 else 1.0  # OpenAI's range is 0-2, Anthropic's 0-1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        converted = []
        for tool in tools:
            fn = tool.get("function") if tool.get("type", "function") == "function" else None
            if not isinstance(fn, dict):
                raise TranslationError(f"unsupported tool type: {tool.get('type')!r}")
            entry: Json = {"name": fn.get("name") or "",
                           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
            if fn.get("description"):
                entry["description"] = fn["description"]
            converted.append(entry)
        out["tools"] = converted
        choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    return out


# ---- requests: Anthropic → OpenAI ---------------------------------------------------------------------------

def _data_url(source: Json) -> str:
    kind = source.get("type")
    if kind == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if kind == "url":
        return source.get("url") or ""
    raise TranslationError(f"unsupported source type: {kind!r}")


def _openai_part(block: Json) -> Json | None:
    """An Anthropic user content block → an OpenAI content part (None for thinking, which is dropped)."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text") or ""}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _data_url(block.get("source") or {})}}
    if kind == "document":
        return {"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                         "file_data": _data_url(block.get("source") or {})}}
    if kind == "thinking" or kind == "redacted_thinking":
        return None
    raise TranslationError(f"unsupported content block type: {kind!r}")


def _openai_user_messages(content: Any) -> list[Json]:
    """An Anthropic user turn → tool messages (first, as OpenAI requires) then at most one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[Json] = []
    parts: list[Json] = []
    for block in content or ():
        if block.get("type") == "tool_result":
            result = block.get("content")
            if isinstance(result, list):  # text goes to the tool message; images follow in the user message
                parts.extend(p for b in result if b.get("type") != "text" and (p := _openai_part(b)))
                result = "".join(b.get("text") or "" for b in result if b.get("type") == "text")
            tools.append({"role": "tool", "tool_call_id": block.get("tool_use_id") or "", "content": result or ""})
        elif (part := _openai_part(block)) is not None:
            parts.append(part)
    if parts:
        tools.append({"role": "user", "content": parts})
    return tools


def _openai_assistant_message(content: Any, *, strict: bool = True) -> Json:
    """Anthropic assistant content → an OpenAI assistant message (thinking dropped; other unknown blocks too,
    unless `strict`)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[Json] = []
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append({"id": block.get("id") or "", "type": "function", "function": {
                "name": block.get("name") or "", "arguments": _dumps(block.get("input") or {}).decode()}})
        elif strict and kind not in ("thinking", "redacted_thinking"):
            raise TranslationError(f"unsupported content block type: {kind!r}")
    msg: Json = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


_OPENAI_TOOL_CHOICE: dict[str, str] = {"auto": "auto", "none": "none", "any": "required"}


def anthropic_to_openai_request(body: Json, upstream_model: str, *, max_tokens_field: str = "max_tokens") -> Json:
    """An Anthropic /v1/messages request body → an OpenAI chat.completions request body.

    `max_tokens_field="max_completion_tokens"` for upstreams (OpenAI's reasoning models) that refuse max_tokens.
    """
    messages: list[Json] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else "\n\n".join(b.get("text") or "" for b in system)
        messages.append({"role": "system", "content": text})
    for msg in body.get("messages") or ():
        role = msg.get("role")
        if role == "user":
            messages.extend(_openai_user_messages(msg.get("content")))
        elif role == "assistant":
            messages.append(_openai_assistant_message(msg.get("content")))
        else:
            raise TranslationError(f"unsupported message role: {role!r}")

    out: Json = {"model": upstream_model, "messages": messages}
    if body.get("max_tokens"):
        out[max_tokens_field] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        converted = []
        for tool in tools:
            if tool.get("type") not in (None, "custom"):
                raise TranslationError(f"unsupported tool type: {tool.get('type')!r}")
            fn: Json = {"name": tool.get("name") or "",
                        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
            if tool.get("description"):
                fn["description"] = tool["description"]
            converted.append({"type": "function", "function": fn})
        out["tools"] = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name") or ""}}
        elif kind in _OPENAI_TOOL_CHOICE:
            out["tool_choice"] = _OPENAI_TOOL_CHOICE[kind]
        else:
            raise TranslationError(f"unsupported tool_choice type: {kind!r}")
        if choice.get("disable_parallel_tool_use") and tools:
            out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id"):
        out["user"] = metadata["user_id"]
    return out


# ---- non-stream responses -----------------------------------------------------------------------------------

def anthropic_to_openai_response(resp: Json, model: str) -> Json:
    """An Anthropic message → an OpenAI chat.completion, reported under `model`."""
    message = _openai_assistant_message(resp.get("content"), strict=False)
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
    content: list[Json] = []
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


# ---- errors -------------------------------------------------------------------------------------------------

# Anthropic error type → (OpenAI type, OpenAI code), following what OpenAI itself answers (a bad key is an
# invalid_request_error with code invalid_api_key; a rate limit has type "requests").
_OPENAI_ERROR: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
    "timeout_error": ("server_error", "timeout"),
}
_ANTHROPIC_ERROR_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}
_ANTHROPIC_ERROR_BY_CODE: dict[str, str] = {
    "invalid_api_key": "authentication_error", "insufficient_quota": "billing_error",
    "rate_limit_exceeded": "rate_limit_error", "model_not_found": "not_found_error",
    "engine_overloaded": "overloaded_error", "overloaded": "overloaded_error",
}


def _error_message(body: bytes, status: int) -> tuple[str, Json]:
    """The upstream's error message (or a generic one) and its error object."""
    try:
        obj = _loads(body) if body else None
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, str):
        return err, {}
    err = err if isinstance(err, dict) else {}
    message = err.get("message")
    if not isinstance(message, str) or not message:
        message = f"The upstream answered HTTP {status}." if status else "The upstream reported an error."
    return message, err


def _anthropic_type_for_status(status: int) -> str:
    if status in _ANTHROPIC_ERROR_BY_STATUS:
        return _ANTHROPIC_ERROR_BY_STATUS[status]
    return "api_error" if status >= 500 or not status else "invalid_request_error"


def _openai_error_obj(message: str, anthropic_type: str) -> Json:
    kind, code = _OPENAI_ERROR.get(anthropic_type, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error_obj(message: str, err: Json, status: int) -> Json:
    code, kind = err.get("code"), err.get("type")
    mapped = _ANTHROPIC_ERROR_BY_CODE.get(code if isinstance(code, str) else "") or _ANTHROPIC_ERROR_BY_CODE.get(
        kind if isinstance(kind, str) else "")
    if mapped is None:
        if status:
            mapped = _anthropic_type_for_status(status)
        elif kind in ("requests", "tokens"):
            mapped = "rate_limit_error"
        else:
            mapped = "invalid_request_error" if kind == "invalid_request_error" else "api_error"
    return {"type": "error", "error": {"type": mapped, "message": message}}


def anthropic_status_to_openai(status: int) -> int:
    """The HTTP status to give an OpenAI client for an Anthropic one (529 "overloaded" is not OpenAI's)."""
    return 503 if status == 529 else status


def anthropic_error_to_openai(status: int, body: bytes) -> bytes:
    """An Anthropic error response body → an OpenAI one. Only the upstream's message is carried over."""
    message, err = _error_message(body, status)
    kind = err.get("type")
    if not isinstance(kind, str) or kind not in _OPENAI_ERROR:
        kind = _anthropic_type_for_status(status)
    return _dumps(_openai_error_obj(message, kind))


def openai_error_to_anthropic(status: int, body: bytes) -> bytes:
    """An OpenAI error response body → an Anthropic one. Only the upstream's message is carried over."""
    message, err = _error_message(body, status)
    return _dumps(_anthropic_error_obj(message, err, status))


# ---- streaming ----------------------------------------------------------------------------------------------

class _SSEReader:
    """Splits raw SSE bytes, cut anywhere, into the data payloads of complete events."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def push(self, chunk: bytes) -> list[bytes]:
        buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:  # a "\r" left at the end stays in the tail and meets its "\n" next time
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._tail = buf
            return []
        self._tail = buf[end + 2:]
        payloads = []
        for event in buf[:end].split(b"\n\n"):
            if event.startswith(b"data:") and b"\n" not in event:  # the common OpenAI shape
                payloads.append(event[6:] if event[5:6] == b" " else event[5:])
                continue
            data = [line[6:] if line[5:6] == b" " else line[5:]
                    for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                payloads.append(b"\n".join(data))
        return payloads

    def flush(self) -> list[bytes]:
        """The unterminated last event, if any, once the upstream has closed."""
        tail, self._tail = self._tail, b""
        return self.push(tail + b"\n\n") if tail.strip() else []


def _json(payload: bytes) -> Json | None:
    try:
        obj = _loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


class _StreamTranslator:
    """Shared plumbing: `feed`/`finish` over an SSE reader, and the `done`/`model`/`usage` the relay reads."""

    __slots__ = ("_finish", "_reader", "done", "model", "pricer", "usage")

    def __init__(self) -> None:
        self._reader = _SSEReader()
        self._finish: str | None = None  # the upstream's stop/finish reason, once it has sent one
        self.done = False
        self.model: str | None = None
        self.usage: Json | None = None
        self.pricer: Pricer | None = None  # upstream usage -> the request's cost, for the client's usage

    def feed(self, chunk: bytes) -> bytes:
        """Take upstream bytes; return the client bytes to send now (possibly empty)."""
        return self._handle(self._reader.push(chunk))

    def finish(self) -> bytes:
        """Upstream closed: translate any unterminated last event, and end the message if it had finished."""
        out = self._handle(self._reader.flush())
        if not self.done and self._finish is not None:
            out += self._end()
        return out

    def _handle(self, payloads: list[bytes]) -> bytes:
        raise NotImplementedError

    def _end(self) -> bytes:
        raise NotImplementedError


class AnthropicToOpenAIStream(_StreamTranslator):
    """Anthropic Messages SSE → OpenAI chat.completion.chunk SSE.

    `done` turns true once the stream ended properly (message_stop, or an error event); a stream that was cut
    short gets no finish chunk and no [DONE], so the client can tell. `usage` is OpenAI-style.
    """

    __slots__ = ("_anthropic_usage", "_blocks", "_created", "_head", "_include_usage", "_name", "_tools")

    def __init__(self, model: str, include_usage: bool, *, created: int | None = None) -> None:
        super().__init__()
        self._name = model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._head = b""  # `data: {"id":…,"model":…,"choices":[`, redone with the id from message_start
        self._start("")
        self._blocks: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self._tools = 0
        self._anthropic_usage: Json = {}

    def _start(self, msg_id: str) -> None:
        self._head = (b'data: {"id":' + _dumps("chatcmpl-" + msg_id.removeprefix("msg_"))
                      + b',"object":"chat.completion.chunk","created":' + str(self._created).encode()
                      + b',"model":' + _dumps(self._name) + b',"choices":[')

    def _chunk(self, delta: Json) -> bytes:
        return self._head + b'{"index":0,"delta":' + _dumps(delta) + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def _end(self) -> bytes:
        self.done = True
        out = (self._head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
               + _dumps(self._finish or "stop") + b"}]}\n\n")
        if self._include_usage and self.usage is not None:
            out += self._head + b'],"usage":' + _dumps(with_cost(self.usage, self.pricer, self._anthropic_usage))
            out += b"}\n\n"
        return out + b"data: [DONE]\n\n"

    @property
    def upstream_usage(self) -> Json | None:
        """The stream's merged usage as Anthropic reported it (for `shared.usage.normalise`)."""
        return self._anthropic_usage if self.usage is not None else None

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            merge_anthropic(self._anthropic_usage, usage)
            self.usage = _openai_usage(self._anthropic_usage)

    def _handle(self, payloads: list[bytes]) -> bytes:
        out: list[bytes] = []
        for payload in payloads:
            if self.done:
                break
            ev = _json(payload)
            if ev is None:
                continue
            kind = ev.get("type")
            if kind == "content_block_delta":
                delta = ev.get("delta") or {}
                dkind = delta.get("type")
                if dkind == "text_delta":
                    if delta.get("text"):
                        out.append(self._chunk({"content": delta["text"]}))
                elif dkind == "input_json_delta":
                    index = self._blocks.get(ev.get("index", -1))
                    if index is not None and delta.get("partial_json"):
                        out.append(self._chunk({"tool_calls": [
                            {"index": index, "function": {"arguments": delta["partial_json"]}}]}))
            elif kind == "content_block_start":
                block = ev.get("content_block") or {}
                if block.get("type") == "tool_use":
                    self._blocks[ev.get("index", -1)] = index = self._tools
                    self._tools += 1
                    out.append(self._chunk({"tool_calls": [{"index": index, "id": block.get("id") or "",
                                                            "type": "function", "function": {
                                                                "name": block.get("name") or "", "arguments": ""}}]}))
                elif block.get("type") == "text" and block.get("text"):
                    out.append(self._chunk({"content": block["text"]}))
            elif kind == "message_start":
                message = ev.get("message") or {}
                self.model = message.get("model") or self.model
                self._start(message.get("id") or "")
                self._take_usage(message.get("usage"))
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif kind == "message_delta":
                self._finish = _finish_reason((ev.get("delta") or {}).get("stop_reason"))
                self._take_usage(ev.get("usage"))
            elif kind == "message_stop":
                out.append(self._end())
            elif kind == "error":
                self.done = True
                message, err = _error_message(payload, 0)
                obj = _openai_error_obj(message, err.get("type") or "api_error")
                out.append(b"data: " + _dumps(obj) + b"\n\n")
        return b"".join(out)


class OpenAIToAnthropicStream(_StreamTranslator):
    """OpenAI chat.completion.chunk SSE → Anthropic Messages SSE.

    The message ends at `data: [DONE]` (or, if the upstream omits it, when it closes after a finish_reason), so
    that a usage chunk after the finish chunk still makes it into message_delta. `usage` is OpenAI-style, as
    the upstream reported it.
    """

    __slots__ = ("_block", "_block_kind", "_blocks", "_name", "_next", "_started")

    def __init__(self, model: str) -> None:
        super().__init__()
        self._name = model
        self._started = False
        self._block = -1  # index of the open Anthropic content block, -1 if none
        self._block_kind = ""
        self._next = 0  # index of the next content block
        self._blocks: dict[int, int] = {}  # OpenAI tool_calls index → Anthropic block index

    @property
    def upstream_usage(self) -> Json | None:
        """The usage as the OpenAI upstream reported it (for `shared.usage.normalise`)."""
        return self.usage

    @staticmethod
    def _event(name: bytes, obj: Json) -> bytes:
        return b"event: " + name + b"\ndata: " + _dumps(obj) + b"\n\n"

    def _open(self, out: list[bytes], kind: str, block: Json) -> int:
        self._close(out)
        self._block, self._block_kind = self._next, kind
        self._next += 1
        out.append(self._event(b"content_block_start",
                               {"type": "content_block_start", "index": self._block, "content_block": block}))
        return self._block

    def _close(self, out: list[bytes]) -> None:
        if self._block >= 0:
            out.append(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":'
                       + str(self._block).encode() + b"}\n\n")
            self._block, self._block_kind = -1, ""

    def _end(self) -> bytes:
        out: list[bytes] = []
        self._close(out)
        self.done = True
        usage = (with_cost(_anthropic_usage(self.usage), self.pricer, self.usage) if self.usage is not None
                 else {"output_tokens": 0})
        out.append(self._event(b"message_delta", {"type": "message_delta", "delta": {
            "stop_reason": _stop_reason(self._finish), "stop_sequence": None}, "usage": usage}))
        out.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        return b"".join(out)

    def _handle(self, payloads: list[bytes]) -> bytes:
        out: list[bytes] = []
        for payload in payloads:
            if self.done:
                break
            if payload == b"[DONE]":
                if self._started:
                    out.append(self._end())
                continue
            ev = _json(payload)
            if ev is None:
                continue
            if ev.get("error"):
                self.done = True
                message, err = _error_message(payload, 0)
                out.append(self._event(b"error", _anthropic_error_obj(message, err, 0)))
                continue
            if not self._started:
                self._started = True
                self.model = ev.get("model") or self.model
                out.append(self._event(b"message_start", {"type": "message_start", "message": {
                    "id": "msg_" + (ev.get("id") or "").removeprefix("chatcmpl-"), "type": "message",
                    "role": "assistant", "model": self._name, "content": [], "stop_reason": None,
                    "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}))
            if isinstance(ev.get("usage"), dict):
                self.usage = ev["usage"]
            for choice in ev.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue  # n > 1 is refused on the way in; ignore stray choices
                delta = choice.get("delta") or {}
                text = delta.get("content") or delta.get("refusal")
                if text:
                    if self._block_kind != "text":
                        self._open(out, "text", {"type": "text", "text": ""})
                    out.append(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                               + str(self._block).encode() + b',"delta":{"type":"text_delta","text":'
                               + _dumps(text) + b"}}\n\n")
                for call in delta.get("tool_calls") or ():
                    self._tool_delta(out, call)
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]
        return b"".join(out)

    def _tool_delta(self, out: list[bytes], call: Json) -> None:
        key = call.get("index", 0)
        fn = call.get("function") or {}
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = self._open(out, "tool_use", {
                "type": "tool_use", "id": call.get("id") or "", "name": fn.get("name") or "", "input": {}})
        if fn.get("arguments"):
            out.append(self._event(b"content_block_delta", {"type": "content_block_delta", "index": block, "delta": {
                "type": "input_json_delta", "partial_json": fn["arguments"]}}))

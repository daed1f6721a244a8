"""Streams: objects with `feed(chunk) -> bytes` / `finish() -> bytes` that take raw upstream SSE bytes cut
anywhere and return the client's SSE bytes (Anthropic Messages ⇄ OpenAI chat.completion.chunk)."""

from __future__ import annotations

import time
from typing import Any

from proxy.sse import SSEBuffer, json_object, payloads
from proxy.translate.common import (
    Json,
    Pricer,
    _anthropic_usage,
    _dumps,
    _finish_reason,
    _openai_usage,
    _stop_reason,
    with_cost,
)
from proxy.translate.errors import _anthropic_error_obj, _error_message, _openai_error_obj
from shared.usage import merge_anthropic

_json = json_object


class _StreamTranslator:
    """Shared plumbing: `feed`/`finish` over an SSE reader, and the `done`/`model`/`usage` the relay reads."""

    __slots__ = ("_finish", "_reader", "done", "model", "pricer", "usage")

    def __init__(self) -> None:
        self._reader = SSEBuffer()
        self._finish: str | None = None  # the upstream's stop/finish reason, once it has sent one
        self.done = False
        self.model: str | None = None
        self.usage: Json | None = None
        self.pricer: Pricer | None = None  # upstream usage -> the request's cost, for the client's usage

    def feed(self, chunk: bytes) -> bytes:
        """Take upstream bytes; return the client bytes to send now (possibly empty)."""
        return self._handle(payloads(self._reader.take(chunk)))

    def finish(self) -> bytes:
        """Upstream closed: translate any unterminated last event, and end the message if it had finished."""
        tail = self._reader.rest()
        out = self._handle(payloads(tail + b"\n\n") if tail.strip() else [])
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
                elif dkind == "thinking_delta":
                    if delta.get("thinking"):
                        out.append(self._chunk({"reasoning_content": delta["thinking"]}))
                elif dkind == "signature_delta":
                    if delta.get("signature"):  # kept for the next turn (see translate.requests.thinking_blocks)
                        out.append(self._chunk({"reasoning_details": [{
                            "type": "reasoning.text", "text": "", "signature": delta["signature"],
                            "format": "anthropic-claude-v1"}]}))
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
                elif block.get("type") == "redacted_thinking" and block.get("data"):
                    out.append(self._chunk({"reasoning_details": [{
                        "type": "reasoning.encrypted", "data": block["data"], "format": "anthropic-claude-v1"}]}))
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
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(reasoning, str) and reasoning:
                    if self._block_kind != "thinking":
                        self._open(out, "thinking", {"type": "thinking", "thinking": "", "signature": ""})
                    out.append(self._event(b"content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                                    "delta": {"type": "thinking_delta",
                                                                              "thinking": reasoning}}))
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


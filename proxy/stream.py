"""Server-sent-event pass-through with metering.

Chunks are forwarded as soon as they hold a complete event; only the bytes after the last event boundary
wait for the next chunk. The meter reads the `usage` and `model` of the stream without re-encoding
anything, and drops the usage-only chunk that we asked the upstream for when the client did not.
"""

from __future__ import annotations

from typing import Protocol

import orjson

from proxy.sse import SSEBuffer, data_of
from proxy.translate import Pricer, with_cost
from shared.usage import merge_anthropic

__all__ = ["AnthropicMeter", "StreamMeter", "StreamTransformer"]


class StreamTransformer(Protocol):
    """What a stream passes through on its way to the client: a meter, or a format translator."""

    usage: dict | None
    upstream_usage: dict | None  # the usage as the upstream's dialect reports it (shared.usage.normalise)
    model: str | None

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class StreamMeter:
    __slots__ = ("_sse", "drop_usage_chunk", "events", "model", "pricer", "service_tier", "usage")

    def __init__(self, *, drop_usage_chunk: bool) -> None:
        self._sse = SSEBuffer()
        self.drop_usage_chunk = drop_usage_chunk
        self.events = 0
        self.model: str | None = None
        self.usage: dict | None = None
        self.service_tier: object = None
        self.pricer: Pricer | None = None  # upstream usage -> the request's cost, added to the usage chunk

    @property
    def upstream_usage(self) -> dict | None:
        """The usage object as the upstream (OpenAI format) sent it, for `shared.usage.normalise`."""
        return self.usage

    def feed(self, chunk: bytes) -> bytes:
        """Take an upstream chunk; return the bytes to forward now (possibly empty)."""
        complete = self._sse.take(chunk)
        if not complete:
            return b""
        self.events += complete.count(b"data:")
        # Chunks carry `"usage":null` until the last one: only a usage object is worth parsing.
        if self.model is None or b'"usage":{' in complete or b'"usage": {' in complete:
            return self._inspect(complete)
        return complete

    def finish(self) -> bytes:
        """Whatever is left after the upstream closed (an unterminated last event)."""
        tail = self._sse.rest()
        return self._inspect(tail + b"\n\n")[:-2] if tail.strip() else tail

    def _inspect(self, complete: bytes) -> bytes:
        kept = []
        dropped = changed = False
        for event in complete.replace(b"\r\n", b"\n").split(b"\n\n"):
            payload = data_of(event)
            if payload is None or payload == b"[DONE]":
                kept.append(event)
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                kept.append(event)
                continue
            if not isinstance(obj, dict):
                kept.append(event)
                continue
            if self.model is None and isinstance(obj.get("model"), str):
                self.model = obj["model"]
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.usage = usage
                self.service_tier = obj.get("service_tier")
                if self.drop_usage_chunk and obj.get("choices") == []:
                    dropped = True
                    continue
                if self.pricer is not None:  # the client's usage chunk carries the request's cost
                    obj["usage"] = with_cost(usage, self.pricer, usage)
                    event, changed = b"data: " + orjson.dumps(obj), True
            kept.append(event)
        if not dropped and not changed and b"\r\n" not in complete:
            return complete  # unchanged: forward the original bytes
        return b"\n\n".join(kept)


class AnthropicMeter:
    """Passes an Anthropic Messages stream through untouched, reading its usage and model.

    Input tokens arrive in `message_start`, output tokens (cumulative) in `message_delta`; only events
    that mention usage are parsed.
    """

    __slots__ = ("_sse", "events", "model", "pricer", "usage")

    def __init__(self) -> None:
        self._sse = SSEBuffer()
        self.events = 0
        self.model: str | None = None
        self.usage: dict | None = None
        self.pricer: Pricer | None = None  # upstream usage -> the request's cost, added to message_delta

    def feed(self, chunk: bytes) -> bytes:
        complete = self._sse.take(chunk)
        if not complete:
            return b""
        self.events += complete.count(b"content_block_delta")
        if b'"usage"' in complete:
            events = complete.replace(b"\r\n", b"\n").split(b"\n\n")
            priced = [self._read_usage(event) for event in events]
            if any(p is not None for p in priced):
                return b"\n\n".join(e if p is None else p for e, p in zip(events, priced, strict=True))
        return complete

    def finish(self) -> bytes:
        tail = self._sse.rest()
        return self._read_usage(tail) or tail

    def _read_usage(self, event: bytes) -> bytes | None:
        """Fold an event's usage in; returns the event rewritten with the cost (a message_delta, when priced)."""
        payload = data_of(event)
        if not payload or b'"usage"' not in payload:
            return None
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        message = obj.get("message") if isinstance(obj, dict) else None
        usage = (message or obj).get("usage") if isinstance(message or obj, dict) else None
        if not isinstance(usage, dict):
            return None
        if isinstance(message, dict) and isinstance(message.get("model"), str):
            self.model = message["model"]
        if self.usage is None:
            self.usage = {}
        merge_anthropic(self.usage, usage)  # message_start's, then message_delta's (cumulative): later wins
        if self.pricer is None or obj.get("type") != "message_delta":
            return None
        obj["usage"] = with_cost(usage, self.pricer, self.usage)
        return b"event: message_delta\ndata: " + orjson.dumps(obj)

    @property
    def upstream_usage(self) -> dict | None:
        """The stream's merged usage as Anthropic reports it, for `shared.usage.normalise`."""
        return self.usage

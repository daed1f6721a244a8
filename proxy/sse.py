"""Server-sent events, split once: the one place that finds event boundaries in upstream bytes cut anywhere.

Pass-through meters forward the complete events' bytes as they are (`SSEBuffer.take`) and parse only the
events worth parsing; translators take the data payloads of the complete events (`payloads`). Both keep the
bytes after the last boundary for the next chunk, so what reaches the client does not depend on where the
upstream's TCP segments were cut.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["SSEBuffer", "data_of", "event", "json_object", "payloads"]


def _last_boundary(buf: bytes) -> int:
    """End offset of the last complete event in `buf` (0 if none): after a blank line, LF or CRLF."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class SSEBuffer:
    """Holds the unfinished tail of a stream between chunks."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def take(self, chunk: bytes) -> bytes:
        """The complete events so far (their original bytes), b"" while none is complete."""
        buf = self._tail + chunk if self._tail else chunk
        end = _last_boundary(buf)
        if end == 0:
            self._tail = buf
            return b""
        if end == len(buf):
            self._tail = b""
            return buf
        self._tail = buf[end:]
        return buf[:end]

    def rest(self) -> bytes:
        """What is left once the upstream closed: an unterminated last event (or b"")."""
        tail, self._tail = self._tail, b""
        return tail


def payloads(complete: bytes) -> list[bytes]:
    """The data payloads (joined `data:` lines) of the complete events in `complete`."""
    if not complete:
        return []
    if b"\r" in complete:
        complete = complete.replace(b"\r\n", b"\n")
    out = []
    for ev in complete.split(b"\n\n"):
        if ev.startswith(b"data:") and b"\n" not in ev:  # the common OpenAI shape
            out.append(ev[6:] if ev[5:6] == b" " else ev[5:])
            continue
        data = [line[6:] if line[5:6] == b" " else line[5:] for line in ev.split(b"\n") if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))
    return out


def data_of(ev: bytes) -> bytes | None:
    """The joined `data:` lines of one event, or None if it has none."""
    if b"data:" not in ev:
        return None
    lines = [line[5:].lstrip(b" ") for line in ev.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def json_object(payload: bytes) -> dict[str, Any] | None:
    """A payload parsed as a JSON object; None for anything else (an upstream is not trusted)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def event(name: bytes, obj: Any) -> bytes:
    """One named event (`event:` and `data:` lines), as Anthropic and the Responses API send them."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

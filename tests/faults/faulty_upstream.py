"""An OpenAI-format upstream on a raw asyncio socket that misbehaves on command: the faults an ASGI mock
cannot produce because its server frames every answer correctly.

Modes (`FaultyUpstream.mode`, changed at any moment by the test):
  ok            a correct `chat.completion` with usage
  hang          reads the request, never answers, keeps the connection open
  reset         reads the request, then closes with a TCP RST (SO_LINGER 0), no answer
  garbage       answers bytes that are not HTTP at all
  garbage_json  `200 OK` with a well-framed body that is not JSON
  short_body    `200 OK` whose content-length promises more than is sent, then the connection closes
  extra_bytes   a correct answer followed by bytes nobody asked for (a smuggled second response)
  overuse       a correct answer reporting far more output tokens than the request allowed (the proxy
                charges its reservation and logs a warning: a log write on every request)

It runs inside the test's event loop; every request it saw is counted per mode.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter

import orjson

__all__ = ["MODES", "FaultyUpstream"]

MODES = ("ok", "hang", "reset", "garbage", "garbage_json", "short_body", "extra_bytes", "overuse")


def _answer(model: str, completion_tokens: int = 2) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-faulty", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens,
                  "total_tokens": 5 + completion_tokens},
    })


def _stream(model: str, completion_tokens: int = 2) -> bytes:
    """The same answer as a Chat Completions stream, usage in its last chunk (include_usage)."""
    def event(obj: dict) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    base = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": 0, "model": model}
    return b"".join([
        event(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "fine"},
                                   "finish_reason": None}]}),
        event(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        event(base | {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens,
                                               "total_tokens": 5 + completion_tokens}}),
        b"data: [DONE]\n\n",
    ])


def _response(body: bytes, *, length: int | None = None, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: %d\r\n\r\n"
            % (len(body) if length is None else length)) + body


class FaultyUpstream:
    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._hung: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in self._hung:
            writer.close()
        if self._server is not None:
            self._server.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        try:
            return await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (body := await self._read_request(reader)) is not None:
                mode = self.mode
                self.seen[mode] += 1
                try:
                    request = orjson.loads(body)
                except orjson.JSONDecodeError:
                    request = {}
                model = request.get("model", "m")
                stream = request.get("stream") is True
                kind = b"text/event-stream" if stream else b"application/json"

                def answer(tokens: int = 2, model: str = model, stream: bool = stream) -> bytes:
                    return _stream(model, tokens) if stream else _answer(model, tokens)

                if mode == "hang":
                    self._hung.append(writer)
                    await reader.read()  # until the client gives up
                    return
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if mode == "garbage":
                    writer.write(b"\x00\xffSSH-2.0-not-http\r\n\x13\x37" * 20)
                    await writer.drain()
                    writer.close()
                    return
                if mode == "garbage_json":
                    writer.write(_response(b"<html>definitely { not json", content_type=kind))
                elif mode == "short_body":
                    whole = answer()
                    writer.write(_response(whole[: len(whole) // 2], length=len(whole), content_type=kind))
                    await writer.drain()
                    writer.close()
                    return
                elif mode == "extra_bytes":
                    writer.write(_response(answer(), content_type=kind) + _response(b'{"smuggled": true}'))
                elif mode == "overuse":
                    writer.write(_response(answer(1_000_000), content_type=kind))
                else:
                    writer.write(_response(answer(), content_type=kind))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if not writer.is_closing():
                writer.close()

"""Small ASGI helpers: read a bounded body, pick the headers we use, send complete responses."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.errors import BodyTooLarge, InvalidRequest

__all__ = ["ClientAddress", "RequestHeaders", "Scope", "read_body", "send_response"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestHeaders:
    """The few request headers the proxy reads, collected in one pass over the ASGI header list."""

    __slots__ = ("api_key", "content_length", "forwarded", "request_id", "user_agent")

    def __init__(self, raw: list[tuple[bytes, bytes]], forwarded_header: bytes) -> None:
        self.api_key: str | None = None
        self.request_id: str | None = None
        self.user_agent: str | None = None
        self.forwarded: str | None = None
        self.content_length: int | None = None
        for name, value in raw:
            if name == b"authorization":
                if value[:7].lower() == b"bearer ":
                    self.api_key = value[7:].strip().decode("latin-1")
            elif name == b"x-api-key":
                if self.api_key is None:
                    self.api_key = value.strip().decode("latin-1")
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID_RE.fullmatch(candidate):
                    self.request_id = candidate
            elif name == b"user-agent":
                self.user_agent = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = int(value) if value.isdigit() else None
            elif name == forwarded_header:
                self.forwarded = value.decode("latin-1")


class ClientAddress:
    """Resolves the client IP: the socket peer, or a trusted proxy's forwarding header."""

    __slots__ = ("_trusted", "_trusted_cache", "header")

    def __init__(self, header: str, trusted_cidrs: str) -> None:
        self.header = header.lower().encode()
        self._trusted = [ipaddress.ip_network(c.strip(), strict=False) for c in trusted_cidrs.split(",") if c.strip()]
        self._trusted_cache: dict[str, bool] = {}

    def _is_trusted(self, peer: str) -> bool:
        trusted = self._trusted_cache.get(peer)
        if trusted is None:
            try:
                address = ipaddress.ip_address(peer)
                trusted = any(address in net for net in self._trusted)
            except ValueError:
                trusted = False
            if len(self._trusted_cache) < 10_000:
                self._trusted_cache[peer] = trusted
        return trusted

    def resolve(self, scope: Scope, forwarded: str | None) -> str | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if forwarded and self.header and peer and self._is_trusted(peer):
            # The rightmost entry was appended by our trusted proxy; entries left of it are client claims.
            candidate = forwarded.rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                return peer
        return peer


_DRAIN_MAX = 16 * 1024 * 1024  # an oversized body up to this is read and dropped, so the client sees the 413


async def read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed `limit` bytes."""
    if declared is not None and declared > limit:
        if declared <= _DRAIN_MAX:
            await _discard_body(receive, _DRAIN_MAX)
        raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("The client disconnected before sending the whole body.", code="client_disconnected")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _discard_body(receive, _DRAIN_MAX - size)
                raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _discard_body(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a body: a client still sending when the answer comes would see the
    connection reset instead of the 413. Past `budget` bytes it is not worth it; the connection closes."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                        content_type: bytes = b"application/json") -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})

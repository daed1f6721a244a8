"""Small ASGI helpers: read a bounded body, pick the headers we use, send complete responses."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.errors import BodyTooLarge, InvalidRequest, RequestTimeout, TooManyUnfinishedRequests

__all__ = ["BodyReader", "ClientAddress", "RequestHeaders", "Scope", "read_body", "send_response"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Client headers that may be forwarded upstream once checked (`proxy.exchange.Exchange.upstream_headers`).
FORWARDED_HEADERS = frozenset((b"anthropic-version", b"anthropic-beta", b"openai-beta"))


class RequestHeaders:
    """The few request headers the proxy reads, collected in one pass over the ASGI header list."""

    __slots__ = ("api_key", "content_length", "forwarded", "forwarded_raw", "request_id", "user_agent")

    def __init__(self, raw: list[tuple[bytes, bytes]], forwarded_header: bytes) -> None:
        self.api_key: str | None = None
        self.request_id: str | None = None
        self.user_agent: str | None = None
        self.forwarded: str | None = None
        self.content_length: int | None = None
        self.forwarded_raw: dict[bytes, str] | None = None  # the FORWARDED_HEADERS the client sent, unchecked
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
            elif name in FORWARDED_HEADERS:
                if self.forwarded_raw is None:
                    self.forwarded_raw = {}
                previous = self.forwarded_raw.get(name)  # a repeated header is one comma-separated list
                text = value.decode("latin-1")
                self.forwarded_raw[name] = text if previous is None else f"{previous},{text}"


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


class BodyReader:
    """Reads request bodies within three bounds: size (413), time (408: the whole body within `timeout_s`,
    however it trickles in) and the number of slow bodies one client address may be sending at once (429).

    Without the last two, a client that sends headers and then a body slower than any timeout of granian's
    holds a connection and a task forever, and a few hundred such clients hold the process.

    Both cost the hot path a few dict operations. One sweeper task per worker passes over the reads in
    progress every `interval` (`timeout_s / 4`, at most 1 s): it cancels those past their deadline (instead
    of a timer per request: `asyncio.timeout` costs ~4 µs a request, this ~0.5 µs), so a body is cut between
    `timeout_s` and `timeout_s` plus one interval after its headers; and it marks as slow those that have
    lasted a whole interval. Only slow reads count against their address: a burst of requests whose bodies
    are all there (200 at once from one client) is many reads in progress for a few milliseconds, none slow.
    The count is this worker's, in memory (no Redis call): with N workers an address may have up to
    N x `max_per_client` slow bodies, which is the point: the bound protects each process.
    """

    __slots__ = ("_limit", "_max_per_client", "_reads", "_slow", "_sweeper", "_timeout", "interval")

    def __init__(self, limit: int, timeout_s: float, max_per_client: int) -> None:
        if limit <= 0 or timeout_s <= 0 or max_per_client <= 0:
            raise ValueError("limit, timeout_s and max_per_client must be positive")
        self._limit = limit
        self._timeout = timeout_s
        self._max_per_client = max_per_client
        self.interval = min(timeout_s / 4, 1.0)
        self._reads: dict[asyncio.Task, _Read] = {}  # every read in progress, by the task doing it
        self._slow: dict[str | None, int] = {}  # client address -> its reads marked slow, still in progress
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    def slow(self, client: str | None) -> int:
        """How many slow bodies `client` is sending now (for tests and metrics)."""
        return self._slow.get(client, 0)

    async def read(self, receive: Receive, declared: int | None, client: str | None) -> bytes:
        if self._slow.get(client, 0) >= self._max_per_client:
            raise TooManyUnfinishedRequests(
                f"Too many requests from your address are still sending their body (at most "
                f"{self._max_per_client}); finish them first.", headers=[(b"retry-after", b"1")])
        task = asyncio.current_task()
        assert task is not None
        read = self._reads[task] = _Read(client, time.monotonic())
        try:
            return await read_body(receive, self._limit, declared)
        except asyncio.CancelledError:
            if not read.expired:
                raise  # cancelled by someone else (the server, on a disconnect): not ours to answer
            task.uncancel()
            raise RequestTimeout(f"The request body did not arrive within {self._timeout:g} s.",
                                 headers=[(b"connection", b"close")]) from None
        finally:
            # Every path (body read, 4xx, deadline, cancelled on a disconnect) gives its place back.
            del self._reads[task]
            if read.slow:
                left = self._slow[client] - 1
                if left:
                    self._slow[client] = left
                else:
                    del self._slow[client]

    def sweep(self, now: float) -> None:
        """One pass of the sweeper at monotonic time `now`. Cancelling only schedules: no read ends (and
        edits the dicts) during the pass."""
        expire_before = now - self._timeout
        slow_before = now - self.interval
        for task, read in self._reads.items():
            if read.started <= expire_before and not read.expired:
                read.expired = True
                task.cancel()
            if read.started <= slow_before and not read.slow:
                read.slow = True
                self._slow[read.client] = self._slow.get(read.client, 0) + 1

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep(time.monotonic())


class _Read:
    __slots__ = ("client", "expired", "slow", "started")

    def __init__(self, client: str | None, started: float) -> None:
        self.client = client
        self.started = started
        self.slow = False
        self.expired = False


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

"""A lean HTTP/1.1 client for upstream calls: asyncio protocols, keep-alive pools, httptools (llhttp) parsing.

aiohttp was the largest single cost of a relayed request (≈37 % of the worker's Python time, see
`bench/RESULTS.md`): request and response objects, header multidicts, tracing hooks, a task per timeout. The
relay needs much less — POST a body, get the status and headers, then read the body whole or chunk by chunk
as it arrives — so this client does just that, on the event loop (no thread hand-offs), with:

- per-origin keep-alive pools (LIFO, idle connections dropped after `keepalive_s`), a cap on open
  connections per process (callers beyond it wait for one to come back);
- a connect timeout, and a read timeout meaning "no byte from the upstream for that long" (one timer per
  connection, re-armed lazily, not per chunk);
- back-pressure: a stream whose reader falls behind pauses the socket instead of buffering without bound;
- one retry on a fresh connection when a reused keep-alive connection turns out closed before any byte of
  the answer arrived (the upstream closed it while idle), which is what keep-alive clients do.

Errors: `ConnectFailed` (could not connect), `TimeoutError` (connect or read timeout), `ConnectionError`
(the connection broke mid-answer), `UnsafeRequest` (a request head that could be read as more than one
request). Only what `proxy/upstream.py` needs is exposed.

The pool is shared by every tenant of the process, so a connection is reused only when its framing is
certain: the request head is checked before it is written (a CR or LF inside a header value would let a
stored credential append header lines or a whole second request, whose answer the next tenant on that
connection would read as its own), and a connection that receives a byte it did not ask for (more than
the answer, or anything while idle) is closed, never pooled.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "H1Pool", "H1Response", "UnsafeRequest", "is_header_value"]

_HIGH_WATER = 1 << 20  # buffered answer bytes at which the socket stops being read
_LOW_WATER = 1 << 18
# Header lines as RFC 9110 allows them (token name, visible ASCII or space in the value), each ending in
# CRLF; and a request target of visible ASCII. Checked on every request: ~1 µs for a usual head.
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\x20-\x7e]*\r\n)*")
_TARGET = re.compile(rb"/[\x21-\x7e]*")


class ConnectFailed(ConnectionError):
    """No connection could be opened to the upstream (refused, unresolvable, TLS failure)."""


class UnsafeRequest(ValueError):
    """The request head holds bytes (CR, LF, control or non-ASCII) that could change its framing."""


def is_header_value(value: str) -> bool:
    """True if `value` can be sent as a header value as it is: visible ASCII and inner spaces only."""
    return value.isascii() and value.isprintable() and value == value.strip()


class _Origin:
    """A base URL, parsed once: where to connect and what to put in the request line and Host header."""

    __slots__ = ("host", "host_header", "idle", "port", "prefix", "ssl")

    def __init__(self, base_url: str, tls: ssl.SSLContext | None) -> None:
        if not (base_url.isascii() and base_url.isprintable()) or " " in base_url:
            raise UnsafeRequest("an upstream URL must be visible ASCII")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL {base_url!r}")
        secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if secure else 80)
        default_port = parts.port is None or parts.port == (443 if secure else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.prefix = parts.path.rstrip("/").encode()
        self.ssl = tls if secure else None
        self.idle: list[_Connection] = []


class H1Response:
    """An answer whose status line and headers have arrived; the body is read with `read` or `chunks`."""

    __slots__ = ("_conn", "_waiter", "body", "complete", "error", "headers", "ready", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.ready = conn.loop.create_future()  # resolved when the headers are in
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: deque[bytes] = deque()
        self.complete = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self) -> bytes:
        """The whole body. What has arrived is taken as it comes, so a body larger than the back-pressure
        mark never stalls its own socket."""
        parts: list[bytes] = []
        body = self.body
        while True:
            if body:
                taken = sum(map(len, body))
                parts += body
                body.clear()
                self._conn.consumed(self, taken)
            if self.complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self.error is not None:
                raise self.error
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (already de-chunked)."""
        body = self.body
        conn = self._conn
        while True:
            if body:
                data = body.popleft()
                conn.consumed(self, len(data))
                yield data
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self._wait()

    def close(self) -> None:
        """Done with the answer: an unfinished one makes its connection unusable, so it is closed."""
        if not self.complete:
            self._conn.abort(ConnectionError("answer abandoned"))


class _Connection(asyncio.Protocol):
    """One upstream socket, carrying one exchange at a time."""

    def __init__(self, pool: H1Pool, origin: _Origin) -> None:
        self.loop = pool.loop
        self._pool = pool
        self._origin = origin
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: H1Response | None = None
        self._buffered = 0
        self._paused = False
        self._read_timeout = 0.0
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.received_any = False
        self.closed = False
        self.idle_since = 0.0
        self._interim = False
        self._release_pending = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None:  # bytes nobody asked for: this connection's framing is in doubt
            self.abort(None)
            return
        self._last_rx = self.loop.time()
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort(ConnectionError("the upstream sent a malformed HTTP answer"))
        if self._release_pending:
            # Pooled only once the whole read is parsed: a second answer in the same bytes closed it.
            self._release_pending = False
            if not self.closed:
                self._pool.release(self)

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        resp = self._response
        if resp is not None and not resp.complete and resp.status and self._close_delimited(resp):
            self.on_message_complete()  # a body without length or chunking ends with the connection
        self.abort(ConnectionError("the upstream closed the connection"))

    def pause_writing(self) -> None:  # request bodies are small; the transport buffers them
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._response is None:  # a second answer to one request (or an answer to none)
            self.abort(None)
            raise ConnectionAbortedError("unsolicited answer")

    def on_header(self, name: bytes, value: bytes) -> None:  # httptools hands over whole names and values
        self._response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        resp = self._response
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints, ...): the real one follows
            self._interim = True
            resp.headers.clear()  # type: ignore[union-attr]
            return
        resp.status = status  # type: ignore[union-attr]
        if not resp.ready.done():  # type: ignore[union-attr]
            resp.ready.set_result(None)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        resp = self._response
        resp.body.append(body)  # type: ignore[union-attr]
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        resp._wake()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        resp = self._response
        if self._interim:
            self._interim = False
            return
        if resp is None or resp.complete:
            return
        resp.complete = True
        self._response = None
        self._stop_timer()
        self._buffered = 0  # what the finished answer still holds is its reader's, not this socket's
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        reusable = self._parser.should_keep_alive() and not self.closed
        resp._wake()
        if reusable:
            self._release_pending = True  # data_received pools it once the rest of this read is parsed
        else:
            self.abort(None)

    # -- used by the pool and the response

    def consumed(self, resp: H1Response, n: int) -> None:
        if resp is not self._response:  # a finished answer read after its connection moved on
            return
        self._buffered -= n
        if self._paused and self._buffered < _LOW_WATER and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    async def exchange(self, request: bytes, read_timeout_s: float) -> H1Response:
        # The response (and its futures) belong to this exchange alone: once it completes, the connection
        # may already carry the next caller's exchange before this coroutine resumes.
        self._response = resp = H1Response(self)
        self.received_any = False
        self._buffered = 0
        self._read_timeout = read_timeout_s
        self._last_rx = self.loop.time()
        self._timer = self.loop.call_later(read_timeout_s, self._check_idle)
        self._transport.write(request)  # type: ignore[union-attr]
        try:
            await resp.ready
        except BaseException:
            if not resp.status and self._response is resp:  # cancelled or failed before the answer began
                self.abort(ConnectionError("request abandoned"))
            raise
        return resp

    def abort(self, error: BaseException | None) -> None:
        """Close the socket; an exchange in progress fails with `error`."""
        if not self.closed:
            self.closed = True
            self._stop_timer()
            if self._transport is not None:
                self._transport.abort()
            self._pool.forget(self)
        resp = self._response
        if error is not None and resp is not None:
            if not resp.ready.done():
                resp.ready.set_exception(error)
            if not resp.complete and resp.error is None:
                resp.error = error
                resp._wake()

    def _check_idle(self) -> None:
        idle = self.loop.time() - self._last_rx
        if self._paused or idle < self._read_timeout:  # still alive (or we are the slow reader): look again later
            self._timer = self.loop.call_later(max(self._read_timeout - idle, 0.01), self._check_idle)
            return
        self._timer = None
        self.abort(TimeoutError(f"no data from the upstream for {self._read_timeout:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @staticmethod
    def _close_delimited(resp: H1Response) -> bool:
        headers = resp.headers
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")


class H1Pool:
    """Keep-alive connections to any number of upstream origins, at most `max_connections` open at once."""

    def __init__(self, *, max_connections: int = 1000, keepalive_s: float = 15.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """`tls`: the context for https origins (default: the system's trust store, hostnames verified)."""
        self.loop = asyncio.get_running_loop()
        self._max = max_connections
        self._keepalive_s = keepalive_s
        self._open = 0
        self._slot_waiters: deque[asyncio.Future] = deque()
        self._origins: dict[str, _Origin] = {}
        self._tls = tls
        self._closed = False

    async def post(self, base_url: str, path: str, headers: bytes, body: bytes, *, method: bytes = b"POST",
                   connect_timeout_s: float, read_timeout_s: float) -> H1Response:
        """POST `body` to `base_url` + `path` (or GET, DELETE: `method`); returns once the status line and
        headers are in.

        `headers`: the request's own header lines, already encoded (`name: value\r\n` each), so callers
        can keep their constant ones as one ready block; host and content-length are added here."""
        target = path.encode()
        if (not _HEADER_LINES.fullmatch(headers) or not _TARGET.fullmatch(target)
                or method not in (b"POST", b"GET", b"DELETE")):
            raise UnsafeRequest("the request head holds bytes that are not allowed in HTTP/1.1 header lines")
        origin = self._origins.get(base_url)
        if origin is None:
            if base_url.startswith("https:") and self._tls is None:
                self._tls = ssl.create_default_context()
            origin = self._origins[base_url] = _Origin(base_url, self._tls)
        request = b"".join((method, b" ", origin.prefix, target, b" HTTP/1.1\r\nhost: ", origin.host_header,
                            b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n", headers, b"\r\n", body))
        conn = await self._acquire(origin, connect_timeout_s)
        reused = conn.idle_since != 0.0
        try:
            return await conn.exchange(request, read_timeout_s)
        except ConnectionError:
            if not reused or conn.received_any:
                raise
        # The upstream had closed this idle connection: the request never reached it. Once more, fresh.
        conn = await self._acquire(origin, connect_timeout_s, fresh=True)
        return await conn.exchange(request, read_timeout_s)

    async def _acquire(self, origin: _Origin, connect_timeout_s: float, *, fresh: bool = False) -> _Connection:
        idle = origin.idle
        if not fresh:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self._keepalive_s:
                    return conn
                conn.abort(None)
        while self._open >= self._max:  # at the cap: wait for a slot, within the connect timeout
            waiter = self.loop.create_future()
            self._slot_waiters.append(waiter)
            await asyncio.wait_for(waiter, connect_timeout_s)
            if idle and not fresh:
                return await self._acquire(origin, connect_timeout_s)
        self._open += 1
        try:
            _, conn = await asyncio.wait_for(self.loop.create_connection(
                lambda: _Connection(self, origin), origin.host, origin.port, ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl else None), connect_timeout_s)
        except BaseException as exc:
            self._open -= 1
            self._wake_one()
            if isinstance(exc, (OSError, ssl.SSLError)) and not isinstance(exc, TimeoutError):
                raise ConnectFailed(str(exc) or type(exc).__name__) from None
            raise
        return conn

    def release(self, conn: _Connection) -> None:
        """An exchange finished cleanly: the connection waits for the next request to its origin."""
        if self._closed:
            conn.abort(None)
            return
        conn.idle_since = time.monotonic()
        conn._origin.idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().abort(None)

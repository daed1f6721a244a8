"""A lean, pipelined Redis client for the proxy's two hot-path script calls.

redis-py spends ~60–100 µs of Python per call on pool checkout, command packing and reply handling — a third
of the relay's CPU per request (see `bench/RESULTS.md`). This client does only what the hot path needs:
`EVALSHA` (re-loading the script on NOSCRIPT) over a few long-lived connections, answered in order, with
hiredis (C) packing commands and parsing replies. Concurrent requests share a connection, so their calls
pipeline without waiting for a checkout, and the calls made in one turn of the event loop leave in one
socket write.

Everything else (caches, pub/sub, the control plane, the workers) keeps using redis-py. Errors are redis-py's
exception classes, so callers handle one family: `ResponseError` for a script error, `ConnectionError` when
the connection drops, `TimeoutError` when Redis does not answer within the timeout (the connection is then
dropped, failing everything queued on it, and the next call reconnects).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from typing import Any

import hiredis
from redis.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["ClusterPipelinedRedis", "LuaScript", "PipelinedRedis", "pipelined_redis"]

_SLOTS = 16384

_pack = hiredis.pack_command


def _evalsha_command(script: LuaScript, keys: list, args: list) -> bytes:
    return _pack(("EVALSHA", script.sha, len(keys), *keys, *args))


class LuaScript:
    """A script's source and SHA-1, so calls send the SHA and the source only after a NOSCRIPT."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Connection(asyncio.Protocol):
    """One socket to Redis: replies come back in the order the commands went out."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiters: deque[asyncio.Future] = deque()
        self._sent_at: deque[float] = deque()
        self._transport: asyncio.Transport | None = None
        self._outbox: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters, sent_at = self._waiters, self._sent_at
        while (reply := reader.gets()) is not False:
            fut = waiters.popleft()
            sent_at.popleft()
            if fut.done():  # the caller was cancelled; the reply is dropped, the order is kept
                continue
            if isinstance(reply, ResponseError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError("Connection to Redis lost."))

    def fail(self, error: Exception) -> None:
        self.closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(error)
        self._sent_at.clear()
        if self._transport is not None:
            self._transport.abort()

    def send(self, command: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Queue a command; the commands queued in one turn of the event loop go out in one write."""
        fut = loop.create_future()
        self._waiters.append(fut)
        self._sent_at.append(time.monotonic())
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(command)
        return fut

    def _flush(self) -> None:
        # One syscall for every request that reached Redis in this turn, instead of one per call.
        outbox, self._outbox = self._outbox, []
        if not self.closed:
            self._transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))  # type: ignore[union-attr]

    def oldest_wait(self, now: float) -> float:
        return now - self._sent_at[0] if self._sent_at else 0.0


class PipelinedRedis:
    """`EVALSHA` over `connections` pipelined sockets, chosen round-robin."""

    def __init__(self, url: str, *, connections: int = 1, timeout_s: float = 5.0) -> None:
        self._params = parse_url(url)
        if self._params.get("ssl"):
            raise ValueError("PipelinedRedis does not support TLS (rediss://); use a plain or unix URL")
        self._size = connections
        self._timeout_s = timeout_s
        self._conns: list[_Connection | None] = [None] * connections
        self._next = 0
        self._connecting: dict[int, asyncio.Task] = {}
        self._watchdog: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def evalsha(self, script: LuaScript, keys: list, args: list) -> Any:
        """Run `script` and return its reply (bytes, ints and lists, as redis-py returns them)."""
        command = _evalsha_command(script, keys, args)
        try:
            return await self._call(command)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self._call(_pack(("SCRIPT", "LOAD", script.source)))
        return await self._call(command)

    def evalsha_now(self, script: LuaScript, keys: list, args: list) -> asyncio.Future | None:
        """`evalsha` without a coroutine or a task: the reply's future, or None when the connection it would
        use is not open (then call `evalsha`). A NOSCRIPT reply is the caller's to retry with `evalsha`."""
        slot = self._next
        conn = self._conns[slot]
        if conn is None or conn.closed:
            return None
        self._next = (slot + 1) % self._size
        return conn.send(_evalsha_command(script, keys, args), self._loop)  # type: ignore[arg-type]

    async def execute(self, *parts: Any) -> Any:
        """Run one plain command (for tests and health checks)."""
        return await self._call(_pack(parts))

    async def _call(self, command: bytes) -> Any:
        slot = self._next
        self._next = (slot + 1) % self._size
        conn = self._conns[slot]
        if conn is None or conn.closed:
            conn = await self._connect(slot)
        return await conn.send(command, self._loop)  # type: ignore[arg-type]

    async def _connect(self, slot: int) -> _Connection:
        task = self._connecting.get(slot)
        if task is None:  # one connect per slot, however many callers are waiting for it
            task = asyncio.ensure_future(self._open())
            self._connecting[slot] = task
            task.add_done_callback(lambda _t: self._connecting.pop(slot, None))
        conn = await asyncio.shield(task)
        self._conns[slot] = conn
        return conn

    async def _open(self) -> _Connection:
        loop = self._loop = asyncio.get_running_loop()
        params = self._params
        try:
            if "path" in params:
                coro = loop.create_unix_connection(_Connection, params["path"])
            else:
                coro = loop.create_connection(_Connection, params.get("host", "localhost"), params.get("port", 6379))
            _, conn = await asyncio.wait_for(coro, self._timeout_s)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"Cannot connect to Redis ({type(exc).__name__}).") from None
        setup = []
        if params.get("password"):
            user = params.get("username")
            setup.append(("AUTH", user, params["password"]) if user else ("AUTH", params["password"]))
        if params.get("db"):
            setup.append(("SELECT", params["db"]))
        for parts in setup:
            await asyncio.wait_for(conn.send(_pack(parts), loop), self._timeout_s)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())
        return conn

    async def _watch(self) -> None:
        """Drop a connection whose oldest call waited longer than the timeout (Redis hung or unreachable):
        a per-call timer would cost more than the call itself."""
        period = max(self._timeout_s / 4, 0.05)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in self._conns:
                if conn is not None and not conn.closed and conn.oldest_wait(now) > self._timeout_s:
                    conn.fail(RedisTimeoutError(f"Redis did not answer within {self._timeout_s:g} s."))

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for conn in self._conns:
            if conn is not None and not conn.closed:
                conn.fail(RedisConnectionError("Client closed."))


class ClusterPipelinedRedis:
    """`PipelinedRedis` for a Redis Cluster: one pipelined client per master, each call sent to the master of
    its first key's slot. Every key of one script call shares a hash tag (`shared.redis_keys`), so the first
    key's slot is the call's slot. The slot map is read with CLUSTER SLOTS at the first call and again after
    a MOVED/ASK reply (a resharding or failover), and the call is retried once on the new owner."""

    def __init__(self, url: str, *, connections: int = 1, timeout_s: float = 5.0) -> None:
        self._seed = url
        self._connections = connections
        self._timeout_s = timeout_s
        self._nodes: dict[tuple[str, int], PipelinedRedis] = {}
        self._owners: list[tuple[str, int] | None] = [None] * _SLOTS
        self._loaded = False
        self._refresh_lock = asyncio.Lock()

    async def evalsha(self, script: LuaScript, keys: list, args: list) -> Any:
        return await self._routed(keys[0], lambda node: node.evalsha(script, keys, args))

    def evalsha_now(self, script: LuaScript, keys: list, args: list) -> asyncio.Future | None:
        """`PipelinedRedis.evalsha_now` on the master of the first key's slot (None before the slot map is
        read); a MOVED/ASK reply is the caller's to retry with `evalsha`."""
        if not self._loaded:
            return None
        try:
            node = self._node(keys[0])
        except RedisConnectionError:
            return None
        return node.evalsha_now(script, keys, args)

    async def execute(self, *parts: Any) -> Any:
        """One plain command; routed by its first argument (its key), else sent to any master."""
        key = parts[1] if len(parts) > 1 else b""
        return await self._routed(key, lambda node: node.execute(*parts))

    async def _routed(self, key: Any, call: Any) -> Any:
        if not self._loaded:
            await self._refresh()
        try:
            return await call(self._node(key))
        except ResponseError as exc:
            if not str(exc).startswith(("MOVED", "ASK")):
                raise
        await self._refresh()
        return await call(self._node(key))

    def _node(self, key: Any) -> PipelinedRedis:
        owner = self._owners[key_slot(key if isinstance(key, bytes) else str(key).encode())]
        if owner is None:
            raise RedisConnectionError("Redis Cluster: no master serves this key's slot.")
        node = self._nodes.get(owner)
        if node is None:
            node = self._nodes[owner] = PipelinedRedis(f"redis://{owner[0]}:{owner[1]}/0",
                                                       connections=self._connections, timeout_s=self._timeout_s)
        return node

    async def _refresh(self) -> None:
        async with self._refresh_lock:
            sources = [*self._nodes.values()] or [PipelinedRedis(self._seed, timeout_s=self._timeout_s)]
            last: Exception | None = None
            for source in sources:
                try:
                    ranges = await source.execute("CLUSTER", "SLOTS")
                    break
                except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                    last = exc
            else:
                raise RedisConnectionError(f"Redis Cluster: no node answered CLUSTER SLOTS ({last}).")
            if not self._nodes:
                await sources[0].aclose()
            owners: list[tuple[str, int] | None] = [None] * _SLOTS
            for start, end, master, *_ in ranges:
                address = (master[0].decode() if isinstance(master[0], bytes) else master[0], int(master[1]))
                owners[start:end + 1] = [address] * (end - start + 1)
            self._owners = owners
            self._loaded = True

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()


def pipelined_redis(url: str, *, cluster: bool = False, connections: int = 1,
                    timeout_s: float = 5.0) -> PipelinedRedis | ClusterPipelinedRedis:
    """The hot path's Redis client for a single server, or (`cluster`) a Redis Cluster seeded by `url`."""
    kind = ClusterPipelinedRedis if cluster else PipelinedRedis
    return kind(url, connections=connections, timeout_s=timeout_s)

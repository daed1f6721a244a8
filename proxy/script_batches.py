"""The billing scripts' calls of one event-loop turn, sent together.

Every request makes one reserve call before forwarding and one settle call after; both scripts take any
number of requests (`shared.billing.batch_call`), each with its own answer. Calls queued in one turn of the
event loop go in one EVALSHA per shard (the keys of a shard share a Redis Cluster slot): under load one
script call carries many requests, and an idle proxy's request goes alone, one turn later.

A failed call fails each of its requests; the callers retry on their own (both scripts are safe to retry:
a reservation that did happen is released, a settlement is applied once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from shared.billing import batch_call
from shared.redis_pipeline import LuaScript, PipelinedRedis

__all__ = ["ScriptBatches"]

Entry = tuple[list, list]
Orphaned = Callable[[Any], None]
Batched = tuple[Entry, asyncio.Future, Orphaned | None]

# Replies after which the call goes again through `evalsha`, which handles them (script not loaded yet, or
# a Redis Cluster slot that moved).
_RETRY_WITH_EVALSHA = ("NOSCRIPT", "MOVED", "ASK")


class ScriptBatches:
    """Batches the calls of one script."""

    __slots__ = ("_calls", "_fast", "_pending", "_script")

    def __init__(self, fast: PipelinedRedis, script: LuaScript) -> None:
        self._fast = fast
        self._script = script
        self._pending: dict[str, list[Batched]] = {}
        self._calls: set[asyncio.Future] = set()  # in flight (the loop keeps only weak references to tasks)

    def call(self, shard: str, entry: Entry, orphaned: Orphaned | None = None) -> asyncio.Future:
        """Queue one request's entry; the future gets its answer. `orphaned(answer)` is told of an answer
        whose caller has gone (cancelled while waiting), e.g. to release a reservation nobody will settle."""
        loop = asyncio.get_running_loop()
        batch = self._pending.get(shard)
        if batch is None:
            batch = self._pending[shard] = []
            loop.call_soon(self._send, shard)
        fut = loop.create_future()
        batch.append((entry, fut, orphaned))
        return fut

    def _send(self, shard: str) -> None:
        batch = self._pending.pop(shard)
        keys, args = batch_call([entry for entry, _, _ in batch])
        # Straight onto an open connection: no task and no coroutine per call (most calls).
        reply = self._fast.evalsha_now(self._script, keys, args)
        if reply is None:
            self._in_task(batch, keys, args)
            return
        self._calls.add(reply)
        reply.add_done_callback(lambda done: self._replied(batch, keys, args, done))

    def _replied(self, batch: list[Batched], keys: list, args: list, reply: asyncio.Future) -> None:
        self._calls.discard(reply)
        exc = reply.exception() if not reply.cancelled() else asyncio.CancelledError()
        if isinstance(exc, ResponseError) and str(exc).startswith(_RETRY_WITH_EVALSHA):
            self._in_task(batch, keys, args)  # loads the script, or follows the slot's new owner
        elif exc is not None:
            _fail(batch, exc)
        else:
            _answer(batch, reply.result())

    def _in_task(self, batch: list[Batched], keys: list, args: list) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch, keys, args))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _run(self, batch: list[Batched], keys: list, args: list) -> None:
        try:
            answers = await self._fast.evalsha(self._script, keys, args)
        except Exception as exc:
            _fail(batch, exc)
            return
        _answer(batch, answers)

    async def close(self) -> None:
        """Wait for the calls in flight (graceful shutdown)."""
        if self._calls:
            await asyncio.wait(self._calls, timeout=5.0)


def _fail(batch: list[Batched], exc: BaseException) -> None:
    for _, fut, _ in batch:
        if not fut.done():
            fut.set_exception(exc)


def _answer(batch: list[Batched], answers: list) -> None:
    for (_, fut, orphaned), answer in zip(batch, answers, strict=True):
        if not fut.done():
            fut.set_result(answer)
        elif orphaned is not None:
            orphaned(answer)

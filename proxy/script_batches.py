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

from shared.billing import batch_call
from shared.redis_pipeline import LuaScript, PipelinedRedis

__all__ = ["ScriptBatches"]

Entry = tuple[list, list]
Orphaned = Callable[[Any], None]


class ScriptBatches:
    """Batches the calls of one script."""

    __slots__ = ("_calls", "_fast", "_pending", "_script")

    def __init__(self, fast: PipelinedRedis, script: LuaScript) -> None:
        self._fast = fast
        self._script = script
        self._pending: dict[str, list[tuple[Entry, asyncio.Future, Orphaned | None]]] = {}
        self._calls: set[asyncio.Task] = set()  # in flight (the loop keeps only weak references to tasks)

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
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _run(self, batch: list[tuple[Entry, asyncio.Future, Orphaned | None]]) -> None:
        keys, args = batch_call([entry for entry, _, _ in batch])
        try:
            answers = await self._fast.evalsha(self._script, keys, args)
        except Exception as exc:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut, orphaned), answer in zip(batch, answers, strict=True):
            if not fut.done():
                fut.set_result(answer)
            elif orphaned is not None:
                orphaned(answer)

    async def close(self) -> None:
        """Wait for the calls in flight (graceful shutdown)."""
        if self._calls:
            await asyncio.wait(self._calls, timeout=5.0)

"""Steady load through the proxy for the fault suite: a few concurrent clients sending chat requests
(non-streamed and streamed) in a loop, recording for every request whether a billed answer was served.

"Served" means the client got the whole answer with its cost: a 200 JSON answer with `usage.cost_micros`,
or a stream that reached `[DONE]` after a usage chunk with `cost_micros`. Its request id is the
`x-request-id` the relay answered with; the usage records of the org must be exactly these ids, plus the
streams that broke after content reached the client ("partial": charged what was produced, estimated).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import orjson

__all__ = ["Outcome", "SteadyLoad"]


@dataclass(slots=True)
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: no HTTP answer (connection refused/reset, timeout)
    request_id: str | None
    cost_micros: int | None  # set only when a billed answer was served
    stream: bool
    error: str | None = None
    partial: bool = False  # a stream that started (content reached the client) and broke before its end

    @property
    def served(self) -> bool:
        return self.cost_micros is not None


@dataclass
class SteadyLoad:
    url: str
    api_key: str
    model: str
    concurrency: int = 4
    stream_every: int = 3  # every n-th request of a client is streamed
    timeout_s: float = 15.0
    pause_s: float = 0.01  # between a client's requests: steady, not a flood (2 shared cores)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.timeout_s, limits=httpx.Limits(max_keepalive_connections=0))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.concurrency)]

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._http.aclose()
        return self.outcomes

    async def _client(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self.outcomes.append(await self.one(stream=n % self.stream_every == 0))
            await asyncio.sleep(self.pause_s)

    async def one(self, *, stream: bool = False) -> Outcome:
        body = {"model": self.model, "messages": [{"role": "user", "content": "steady load"}], "max_tokens": 16}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        started = time.monotonic()
        headers = {"authorization": f"Bearer {self.api_key}"}
        try:
            async with self._http.stream("POST", self.url + "/v1/chat/completions", json=body,
                                         headers=headers) as resp:
                raw = await resp.aread()
                rid = resp.headers.get("x-request-id")
                cost = _cost(raw, stream) if resp.status_code == 200 else None
                partial = stream and cost is None and resp.status_code == 200 and b'"content"' in raw
                return Outcome(started, time.monotonic(), resp.status_code, rid, cost, stream,
                               None if cost is not None else raw[-300:].decode(errors="replace"), partial)
        except httpx.HTTPError as exc:
            return Outcome(started, time.monotonic(), 0, None, None, stream, type(exc).__name__)


def _cost(raw: bytes, stream: bool) -> int | None:
    if not stream:
        try:
            return orjson.loads(raw)["usage"]["cost_micros"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
    if not raw.rstrip().endswith(b"data: [DONE]"):
        return None
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {") and b"cost_micros" in line:
            usage = orjson.loads(line[6:]).get("usage") or {}
            if "cost_micros" in usage:
                return usage["cost_micros"]
    return None

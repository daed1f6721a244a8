"""Client CPU per EVALSHA: redis-py (asyncio, hiredis) vs the proxy's pipelined client.

Runs `--tasks` concurrent callers in one process on uvloop, each calling a small script in a loop, and
reports the process's CPU time per call (what the relay pays per script call) and calls per second.

    .venv/bin/python -m bench.redis_clients [--redis-url URL] [--calls 40000] [--tasks 32]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop
from redis.asyncio import Redis

from shared.redis_client import connect_redis
from shared.redis_pipeline import LuaScript, PipelinedRedis

SCRIPT = "redis.call('INCRBY', KEYS[1], ARGV[1]); return {1, ARGV[2], tonumber(ARGV[1])}"
KEY = "rr:bench:redis_clients"


async def _drive(call, calls: int, tasks: int) -> tuple[float, float]:
    per_task = calls // tasks

    async def worker() -> None:
        for i in range(per_task):
            await call(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return (time.process_time() - cpu) / (per_task * tasks), (time.perf_counter() - wall)


async def main(url: str, calls: int, tasks: int) -> None:
    rp: Redis = connect_redis(url)
    script = rp.register_script(SCRIPT)
    lean = PipelinedRedis(url)
    lua = LuaScript(SCRIPT)
    clients = {
        "redis-py": lambda i: script(keys=[KEY], args=[1, f"req-{i}"]),
        "pipelined": lambda i: lean.evalsha(lua, [KEY], [1, f"req-{i}"]),
    }
    for call in clients.values():
        await _drive(call, 2000, tasks)  # warm up: connections, script cache
    for _ in range(2):
        for name, call in clients.items():
            cpu, wall = await _drive(call, calls, tasks)
            print(f"{name:10s} {cpu * 1e6:6.1f} µs CPU/call  {calls / wall:9,.0f} calls/s  ({tasks} tasks)")
    await rp.delete(KEY)
    await rp.aclose()
    await lean.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--calls", type=int, default=40000)
    ap.add_argument("--tasks", type=int, default=32)
    a = ap.parse_args()
    uvloop.run(main(a.redis_url, a.calls, a.tasks))

"""Upstream HTTP clients compared on the proxy's job: `python -m bench.clients [--seconds 5] [--concurrency 32]`.

Each client POSTs the bench's chat request to nginx's fixed answer (the same upstream as `bench.overhead`)
from N coroutines on one uvloop for a fixed time, reading the whole body, in this process. It prints
requests/s and this process's CPU time per request: what the client itself costs on the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import uvloop

from bench.overhead import REQUEST, Stack, start_upstream, stop

Post = Callable[[], Awaitable[bytes]]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(post: Post, seconds: float, concurrency: int) -> tuple[int, float]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            body = await post()
            assert b"choices" in body
            done += 1

    cpu = _cpu()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, _cpu() - cpu


async def aiohttp_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False)
    headers = {"content-type": "application/json", "authorization": "Bearer x"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)

    async def post() -> bytes:
        async with session.post(url, data=REQUEST.encode(), headers=headers, timeout=timeout) as resp:
            return await resp.read()

    return post, session.close


async def pyreqwest_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    from pyreqwest.client import ClientBuilder

    client = (ClientBuilder().connect_timeout(timedelta(seconds=5)).read_timeout(timedelta(seconds=30))
              .max_connections(1000).gzip(False).error_for_status(False).build())
    body = REQUEST.encode()

    async def post() -> bytes:
        request = (client.post(url).header("content-type", "application/json").header("authorization", "Bearer x")
                   .body_bytes(body).build_streamed())
        async with request as resp:
            return bytes(await resp.body_reader.bytes())

    return post, client.close


async def httpx_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000), timeout=30)

    async def post() -> bytes:
        resp = await client.post(url, content=REQUEST.encode(), headers={"authorization": "Bearer x",
                                                                          "content-type": "application/json"})
        return resp.content

    return post, client.aclose


async def h1_client(url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    from proxy.h1 import H1Pool

    pool = H1Pool(max_connections=1000)
    base, _, path = url.partition("/chat")
    headers = b"content-type: application/json\r\nauthorization: Bearer x\r\n"
    body = REQUEST.encode()

    async def post() -> bytes:
        resp = await pool.post(base, "/chat" + path, headers, body, connect_timeout_s=5, read_timeout_s=30)
        return await resp.read()

    return post, pool.close


CLIENTS = {"h1 (proxy.h1)": h1_client, "aiohttp": aiohttp_client, "pyreqwest": pyreqwest_client,
           "httpx": httpx_client}


async def compare(url: str, seconds: float, concurrency: int) -> None:
    print(f"{'client':<14} {'req/s':>8} {'CPU µs/req':>11}   ({concurrency} concurrent, {seconds:.0f} s, one process)")
    for name, make in CLIENTS.items():
        post, close = await make(url)
        await _drive(post, 1.0, concurrency)  # warm the pool
        done, cpu = await _drive(post, seconds, concurrency)
        await close()
        print(f"{name:<14} {done / seconds:>8,.0f} {1e6 * cpu / done:>11,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.clients", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="rr-clients-")), "", "")
    try:
        url = start_upstream(stack) + "/chat/completions"
        uvloop.run(compare(url, args.seconds, args.concurrency))
    finally:
        for proc in stack.procs.values():
            stop(proc)


if __name__ == "__main__":
    main()

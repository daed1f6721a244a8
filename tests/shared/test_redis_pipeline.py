"""The proxy's pipelined Redis client against the real Redis (and, for timeouts, a server that never answers)."""

from __future__ import annotations

import asyncio
import os

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.redis_pipeline import LuaScript, PipelinedRedis
from shared.settings import Settings

ECHO = LuaScript("return {tonumber(ARGV[1]), KEYS[1], redis.call('INCR', KEYS[1])}")


@pytest.fixture
async def client(settings: Settings):
    c = PipelinedRedis(settings.redis_url, connections=2, timeout_s=2.0)
    yield c
    await c.aclose()


def _key(settings: Settings) -> str:
    return f"{settings.redis_prefix}pipeline:{os.urandom(4).hex()}"


async def test_replies_match_their_calls_under_concurrency(client: PipelinedRedis, settings: Settings) -> None:
    key = _key(settings)
    replies = await asyncio.gather(*(client.evalsha(ECHO, [key], [i]) for i in range(500)))
    assert [r[0] for r in replies] == list(range(500))  # each caller got its own reply, in any interleaving
    assert all(r[1] == key.encode() for r in replies)
    assert sorted(r[2] for r in replies) == list(range(1, 501))


async def test_script_flushed_from_redis_is_loaded_again(client: PipelinedRedis, settings: Settings,
                                                         redis: Redis) -> None:
    key = _key(settings)
    assert (await client.evalsha(ECHO, [key], [7]))[2] == 1
    await redis.script_flush()
    assert (await client.evalsha(ECHO, [key], [8]))[:1] == [8]


async def test_script_errors_are_response_errors_and_the_connection_stays_usable(
        client: PipelinedRedis, settings: Settings) -> None:
    broken = LuaScript("return redis.call('NOSUCHCOMMAND')")
    with pytest.raises(ResponseError):
        await client.evalsha(broken, [_key(settings)], [])
    assert (await client.evalsha(ECHO, [_key(settings)], [3]))[0] == 3


async def test_cancelled_caller_does_not_shift_the_replies_of_others(client: PipelinedRedis,
                                                                     settings: Settings) -> None:
    slow = LuaScript("local t = redis.call('TIME'); local n = 0; while n < 300000 do n = n + 1 end; return 'slow'")
    key = _key(settings)
    doomed = asyncio.ensure_future(client.evalsha(slow, [key], []))
    await asyncio.sleep(0)
    others = [asyncio.ensure_future(client.evalsha(ECHO, [key], [i])) for i in range(10)]
    await asyncio.sleep(0.001)
    doomed.cancel()
    assert [r[0] for r in await asyncio.gather(*others)] == list(range(10))


async def test_reconnects_after_redis_drops_the_connection(client: PipelinedRedis, settings: Settings,
                                                           redis: Redis) -> None:
    key = _key(settings)
    await asyncio.gather(*(client.evalsha(ECHO, [key], [1]) for _ in range(4)))  # open both connections
    ids = await client.execute("CLIENT", "ID"), await client.execute("CLIENT", "ID")
    for client_id in ids:
        await redis.execute_command("CLIENT", "KILL", "ID", client_id)
    await asyncio.sleep(0.05)
    outcomes = await asyncio.gather(*(client.evalsha(ECHO, [key], [2]) for _ in range(4)), return_exceptions=True)
    assert all(isinstance(o, list) and o[0] == 2 for o in outcomes), outcomes


async def test_selects_the_database_of_the_url(settings: Settings, redis: Redis) -> None:
    base = settings.redis_url.rsplit("/", 1)[0]
    other = PipelinedRedis(f"{base}/9")
    key = _key(settings)
    try:
        await other.evalsha(ECHO, [key], [1])
        assert await redis.exists(key) == 0  # written to db 9, not to the run's db
        assert await other.execute("EXISTS", key) == 1
        await other.execute("DEL", key)
    finally:
        await other.aclose()


async def test_unanswered_calls_time_out_and_the_next_call_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RedisTimeoutError):
            await client.evalsha(ECHO, ["k"], [1])
        assert asyncio.get_running_loop().time() - started < 1.5
        with pytest.raises(RedisTimeoutError):
            await client.evalsha(ECHO, ["k"], [1])
        assert len(accepted) == 2  # the hung connection was dropped and a new one opened
    finally:
        await client.aclose()
        server.close()


async def test_unreachable_redis_is_a_connection_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    with pytest.raises(RedisConnectionError):
        await client.evalsha(ECHO, ["k"], [1])
    await client.aclose()

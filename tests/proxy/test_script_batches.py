"""`proxy.script_batches.ScriptBatches` against the real Redis: the calls of one event-loop turn share one
script call, each gets its own answer, a script Redis does not know yet is loaded, a failed call fails each
of its requests (and only those), and the answer of a caller that has gone reaches `orphaned`."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from proxy.script_batches import ScriptBatches
from shared.redis_pipeline import LuaScript, PipelinedRedis
from shared.settings import Settings

# Each entry is one key and one argument; its answer is {its argument, how many entries the call carried}.
# An argument "boom" makes the whole call fail, as a script error would.
_ECHO = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  if ARGV[1 + i] == 'boom' then return redis.error_reply('ERR boom') end
  out[i] = {ARGV[1 + i], n}
end
return out
"""


def _script() -> LuaScript:
    # A comment unique to this test: Redis has never seen its SHA, so the first call meets NOSCRIPT.
    return LuaScript(f"-- {uuid.uuid4()}\n{_ECHO}")


@pytest.fixture
async def fast(settings: Settings):
    client = PipelinedRedis(settings.redis_url, connections=2)
    yield client
    await client.aclose()


def _entry(settings: Settings, value: str) -> tuple[list, list]:
    return [f"{settings.redis_prefix}batch:{value}"], [value]


async def test_the_calls_of_one_turn_share_one_script_call_and_each_gets_its_answer(fast, settings) -> None:
    batches = ScriptBatches(fast, _script())
    # First turn: the script is unknown to Redis (NOSCRIPT), so the call goes through evalsha, which loads it.
    first = [batches.call("s", _entry(settings, f"a{i}")) for i in range(5)]
    assert await asyncio.gather(*first) == [[f"a{i}".encode(), 5] for i in range(5)]
    # Next turns: straight onto the open connection.
    for turn in range(3):
        futures = [batches.call("s", _entry(settings, f"t{turn}-{i}")) for i in range(3 + turn)]
        assert await asyncio.gather(*futures) == [[f"t{turn}-{i}".encode(), 3 + turn] for i in range(3 + turn)]
    await batches.close()


async def test_each_shard_gets_its_own_call(fast, settings) -> None:
    batches = ScriptBatches(fast, _script())
    futures = [batches.call(shard, _entry(settings, f"{shard}{i}")) for i in range(4) for shard in ("x", "y", "z")]
    answers = await asyncio.gather(*futures)
    assert all(size == 4 for _, size in answers), answers
    assert [value for value, _ in answers] == [f"{s}{i}".encode() for i in range(4) for s in ("x", "y", "z")]


async def test_a_failed_call_fails_each_of_its_requests_and_only_those(fast, settings) -> None:
    from redis.exceptions import ResponseError

    batches = ScriptBatches(fast, _script())
    await batches.call("s", _entry(settings, "warm"))  # loaded: the failing call takes the direct path
    doomed = [batches.call("s", _entry(settings, v)) for v in ("ok1", "boom", "ok2")]
    elsewhere = batches.call("other", _entry(settings, "fine"))
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(r, ResponseError) and "boom" in str(r) for r in results), results
    assert await elsewhere == [b"fine", 1]
    assert await batches.call("s", _entry(settings, "after")) == [b"after", 1]


async def test_the_answer_of_a_caller_that_has_gone_reaches_orphaned(fast, settings) -> None:
    batches = ScriptBatches(fast, _script())
    await batches.call("s", _entry(settings, "warm"))
    orphans: list = []
    gone = batches.call("s", _entry(settings, "gone"), orphans.append)
    kept = batches.call("s", _entry(settings, "kept"), orphans.append)
    gone.cancel()
    assert await kept == [b"kept", 2]
    assert orphans == [[b"gone", 2]]


async def test_a_dropped_connection_fails_the_call_and_the_next_one_reconnects(fast, settings) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    batches = ScriptBatches(fast, _script())
    await batches.call("s", _entry(settings, "warm"))
    await batches.call("s", _entry(settings, "warm2"))  # both pipelined connections are open
    futures = [batches.call("s", _entry(settings, f"v{i}")) for i in range(3)]
    await asyncio.sleep(0)  # the batch is sent on this turn...
    for conn in fast._conns:  # ...and every connection breaks before Redis answers
        assert conn is not None
        conn.fail(RedisConnectionError("dropped by the test"))
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert await batches.call("s", _entry(settings, "again")) == [b"again", 1]


async def test_a_script_redis_does_not_know_is_loaded_on_an_open_connection(fast, settings) -> None:
    warm = ScriptBatches(fast, _script())
    await warm.call("s", _entry(settings, "w1"))
    await warm.call("s", _entry(settings, "w2"))  # every connection is open now
    fresh = ScriptBatches(fast, _script())  # never loaded: its direct call meets NOSCRIPT and is retried
    futures = [fresh.call("s", _entry(settings, f"f{i}")) for i in range(3)]
    assert await asyncio.gather(*futures) == [[f"f{i}".encode(), 3] for i in range(3)]

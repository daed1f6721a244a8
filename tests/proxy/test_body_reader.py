"""`BodyReader` as a unit, its sweeper driven by hand: what counts against an address, and that every path
out of a read gives its place back."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.errors import BodyTooLarge, InvalidRequest, RequestTimeout, TooManyUnfinishedRequests
from proxy.http import BodyReader

IP = "192.0.2.7"


def _messages(*messages: dict):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


async def test_a_whole_body_is_read_and_nothing_is_left_counted() -> None:
    reader = BodyReader(100, 30.0, 2)
    receive = _messages({"type": "http.request", "body": b"ab", "more_body": True},
                        {"type": "http.request", "body": b"cd", "more_body": False})
    assert await reader.read(receive, None, IP) == b"abcd"
    assert reader.slow(IP) == 0 and not reader._reads


@pytest.mark.parametrize(("messages", "error"), [
    ([{"type": "http.request", "body": b"x" * 101, "more_body": False}], BodyTooLarge),
    ([{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.disconnect"}], InvalidRequest),
])
async def test_a_refused_body_leaves_nothing_counted(messages: list[dict], error: type) -> None:
    reader = BodyReader(100, 30.0, 2)
    with pytest.raises(error):
        await reader.read(_messages(*messages), None, IP)
    assert not reader._reads


async def _hanging(reader: BodyReader, client: str, count: int) -> list[asyncio.Task]:
    never = asyncio.Event()

    async def hang() -> dict:
        await never.wait()
        return {}

    tasks = [asyncio.ensure_future(reader.read(hang, None, client)) for _ in range(count)]
    await asyncio.sleep(0)  # let them all start reading
    return tasks


async def test_only_slow_bodies_count_and_the_bound_is_per_address() -> None:
    reader = BodyReader(100, 30.0, 2)
    hung = await _hanging(reader, IP, 5)  # a burst: more reads in progress than the bound, none slow yet
    whole = {"type": "http.request", "body": b"ok"}
    assert await reader.read(_messages(whole), None, IP) == b"ok"
    reader.sweep(time.monotonic() + reader.interval)  # they have lasted a whole interval: slow
    assert reader.slow(IP) == 5
    with pytest.raises(TooManyUnfinishedRequests) as refused:
        await reader.read(_messages(whole), None, IP)
    assert refused.value.status == 429
    assert await reader.read(_messages(whole), None, "192.0.2.8") == b"ok"  # another address
    for task in hung:  # what the server does when such a client goes away
        task.cancel()
    await asyncio.gather(*hung, return_exceptions=True)
    assert all(t.cancelled() for t in hung)  # a cancellation that was not the deadline stays one
    assert reader.slow(IP) == 0 and not reader._reads
    assert await reader.read(_messages(whole), None, IP) == b"ok"


async def test_a_body_past_its_deadline_is_a_408_and_gives_its_place_back() -> None:
    reader = BodyReader(100, 30.0, 2)
    (hung,) = await _hanging(reader, IP, 1)
    reader.sweep(time.monotonic() + 29)  # slow, not yet late
    await asyncio.sleep(0)
    assert not hung.done() and reader.slow(IP) == 1
    reader.sweep(time.monotonic() + 30)
    with pytest.raises(RequestTimeout) as timed_out:
        await hung
    assert timed_out.value.status == 408 and timed_out.value.code == "request_timeout"
    assert reader.slow(IP) == 0 and not reader._reads

"""`BodyReader` as a unit: the per-address slot is given back on every path out of a read."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import BodyTooLarge, InvalidRequest, TooManyUnfinishedRequests
from proxy.http import BodyReader

IP = "192.0.2.7"


def _messages(*messages: dict):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


async def test_a_whole_body_is_read_and_its_slot_returned() -> None:
    reader = BodyReader(100, 30.0, 2)
    receive = _messages({"type": "http.request", "body": b"ab", "more_body": True},
                        {"type": "http.request", "body": b"cd", "more_body": False})
    assert await reader.read(receive, None, IP) == b"abcd"
    assert reader.reading(IP) == 0


@pytest.mark.parametrize(("messages", "error"), [
    ([{"type": "http.request", "body": b"x" * 101, "more_body": False}], BodyTooLarge),
    ([{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.disconnect"}], InvalidRequest),
])
async def test_a_refused_body_returns_its_slot(messages: list[dict], error: type) -> None:
    reader = BodyReader(100, 30.0, 2)
    with pytest.raises(error):
        await reader.read(_messages(*messages), None, IP)
    assert reader.reading(IP) == 0


async def test_the_bound_is_per_address_and_a_cancelled_read_returns_its_slot() -> None:
    reader = BodyReader(100, 30.0, 2)
    never = asyncio.Event()

    async def hang() -> dict:
        await never.wait()
        return {}

    hung = [asyncio.ensure_future(reader.read(hang, None, IP)) for _ in range(2)]
    await asyncio.sleep(0)  # let both start reading
    assert reader.reading(IP) == 2
    with pytest.raises(TooManyUnfinishedRequests) as refused:
        await reader.read(hang, None, IP)
    assert refused.value.status == 429
    assert await reader.read(_messages({"type": "http.request", "body": b"ok"}), None, "192.0.2.8") == b"ok"
    for task in hung:  # what the server does when such a client goes away
        task.cancel()
    await asyncio.gather(*hung, return_exceptions=True)
    assert reader.reading(IP) == 0
    assert all(t.cancelled() for t in hung)  # a cancellation that was not the deadline stays one

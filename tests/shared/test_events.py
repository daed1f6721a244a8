"""The event outbox: an event is recorded once per dedupe key, and an unknown type is refused."""

import pytest

from shared.notify.events import UnknownEvent, emit


async def test_an_event_is_recorded_once_per_dedupe_key(db, factory) -> None:
    org = await factory.org()
    first = await emit(db, org, "balance.low", {"available_micros": 5}, dedupe_key="crossing-1")
    again = await emit(db, org, "balance.low", {"available_micros": 4}, dedupe_key="crossing-1")
    other = await emit(db, org, "balance.low", {"available_micros": 3}, dedupe_key="crossing-2")
    undeduped = [await emit(db, org, "key.created", {"key_id": 1}) for _ in range(2)]
    assert first is not None and again is None and other is not None
    assert all(undeduped) and undeduped[0] != undeduped[1]
    rows = await db.fetch("select event_type, payload from event_outbox where org_id = $1 order by id", org)
    assert [r["event_type"] for r in rows] == ["balance.low", "balance.low", "key.created", "key.created"]
    assert '"available_micros": 5' in rows[0]["payload"]


async def test_an_unknown_event_type_is_refused(db, factory) -> None:
    org = await factory.org()
    with pytest.raises(UnknownEvent):
        await emit(db, org, "balance.lowish", {})
    assert await db.fetchval("select count(*) from event_outbox where org_id = $1", org) == 0

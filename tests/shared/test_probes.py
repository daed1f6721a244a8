"""The probe runner against real mock upstreams (persona knob), PostgreSQL and Redis: what a round stores
(hashes and derived numbers, never answer text), the budgets, that substitution, degradation and broken tool
calls are caught within a bounded number of rounds and an honest route is not, and that the router then
sends customers to the healthy route (end to end through a real proxy)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from proxy.routing import load_catalogue
from shared.crypto import box_from_settings
from shared.settings import Settings
from shared.workers.probes import ProbeRunner
from tests.conftest import Factory, Server, start_mock_upstream, wait_for_rows

MAX_ROUNDS = 12  # the bar: each bad route is flagged within this many rounds (the simulation needs 4-7)


@pytest.fixture(scope="module")
def persona_mock() -> Iterator[Server]:
    server = start_mock_upstream("persona-mock")
    yield server
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def _settings(settings: Settings, **overrides: object) -> Settings:
    return msgspec.structs.replace(settings, probe_enabled=True, probe_gap_ms=0, **overrides)


async def _configure(mock: Server, models: dict) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.post(mock.url + "/_mock/config", json={"models": models})
        assert resp.status_code == 200, resp.text


async def _entry_route(runner_settings: Settings, db, route_id: int):
    box = box_from_settings(runner_settings.master_key_bytes, runner_settings.master_key_id,
                            runner_settings.old_master_keys_map)
    catalogue = await load_catalogue(db, box)
    for entry in catalogue.models.values():
        for route in entry.routes:
            if route.id == route_id:
                return entry, route
    raise AssertionError(f"route {route_id} not in the catalogue")


async def _pair(factory: Factory, mock: Server, bad: str) -> tuple[str, int, int, str, str]:
    """A model with a reference route and a second route (priority 10: customers' first choice)."""
    tag = uuid.uuid4().hex[:6]
    ref_up, bad_up = f"ref-{tag}", f"bad-{tag}"
    ref_provider = await factory.provider(mock.url + "/v1")
    other_provider = await factory.provider(mock.url + "/v1")
    model = await factory.model(ref_provider, upstream_model=ref_up)
    ref_id = await factory.db.fetchval("select id from routes where model = $1", model)
    bad_id = await factory.route(model, other_provider, bad_up, priority=10)
    await factory.db.execute("update models set reference_route_id = $2 where name = $1", model, ref_id)
    return model, ref_id, bad_id, ref_up, bad_up


async def _rounds_until(runner: ProbeRunner, clock: Clock, settings: Settings, db, route_ids: list[int],
                        target: int, statuses: tuple[str, ...], limit: int = MAX_ROUNDS) -> int | None:
    """Run rounds of every route in `route_ids` (in turn) until `target` has one of `statuses`."""
    for n in range(1, limit + 1):
        clock.now += 900
        for route_id in route_ids:
            entry, route = await _entry_route(settings, db, route_id)
            report = await runner.run_round(entry, route)
            assert report.probes == 20
        if await db.fetchval("select probe_status from routes where id = $1", target) in statuses:
            return n
    return None


async def test_a_round_stores_hashes_and_features_only_and_is_paid_by_the_platform(
        settings, db, redis, factory: Factory, persona_mock: Server) -> None:
    s = _settings(settings)
    _model, ref_id, _, ref_up, bad_up = await _pair(factory, persona_mock, "reference")
    await _configure(persona_mock, {ref_up: {"persona": "reference"}, bad_up: {"persona": "reference"}})
    ledger_before = await db.fetchval("select count(*) from balance_transactions")
    runner = ProbeRunner(s, db, redis, clock=Clock(), rng=random.Random(1))
    await runner.start()
    try:
        entry, route = await _entry_route(s, db, ref_id)
        report = await runner.run_round(entry, route)
    finally:
        await runner.close()
    assert report.probes == 20 and report.errors == 0 and not report.refused
    rows = await db.fetch("select * from probe_results where route_id = $1", ref_id)
    assert len(rows) == 20
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["outcome"])
        assert len(r["prompt_hash"]) == 32 and len(r["response_hash"]) == 32
        assert r["http_status"] == 200 and r["ttfb_ms"] is not None and r["total_ms"] >= r["ttfb_ms"]
        assert r["reported_model"] == ref_up and r["system_fingerprint"] == "fp_mock"
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 and r["route_status"] == "healthy"
    assert by_kind["known_answer"].count("pass") >= 6 and set(by_kind["tool_call"]) == {"pass"}
    assert set(by_kind["fingerprint"]) == {"sample"} and len(by_kind["deterministic"]) == 2
    # No answer text anywhere in the stored rows: the capitals, tool arguments and animals the mock answered
    # are not in any text or JSON column (hashes and numbers only).
    stored = " ".join(str(v) for r in rows for k, v in r.items() if k not in ("prompt_hash", "response_hash"))
    for text in ("Paris", "Tokyo", "celsius", "fahrenheit", "vault", "cat", "dog", "elephant", "sentence"):
        assert text.lower() not in stored.lower()
    spend = await db.fetch("select * from probe_spend where route_id in (0, $1)", ref_id)
    assert {r["route_id"] for r in spend} == {0, ref_id}
    route_row = next(r for r in spend if r["route_id"] == ref_id)
    assert route_row["probes"] == 20 and route_row["reserved_micros"] == 0
    assert route_row["spent_micros"] == sum(r["cost_micros"] for r in rows) > 0
    # Probes never touch an org's balance: no ledger row, no usage record for them.
    assert await db.fetchval("select count(*) from balance_transactions") == ledger_before


async def test_probe_spend_stops_at_the_route_budget(settings, db, redis, factory: Factory,
                                                     persona_mock: Server) -> None:
    s = _settings(settings, probe_route_budget_micros=3000)
    _model, ref_id, _, ref_up, _ = await _pair(factory, persona_mock, "reference")
    await _configure(persona_mock, {ref_up: {"persona": "reference"}})
    runner = ProbeRunner(s, db, redis, clock=Clock(), rng=random.Random(2))
    await runner.start()
    try:
        entry, route = await _entry_route(s, db, ref_id)
        first = await runner.run_round(entry, route)
        second = await runner.run_round(entry, route)
    finally:
        await runner.close()
    assert first.refused and second.refused and first.probes < 20
    row = await db.fetchrow("select * from probe_spend where route_id = $1", ref_id)
    assert row["spent_micros"] + row["reserved_micros"] <= 3000 and row["refused"] >= 2


@pytest.mark.parametrize(("bad_persona", "knobs", "expect", "detectors"), [
    ("substitute", {"persona": "substitute"}, ("failing",), {"accuracy", "answer_distribution", "usage_shape"}),
    ("degraded", {"persona": "reference", "error_rate": 0.6}, ("failing",), {"error_rate"}),
    ("broken_tools", {"persona": "broken_tools", "tool_break_rate": 0.35}, ("degraded", "failing"), {"tool_calls"}),
])
async def test_bad_routes_are_flagged_within_bounded_rounds(settings, db, redis, factory: Factory,
                                                            persona_mock: Server, bad_persona, knobs, expect,
                                                            detectors) -> None:
    s = _settings(settings)
    _model, ref_id, bad_id, ref_up, bad_up = await _pair(factory, persona_mock, bad_persona)
    await _configure(persona_mock, {ref_up: {"persona": "reference"}, bad_up: knobs})
    clock = Clock()
    runner = ProbeRunner(s, db, redis, clock=clock, rng=random.Random(3))
    await runner.start()
    try:
        rounds = await _rounds_until(runner, clock, s, db, [ref_id, bad_id], bad_id, expect)
    finally:
        await runner.close()
    assert rounds is not None, f"{bad_persona} not flagged in {MAX_ROUNDS} rounds"
    found = {r["detector"] for r in await db.fetch("select detector from quality_findings where route_id = $1",
                                                  bad_id)}
    assert detectors & found, found
    finding = await db.fetchrow("select * from quality_findings where route_id = $1 order by id desc limit 1", bad_id)
    assert 0 < finding["confidence"] <= 1 and finding["evidence"]
    history = await db.fetch("select * from route_status_history where route_id = $1 order by id", bad_id)
    assert history and history[-1]["to_status"] in expect and history[-1]["actor_user_id"] is None
    assert await db.fetchval("select probe_status from routes where id = $1", ref_id) == "healthy"
    assert not await db.fetchval("select count(*) from quality_findings where route_id = $1", ref_id)


async def test_an_honest_route_stays_healthy(settings, db, redis, factory: Factory, persona_mock: Server) -> None:
    s = _settings(settings)
    _model, ref_id, other_id, ref_up, other_up = await _pair(factory, persona_mock, "reference")
    await _configure(persona_mock, {ref_up: {"persona": "reference"}, other_up: {"persona": "reference"}})
    clock = Clock()
    runner = ProbeRunner(s, db, redis, clock=clock, rng=random.Random(4))
    await runner.start()
    try:
        assert await _rounds_until(runner, clock, s, db, [ref_id, other_id], other_id, ("degraded", "failing"),
                                   limit=8) is None
    finally:
        await runner.close()
    assert not await db.fetchval("select count(*) from quality_findings where route_id = $1", other_id)


async def test_tick_runs_each_due_route_once_across_runners(settings, db, redis, factory: Factory,
                                                            persona_mock: Server) -> None:
    s = _settings(settings)
    _model, ref_id, other_id, ref_up, other_up = await _pair(factory, persona_mock, "reference")
    await _configure(persona_mock, {ref_up: {"persona": "reference"}, other_up: {"persona": "reference"}})
    clock = Clock()
    runners = [ProbeRunner(s, db, redis, clock=clock, rng=random.Random(i)) for i in range(2)]
    for r in runners:
        await r.start()
    try:
        await asyncio.gather(*(r.tick() for r in runners))  # schedules the new routes
        await db.execute("update route_quality set next_round_at = now() - interval '1 second' "
                         "where route_id = any($1::bigint[])", [ref_id, other_id])
        clock.now = max(clock.now, (await db.fetchval("select extract(epoch from now())::float8")) + 1)
        reports = [rep for reps in await asyncio.gather(*(r.tick() for r in runners)) for rep in reps]
    finally:
        for r in runners:
            await r.close()
    mine = [rep for rep in reports if rep.route_id in (ref_id, other_id)]
    assert sorted(rep.route_id for rep in mine) == sorted([ref_id, other_id])
    nxt = await db.fetchval("select min(next_round_at) from route_quality where route_id = any($1::bigint[])",
                            [ref_id, other_id])
    assert nxt.timestamp() > clock.now + s.probe_interval_s * (1 - s.probe_jitter) - 1


async def test_customers_move_to_the_healthy_route_once_the_bad_one_fails(
        settings, db, redis, factory: Factory, persona_mock: Server, proxy: Server) -> None:
    s = _settings(settings)
    model, ref_id, bad_id, ref_up, bad_up = await _pair(factory, persona_mock, "substitute")
    await _configure(persona_mock, {ref_up: {"persona": "reference"}, bad_up: {"persona": "substitute"}})
    org_id = await factory.org()
    _, api_key = await factory.key(org_id)
    await factory.publish_config(proxy, api_key, model)
    auth = {"authorization": f"Bearer {api_key}"}
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    async with httpx.AsyncClient(timeout=10) as http:
        first = await http.post(proxy.url + "/v1/chat/completions", json=body, headers=auth)
        assert first.status_code == 200
        first_id = first.headers["x-request-id"]
        row = await wait_for_rows(db, "select route_id, route_status from request_logs where request_id = $1",
                                  first_id)
        assert (row[0]["route_id"], row[0]["route_status"]) == (bad_id, "healthy")  # priority 10 wins
        clock = Clock()
        runner = ProbeRunner(s, db, redis, clock=clock, rng=random.Random(5))
        await runner.start()
        try:
            assert await _rounds_until(runner, clock, s, db, [ref_id, bad_id], bad_id, ("failing",)) is not None
        finally:
            await runner.close()
        # The runner published `config`: the proxy reloads and plans the healthy route only.
        for _ in range(100):
            resp = await http.post(proxy.url + "/v1/chat/completions", json=body, headers=auth)
            assert resp.status_code == 200
            rows = await wait_for_rows(db, "select route_id, route_status from request_logs where request_id = $1",
                                       resp.headers["x-request-id"])
            if rows[0]["route_id"] == ref_id:
                assert rows[0]["route_status"] == "healthy"
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("customer traffic never left the failing route")
        for _ in range(5):  # and stays off it
            resp = await http.post(proxy.url + "/v1/chat/completions", json=body, headers=auth)
            rows = await wait_for_rows(db, "select route_id from request_logs where request_id = $1",
                                       resp.headers["x-request-id"])
            assert rows[0]["route_id"] == ref_id

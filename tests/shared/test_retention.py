"""Retention: expired partitions dropped by their catalog bounds, each org's request logs trimmed to its own
retention in bounded batches, one pass at a time, and a worker loop that outlives database failures.

These tests run against a database of their own (migrated here), so a pass sees only the rows and partitions
they made, and their counts are exact.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest
import pytest_asyncio

from shared.db.migrate import migrate
from shared.settings import Settings, SettingsError
from shared.workers import retention
from shared.workers.main import ensure_partitions_ahead
from shared.workers.retention import RetentionResult, run_retention_pass
from tests.conftest import ROOT, Factory, _with_database, settings_env, stop_process

PARENTS = ("request_logs", "usage_records")
# Every test here computes its months and cutoffs from Python's clock: `make test-calendar` runs them at a
# month's and a year's last seconds.
pytestmark = pytest.mark.calendar


@pytest_asyncio.fixture(scope="module")
async def own_db(servers: tuple[str, str]) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    admin_url = servers[0]
    name = f"rr_retention_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'create database "{name}"')
    await conn.close()
    url = _with_database(admin_url, name)
    await migrate(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    yield url, pool
    await pool.close()
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'drop database "{name}" with (force)')
    await conn.close()


@pytest_asyncio.fixture
async def pool(own_db: tuple[str, asyncpg.Pool]) -> asyncpg.Pool:
    """The private database as migrate leaves it: no orgs, no rows, partitions for this month and two ahead."""
    pool = own_db[1]
    for parent in PARENTS:
        for name in await _partitions(pool, parent):
            await pool.execute(f'drop table "{name}"')
    await ensure_partitions_ahead(pool)  # by Python's clock: the one @pytest.mark.calendar moves
    await pool.execute("delete from orgs")
    return pool


@pytest.fixture
def orgs(pool: asyncpg.Pool, redis, redis_keys, settings: Settings) -> Factory:
    return Factory(pool, redis, redis_keys, settings)


def _with(settings: Settings, **changes: object) -> Settings:
    return msgspec.structs.replace(settings, **changes)


def _month_start(offset: int, now: datetime) -> datetime:
    """The first instant (UTC) of the month `offset` months from now's: -1 is last month."""
    year, month = divmod(now.month - 1 + offset, 12)
    return datetime(now.year + year, month + 1, 1, tzinfo=UTC)


def _standard_name(parent: str, offset: int, now: datetime) -> str:
    start = _month_start(offset, now)
    return f"{parent}_y{start:%Y}m{start:%m}"


async def _create_partition(pool: asyncpg.Pool, parent: str, offset: int, now: datetime,
                            name: str | None = None) -> str:
    name = name or _standard_name(parent, offset, now)
    start, end = _month_start(offset, now), _month_start(offset + 1, now)
    await pool.execute(f'create table "{name}" partition of {parent} '
                       f"for values from ('{start.isoformat()}') to ('{end.isoformat()}')")
    return name


async def _partitions(pool: asyncpg.Pool, parent: str) -> set[str]:
    rows = await pool.fetch(
        """select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
           where i.inhparent = $1::regclass""", parent)
    return {r["relname"] for r in rows}


async def _log_rows(pool: asyncpg.Pool, org_id: int | None, ages_days: list[float], now: datetime) -> None:
    """Request-log rows `ages_days` old; the request id says the age, so survivors can be read back."""
    await pool.executemany(
        """insert into request_logs (created_at, request_id, org_id, path, method, status_code, latency_ms)
           values ($1, $2, $3, '/v1/chat/completions', 'POST', 200, 5)""",
        [(now - timedelta(days=age), f"age{age:g}-{secrets.token_hex(6)}", org_id) for age in ages_days])


async def _ages_left(pool: asyncpg.Pool, org_id: int | None) -> list[float]:
    rows = await pool.fetch("select request_id from request_logs where org_id is not distinct from $1", org_id)
    return sorted(float(r["request_id"].split("-")[0][3:]) for r in rows)


async def test_partitions_wholly_past_the_window_are_dropped_by_their_bounds(pool, settings: Settings) -> None:
    now = datetime.now(UTC)
    # A request-log window whose cutoff falls inside the month before last.
    last_month_age = (now - _month_start(-1, now)) / timedelta(days=1)
    keep = int(last_month_age) + 10
    cutoff = now - timedelta(days=keep)
    assert _month_start(-2, now) < cutoff - timedelta(days=1) and cutoff + timedelta(days=1) < _month_start(-1, now)
    config = _with(settings, log_retention_max_days=keep, log_retention_default_days=keep)

    # Names mean nothing: an old range named like a future month goes, a recent one named like 2000 stays.
    await _create_partition(pool, "request_logs", -3, now, name="request_logs_y2099m12")
    straddling = await _create_partition(pool, "request_logs", -2, now)
    await _create_partition(pool, "request_logs", -1, now, name="request_logs_y2000m01")
    # usage_records keep their own, longer window (RR_USAGE_RETENTION_DAYS, about 7 years).
    assert config.usage_retention_days == 2555
    await _create_partition(pool, "usage_records", -90, now)
    kept_usage = {await _create_partition(pool, "usage_records", k, now) for k in (-80, -3)}
    current_and_future = {p: {_standard_name(p, k, now) for k in (0, 1, 2)} for p in PARENTS}
    assert await _partitions(pool, "request_logs") == current_and_future["request_logs"] | {
        "request_logs_y2099m12", straddling, "request_logs_y2000m01"}

    # The straddling month stays; of its rows, only those past the cutoff go (rows of no org: the default).
    await pool.executemany(
        """insert into request_logs (created_at, request_id, path, method, status_code, latency_ms)
           values ($1, $2, '/v1/embeddings', 'POST', 200, 5)""",
        [(_month_start(-2, now) + timedelta(hours=1), "expired"), (cutoff + timedelta(days=1), "inside")])

    result = await run_retention_pass(pool, config, wait=True, batch_pause_s=0)
    assert result is not None and result.completed
    assert result.partitions_dropped == {"request_logs": 1, "usage_records": 1}
    assert await _partitions(pool, "request_logs") == current_and_future["request_logs"] | {
        straddling, "request_logs_y2000m01"}
    assert await _partitions(pool, "usage_records") == current_and_future["usage_records"] | kept_usage
    assert [r["request_id"] for r in await pool.fetch("select request_id from request_logs")] == ["inside"]
    assert result.rows_deleted == 1 and result.orgs_trimmed == 0

    again = await run_retention_pass(pool, config, wait=True, batch_pause_s=0)
    assert again is not None and again.partitions_dropped == {"request_logs": 0, "usage_records": 0}


async def test_current_and_future_months_survive_the_shortest_windows(pool, settings: Settings) -> None:
    now = datetime.now(UTC)
    config = _with(settings, log_retention_min_days=1, log_retention_max_days=1, log_retention_default_days=1,
                   usage_retention_days=1)
    last_month = {p: await _create_partition(pool, p, -1, now) for p in PARENTS}
    await _log_rows(pool, None, [0.01], now)

    result = await run_retention_pass(pool, config, wait=True, batch_pause_s=0)
    assert result is not None
    last_month_expired = _month_start(0, now) <= now - timedelta(days=1)  # false only on a month's first day
    for parent in PARENTS:
        expected = {_standard_name(parent, k, now) for k in (0, 1, 2)}
        if not last_month_expired:
            expected.add(last_month[parent])
        assert await _partitions(pool, parent) == expected
        assert result.partitions_dropped[parent] == int(last_month_expired)
    assert await _ages_left(pool, None) == [0.01]
    with pytest.raises(asyncpg.RaiseError, match="keep_days must be at least 1"):
        await pool.fetchval("select rr_drop_expired_partitions('request_logs', 0)")


async def test_each_org_keeps_its_request_logs_for_its_own_retention(pool, orgs: Factory,
                                                                     settings: Settings) -> None:
    now = datetime.now(UTC)
    for k in range(-6, 0):
        await _create_partition(pool, "request_logs", k, now)
    config = _with(settings, log_retention_default_days=30)
    assert config.log_retention_max_days == 400  # every row below is inside the partitions' window
    week = await orgs.org(request_log_retention_days=7)
    default = await orgs.org()  # null: the platform default
    two_months = await orgs.org(request_log_retention_days=60)
    ages = [1, 6, 8, 20, 45, 75, 110]
    for org_id in (week, default, two_months, None):
        await _log_rows(pool, org_id, ages, now)

    result = await run_retention_pass(pool, config, wait=True, batch_pause_s=0)
    assert await _ages_left(pool, week) == [1, 6]
    assert await _ages_left(pool, default) == [1, 6, 8, 20]
    assert await _ages_left(pool, two_months) == [1, 6, 8, 20, 45]
    assert await _ages_left(pool, None) == [1, 6, 8, 20]  # rows of no org (unknown keys) follow the default
    assert result is not None
    assert (result.rows_deleted, result.orgs_trimmed) == (5 + 3 + 2 + 3, 3)
    assert result.partitions_dropped == {"request_logs": 0, "usage_records": 0}

    # Shortening an org's retention takes effect at the next pass; nothing else changes.
    await pool.execute("update orgs set request_log_retention_days = 5 where id = $1", two_months)
    result = await run_retention_pass(pool, config, wait=True, batch_pause_s=0)
    assert await _ages_left(pool, two_months) == [1]
    assert await _ages_left(pool, default) == [1, 6, 8, 20]
    assert result is not None and (result.rows_deleted, result.orgs_trimmed) == (4, 1)


async def test_deletes_go_in_bounded_batches(pool, orgs: Factory, settings: Settings) -> None:
    now = datetime.now(UTC)
    for k in (-2, -1):
        await _create_partition(pool, "request_logs", k, now)
    org_id = await orgs.org(request_log_retention_days=7)
    await _log_rows(pool, org_id, [10] * 175 + [40] * 175, now)  # one or two partitions
    await _log_rows(pool, org_id, [1] * 10, now)

    config = _with(settings, retention_batch_size=100)
    result = await run_retention_pass(pool, config, wait=True, batch_pause_s=0)
    assert result is not None and result.rows_deleted == 350
    # 100 + 100 + 100 + 50 in one partition, or 100 + 75 in each of two: never more than a batch at once.
    assert result.batches == 4
    assert await _ages_left(pool, org_id) == [1] * 10


async def test_a_stopping_worker_ends_its_pass_between_batches(pool, orgs: Factory, settings: Settings) -> None:
    now = datetime.now(UTC)
    await _create_partition(pool, "request_logs", -1, now)
    org_id = await orgs.org(request_log_retention_days=1)
    await _log_rows(pool, org_id, [2] * 500, now)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)  # during the pause after the first batch
    config = _with(settings, retention_batch_size=100)
    result = await run_retention_pass(pool, config, stop=stop, wait=True, batch_pause_s=0.3)
    assert result is not None and not result.completed
    assert result.rows_deleted in (100, 200) and result.batches == result.rows_deleted // 100
    assert len(await _ages_left(pool, org_id)) == 500 - result.rows_deleted


async def test_a_pass_over_empty_tables_changes_nothing(pool, orgs: Factory, settings: Settings) -> None:
    await orgs.org(request_log_retention_days=7)
    before = {p: await _partitions(pool, p) for p in PARENTS}
    for _ in range(2):
        result = await run_retention_pass(pool, settings, wait=True, batch_pause_s=0)
        assert result == RetentionResult(partitions_dropped={"request_logs": 0, "usage_records": 0})
        assert {p: await _partitions(pool, p) for p in PARENTS} == before
    assert await pool.fetchval("select count(*) from request_logs") == 0


async def test_one_pass_at_a_time(pool, orgs: Factory, settings: Settings) -> None:
    now = datetime.now(UTC)
    await _create_partition(pool, "request_logs", -1, now)
    org_id = await orgs.org(request_log_retention_days=1)
    await _log_rows(pool, org_id, [2, 20], now)
    async with pool.acquire() as other:
        await other.execute("select pg_advisory_lock(hashtext('rr_retention_pass'))")
        try:
            assert await run_retention_pass(pool, settings, batch_pause_s=0) is None  # another worker's turn
            assert await _ages_left(pool, org_id) == [2, 20]
        finally:
            await other.execute("select pg_advisory_unlock(hashtext('rr_retention_pass'))")
    result = await run_retention_pass(pool, settings, batch_pause_s=0)
    assert result is not None and result.rows_deleted == 2
    assert await _ages_left(pool, org_id) == []


async def test_worker_loop_outlives_database_failures(monkeypatch, caplog, settings: Settings) -> None:
    config = _with(settings, retention_interval_s=0.01)
    stop = asyncio.Event()
    calls = []

    async def flaky_pass(pool: object, settings: Settings, *, stop: asyncio.Event) -> RetentionResult:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError(111, "connection refused")
        if len(calls) == 2:
            raise asyncpg.AdminShutdownError("terminating connection due to administrator command")
        stop.set()
        return RetentionResult({"request_logs": 1, "usage_records": 0}, rows_deleted=12, orgs_trimmed=2, batches=3)

    monkeypatch.setattr(retention, "run_retention_pass", flaky_pass)
    with caplog.at_level(logging.INFO, logger="rocket_relay.retention"):
        await asyncio.wait_for(retention.enforce_retention(None, config, stop), 10)
    assert len(calls) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "ConnectionRefusedError" in warnings[0] and "AdminShutdownError" in warnings[1]
    [info] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info.startswith("retention pass: dropped 1 request_logs and 0 usage_records partitions, "
                           "deleted 12 request-log rows of 2 orgs in 3 batches")


async def test_worker_loop_keeps_going_on_a_closed_pool(caplog, own_db, settings: Settings) -> None:
    closed = await asyncpg.create_pool(own_db[0], min_size=1, max_size=1)
    await closed.close()
    stop = asyncio.Event()
    config = _with(settings, retention_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="rocket_relay.retention"):
        task = asyncio.create_task(retention.enforce_retention(closed, config, stop))
        await asyncio.sleep(0.3)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
    failures = [r.getMessage() for r in caplog.records if "retention pass failed" in r.getMessage()]
    assert len(failures) >= 2 and all("InterfaceError" in m for m in failures)


async def test_rr_worker_runs_retention(pool, own_db, settings: Settings) -> None:
    """The worker process runs a pass at start-up: an expired partition is gone, and it says so in one line."""
    now = datetime.now(UTC)
    expired = await _create_partition(pool, "usage_records", -100, now)
    env = settings_env(settings, database_url=own_db[0], redis_prefix=f"{settings.redis_prefix}retention:")
    process, log_path = _start_worker(env)
    try:
        deadline = time.monotonic() + 30
        while "retention pass" not in _read(log_path) and time.monotonic() < deadline:
            assert process.poll() is None, _read(log_path)
            await asyncio.sleep(0.1)
    finally:
        assert stop_process(process) == 0
    text = _read(log_path)
    assert "retention pass: dropped 0 request_logs and 1 usage_records partitions" in text, text
    assert expired not in await _partitions(pool, "usage_records")


def _start_worker(env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log_path = Path(tempfile.mkstemp(prefix="rr-worker-retention-", suffix=".log")[1])
    with log_path.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "shared.workers.main"], env=env, cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT)
    return process, log_path


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def test_retention_settings_and_effective_days(settings: Settings) -> None:
    assert (settings.log_retention_default_days, settings.usage_retention_days) == (90, 2555)
    assert (settings.retention_interval_s, settings.retention_batch_size) == (3600.0, 5000)
    for changes, variable in (({"log_retention_default_days": 401}, "RR_LOG_RETENTION_DEFAULT_DAYS"),
                              ({"log_retention_min_days": 100, "log_retention_default_days": 99},
                               "RR_LOG_RETENTION_DEFAULT_DAYS"),
                              ({"usage_retention_days": 0}, "RR_USAGE_RETENTION_DAYS"),
                              ({"retention_interval_s": 0}, "RR_RETENTION_INTERVAL_S"),
                              ({"retention_batch_size": -1}, "RR_RETENTION_BATCH_SIZE")):
        with pytest.raises(SettingsError, match=variable):
            _with(settings, **changes)
    config = _with(settings, log_retention_min_days=3, log_retention_max_days=100, log_retention_default_days=30)
    assert config.effective_log_retention_days(None) == 30
    assert config.effective_log_retention_days(7) == 7
    assert config.effective_log_retention_days(1) == 3  # chosen before the minimum was raised
    assert config.effective_log_retention_days(365) == 100  # no org keeps logs past the maximum


async def test_partition_manager_creates_this_month_and_two_ahead_by_the_callers_clock(pool) -> None:
    for name in await _partitions(pool, "request_logs"):
        await pool.execute(f'drop table "{name}"')
    now = datetime.now(UTC)
    assert await ensure_partitions_ahead(pool, now) == 3  # request_logs' three (usage_records' exist)
    assert await _partitions(pool, "request_logs") == {_standard_name("request_logs", k, now) for k in range(3)}
    assert await ensure_partitions_ahead(pool, now) == 0
    # An explicit time: the month of a year's last second, and the two after it, across the new year.
    await ensure_partitions_ahead(pool, datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert {"request_logs_y2030m12", "request_logs_y2031m01", "request_logs_y2031m02"} <= await _partitions(
        pool, "request_logs")

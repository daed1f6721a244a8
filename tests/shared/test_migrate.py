"""Migrations: applied once, recorded, safe to run twice and from two processes at once."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from shared.db.migrate import MigrationError, load_migrations, migrate
from tests.conftest import ROOT, _with_database


@pytest_asyncio.fixture
async def empty_db(servers) -> AsyncIterator[str]:
    admin_url = servers[0]
    name = f"rr_mig_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'create database "{name}"')
    await conn.close()
    yield _with_database(admin_url, name)
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'drop database "{name}" with (force)')
    await conn.close()


def _month_suffix(months_ahead: int) -> str:
    now = datetime.now(UTC)
    year, month = divmod(now.month - 1 + months_ahead, 12)
    return f"y{now.year + year}m{month + 1:02d}"


async def test_two_processes_migrate_at_once_and_again(empty_db: str) -> None:
    cmd = [sys.executable, "-c", "from shared.db.migrate import main; main()"]
    env = {"DATABASE_URL": empty_db, "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied = sorted(out for out, _ in outputs)
    total = len(load_migrations())
    assert applied[0].startswith("applied 0 migration"), applied  # the second waited, then found nothing to do
    assert applied[1].startswith(f"applied {total} migration"), applied

    assert await migrate(empty_db) == []  # and a third run changes nothing
    conn = await asyncpg.connect(empty_db)
    try:
        versions = await conn.fetch("select version from schema_migrations order by version")
        assert [r["version"] for r in versions] == [m.version for m in load_migrations()]
        tables = {r["tablename"] for r in await conn.fetch("select tablename from pg_tables where schemaname='public'")}
        for parent in ("request_logs", "usage_records"):
            assert f"{parent}_{_month_suffix(0)}" in tables
            assert f"{parent}_{_month_suffix(1)}" in tables
        # Partitioned for real: a row lands in this month's partition.
        await conn.execute(
            "insert into request_logs (created_at, request_id, path, method, status_code, latency_ms) "
            "values (now(), 'r1', '/v1/x', 'POST', 200, 1)")
        part = await conn.fetchval("select tableoid::regclass::text from request_logs where request_id = 'r1'")
        assert part == f"request_logs_{_month_suffix(0)}"
        # Creating partitions again is a no-op.
        assert await conn.fetchval("select rr_ensure_month_partitions('request_logs', 2)") == 0
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_refused(empty_db: str, tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("create table t1 (id int);")
    assert await migrate(empty_db, tmp_path) == ["0001"]
    (tmp_path / "0001_first.sql").write_text("create table t1 (id bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_db, tmp_path)


async def test_a_failing_migration_leaves_nothing_half_applied(empty_db: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("create table ok_t (id int);")
    (tmp_path / "0002_bad.sql").write_text("create table bad_t (id int); select * from no_such_table;")
    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("select to_regclass('bad_t')") is None
        assert await conn.fetchval("select to_regclass('ok_t')") is not None
        assert [r["version"] for r in await conn.fetch("select version from schema_migrations")] == ["0001"]
    finally:
        await conn.close()
    await asyncio.sleep(0)


def test_misnamed_migration_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "first.sql").write_text("select 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)

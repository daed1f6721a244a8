"""`docs/data-processing.md` against what the code really keeps: every table and column of the migrated schema
and every Redis key family of the key builders must be in the map, and every map entry must still exist.

Also: a migration that adds an unmapped column fails the check (shown on a scratch database), and the map's
retention windows are the settings' defaults.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import secrets
from pathlib import Path

import asyncpg
import msgspec
import pytest

from control_plane.redis_keys import ControlPlaneKeys
from shared.db.migrate import migrate
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from tests.conftest import _with_database

MAP = Path(__file__).resolve().parent.parent / "docs" / "data-processing.md"
PREFIX = "P:"
_COLUMNS_SQL = """
select c.table_name, c.column_name
from information_schema.columns c
join pg_class k on k.relname = c.table_name and k.relnamespace = 'public'::regnamespace
where c.table_schema = 'public' and k.relkind in ('r', 'p')
  and not exists (select 1 from pg_inherits i where i.inhrelid = k.oid)  -- partitions are their parent's
"""


def map_rows() -> list[list[str]]:
    rows = []
    for line in MAP.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0] in ("postgres", "redis", "files"):
            assert len(cells) == 8, f"a map row needs 8 cells: {line}"
            assert all(cells), f"a map row has an empty cell: {line}"
            rows.append(cells)
    return rows


def mapped_columns() -> dict[str, set[str]]:
    tables: dict[str, set[str]] = {}
    for store, where, fields, *_ in map_rows():
        if store == "postgres":
            assert where not in tables, f"{where} is mapped twice"
            tables[where] = {f.strip() for f in fields.split(",")}
    return tables


def mapped_key_families() -> list[str]:
    return [where for store, where, *_ in map_rows() if store == "redis"]


def _sample(param: inspect.Parameter) -> object:
    return 7 if param.annotation in (int, "int") else "x"


def built_keys() -> list[str]:
    """One key of every family the key builders make (each public method called with sample arguments)."""
    keys: list[str] = []
    builders = [RedisKeys(PREFIX, 16), RedisKeys(PREFIX, 16).org(7), ControlPlaneKeys(PREFIX)]
    for builder in builders:
        for name in dir(builder):
            if name.startswith("_") or name in ("prefix", "shards", "shard", "tag", "rate_prefix", "org"):
                continue
            value = getattr(builder, name)
            if callable(value):
                params = list(inspect.signature(value).parameters.values())
                value = value(*(_sample(p) for p in params))
            if isinstance(value, str) and value.startswith(PREFIX):
                keys.append(value[len(PREFIX):])
    return keys


def _family(pattern: str) -> str:
    """A map pattern as an fnmatch pattern (`{s:*}` is a literal hash tag with any shard)."""
    return pattern.replace("[", "[[]")


async def check_schema(pool: asyncpg.Pool) -> list[str]:
    """Everything that makes the map wrong for this database (empty: the map is right)."""
    actual: dict[str, set[str]] = {}
    for r in await pool.fetch(_COLUMNS_SQL):
        actual.setdefault(r["table_name"], set()).add(r["column_name"])
    mapped = mapped_columns()
    problems = [f"table {t} is not in the map" for t in sorted(set(actual) - set(mapped))]
    problems += [f"the map lists table {t}, which does not exist" for t in sorted(set(mapped) - set(actual))]
    for table in sorted(set(actual) & set(mapped)):
        problems += [f"column {table}.{c} is not in the map" for c in sorted(actual[table] - mapped[table])]
        problems += [f"the map lists column {table}.{c}, which does not exist"
                     for c in sorted(mapped[table] - actual[table])]
    return problems


def check_redis() -> list[str]:
    families = mapped_key_families()
    keys = built_keys()
    problems = [f"Redis key family of {k!r} is not in the map" for k in keys
                if not any(fnmatch.fnmatchcase(k, _family(f)) for f in families)]
    problems += [f"the map lists Redis key family {f!r}, which no key builder makes" for f in families
                 if not any(fnmatch.fnmatchcase(k, _family(f)) for k in keys)]
    return problems


async def test_the_map_accounts_for_every_table_and_column(db) -> None:
    assert await check_schema(db) == []


def test_the_map_accounts_for_every_redis_key_family() -> None:
    assert len(built_keys()) >= 15
    assert check_redis() == []


def test_every_row_names_a_category_of_the_summary() -> None:
    categories = ("account data", "API operation data", "secret data", "payment data", "model-quality probe",
                  "platform configuration", "operational")
    for row in map_rows():
        assert row[3].startswith(categories), f"{row[1]}: unknown category {row[3]!r}"


async def test_a_migration_adding_an_unmapped_column_fails_the_check(servers) -> None:
    admin_url, _ = servers
    name = f"rr_map_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'create database "{name}"')
    await conn.close()
    try:
        url = _with_database(admin_url, name)
        await migrate(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            assert await check_schema(pool) == []
            await pool.execute("alter table orgs add column favourite_prompt text")
            await pool.execute("create table shadow_bodies (id bigint, body text)")
            await pool.execute("alter table users drop column is_platform_admin")
            assert sorted(await check_schema(pool)) == sorted([
                "column orgs.favourite_prompt is not in the map", "table shadow_bodies is not in the map",
                "the map lists column users.is_platform_admin, which does not exist"])
        finally:
            await pool.close()
    finally:
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'drop database if exists "{name}" with (force)')
        await conn.close()


@pytest.mark.parametrize(("setting", "unit"), [
    ("log_retention_default_days", "days"), ("log_retention_max_days", "days"), ("usage_retention_days", "days"),
    ("probe_retention_days", "days"), ("refresh_token_ttl_s", "s"), ("reservation_ttl_s", "s"),
    ("redis_key_cache_ttl_s", "s"), ("login_window_s", "s"), ("webhook_delivery_retention_days", "days"),
    ("mail_retention_days", "days"),
])
def test_the_maps_retention_windows_are_the_defaults(setting: str, unit: str) -> None:
    env = "RR_" + setting.upper()
    row = next((line for line in MAP.read_text().splitlines() if f"`{env}`" in line), None)
    assert row is not None, f"the map states no window for {env}"
    stated = re.search(r"\|\s*([\d,]+) (days|s)\s*\|\s*$", row)
    assert stated is not None and stated.group(2) == unit, row
    default = next(f.default for f in msgspec.structs.fields(Settings) if f.name == setting)
    assert int(stated.group(1).replace(",", "")) == default

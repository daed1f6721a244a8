"""Apply the ordered plain-SQL migrations in `migrations/` and record each in `schema_migrations`.

Safe to run twice (applied versions are skipped) and from several processes at once: the whole run holds a
session advisory lock, so a second migrator waits and then finds nothing left to do. Each file runs in its
own transaction together with its bookkeeping row, so a failed file leaves no half-applied state.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

__all__ = ["Migration", "MigrationError", "load_migrations", "main", "migrate"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_ID = 0x5252_4D49  # "RRMI": one lock id for every migrator of every deployment


class MigrationError(Exception):
    """An applied migration file changed, or the migrations folder is malformed."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Read `NNNN_name.sql` files in version order."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        if not version.isdigit() or not name:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        migrations.append(Migration(version, name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return migrations


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; return the versions applied by this call."""
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("select pg_advisory_lock($1)", _LOCK_ID)
        try:
            return await _apply_pending(conn, migrations)
        finally:
            await conn.execute("select pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(
        """create table if not exists schema_migrations (
               version text primary key,
               name text not null,
               checksum text not null,
               applied_at timestamptz not null default now())"""
    )
    applied = {r["version"]: r["checksum"] for r in await conn.fetch("select version, checksum from schema_migrations")}
    done = []
    for migration in migrations:
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version}_{migration.name} changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                migration.version, migration.name, migration.checksum,
            )
        done.append(migration.version)
    return done


def main() -> None:
    """`rr-migrate`: apply pending migrations to DATABASE_URL."""
    import os

    dsn = os.environ.get("DATABASE_URL", "")
    if not dsn:
        sys.exit("DATABASE_URL is required but not set")
    applied = asyncio.run(migrate(dsn))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")

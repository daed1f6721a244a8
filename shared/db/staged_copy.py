"""COPY through a staging table, the one home of what both batched writers do (the proxies' request-log
writer in `proxy/records.py`, the billing flusher in `shared/workers/flusher.py`).

A batch is COPYed into a per-connection temporary staging table and moved into its monthly-partitioned
target by one statement, in one transaction together with whatever the caller adds (`finish`: a watermark,
the record of rows set aside). Three things can go wrong that are not "PostgreSQL is unreachable":

- The staging table does not exist yet (a new connection): created, and the batch is tried again.
- A row's month has no partition (the partition manager is late, or the row is late: an event from a month
  long past, or a clock far ahead). The partitions of the months actually present in the batch are created
  — not "this month and two ahead", which would not help a late row — and the batch is tried again. Rows
  are never dropped for want of a partition. PostgreSQL reports this as a check violation (23514) that
  names the table and no constraint, which is how it is told apart from a real CHECK constraint.
- A row PostgreSQL (or the driver, while encoding) refuses: a NUL in a text, an integer out of range, a
  constraint. Retrying the batch would fail forever and stop the writer. The batch is written again in
  "isolation": each part in a savepoint, a failing part split in two until the bad rows are found; those are
  returned to the caller as `Rejected` and everything else is written, in the same one transaction.

Anything else (connection lost, PostgreSQL down or shutting down, a timeout, a lock) is raised: the rows are
not at fault, and the caller keeps them and retries later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

__all__ = ["Rejected", "StagedTable", "ensure_partitions_for", "is_missing_partition", "is_poison", "write_staged"]

# SQLSTATE classes that blame a row, not the server: data exception (22: bad text, out-of-range number),
# integrity constraint violation (23) and program limit exceeded (54: e.g. a value too large for an index).
_POISON_CLASSES = frozenset({"22", "23", "54"})
# Raised by asyncpg while encoding a row, before anything is sent: an int outside int4/int8, a string that
# is not valid UTF-8 (lone surrogates), a value of the wrong type.
_DRIVER_REFUSALS = (OverflowError, ValueError, TypeError)
_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class StagedTable:
    """How one target table is written: its staging table and the statement moving the staged rows."""

    parent: str  # the partitioned target, for creating missing partitions
    stage: str  # the temporary staging table
    stage_ddl: str  # creates the staging table (`if not exists`); run once per connection
    columns: tuple[str, ...]  # the staging columns, in row order
    move_sql: str  # moves the staged rows into `parent` (idempotent: `on conflict do nothing`)
    time_index: int = 0  # position in a row of the partition key (a datetime)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A row that was set aside, and why. `reason` is the error's class name, never its message: messages
    may quote the offending value, and that value is request content."""

    row: tuple
    sqlstate: str | None  # None: the driver refused it before PostgreSQL saw it
    reason: str


def is_missing_partition(exc: BaseException) -> bool:
    """PostgreSQL's "no partition of relation … found for row": a check violation naming no constraint."""
    return isinstance(exc, asyncpg.CheckViolationError) and not getattr(exc, "constraint_name", None)


def is_poison(exc: BaseException) -> bool:
    """True when `exc` blames the rows being written (retrying them as they are can never succeed)."""
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _POISON_CLASSES and not is_missing_partition(exc)
    return isinstance(exc, _DRIVER_REFUSALS)  # includes asyncpg's client-side DataError (a ValueError)


async def ensure_partitions_for(conn: asyncpg.Connection, parent: str, moments: Sequence[object]) -> int:
    """Create the partitions of `parent` for the UTC months of `moments` that have none; returns how many."""
    months = sorted({datetime(m.year, m.month, 1, tzinfo=UTC)
                     for m in (t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
                               for t in moments if isinstance(t, datetime))})
    if not months:
        return 0
    return await conn.fetchval("select rr_ensure_partitions_for($1, $2::timestamptz[])", parent, months)


async def write_staged(conn: asyncpg.Connection, table: StagedTable, rows: list[tuple], *,
                       finish: Callable[[asyncpg.Connection, list[Rejected]], Awaitable[None]] | None = None,
                       ) -> list[Rejected]:
    """Write `rows` (and run `finish(conn, rejected)`) in one transaction; return the rows set aside.

    The first attempt is one COPY and one statement, as cheap as it gets; the savepoints of isolation are
    paid only by a batch that failed with a poison row. Raises when the failure is not the rows' fault.
    """
    isolate = False
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            async with conn.transaction():
                rejected = await _isolate(conn, table, rows) if isolate else await _copy_move(conn, table, rows)
                if finish is not None:
                    await finish(conn, rejected)
            return rejected
        except asyncpg.UndefinedTableError:
            if attempt == _ATTEMPTS:
                raise
            await conn.execute(table.stage_ddl)  # a new connection: create its staging table, then again
        except Exception as exc:
            if is_missing_partition(exc) and attempt < _ATTEMPTS:
                # Outside the batch's transaction, so the new partitions don't wait for (or roll back with) it.
                await ensure_partitions_for(conn, table.parent, [r[table.time_index] for r in rows])
            elif is_poison(exc) and not isolate:
                isolate = True
            else:
                raise
    raise AssertionError("unreachable")  # every path of the last attempt returns or raises


async def _copy_move(conn: asyncpg.Connection, table: StagedTable, rows: list[tuple]) -> list[Rejected]:
    if rows:
        await conn.copy_records_to_table(table.stage, records=rows, columns=table.columns)
        await conn.execute(table.move_sql)
    return []


async def _isolate(conn: asyncpg.Connection, table: StagedTable, rows: list[tuple]) -> list[Rejected]:
    """Write `rows` part by part, each in a savepoint, bisecting the parts that fail with a poison error.
    n rows with k bad ones cost O(k log n) savepoints."""
    try:
        async with conn.transaction():  # a savepoint inside the batch's transaction
            await _copy_move(conn, table, rows)
            await conn.execute(f"delete from {table.stage}")  # moved: the next part starts from an empty stage
        return []
    except Exception as exc:
        if not is_poison(exc):
            raise
        if len(rows) == 1:
            return [Rejected(rows[0], getattr(exc, "sqlstate", None), type(exc).__name__)]
    mid = len(rows) // 2
    return await _isolate(conn, table, rows[:mid]) + await _isolate(conn, table, rows[mid:])

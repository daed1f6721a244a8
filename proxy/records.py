"""Request metadata: one `RequestRecord` per request, written to `request_logs` in batches with COPY.

The hot path only appends a tuple to an in-memory list. A background task copies the list in batches into
a per-connection temporary staging table and moves it with `insert … on conflict do nothing`, so a batch
retried after an ambiguous failure (committed, but the connection broke before we heard) changes nothing.
While PostgreSQL is down the buffer holds the rows (up to `log_buffer_max`, oldest dropped past that, with
a count) and retries. Bodies are never part of a record: there is no field that could hold one.

The COPY itself is `shared.db.staged_copy.write_staged`: a row for a month without a partition gets its
partition; a row PostgreSQL refuses (a NUL in `model`, …) is set aside while the rest of its batch is
written, counted in `rejected`, logged without its content and recorded in `rejected_rows` (request id,
org, time and the error's SQLSTATE/class; never the model string or user agent), where platform admins
list it (`GET /v1/admin/rejected-rows`). Retrying such a batch would fail forever and stop request logging
of every org served by this worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.db.staged_copy import Rejected, StagedTable, write_staged
from shared.usage import Usage

__all__ = ["COLUMNS", "RequestLogWriter", "RequestRecord"]

log = logging.getLogger("rocket_relay.records")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

COLUMNS = (
    "created_at", "request_id", "client_request_id", "org_id", "api_key_id", "model", "provider",
    "route_id", "upstream_model", "reported_model", "path", "method", "status_code", "error_code",
    "stream", "latency_ms", "ttfb_ms", "prompt_tokens", "completion_tokens", "total_tokens", "attempts",
    "cost_micros", "client_ip", "user_agent", "byok", "estimated", "route_status",
)


class RequestRecord:
    """Everything we keep about one request. Filled in as the request moves along."""

    __slots__ = (
        "api_key_id", "attempts", "byok", "client_ip", "client_request_id", "completion_tokens", "cost_micros",
        "created_at", "error_code", "estimated", "method", "model", "org_id", "path", "prompt_tokens", "provider",
        "provider_format", "reported_model", "request_id", "route_id", "route_status", "started", "started_wall",
        "status_code", "stream", "ttfb_ms", "upstream_model", "usage", "user_agent",
    )

    def __init__(self, request_id: str, client_request_id: str | None, path: str, method: str,
                 client_ip: str | None, user_agent: str | None) -> None:
        self.started = time.perf_counter()
        self.started_wall = time.time()
        # Exactly the microsecond the usage event carries (int(started_wall × 10^6)), so the request log and
        # its usage record share created_at to the microsecond and join on it.
        self.created_at = _EPOCH + timedelta(microseconds=int(self.started_wall * 1_000_000))
        self.request_id = request_id
        self.client_request_id = client_request_id
        self.path = path
        self.method = method
        self.client_ip = client_ip
        self.user_agent = user_agent
        self.org_id: int | None = None
        self.api_key_id: int | None = None
        self.model: str | None = None
        self.provider: str | None = None
        self.provider_format = "openai"  # the dialect of the route that answered (not a column)
        self.route_id: int | None = None
        self.route_status: str | None = None  # the route's probe status when it served (model-route evidence)
        self.upstream_model: str | None = None
        self.reported_model: str | None = None
        self.status_code = 0
        self.error_code: str | None = None
        self.stream = False
        self.ttfb_ms: int | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.attempts = 0
        self.cost_micros: int | None = None
        self.byok = False
        self.usage: Usage | None = None  # the upstream's usage, normalised (not a column: the components go
        self.estimated = False  # to usage_records); True when the usage was estimated (a stream cut short)

    def mark_first_byte(self) -> None:
        if self.ttfb_ms is None:
            self.ttfb_ms = int((time.perf_counter() - self.started) * 1000)

    def as_row(self) -> tuple:
        total = None
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            total = (self.prompt_tokens or 0) + (self.completion_tokens or 0)
        return (
            self.created_at, self.request_id, self.client_request_id, self.org_id, self.api_key_id,
            self.model, self.provider, self.route_id, self.upstream_model, self.reported_model, self.path,
            self.method, self.status_code, self.error_code, self.stream,
            int((time.perf_counter() - self.started) * 1000), self.ttfb_ms, self.prompt_tokens,
            self.completion_tokens, total, self.attempts, self.cost_micros, self.client_ip,
            (self.user_agent or None) and self.user_agent[:512], self.byok, self.estimated, self.route_status,
        )


# The staging table is created once per connection. Its client_ip is text, cast on the move: asyncpg would
# otherwise parse every address with the ipaddress module, a few µs per row on the hot process.
_STAGE_DDL = (
    "create temp table if not exists request_logs_stage "
    "(like request_logs including defaults) on commit delete rows; "
    "alter table request_logs_stage alter column client_ip type text"
)
_MOVE_SQL = "insert into request_logs ({}) select {} from request_logs_stage on conflict do nothing".format(
    ", ".join(COLUMNS), ", ".join("client_ip::inet" if c == "client_ip" else c for c in COLUMNS))
_TABLE = StagedTable("request_logs", "request_logs_stage", _STAGE_DDL, COLUMNS, _MOVE_SQL,
                     COLUMNS.index("created_at"))
_REJECTED_SQL = """insert into rejected_rows (kind, request_id, org_id, row_created_at, sqlstate, reason)
                   values ('request_log', $1, $2, $3, $4, $5)"""
_ID, _ORG, _CREATED = COLUMNS.index("request_id"), COLUMNS.index("org_id"), COLUMNS.index("created_at")


def _rejected_record(r: Rejected) -> tuple:
    """What is kept of a set-aside row: identifiers only. The request id is ours, but it is part of the row
    that failed, so it is kept only when it is a plain string of sane length."""
    rid, org, created = r.row[_ID], r.row[_ORG], r.row[_CREATED]
    rid = rid if isinstance(rid, str) and rid.isprintable() and len(rid) <= 200 else None
    org = org if isinstance(org, int) and -(2**63) <= org < 2**63 else None
    return rid, org, created if isinstance(created, datetime) else None, r.sqlstate, r.reason


class RequestLogWriter:
    """Buffers request rows and COPYs them into PostgreSQL from one background task."""

    def __init__(self, pool: asyncpg.Pool, *, batch_size: int, interval_s: float, buffer_max: int) -> None:
        if batch_size <= 0 or interval_s <= 0 or buffer_max < batch_size:
            raise ValueError("batch_size and interval_s must be positive and buffer_max >= batch_size")
        self._pool = pool
        self._batch_size = batch_size
        self._interval = interval_s
        self._buffer_max = buffer_max
        self._rows: list[tuple] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.dropped = 0
        self.written = 0
        self.rejected = 0  # rows PostgreSQL refused: set aside, recorded in rejected_rows

    @property
    def buffered(self) -> int:
        """Rows waiting for PostgreSQL (read by the metrics snapshot, not per request)."""
        return len(self._rows)

    def add(self, record: RequestRecord) -> None:
        """Queue one record; called on the hot path, so it only appends."""
        rows = self._rows
        rows.append(record.as_row())
        if len(rows) >= self._batch_size:
            self._wake.set()
            if len(rows) > self._buffer_max:
                self._trim()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request-log-writer")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the task after writing what is buffered (tries until `timeout_s`)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except TimeoutError:
                log.error("request log writer: %d rows not written at shutdown", len(self._rows))

    async def _run(self) -> None:
        backoff = self._interval
        while True:
            if len(self._rows) < self._batch_size and not self._closing:
                # Wait for a full batch or the interval, even with rows pending: writing whatever came in
                # during the last write would make a stream of tiny batches, each paying the round trips.
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except TimeoutError:
                    pass
                self._wake.clear()
            if not self._rows:
                if self._closing:
                    return
                continue
            batch = self._rows[: self._batch_size]
            del self._rows[: len(batch)]
            try:
                rejected = await self._write(batch)
            except Exception as exc:  # PostgreSQL down or unreachable (poison rows never get here): keep them
                self._rows[:0] = batch  # put it back in front, in order, and try again later
                self._trim()
                log.warning("request log writer: batch of %d failed (%s); retrying", len(batch),
                            type(exc).__name__)
                if self._closing and backoff >= 5.0:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = self._interval
            self.written += len(batch) - len(rejected)
            if rejected:
                self.rejected += len(rejected)
                # Counts and error classes only: the rows' content (model, user agent) is request content.
                log.error("request log writer: %d of %d rows refused by PostgreSQL (%s) and set aside in "
                          "rejected_rows; the rest of the batch was written", len(rejected), len(batch),
                          ", ".join(sorted({f"{r.reason} {r.sqlstate or '-'}" for r in rejected})))

    def _trim(self) -> None:
        excess = len(self._rows) - self._buffer_max
        if excess > 0:
            del self._rows[:excess]
            self.dropped += excess
            log.error("request log writer: buffer full, dropped %d oldest rows", excess)

    async def _write(self, batch: list[tuple]) -> list[Rejected]:
        async with self._pool.acquire() as conn:
            return await write_staged(conn, _TABLE, batch, finish=_record_rejected)


async def _record_rejected(conn: asyncpg.Connection, rejected: list[Rejected]) -> None:
    """In the batch's transaction: the set-aside rows are recorded exactly when the others are written."""
    if rejected:
        await conn.executemany(_REJECTED_SQL, [_rejected_record(r) for r in rejected])

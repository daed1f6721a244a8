"""Rows the batched writers set aside because PostgreSQL refused them (`rejected_rows`), for platform admins.

Request-log rows are listed by their identifiers only (their content is not kept). Billing events are held
for repair: the listing says whether the ledger debit was applied (`transaction_id`); the raw event stays in
the table for the repair and is not returned here.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, get
from litestar.params import FromQuery, Parameter

from control_plane.common import CP, DEPENDENCIES, LimitParam
from control_plane.permissions import require
from control_plane.state import MAX_ID

RejectedKind = Literal["request_log", "usage_event"]


class RejectedRow(msgspec.Struct, frozen=True):
    id: int
    kind: RejectedKind
    request_id: str | None
    org_id: int | None
    row_created_at: datetime.datetime | None
    sqlstate: str | None  # null: refused by the database driver before PostgreSQL saw it
    reason: str  # the error's class
    shard: int | None  # usage events: the billing stream shard and entry id
    stream_id: str | None
    cost_micros: int | None
    transaction_id: int | None  # usage events: the ledger debit applied for it (null: none could be)
    rejected_at: datetime.datetime
    resolved_at: datetime.datetime | None


class RejectedPage(msgspec.Struct, frozen=True):
    data: list[RejectedRow]
    unresolved: dict[str, int]  # open set-aside rows per kind, over the whole table
    next_before_id: int | None


class AdminRejectedRowsController(Controller):
    path = "/v1/admin/rejected-rows"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    @get("/", guards=[require("platform.rejected_rows.read")])
    async def rejected_rows(self, cp: CP, kind: FromQuery[RejectedKind | None] = None,
                            unresolved: FromQuery[bool] = False,
                            before_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                            limit: LimitParam = 50) -> RejectedPage:
        """Set-aside rows, newest first, with the number still unresolved per kind."""
        rows = await cp.pool.fetch(
            """select id, kind, request_id, org_id, row_created_at, sqlstate, reason, shard, stream_id,
                      cost_micros, transaction_id, rejected_at, resolved_at
               from rejected_rows
               where ($1::text is null or kind = $1) and (not $2 or resolved_at is null)
                 and ($3::bigint is null or id < $3)
               order by id desc limit $4""", kind, unresolved, before_id, limit + 1)
        counts = await cp.pool.fetch(
            "select kind, count(*)::int as n from rejected_rows where resolved_at is null group by kind")
        data = [RejectedRow(**dict(r)) for r in rows[:limit]]
        return RejectedPage(data, {r["kind"]: r["n"] for r in counts}, data[-1].id if len(rows) > limit else None)

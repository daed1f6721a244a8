"""Spend budgets of an org and of its keys: list, create, read, change, delete (shared/budgets.py says what the
periods and windows mean).

Every change is pushed to the proxies like a key change (`shared.apikeys.publish_key_change`): a key's
budgets travel in its cached record, and an org's in the record of every key of the org, so the reserve
script gets them as arguments within moments. The spend counted so far is kept: lowering a limit below it
refuses the next request; deleting a budget and creating it again starts from what the period already spent.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import JSONBody
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, IdParam, PositiveId, set_fields
from control_plane.errors import Conflict, NotFound
from control_plane.permissions import require
from control_plane.state import ControlPlane
from shared.apikeys import publish_key_change, publish_org_change
from shared.budgets import MAX_BUDGET_MICROS

Period = Literal["day", "week", "month"]
Window = Literal["calendar", "rolling"]
LimitMicros = Annotated[int, msgspec.Meta(ge=1, le=MAX_BUDGET_MICROS,
                                          description="Micro-units: 1 USD = 1,000,000; at most a billion USD.")]
AlertPercent = Annotated[int, msgspec.Meta(ge=1, le=100, description="Soft threshold: % of the limit.")]


class BudgetCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    period: Period
    limit_micros: LimitMicros
    window: Window = "calendar"
    api_key_id: PositiveId | None = None  # None: the whole org
    alert_percent: AlertPercent | None = 80  # None: no soft threshold


class BudgetUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    limit_micros: LimitMicros | UnsetType = UNSET
    alert_percent: AlertPercent | UnsetType | None = UNSET


class BudgetView(msgspec.Struct, frozen=True):
    id: int
    scope: str  # "key" or "org"
    api_key_id: int | None
    period: str
    window: str
    limit_micros: int
    alert_percent: int | None
    time_zone: str  # of calendar periods (RR_BUDGET_TIMEZONE)
    created_at: datetime.datetime
    updated_at: datetime.datetime


_COLUMNS = "id, api_key_id, period, window_kind, limit_micros, alert_percent, created_at, updated_at"
_AUDITED = ("api_key_id", "period", "window_kind", "limit_micros", "alert_percent")


def _view(row: asyncpg.Record, cp: ControlPlane) -> BudgetView:
    return BudgetView(row["id"], "org" if row["api_key_id"] is None else "key", row["api_key_id"], row["period"],
                      row["window_kind"], row["limit_micros"], row["alert_percent"], cp.settings.budget_timezone,
                      row["created_at"], row["updated_at"])


async def _publish(cp: ControlPlane, org_id: int, api_key_id: int | None) -> None:
    ttl = cp.settings.redis_key_cache_ttl_s
    if api_key_id is None:
        await publish_org_change(cp.redis, cp.keys, cp.pool, org_id, ttl)
        return
    prefix = await cp.pool.fetchval("select prefix from api_keys where id = $1", api_key_id)
    if prefix is not None:
        await publish_key_change(cp.redis, cp.keys, cp.pool, prefix, ttl)


class BudgetsController(Controller):
    path = "/v1/orgs/{org_id:int}/budgets"
    dependencies = DEPENDENCIES
    tags = ("budgets",)

    @get("/", guards=[require("budgets.read")])
    async def list_budgets(self, cp: CP, org_id: IdParam) -> list[BudgetView]:
        rows = await cp.pool.fetch(
            f"select {_COLUMNS} from budgets where org_id = $1 order by api_key_id nulls first, id", org_id)
        return [_view(r, cp) for r in rows]

    @post("/", guards=[require("budgets.manage")], opt={"errors": (409,)})
    async def create(self, cp: CP, principal: Caller, org_id: IdParam, data: JSONBody[BudgetCreate]) -> BudgetView:
        """A budget for the org (no `api_key_id`) or one of its keys; one per scope, period and window."""
        async with cp.pool.acquire() as conn, conn.transaction():
            if data.api_key_id is not None and not await conn.fetchval(
                    "select 1 from api_keys where id = $1 and org_id = $2 and revoked_at is null for share",
                    data.api_key_id, org_id):
                raise NotFound("No such API key.")  # also for another org's key: nobody learns it exists
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(
                        f"""insert into budgets (org_id, api_key_id, period, window_kind, limit_micros, alert_percent,
                                                 created_by)
                            values ($1, $2, $3, $4, $5, $6, $7) returning {_COLUMNS}""",
                        org_id, data.api_key_id, data.period, data.window, data.limit_micros, data.alert_percent,
                        principal.user_id)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"This {'key' if data.api_key_id else 'org'} already has a {data.window} "
                               f"{data.period} budget; change that one.", code="budget_exists") from None
            await audit.record(conn, principal, "budget.create", "budget", row["id"], org_id=org_id,
                               after={f: row[f] for f in _AUDITED})
        await _publish(cp, org_id, row["api_key_id"])
        return _view(row, cp)

    @get("/{budget_id:int}", guards=[require("budgets.read")])
    async def get_budget(self, cp: CP, org_id: IdParam, budget_id: IdParam) -> BudgetView:
        row = await cp.pool.fetchrow(f"select {_COLUMNS} from budgets where id = $1 and org_id = $2",
                                     budget_id, org_id)
        if row is None:
            raise NotFound("No such budget.")
        return _view(row, cp)

    @patch("/{budget_id:int}", guards=[require("budgets.manage")])
    async def update(self, cp: CP, principal: Caller, org_id: IdParam, budget_id: IdParam,
                     data: JSONBody[BudgetUpdate]) -> BudgetView:
        """Change the limit or the soft threshold (null: none); proxies apply it within moments."""
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(f"select {_COLUMNS} from budgets where id = $1 and org_id = $2 for update",
                                         budget_id, org_id)
            if before is None:
                raise NotFound("No such budget.")
            fields = set_fields(data)
            if not fields:
                return _view(before, cp)
            sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
            after = await conn.fetchrow(
                f"update budgets set {sets}, updated_at = now() where id = $1 returning {_COLUMNS}",
                budget_id, *fields.values())
            await audit.record(conn, principal, "budget.update", "budget", budget_id, org_id=org_id,
                               before={k: before[k] for k in fields}, after={k: after[k] for k in fields})
        await _publish(cp, org_id, after["api_key_id"])
        return _view(after, cp)

    @delete("/{budget_id:int}", guards=[require("budgets.manage")])
    async def remove(self, cp: CP, principal: Caller, org_id: IdParam, budget_id: IdParam) -> None:
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"delete from budgets where id = $1 and org_id = $2 returning {_COLUMNS}",
                                      budget_id, org_id)
            if row is None:
                raise NotFound("No such budget.")
            await audit.record(conn, principal, "budget.delete", "budget", budget_id, org_id=org_id,
                               before={f: row[f] for f in _AUDITED})
        await _publish(cp, org_id, row["api_key_id"])

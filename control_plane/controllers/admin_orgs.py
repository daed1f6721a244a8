"""Platform admin: the org list and search, an org's details, suspension and limits, balance adjustments."""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, get, patch, post
from litestar.params import FromQuery, JSONBody, Parameter
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import (
    CP,
    DEPENDENCIES,
    Caller,
    IdParam,
    LimitParam,
    Micros,
    NonNegMicros,
    PerMinute,
    set_fields,
)
from control_plane.controllers.orgs import ORG_COLUMNS, Org, org_view
from control_plane.errors import Conflict, Invalid, NotFound
from control_plane.permissions import require
from control_plane.state import MAX_ID
from shared.apikeys import publish_org_change
from shared.billing import ExternalIdTaken, apply_ledger_entry

# Set the credit limit of a live balance. Race prevented: writing to a balance that was just dropped would
# create a hash without its `balance` field, which the reserve script would then take as a live balance of
# zero; without a live balance the next rebuild reads the limit from PostgreSQL anyway.
_SET_CREDIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'credit', ARGV[1])
return 1
"""


class AdminOrg(msgspec.Struct, frozen=True):
    id: int
    name: str
    code: str
    status: str
    created_at: datetime.datetime
    balance_micros: int
    credit_limit_micros: int
    members: int


class AdminOrgPage(msgspec.Struct, frozen=True):
    data: list[AdminOrg]
    next_after_id: int | None


class AdminOrgDetail(msgspec.Struct, frozen=True):
    org: Org
    balance_micros: int
    owners: list[str]  # emails
    active_keys: int


class AdminOrgUpdate(msgspec.Struct, frozen=True):
    status: Literal["active", "suspended"] | UnsetType = UNSET
    credit_limit_micros: NonNegMicros | UnsetType = UNSET
    rpm_limit: PerMinute | UnsetType | None = UNSET
    tpm_limit: PerMinute | UnsetType | None = UNSET


class Adjustment(msgspec.Struct, frozen=True):
    amount_micros: Micros  # positive credits the org, negative debits it
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    # Makes the call idempotent: a retry with the same id changes nothing and returns the first result.
    external_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class AdjustmentResult(msgspec.Struct, frozen=True):
    transaction_id: int
    created: bool  # false: this external_id was applied before
    balance_micros: int


class AdminOrgsController(Controller):
    path = "/v1/admin/orgs"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    @get("/", guards=[require("platform.orgs.read")])
    async def list_orgs(self, cp: CP, q: Annotated[str | None, Parameter(max_length=200)] = None,
                        status: FromQuery[Literal["active", "suspended"] | None] = None,
                        after_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                        limit: LimitParam = 50) -> AdminOrgPage:
        """Orgs by id; `q` matches the name, the code or a member's email (case-insensitive substring)."""
        pattern = None if not q else "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await cp.pool.fetch(
            """select o.id, o.name, o.code, o.status, o.created_at, coalesce(b.balance_micros, 0) as balance_micros,
                      o.credit_limit_micros, (select count(*) from memberships m where m.org_id = o.id) as members
               from orgs o left join org_balances b on b.org_id = o.id
               where ($1::text is null or lower(o.name) like $1 or o.code like $1
                      or exists (select 1 from memberships m join users u on u.id = m.user_id
                                 where m.org_id = o.id and lower(u.email) like $1))
                 and ($2::text is null or o.status = $2) and ($3::bigint is null or o.id > $3)
               order by o.id limit $4""", pattern, status, after_id, limit + 1)
        data = [AdminOrg(**dict(r)) for r in rows[:limit]]
        return AdminOrgPage(data, data[-1].id if len(rows) > limit else None)

    @get("/{org_id:int}", guards=[require("platform.orgs.read")])
    async def get_org(self, cp: CP, org_id: IdParam) -> AdminOrgDetail:
        row = await cp.pool.fetchrow(f"select {ORG_COLUMNS} from orgs where id = $1", org_id)
        if row is None:
            raise NotFound("No such org.")
        balance = await cp.pool.fetchval("select balance_micros from org_balances where org_id = $1", org_id)
        owners = await cp.pool.fetch(
            """select u.email from memberships m join users u on u.id = m.user_id
               where m.org_id = $1 and m.role = 'owner' order by u.email""", org_id)
        keys = await cp.pool.fetchval(
            "select count(*) from api_keys where org_id = $1 and revoked_at is null", org_id)
        return AdminOrgDetail(org_view(row, cp.settings), balance or 0, [r["email"] for r in owners], keys)

    @patch("/{org_id:int}", guards=[require("platform.orgs.manage")])
    async def update_org(self, cp: CP, principal: Caller, org_id: IdParam,
                         data: JSONBody[AdminOrgUpdate]) -> Org:
        """Suspend or resume an org (its keys stop or resume working at every proxy within moments), or set
        its credit limit and org-wide rate limits."""
        fields = set_fields(data)
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(f"select {ORG_COLUMNS} from orgs where id = $1 for update", org_id)
            if before is None:
                raise NotFound("No such org.")
            after = before
            if fields:
                sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
                after = await conn.fetchrow(f"update orgs set {sets} where id = $1 returning {ORG_COLUMNS}",
                                            org_id, *fields.values())
                new_status = fields.get("status") if fields.get("status") != before["status"] else None
                action = {"suspended": "org.suspend", "active": "org.resume"}.get(new_status, "org.admin_update")
                await audit.record(conn, principal, action, "org", org_id, org_id=org_id,
                                   before={k: before[k] for k in fields}, after={k: after[k] for k in fields})
        if {"status", "rpm_limit", "tpm_limit"} & fields.keys():
            await publish_org_change(cp.redis, cp.keys, cp.pool, org_id, cp.settings.redis_key_cache_ttl_s)
        if "credit_limit_micros" in fields:
            await cp.redis.eval(_SET_CREDIT, 1, cp.keys.org(org_id).balance, after["credit_limit_micros"])
        return org_view(after, cp.settings)

    @post("/{org_id:int}/adjustments", guards=[require("platform.balance.adjust")], opt={"errors": (409,)})
    async def adjust_balance(self, cp: CP, principal: Caller, org_id: IdParam,
                             data: JSONBody[Adjustment]) -> AdjustmentResult:
        """Credit or debit an org's balance with a reason: one ledger entry, then the live balance."""
        if data.amount_micros == 0:
            raise Invalid("amount_micros must not be zero.")
        if not await cp.pool.fetchval("select 1 from orgs where id = $1", org_id):
            raise NotFound("No such org.")
        try:
            result = await apply_ledger_entry(cp.pool, cp.scripts, cp.keys, org_id, "adjustment",
                                              data.amount_micros, external_id=data.external_id, reason=data.reason,
                                              actor_user_id=principal.user_id)
        except ExternalIdTaken:
            raise Conflict("This external_id was already used for another org.", code="external_id_taken") from None
        if result.created:
            await audit.record(cp.pool, principal, "balance.adjust", "balance_transaction", result.transaction_id,
                               org_id=org_id, after={"amount_micros": data.amount_micros, "reason": data.reason,
                                                     "external_id": data.external_id})
        balance = await cp.pool.fetchval("select balance_micros from org_balances where org_id = $1", org_id)
        return AdjustmentResult(result.transaction_id, result.created, balance)

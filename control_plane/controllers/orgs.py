"""Orgs and their members: create, read and configure an org; add, re-role and remove members.

Role rules beyond the permission table's actions: only owners (`members.manage_owners`) may grant the owner
role or change or remove an owner, and an org always keeps at least one owner. Membership changes of one org
are serialized by locking its row, so two owners demoting each other at once can't leave it ownerless.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import JSONBody
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.accounts import create_org
from control_plane.common import CP, DEPENDENCIES, Caller, Email, IdParam, NonNegMicros, set_fields
from control_plane.errors import Conflict, Forbidden, Invalid, NotFound
from control_plane.permissions import allowed, require
from control_plane.principal import Principal
from control_plane.state import ControlPlane
from shared.settings import Settings

Role = Literal["owner", "admin", "developer", "billing", "viewer"]
OrgName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class OrgCreate(msgspec.Struct, frozen=True):
    name: OrgName


class OrgSummary(msgspec.Struct, frozen=True):
    id: int
    name: str
    code: str
    status: str
    role: str


class Org(msgspec.Struct, frozen=True):
    id: int
    name: str
    code: str
    status: str
    created_at: datetime.datetime
    billing_email: str | None
    alert_emails: list[str]
    low_balance_threshold_micros: int | None
    request_log_retention_days: int | None  # None: the platform's default retention
    effective_request_log_retention_days: int  # what the retention worker applies (default and bounds resolved)
    rpm_limit: int | None
    tpm_limit: int | None
    credit_limit_micros: int


class OrgUpdate(msgspec.Struct, frozen=True):
    name: OrgName | UnsetType = UNSET
    request_log_retention_days: Annotated[int, msgspec.Meta(ge=1, le=100000)] | UnsetType | None = UNSET


class BillingSettingsUpdate(msgspec.Struct, frozen=True):
    billing_email: Email | UnsetType | None = UNSET
    alert_emails: Annotated[list[Email], msgspec.Meta(max_length=20)] | UnsetType = UNSET
    low_balance_threshold_micros: NonNegMicros | UnsetType | None = UNSET


class Member(msgspec.Struct, frozen=True):
    user_id: int
    email: str
    role: str
    created_at: datetime.datetime


class MemberAdd(msgspec.Struct, frozen=True):
    email: Email
    role: Role


class MemberUpdate(msgspec.Struct, frozen=True):
    role: Role


ORG_COLUMNS = """id, name, code, status, created_at, billing_email, alert_emails, low_balance_threshold_micros,
                  request_log_retention_days, rpm_limit, tpm_limit, credit_limit_micros"""


def org_view(row: asyncpg.Record, settings: Settings) -> Org:
    stored = {f: row[f] for f in Org.__struct_fields__ if f != "effective_request_log_retention_days"}
    return Org(**stored, effective_request_log_retention_days=settings.effective_log_retention_days(
        row["request_log_retention_days"]))


async def _update_org(cp: ControlPlane, principal: Principal, org_id: int, fields: dict, action: str) -> Org:
    async with cp.pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(f"select {ORG_COLUMNS} from orgs where id = $1 for update", org_id)
        if fields:
            sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
            after = await conn.fetchrow(f"update orgs set {sets} where id = $1 returning {ORG_COLUMNS}",
                                        org_id, *fields.values())
            await audit.record(conn, principal, action, "org", org_id, org_id=org_id,
                               before={k: before[k] for k in fields}, after={k: after[k] for k in fields})
            before = after
    return org_view(before, cp.settings)


class OrgsController(Controller):
    path = "/v1/orgs"
    dependencies = DEPENDENCIES
    tags = ("orgs",)

    @post("/", guards=[require("orgs.create")])
    async def create(self, cp: CP, principal: Caller, data: JSONBody[OrgCreate]) -> Org:
        """Create another org; the caller becomes its owner."""
        async with cp.pool.acquire() as conn, conn.transaction():
            org = await create_org(conn, data.name, principal.user_id)
            actor = replace(principal, scope="org", org_id=org["id"], role="owner")
            await audit.record(conn, actor, "org.create", "org", org["id"], org_id=org["id"],
                               after={"name": org["name"], "code": org["code"]})
        return org_view(org, cp.settings)

    @get("/", guards=[require("orgs.list")])
    async def list_mine(self, cp: CP, principal: Caller) -> list[OrgSummary]:
        """The orgs the caller belongs to, with their role in each."""
        rows = await cp.pool.fetch(
            """select o.id, o.name, o.code, o.status, m.role from memberships m join orgs o on o.id = m.org_id
               where m.user_id = $1 order by o.id""", principal.user_id)
        return [OrgSummary(r["id"], r["name"], r["code"], r["status"], r["role"]) for r in rows]

    @get("/{org_id:int}", guards=[require("org.read")])
    async def get_org(self, cp: CP, org_id: IdParam) -> Org:
        return org_view(await cp.pool.fetchrow(f"select {ORG_COLUMNS} from orgs where id = $1", org_id),
                        cp.settings)

    @patch("/{org_id:int}", guards=[require("org.update")])
    async def update(self, cp: CP, principal: Caller, org_id: IdParam, data: JSONBody[OrgUpdate]) -> Org:
        """Rename the org or set its request-log retention (within the platform's bounds; null: default)."""
        fields = set_fields(data)
        days = fields.get("request_log_retention_days")
        low, high = cp.settings.log_retention_min_days, cp.settings.log_retention_max_days
        if days is not None and not low <= days <= high:
            raise Invalid(f"request_log_retention_days must be between {low} and {high}.")
        return await _update_org(cp, principal, org_id, fields, "org.update")

    @patch("/{org_id:int}/billing-settings", guards=[require("billing_settings.update")])
    async def update_billing(self, cp: CP, principal: Caller, org_id: IdParam,
                             data: JSONBody[BillingSettingsUpdate]) -> Org:
        """Billing contact, low-balance alert recipients and threshold."""
        fields = set_fields(data)
        if "alert_emails" in fields:
            fields["alert_emails"] = sorted({e.strip().lower() for e in fields["alert_emails"]})
        return await _update_org(cp, principal, org_id, fields, "org.billing_settings.update")

    # --- members ---------------------------------------------------------------------------------------

    @get("/{org_id:int}/members", guards=[require("members.read")])
    async def members(self, cp: CP, org_id: IdParam) -> list[Member]:
        rows = await cp.pool.fetch(
            """select m.user_id, u.email, m.role, m.created_at from memberships m join users u on u.id = m.user_id
               where m.org_id = $1 order by m.created_at, m.user_id""", org_id)
        return [Member(r["user_id"], r["email"], r["role"], r["created_at"]) for r in rows]

    @post("/{org_id:int}/members", guards=[require("members.manage")], opt={"errors": (409,)})
    async def add_member(self, cp: CP, principal: Caller, org_id: IdParam, data: JSONBody[MemberAdd]) -> Member:
        """Add an existing user (by email) with a role. Granting `owner` takes an owner."""
        if data.role == "owner" and not allowed(principal.role, "members.manage_owners"):
            raise Forbidden("Only an owner may grant the owner role.")
        async with cp.pool.acquire() as conn, conn.transaction():
            user = await conn.fetchrow("select id, email from users where lower(email) = lower($1)", data.email)
            if user is None:
                raise NotFound("No user with this email; they must sign up first.", code="user_not_found")
            row = await conn.fetchrow(
                """insert into memberships (org_id, user_id, role) values ($1, $2, $3)
                   on conflict do nothing returning created_at""", org_id, user["id"], data.role)
            if row is None:
                raise Conflict("This user is already a member.", code="already_member")
            await audit.record(conn, principal, "member.add", "user", user["id"], org_id=org_id,
                               after={"email": user["email"], "role": data.role})
        return Member(user["id"], user["email"], data.role, row["created_at"])

    @patch("/{org_id:int}/members/{user_id:int}", guards=[require("members.manage")], opt={"errors": (409,)})
    async def update_member(self, cp: CP, principal: Caller, org_id: IdParam, user_id: IdParam,
                            data: JSONBody[MemberUpdate]) -> Member:
        """Change a member's role."""
        async with cp.pool.acquire() as conn, conn.transaction():
            current = await self._lock_member(conn, principal, org_id, user_id, data.role)
            if current["role"] == "owner" and data.role != "owner":
                await self._keep_an_owner(conn, org_id)
            row = await conn.fetchrow(
                "update memberships set role = $3 where org_id = $1 and user_id = $2 returning created_at",
                org_id, user_id, data.role)
            if current["role"] != data.role:
                await audit.record(conn, principal, "member.update", "user", user_id, org_id=org_id,
                                   before={"role": current["role"]}, after={"role": data.role})
        return Member(user_id, current["email"], data.role, row["created_at"])

    @delete("/{org_id:int}/members/{user_id:int}", guards=[require("members.manage")], opt={"errors": (409,)})
    async def remove_member(self, cp: CP, principal: Caller, org_id: IdParam, user_id: IdParam) -> None:
        """Remove a member (their API keys stay: keys belong to the org)."""
        async with cp.pool.acquire() as conn, conn.transaction():
            current = await self._lock_member(conn, principal, org_id, user_id, None)
            if current["role"] == "owner":
                await self._keep_an_owner(conn, org_id)
            await conn.execute("delete from memberships where org_id = $1 and user_id = $2", org_id, user_id)
            await audit.record(conn, principal, "member.remove", "user", user_id, org_id=org_id,
                               before={"email": current["email"], "role": current["role"]})

    @staticmethod
    async def _lock_member(conn: asyncpg.Connection, principal: Principal, org_id: int, user_id: int,
                           new_role: str | None) -> asyncpg.Record:
        await conn.execute("select 1 from orgs where id = $1 for update", org_id)
        current = await conn.fetchrow(
            """select m.role, u.email from memberships m join users u on u.id = m.user_id
               where m.org_id = $1 and m.user_id = $2""", org_id, user_id)
        if current is None:
            raise NotFound("No such member.")
        if "owner" in (current["role"], new_role) and not allowed(principal.role, "members.manage_owners"):
            raise Forbidden("Only an owner may change owners.")
        return current

    @staticmethod
    async def _keep_an_owner(conn: asyncpg.Connection, org_id: int) -> None:
        owners = await conn.fetchval("select count(*) from memberships where org_id = $1 and role = 'owner'", org_id)
        if owners <= 1:
            raise Conflict("An org must keep at least one owner.", code="last_owner")

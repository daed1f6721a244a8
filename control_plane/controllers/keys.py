"""API keys of an org: create (the secret is shown once), list, read, update limits, revoke.

Every change is pushed to the proxies through `shared.apikeys.publish_key_change` (their caches are
overwritten and evicted), so a revocation or a new limit applies within moments, not at cache expiry.
"""

from __future__ import annotations

import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import FromQuery, JSONBody
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, IdParam, NonNegMicros, PerMinute, set_fields, utc
from control_plane.errors import Conflict, Invalid, NotFound
from control_plane.permissions import require
from control_plane.state import ControlPlane
from shared.apikeys import create_api_key, publish_key_change
from shared.notify.events import emit

KeyName = Annotated[str, msgspec.Meta(max_length=200)]
ModelList = Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]], msgspec.Meta(max_length=200)]


class KeyCreate(msgspec.Struct, frozen=True):
    name: KeyName = ""
    rpm_limit: PerMinute | None = None
    tpm_limit: PerMinute | None = None
    allowed_models: ModelList | None = None  # None: every model
    monthly_spend_cap_micros: NonNegMicros | None = None
    expires_at: datetime.datetime | None = None


class KeyUpdate(msgspec.Struct, frozen=True):
    name: KeyName | UnsetType = UNSET
    rpm_limit: PerMinute | UnsetType | None = UNSET
    tpm_limit: PerMinute | UnsetType | None = UNSET
    allowed_models: ModelList | UnsetType | None = UNSET
    monthly_spend_cap_micros: NonNegMicros | UnsetType | None = UNSET
    expires_at: datetime.datetime | UnsetType | None = UNSET


class ApiKey(msgspec.Struct, frozen=True):
    id: int
    name: str
    prefix: str
    status: str  # active, expired or revoked
    created_at: datetime.datetime
    created_by: int | None
    last_used_at: datetime.datetime | None
    expires_at: datetime.datetime | None
    revoked_at: datetime.datetime | None
    rpm_limit: int | None
    tpm_limit: int | None
    allowed_models: list[str] | None
    monthly_spend_cap_micros: int | None


class CreatedKey(msgspec.Struct, frozen=True):
    key: str  # the full key: shown only in this response, store it now
    api_key: ApiKey


_COLUMNS = """id, name, prefix, created_at, created_by, last_used_at, expires_at, revoked_at, rpm_limit, tpm_limit,
              allowed_models, monthly_spend_cap_micros"""
_LIMIT_FIELDS = ("name", "rpm_limit", "tpm_limit", "allowed_models", "monthly_spend_cap_micros", "expires_at")


def key_view(row: asyncpg.Record) -> ApiKey:
    if row["revoked_at"] is not None:
        status = "revoked"
    elif row["expires_at"] is not None and row["expires_at"] <= datetime.datetime.now(datetime.UTC):
        status = "expired"
    else:
        status = "active"
    return ApiKey(status=status, **{f: row[f] for f in ApiKey.__struct_fields__ if f != "status"})


async def _check_fields(conn: asyncpg.Connection, fields: dict) -> dict:
    if fields.get("expires_at") is not None:
        fields["expires_at"] = utc(fields["expires_at"])
        if fields["expires_at"] <= datetime.datetime.now(datetime.UTC):
            raise Invalid("expires_at must be in the future.")
    if fields.get("allowed_models") is not None:
        models = sorted(set(fields["allowed_models"]))
        known = await conn.fetchval("select count(*) from models where name = any($1::text[])", models)
        if known != len(models):
            raise Invalid("allowed_models names a model that does not exist.", code="unknown_model")
        fields["allowed_models"] = models
    return fields


async def _publish(cp: ControlPlane, prefix: str) -> None:
    await publish_key_change(cp.redis, cp.keys, cp.pool, prefix, cp.settings.redis_key_cache_ttl_s)


class KeysController(Controller):
    path = "/v1/orgs/{org_id:int}/keys"
    dependencies = DEPENDENCIES
    tags = ("api keys",)

    @get("/", guards=[require("keys.read")])
    async def list_keys(self, cp: CP, org_id: IdParam, include_revoked: FromQuery[bool] = False) -> list[ApiKey]:
        rows = await cp.pool.fetch(
            f"""select {_COLUMNS} from api_keys where org_id = $1 and ($2 or revoked_at is null)
                order by id desc""", org_id, include_revoked)
        return [key_view(r) for r in rows]

    @post("/", guards=[require("keys.manage")])
    async def create(self, cp: CP, principal: Caller, org_id: IdParam, data: JSONBody[KeyCreate]) -> CreatedKey:
        """Create a key. The response holds the full key once; only its prefix and a keyed hash are stored."""
        async with cp.pool.acquire() as conn, conn.transaction():
            fields = await _check_fields(conn, msgspec.structs.asdict(data))
            key_id, key = await create_api_key(conn, cp.settings.key_pepper.encode(), org_id,
                                               created_by=principal.user_id, **fields)
            row = await conn.fetchrow(f"select {_COLUMNS} from api_keys where id = $1", key_id)
            await audit.record(conn, principal, "api_key.create", "api_key", key_id, org_id=org_id,
                               after={"prefix": row["prefix"], **{f: row[f] for f in _LIMIT_FIELDS}})
            await emit(conn, org_id, "key.created", {"key_id": key_id, "prefix": row["prefix"]})
        # A proxy may hold "no such key" for this prefix for a moment; the event clears that too.
        await _publish(cp, row["prefix"])
        return CreatedKey(key, key_view(row))

    @get("/{key_id:int}", guards=[require("keys.read")])
    async def get_key(self, cp: CP, org_id: IdParam, key_id: IdParam) -> ApiKey:
        row = await cp.pool.fetchrow(f"select {_COLUMNS} from api_keys where id = $1 and org_id = $2", key_id, org_id)
        if row is None:
            raise NotFound("No such API key.")
        return key_view(row)

    @patch("/{key_id:int}", guards=[require("keys.manage")], opt={"errors": (409,)})
    async def update(self, cp: CP, principal: Caller, org_id: IdParam, key_id: IdParam,
                     data: JSONBody[KeyUpdate]) -> ApiKey:
        """Rename a key or change its limits (null removes a limit); proxies apply it within moments."""
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(f"select {_COLUMNS} from api_keys where id = $1 and org_id = $2 for update",
                                         key_id, org_id)
            if before is None:
                raise NotFound("No such API key.")
            if before["revoked_at"] is not None:
                raise Conflict("This key is revoked; create a new one.", code="key_revoked")
            fields = await _check_fields(conn, set_fields(data))
            if not fields:
                return key_view(before)
            sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
            after = await conn.fetchrow(f"update api_keys set {sets} where id = $1 returning {_COLUMNS}",
                                        key_id, *fields.values())
            await audit.record(conn, principal, "api_key.update", "api_key", key_id, org_id=org_id,
                               before={k: before[k] for k in fields}, after={k: after[k] for k in fields})
        await _publish(cp, after["prefix"])
        return key_view(after)

    @delete("/{key_id:int}", guards=[require("keys.manage")])
    async def revoke(self, cp: CP, principal: Caller, org_id: IdParam, key_id: IdParam) -> None:
        """Revoke a key: every proxy refuses it within moments. Revoking a revoked key changes nothing."""
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "select prefix, revoked_at from api_keys where id = $1 and org_id = $2 for update", key_id, org_id)
            if row is None:
                raise NotFound("No such API key.")
            if row["revoked_at"] is None:
                revoked_at = await conn.fetchval(
                    "update api_keys set revoked_at = now() where id = $1 returning revoked_at", key_id)
                await audit.record(conn, principal, "api_key.revoke", "api_key", key_id, org_id=org_id,
                                   before={"revoked_at": None}, after={"revoked_at": revoked_at})
                await emit(conn, org_id, "key.revoked", {"key_id": key_id, "prefix": row["prefix"]},
                           dedupe_key=f"key-{key_id}")
        # Published even when it was revoked already: a retry after a failed publish must still reach proxies.
        await _publish(cp, row["prefix"])

"""BYOK: an org's own provider credentials (envelope-encrypted, never shown again), and the public
catalogue a portal needs to offer them: the providers and the models with their current prices."""

from __future__ import annotations

import datetime
from typing import Annotated

import msgspec
from litestar import Controller, delete, get, put
from litestar.params import JSONBody

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, VISIBLE_ASCII, Caller, IdParam, mask_secret
from control_plane.errors import NotFound
from control_plane.permissions import require
from shared.crypto import store_secret

BYOK_KIND = "byok_credential"


class Provider(msgspec.Struct, frozen=True):
    id: int
    name: str
    api_format: str


class CurrentPrice(msgspec.Struct, frozen=True):
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    request_micros: int
    byok_input_micros_per_mtok: int
    byok_output_micros_per_mtok: int
    byok_request_micros: int
    effective_from: datetime.datetime


class Model(msgspec.Struct, frozen=True):
    name: str
    kind: str
    owned_by: str
    price: CurrentPrice | None


class ByokCredential(msgspec.Struct, frozen=True):
    provider_id: int
    provider_name: str
    credential_hint: str  # e.g. "sk-…abcd": the credential itself is never returned
    created_at: datetime.datetime
    updated_at: datetime.datetime


class ByokSet(msgspec.Struct, frozen=True):
    api_key: Annotated[str, msgspec.Meta(min_length=8, max_length=4096, pattern=VISIBLE_ASCII)]


class CatalogueController(Controller):
    path = "/v1"
    dependencies = DEPENDENCIES
    tags = ("catalogue",)

    @get("/providers", guards=[require("catalogue.read")])
    async def providers(self, cp: CP) -> list[Provider]:
        """Active providers (for choosing where a BYOK credential applies)."""
        rows = await cp.pool.fetch("select id, name, api_format from providers where status = 'active' order by id")
        return [Provider(**dict(r)) for r in rows]

    @get("/models", guards=[require("catalogue.read")])
    async def models(self, cp: CP) -> list[Model]:
        """Models with at least one usable route, with the price in force now (µ$ per million tokens)."""
        rows = await cp.pool.fetch(
            """select m.name, m.kind, m.owned_by, p.input_micros_per_mtok, p.output_micros_per_mtok,
                      p.request_micros, p.byok_input_micros_per_mtok, p.byok_output_micros_per_mtok,
                      p.byok_request_micros, p.effective_from
               from models m
               left join lateral (select * from model_prices mp where mp.model = m.name and mp.effective_from <= now()
                                    and mp.service_tier = 'default' and mp.min_prompt_tokens = 0
                                  order by mp.effective_from desc limit 1) p on true
               where exists (select 1 from routes r join providers pr on pr.id = r.provider_id
                             where r.model = m.name and r.status <> 'disabled' and pr.status = 'active')
               order by m.name""")
        return [Model(r["name"], r["kind"], r["owned_by"],
                      CurrentPrice(**{f: r[f] for f in CurrentPrice.__struct_fields__})
                      if r["effective_from"] is not None else None) for r in rows]


class ByokController(Controller):
    path = "/v1/orgs/{org_id:int}/byok"
    dependencies = DEPENDENCIES
    tags = ("byok",)

    @get("/", guards=[require("byok.read")])
    async def list_credentials(self, cp: CP, org_id: IdParam) -> list[ByokCredential]:
        rows = await cp.pool.fetch(
            """select c.provider_id, p.name as provider_name, s.hint as credential_hint, c.created_at, c.updated_at
               from org_provider_credentials c join providers p on p.id = c.provider_id
               join secrets s on s.id = c.secret_id where c.org_id = $1 order by c.provider_id""", org_id)
        return [ByokCredential(**dict(r)) for r in rows]

    @put("/{provider_id:int}", guards=[require("byok.manage")])
    async def set_credential(self, cp: CP, principal: Caller, org_id: IdParam, provider_id: IdParam,
                             data: JSONBody[ByokSet]) -> ByokCredential:
        """Store (or replace) the org's credential for a provider; requests of the org then use it."""
        async with cp.pool.acquire() as conn, conn.transaction():
            provider = await conn.fetchval("select name from providers where id = $1", provider_id)
            if provider is None:
                raise NotFound("No such provider.")
            secret_id = await store_secret(conn, cp.box, BYOK_KIND, data.api_key, org_id=org_id,
                                           hint=mask_secret(data.api_key))
            old = await conn.fetchval(
                "select secret_id from org_provider_credentials where org_id = $1 and provider_id = $2 for update",
                org_id, provider_id)
            row = await conn.fetchrow(
                """insert into org_provider_credentials (org_id, provider_id, secret_id) values ($1, $2, $3)
                   on conflict (org_id, provider_id) do update set secret_id = excluded.secret_id, updated_at = now()
                   returning created_at, updated_at""", org_id, provider_id, secret_id)
            if old is not None:
                await conn.execute("delete from secrets where id = $1", old)
            await audit.record(conn, principal, "byok.set", "provider", provider_id, org_id=org_id,
                               before={"credential": old and "old"}, after={"credential": "new"})
        await cp.redis.publish(cp.keys.events_channel, f"byok:{org_id}")
        return ByokCredential(provider_id, provider, mask_secret(data.api_key), row["created_at"], row["updated_at"])

    @delete("/{provider_id:int}", guards=[require("byok.manage")])
    async def delete_credential(self, cp: CP, principal: Caller, org_id: IdParam,
                                provider_id: IdParam) -> None:
        """Forget the org's credential for a provider; its requests go back to the platform's credential."""
        async with cp.pool.acquire() as conn, conn.transaction():
            secret_id = await conn.fetchval(
                "delete from org_provider_credentials where org_id = $1 and provider_id = $2 returning secret_id",
                org_id, provider_id)
            if secret_id is None:
                raise NotFound("No credential for this provider.")
            await conn.execute("delete from secrets where id = $1", secret_id)
            await audit.record(conn, principal, "byok.delete", "provider", provider_id, org_id=org_id,
                               before={"credential": "old"}, after={"credential": None})
        await cp.redis.publish(cp.keys.events_channel, f"byok:{org_id}")

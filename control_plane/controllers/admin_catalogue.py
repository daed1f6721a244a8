"""Platform admin: the supply chain — models, prices (with effective dates), providers and routes.

Every change ends with a `config` event, on which every proxy reloads its catalogue within moments.

Prices never change retroactively or "now": a new price takes effect at `effective_from`, at least
`price_min_lead_s` in the future (the default when omitted). A proxy charges each request the price in force
when the request *started*, and reserves money up front at that price; so each proxy must already hold a
price before it applies — after the change event, or at worst after its periodic refresh, which the
default lead exceeds. Otherwise a request could reserve at the old price and be charged the new one.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import JSONBody, Parameter
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import (
    CP,
    DEPENDENCIES,
    Caller,
    Credential,
    IdParam,
    NonNegMicros,
    WireName,
    mask_secret,
    set_fields,
    utc,
)
from control_plane.errors import Invalid, NotFound
from control_plane.permissions import require
from shared.crypto import store_secret

ModelName = WireName
# Visible ASCII only: the URL's path goes into the request line and its host into the Host header.
BaseUrl = Annotated[str, msgspec.Meta(min_length=8, max_length=2000, pattern=r"^https?://[\x21-\x7e]+$(?!\n)")]
TimeoutMs = Annotated[int, msgspec.Meta(ge=1, le=3_600_000)]
RouteStatus = Literal["active", "degraded", "disabled"]
ModelParam = Annotated[str | None, Parameter(max_length=200)]


class ModelCreate(msgspec.Struct, frozen=True):
    name: ModelName
    kind: Literal["chat", "completion", "embedding"]
    owned_by: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "rocket-relay"


class Model(msgspec.Struct, frozen=True):
    name: str
    kind: str
    owned_by: str
    created_at: datetime.datetime


OptMicros = NonNegMicros | None
TierName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,32}$(?!\n)")]


class PriceComponents(msgspec.Struct, frozen=True, kw_only=True):
    """µ$ per million tokens of the components billed apart. Unset: the fallback of `shared.money.Price`
    (cached input, cache writes, input images/audio → the input price; 1-hour writes → the 5-minute price;
    reasoning, output images/audio → the output price; the BYOK ones → the BYOK input/output prices)."""

    cached_input_micros_per_mtok: OptMicros = None
    cache_write_5m_micros_per_mtok: OptMicros = None
    cache_write_1h_micros_per_mtok: OptMicros = None
    reasoning_micros_per_mtok: OptMicros = None
    input_image_micros_per_mtok: OptMicros = None
    input_audio_micros_per_mtok: OptMicros = None
    output_image_micros_per_mtok: OptMicros = None
    output_audio_micros_per_mtok: OptMicros = None
    byok_cached_input_micros_per_mtok: OptMicros = None
    byok_cache_write_5m_micros_per_mtok: OptMicros = None
    byok_cache_write_1h_micros_per_mtok: OptMicros = None
    byok_reasoning_micros_per_mtok: OptMicros = None


class PriceRow(PriceComponents, frozen=True, kw_only=True):
    """The prices every row of a version has (µ$ per million tokens; the BYOK ones: what BYOK requests pay)."""

    input_micros_per_mtok: NonNegMicros
    output_micros_per_mtok: NonNegMicros
    request_micros: NonNegMicros = 0
    byok_input_micros_per_mtok: NonNegMicros = 0
    byok_output_micros_per_mtok: NonNegMicros = 0
    byok_request_micros: NonNegMicros = 0


class PriceTier(PriceRow, frozen=True, kw_only=True):
    """Another row of the same price version: a service tier's price, or the price from a prompt size up."""

    service_tier: TierName = "default"
    min_prompt_tokens: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] = 0


class PriceCreate(PriceRow, frozen=True, kw_only=True):
    model: ModelName
    effective_from: datetime.datetime | None = None  # default: now + the minimum lead
    # More rows of this version (same model and effective_from): e.g. {"min_prompt_tokens": 200000, ...} for a
    # long-context price, {"service_tier": "flex", ...} for a cheaper tier. This row is the default tier's
    # price from 0 prompt tokens.
    tiers: Annotated[list[PriceTier], msgspec.Meta(max_length=32)] = []


class Price(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    model: str
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    request_micros: int
    byok_input_micros_per_mtok: int
    byok_output_micros_per_mtok: int
    byok_request_micros: int
    cached_input_micros_per_mtok: int | None
    cache_write_5m_micros_per_mtok: int | None
    cache_write_1h_micros_per_mtok: int | None
    reasoning_micros_per_mtok: int | None
    input_image_micros_per_mtok: int | None
    input_audio_micros_per_mtok: int | None
    output_image_micros_per_mtok: int | None
    output_audio_micros_per_mtok: int | None
    byok_cached_input_micros_per_mtok: int | None
    byok_cache_write_5m_micros_per_mtok: int | None
    byok_cache_write_1h_micros_per_mtok: int | None
    byok_reasoning_micros_per_mtok: int | None
    service_tier: str
    min_prompt_tokens: int
    effective_from: datetime.datetime
    created_at: datetime.datetime


class ProviderCreate(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    base_url: BaseUrl
    api_format: Literal["openai", "anthropic"] = "openai"
    responses_api: bool = False  # an openai provider that also serves the Responses API (passed through)
    api_key: Credential | None = None
    connect_timeout_ms: TimeoutMs = 5000
    read_timeout_ms: TimeoutMs = 120_000


class ProviderUpdate(msgspec.Struct, frozen=True):
    base_url: BaseUrl | UnsetType = UNSET
    api_format: Literal["openai", "anthropic"] | UnsetType = UNSET
    responses_api: bool | UnsetType = UNSET
    api_key: Credential | UnsetType | None = UNSET
    connect_timeout_ms: TimeoutMs | UnsetType = UNSET
    read_timeout_ms: TimeoutMs | UnsetType = UNSET
    status: Literal["active", "disabled"] | UnsetType = UNSET


class Provider(msgspec.Struct, frozen=True):
    id: int
    name: str
    api_format: str
    base_url: str
    credential_hint: str | None  # the stored credential, masked; None: none stored
    connect_timeout_ms: int
    read_timeout_ms: int
    status: str
    created_at: datetime.datetime
    responses_api: bool = False


class RouteCreate(msgspec.Struct, frozen=True):
    model: ModelName
    provider_id: Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]
    upstream_model: ModelName
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    weight: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    status: RouteStatus = "active"


class RouteUpdate(msgspec.Struct, frozen=True):
    upstream_model: ModelName | UnsetType = UNSET
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] | UnsetType = UNSET
    weight: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | UnsetType = UNSET
    status: RouteStatus | UnsetType = UNSET


class Route(msgspec.Struct, frozen=True):
    id: int
    model: str
    provider_id: int
    provider_name: str
    upstream_model: str
    priority: int
    weight: int
    status: str
    created_at: datetime.datetime


_PROVIDER_SQL = """select p.id, p.name, p.api_format, p.responses_api, p.base_url, s.hint as credential_hint,
       p.connect_timeout_ms,
       p.read_timeout_ms, p.status, p.created_at
from providers p left join secrets s on s.id = p.credential_secret_id"""
_ROUTE_SQL = """select r.id, r.model, r.provider_id, p.name as provider_name, r.upstream_model, r.priority, r.weight,
       r.status, r.created_at
from routes r join providers p on p.id = r.provider_id"""
_PRICE_COLUMNS = ", ".join(Price.__struct_fields__)


def _row(struct: type[msgspec.Struct], row: asyncpg.Record) -> msgspec.Struct:
    return struct(**{f: row[f] for f in struct.__struct_fields__})


class AdminCatalogueController(Controller):
    path = "/v1/admin"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    # --- models and prices -----------------------------------------------------------------------------

    @get("/models", guards=[require("platform.catalogue.read")])
    async def list_models(self, cp: CP) -> list[Model]:
        return [_row(Model, r) for r in await cp.pool.fetch("select * from models order by name")]

    @post("/models", guards=[require("platform.catalogue.manage")], opt={"errors": (409,)})
    async def create_model(self, cp: CP, principal: Caller, data: JSONBody[ModelCreate]) -> Model:
        """Add a model to the catalogue (it is served once it has a price and a route)."""
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("insert into models (name, kind, owned_by) values ($1, $2, $3) returning *",
                                      data.name, data.kind, data.owned_by)
            await audit.record(conn, principal, "model.create", "model", data.name, org_id=None,
                               after=msgspec.structs.asdict(data))
        await cp.publish_config()
        return _row(Model, row)

    @get("/prices", guards=[require("platform.catalogue.read")])
    async def list_prices(self, cp: CP, model: ModelParam = None) -> list[Price]:
        """Every price (past, current and scheduled), newest effective date first."""
        rows = await cp.pool.fetch(
            f"""select {_PRICE_COLUMNS} from model_prices where $1::text is null or model = $1
                order by model, effective_from desc, service_tier, min_prompt_tokens""", model)
        return [_row(Price, r) for r in rows]

    @post("/prices", guards=[require("platform.catalogue.manage")], opt={"errors": (409,)})
    async def create_price(self, cp: CP, principal: Caller, data: JSONBody[PriceCreate]) -> Price:
        """Schedule a price (µ$ per million tokens; BYOK columns: what BYOK requests pay)."""
        earliest = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=cp.settings.price_min_lead_s)
        effective = utc(data.effective_from) if data.effective_from else earliest
        if effective < earliest - datetime.timedelta(seconds=1):
            raise Invalid(f"effective_from must be at least {cp.settings.price_min_lead_s:g} s in the future, "
                          "so that every proxy knows a price before it applies.", code="price_too_soon")
        base = {k: v for k, v in msgspec.structs.asdict(data).items() if k != "tiers"}
        values = {**base, "effective_from": effective}
        rows = [values] + [{**msgspec.structs.asdict(t), "model": data.model, "effective_from": effective}
                           for t in data.tiers]
        seen = {(r.get("service_tier", "default"), r.get("min_prompt_tokens", 0)) for r in rows}
        if len(seen) != len(rows):
            raise Invalid("Each tier of a price needs its own (service_tier, min_prompt_tokens); the price itself is "
                          "the default tier from 0 prompt tokens.", code="duplicate_price_tier")
        async with cp.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select 1 from models where name = $1", data.model):
                raise Invalid("No such model.", code="unknown_model")
            created = []
            for fields in rows:
                names = ", ".join(fields)
                params = ", ".join(f"${n}" for n in range(1, len(fields) + 1))
                inserted = await conn.fetchrow(f"insert into model_prices ({names}) values ({params}) returning *",
                                               *fields.values())
                created.append(inserted)
                await audit.record(conn, principal, "price.create", "model_price", inserted["id"], org_id=None,
                                   after=fields)
        await cp.publish_config()
        return _row(Price, created[0])

    # --- providers -------------------------------------------------------------------------------------

    @get("/providers", guards=[require("platform.catalogue.read")])
    async def list_providers(self, cp: CP) -> list[Provider]:
        return [_row(Provider, r) for r in await cp.pool.fetch(_PROVIDER_SQL + " order by p.id")]

    @post("/providers", guards=[require("platform.catalogue.manage")], opt={"errors": (409,)})
    async def create_provider(self, cp: CP, principal: Caller, data: JSONBody[ProviderCreate]) -> Provider:
        """Add an upstream provider; its credential is stored encrypted and only ever shown masked."""
        fields = msgspec.structs.asdict(data)
        async with cp.pool.acquire() as conn, conn.transaction():
            api_key = fields.pop("api_key")
            if api_key is not None:
                fields["credential_secret_id"] = await store_secret(conn, cp.box, "provider_credential", api_key,
                                                                    hint=mask_secret(api_key))
            names = ", ".join(fields)
            params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
            provider_id = await conn.fetchval(f"insert into providers ({names}) values ({params}) returning id",
                                              *fields.values())
            await audit.record(conn, principal, "provider.create", "provider", provider_id, org_id=None,
                               after={**msgspec.structs.asdict(data), "credential_secret_id": None})
            row = await conn.fetchrow(_PROVIDER_SQL + " where p.id = $1", provider_id)
        await cp.publish_config()
        return _row(Provider, row)

    @patch("/providers/{provider_id:int}", guards=[require("platform.catalogue.manage")])
    async def update_provider(self, cp: CP, principal: Caller, provider_id: IdParam,
                              data: JSONBody[ProviderUpdate]) -> Provider:
        """Change a provider's URL, format, timeouts, status or credential (null removes it)."""
        fields = set_fields(data)
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("select * from providers where id = $1 for update", provider_id)
            if before is None:
                raise NotFound("No such provider.")
            columns = {k: v for k, v in fields.items() if k != "api_key"}
            if "api_key" in fields:
                api_key = fields["api_key"]
                columns["credential_secret_id"] = None if api_key is None else await store_secret(
                    conn, cp.box, "provider_credential", api_key, hint=mask_secret(api_key))
            if columns:
                sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=2))
                await conn.execute(f"update providers set {sets} where id = $1", provider_id, *columns.values())
                if "credential_secret_id" in columns and before["credential_secret_id"] is not None:
                    await conn.execute("delete from secrets where id = $1", before["credential_secret_id"])
            audit_before = {k: before[k] for k in fields if k != "api_key"}
            audit_after = {k: fields[k] for k in fields if k != "api_key"}
            if "api_key" in fields:
                audit_before["api_key"] = before["credential_secret_id"] and "old"
                audit_after["api_key"] = fields["api_key"]
            await audit.record(conn, principal, "provider.update", "provider", provider_id, org_id=None,
                               before=audit_before, after=audit_after)
            row = await conn.fetchrow(_PROVIDER_SQL + " where p.id = $1", provider_id)
        await cp.publish_config()
        return _row(Provider, row)

    # --- routes ----------------------------------------------------------------------------------------

    @get("/routes", guards=[require("platform.catalogue.read")])
    async def list_routes(self, cp: CP, model: ModelParam = None) -> list[Route]:
        rows = await cp.pool.fetch(_ROUTE_SQL + " where $1::text is null or r.model = $1 order by r.model, r.id",
                                   model)
        return [_row(Route, r) for r in rows]

    @post("/routes", guards=[require("platform.catalogue.manage")], opt={"errors": (409,)})
    async def create_route(self, cp: CP, principal: Caller, data: JSONBody[RouteCreate]) -> Route:
        """Route a model to a provider's upstream model name, with a priority and a weight."""
        async with cp.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select 1 from models where name = $1", data.model):
                raise Invalid("No such model.", code="unknown_model")
            if not await conn.fetchval("select 1 from providers where id = $1", data.provider_id):
                raise Invalid("No such provider.", code="unknown_provider")
            route_id = await conn.fetchval(
                """insert into routes (model, provider_id, upstream_model, priority, weight, status)
                   values ($1, $2, $3, $4, $5, $6) returning id""", *msgspec.structs.astuple(data))
            await audit.record(conn, principal, "route.create", "route", route_id, org_id=None,
                               after=msgspec.structs.asdict(data))
            row = await conn.fetchrow(_ROUTE_SQL + " where r.id = $1", route_id)
        await cp.publish_config()
        return _row(Route, row)

    @patch("/routes/{route_id:int}", guards=[require("platform.catalogue.manage")])
    async def update_route(self, cp: CP, principal: Caller, route_id: IdParam,
                           data: JSONBody[RouteUpdate]) -> Route:
        """Change a route's upstream model, priority, weight or status (disabled: not used)."""
        fields = set_fields(data)
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("select * from routes where id = $1 for update", route_id)
            if before is None:
                raise NotFound("No such route.")
            if fields:
                sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
                await conn.execute(f"update routes set {sets} where id = $1", route_id, *fields.values())
                await audit.record(conn, principal, "route.update", "route", route_id, org_id=None,
                                   before={k: before[k] for k in fields}, after=fields)
            row = await conn.fetchrow(_ROUTE_SQL + " where r.id = $1", route_id)
        await cp.publish_config()
        return _row(Route, row)

    @delete("/routes/{route_id:int}", guards=[require("platform.catalogue.manage")])
    async def delete_route(self, cp: CP, principal: Caller, route_id: IdParam) -> None:
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("delete from routes where id = $1 returning *", route_id)
            if before is None:
                raise NotFound("No such route.")
            await audit.record(conn, principal, "route.delete", "route", route_id, org_id=None,
                               before={k: before[k] for k in ("model", "provider_id", "upstream_model")})
        await cp.publish_config()

"""The supply chain as this process sees it: models, their routes and providers, loaded from PostgreSQL.

A `Catalogue` is an immutable snapshot, swapped whole when the events channel says the configuration
changed (and every `config_refresh_interval_s` as a safety net), so the hot path reads it without locks or
I/O. Provider credentials are decrypted once per load, never per request.
"""

from __future__ import annotations

import asyncpg
import msgspec

from proxy.errors import InvalidRequest, ModelNotFound
from shared.apikeys import KeyRecord
from shared.crypto import SecretBox
from shared.money import Price

__all__ = ["Catalogue", "Route", "load_catalogue"]


class Route(msgspec.Struct, frozen=True):
    id: int
    model: str
    provider: str
    api_format: str
    base_url: str
    upstream_model: str
    credential: str | None
    connect_timeout_s: float
    read_timeout_s: float
    priority: int
    weight: int


class ModelEntry(msgspec.Struct, frozen=True):
    name: str
    kind: str
    owned_by: str
    created: int
    routes: tuple[Route, ...]  # usable routes, best priority first
    prices: tuple[Price, ...]  # newest effective_from first; future prices are loaded ahead of time

    def price_at(self, when: float) -> Price | None:
        """The price in force at unix time `when` (the request's start)."""
        for price in self.prices:
            if price.effective_from <= when:
                return price
        return None


# Which model kinds each endpoint serves.
ENDPOINT_KINDS = {
    "/v1/chat/completions": ("chat",),
    "/v1/completions": ("completion", "chat"),
    "/v1/embeddings": ("embedding",),
}


class Catalogue:
    __slots__ = ("models",)

    def __init__(self, models: dict[str, ModelEntry]) -> None:
        self.models = models

    def entry_for(self, model: str, path: str, key: KeyRecord) -> ModelEntry:
        """The model, if this key may use it on this endpoint; 404/400 otherwise."""
        entry = self.models.get(model)
        if entry is None or not entry.routes or (key.allowed_models is not None and model not in key.allowed_models):
            # The same answer for "no such model" and "not allowed for this key": don't reveal the catalogue.
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.",
                                param="model")
        if entry.kind not in ENDPOINT_KINDS[path]:
            raise InvalidRequest(f"The model `{model}` is a {entry.kind} model and cannot be used with {path}.",
                                 param="model", code="model_not_supported")
        return entry

    def visible_models(self, key: KeyRecord) -> list[ModelEntry]:
        allowed = key.allowed_models
        return [m for m in self.models.values() if m.routes and (allowed is None or m.name in allowed)]


_MODELS_SQL = "select name, kind, owned_by, extract(epoch from created_at)::bigint as created from models"
_PRICES_SQL = """
select id, model, input_micros_per_mtok, output_micros_per_mtok, request_micros,
       extract(epoch from effective_from)::float8 as effective_from
from model_prices order by model, effective_from desc
"""
_ROUTES_SQL = """
select r.id, r.model, p.name as provider, p.api_format, p.base_url, r.upstream_model, p.credential_secret_id,
       p.connect_timeout_ms, p.read_timeout_ms, r.priority, r.weight,
       s.kind as secret_kind, s.master_key_id, s.wrapped_key, s.ciphertext
from routes r
join providers p on p.id = r.provider_id
left join secrets s on s.id = p.credential_secret_id
where r.status <> 'disabled' and p.status = 'active'
order by r.model, r.priority desc, r.id
"""


async def load_catalogue(pool: asyncpg.Pool, box: SecretBox) -> Catalogue:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        model_rows = await conn.fetch(_MODELS_SQL)
        route_rows = await conn.fetch(_ROUTES_SQL)
        price_rows = await conn.fetch(_PRICES_SQL)
    prices: dict[str, list[Price]] = {}
    for p in price_rows:
        prices.setdefault(p["model"], []).append(Price(
            p["id"], p["input_micros_per_mtok"], p["output_micros_per_mtok"], p["request_micros"],
            p["effective_from"]))
    routes: dict[str, list[Route]] = {}
    for r in route_rows:
        credential = None
        if r["credential_secret_id"] is not None:
            credential = box.open(r["credential_secret_id"], r["secret_kind"], r["master_key_id"],
                                  r["wrapped_key"], r["ciphertext"]).decode()
        routes.setdefault(r["model"], []).append(Route(
            id=r["id"], model=r["model"], provider=r["provider"], api_format=r["api_format"],
            base_url=r["base_url"].rstrip("/"), upstream_model=r["upstream_model"], credential=credential,
            connect_timeout_s=r["connect_timeout_ms"] / 1000, read_timeout_s=r["read_timeout_ms"] / 1000,
            priority=r["priority"], weight=r["weight"],
        ))
    models = {
        m["name"]: ModelEntry(m["name"], m["kind"], m["owned_by"], m["created"],
                              tuple(routes.get(m["name"], ())), tuple(prices.get(m["name"], ())))
        for m in model_rows
    }
    return Catalogue(models)

"""The supply chain as this process sees it: models, their routes and providers, loaded from PostgreSQL.

A `Catalogue` is an immutable snapshot, swapped whole when the events channel says the configuration
changed (and every `config_refresh_interval_s` as a safety net), so the hot path reads it without locks or
I/O. Provider credentials are decrypted once per load, never per request.
"""

from __future__ import annotations

import random
import time
from itertools import groupby
from typing import Any

import asyncpg
import msgspec

from proxy.errors import InvalidRequest, ModelNotFound, UpstreamError
from proxy.health import HEALTHY, CircuitBreakers, RouteStats, route_rank
from shared.apikeys import KeyRecord
from shared.crypto import SecretBox
from shared.money import Price, PriceVersion

__all__ = ["Attempt", "Catalogue", "Route", "apply_preferences", "load_catalogue", "plan_attempts"]


class Route(msgspec.Struct, frozen=True):
    id: int
    model: str
    provider_id: int
    provider: str
    api_format: str
    base_url: str
    upstream_model: str
    credential: str | None
    connect_timeout_s: float
    read_timeout_s: float
    priority: int
    weight: int
    status: str  # active | degraded (disabled routes are not loaded)
    # What the model-quality probes say (shared/quality): healthy | degraded | failing | quarantined.
    # Failing and quarantined routes are loaded (the probe runner keeps probing them) but never planned.
    probe_status: str = "healthy"
    responses_api: bool = False  # an `openai` provider that serves the Responses API too

    @property
    def wire(self) -> str:
        """The richest dialect the provider speaks: `openai-responses`, `openai` or `anthropic`
        (`proxy.endpoints.Endpoint.dialect_for` picks a dialect by it, falling back to `api_format`)."""
        return "openai-responses" if self.responses_api and self.api_format == "openai" else self.api_format


class ModelEntry(msgspec.Struct, frozen=True):
    name: str
    kind: str
    owned_by: str
    created: int
    routes: tuple[Route, ...]  # usable routes, best priority first
    prices: tuple[PriceVersion, ...]  # newest effective_from first; future prices are loaded ahead of time
    tiers: tuple[tuple[Route, ...], ...] = ()  # routes grouped by priority, best first

    def __post_init__(self) -> None:
        if not self.tiers and self.routes:
            tiers = tuple(tuple(g) for _, g in groupby(self.routes, key=lambda r: r.priority))
            msgspec.structs.force_setattr(self, "tiers", tiers)

    def price_at(self, when: float) -> PriceVersion | None:
        """The price version in force at unix time `when` (the request's start)."""
        for price in self.prices:
            if price.effective_from <= when:
                return price
        return None


class Catalogue:
    """`loaded_at` is the wall-clock time just before its snapshot was read: everything committed before
    then is in it (so a newer load never loses to an older one finishing later)."""

    __slots__ = ("loaded_at", "models")

    def __init__(self, models: dict[str, ModelEntry], loaded_at: float = 0.0) -> None:
        self.models = models
        self.loaded_at = loaded_at

    def entry_for(self, model: str, path: str, kinds: tuple[str, ...], key: KeyRecord) -> ModelEntry:
        """The model, if this key may use it on the endpoint at `path` (serving models of `kinds`); 404/400
        otherwise."""
        entry = self.models.get(model)
        if entry is None or not entry.routes or (key.allowed_models is not None and model not in key.allowed_models):
            # The same answer for "no such model" and "not allowed for this key": don't reveal the catalogue.
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.",
                                param="model")
        if entry.kind not in kinds:
            raise InvalidRequest(f"The model `{model}` is a {entry.kind} model and cannot be used with {path}.",
                                 param="model", code="model_not_supported")
        return entry

    def visible_models(self, key: KeyRecord) -> list[ModelEntry]:
        allowed = key.allowed_models
        return [m for m in self.models.values() if m.routes and (allowed is None or m.name in allowed)]


class Attempt(msgspec.Struct, frozen=True, array_like=True):
    """One try at a route, with the credential to use (the org's own for BYOK)."""

    route: Route
    credential: str | None
    byok: bool


def _weighted_order(routes: list[Route], rng: random.Random | None) -> list[Route]:
    """A random order in which heavier routes tend to come first (weighted sampling without replacement)."""
    if len(routes) < 2:
        return routes
    draw = (rng or random).random
    pool, order = list(routes), []
    while pool:
        pick = draw() * sum(r.weight for r in pool)
        for i, route in enumerate(pool):
            pick -= route.weight
            if pick < 0 or i == len(pool) - 1:
                order.append(pool.pop(i))
                break
    return order


def plan_attempts(entry: ModelEntry, byok: dict[int, str], breakers: CircuitBreakers, now: float,
                  limit: int, rng: random.Random | None = None) -> list[Attempt]:
    """The routes to try, in order: the org's BYOK routes first, then by priority; within a priority,
    healthy before degraded (`proxy.health.route_rank`: the breaker, the probe status and the admin status
    in one rank), weighted at random (`rng`, default the module's generator); routes whose breaker is open
    or that probes found failing, or an admin quarantined, are left out."""
    if len(entry.routes) == 1 and not byok:  # the common case, without allocation beyond the list
        route = entry.routes[0]
        if route_rank(breakers, route, now) is not None:
            return [Attempt(route, route.credential, False)]
        raise UpstreamError(f"The model `{entry.name}` is temporarily unavailable (its provider is failing).",
                            status=503, code="model_unavailable")
    own, ours = [], []
    for tier in entry.tiers:
        ranked = [(r, rank) for r in tier if (rank := route_rank(breakers, r, now)) is not None]
        ordered = _weighted_order([r for r, rank in ranked if rank == HEALTHY], rng)
        ordered += _weighted_order([r for r, rank in ranked if rank != HEALTHY], rng)
        for route in ordered:
            credential = byok.get(route.provider_id)
            if credential is not None:
                own.append(Attempt(route, credential, True))
            else:
                ours.append(Attempt(route, route.credential, False))
    attempts = (own + ours)[:limit]
    if not attempts:
        raise UpstreamError(f"The model `{entry.name}` is temporarily unavailable (its providers are failing).",
                            status=503, code="model_unavailable")
    return attempts


def apply_preferences(attempts: list[Attempt], prefs: Any, stats: RouteStats) -> list[Attempt]:
    """A client's `provider` preferences applied to planned attempts (OpenRouter's semantics): `only` keeps
    those providers, `ignore` drops those; `order` tries those first, in that order, then the others unless
    `allow_fallbacks` is false; `sort` by `latency` (lowest first) or `throughput` (highest first), as this
    process measured them (`proxy.health.RouteStats`; unmeasured routes last). (`sort: price` orders models,
    whose routes share one price: `proxy.relay`.)"""
    only = frozenset(prefs.only) if prefs.only else None
    ignore = frozenset(prefs.ignore or ())
    kept = [a for a in attempts
            if (only is None or a.route.provider in only) and a.route.provider not in ignore]
    if prefs.order:
        rank = {name: i for i, name in enumerate(prefs.order)}
        first = sorted((a for a in kept if a.route.provider in rank), key=lambda a: rank[a.route.provider])
        kept = first + ([a for a in kept if a.route.provider not in rank] if prefs.allow_fallbacks else [])
    if prefs.sort == "latency":
        kept.sort(key=lambda a: stats.latency(a.route.id))
    elif prefs.sort == "throughput":
        kept.sort(key=lambda a: -stats.throughput(a.route.id))
    return kept


_MODELS_SQL = "select name, kind, owned_by, extract(epoch from created_at)::bigint as created from models"
_PRICE_FIELDS = tuple(f for f in Price.__struct_fields__ if f != "effective_from")
_PRICES_SQL = f"""
select model, {", ".join(_PRICE_FIELDS)}, extract(epoch from effective_from)::float8 as effective_from
from model_prices order by model, effective_from desc, service_tier, min_prompt_tokens
"""
_ROUTES_SQL = """
select r.id, r.model, p.id as provider_id, p.name as provider, r.status, r.probe_status, p.api_format, p.base_url,
       p.responses_api,
       r.upstream_model, p.credential_secret_id,
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
        loaded_at = time.time()  # before the snapshot (taken by the first query)
        model_rows = await conn.fetch(_MODELS_SQL)
        route_rows = await conn.fetch(_ROUTES_SQL)
        price_rows = await conn.fetch(_PRICES_SQL)
    rows: dict[tuple[str, float], list[Price]] = {}
    for p in price_rows:  # one version per (model, effective_from), its tier rows together
        rows.setdefault((p["model"], p["effective_from"]), []).append(
            Price(effective_from=p["effective_from"], **{f: p[f] for f in _PRICE_FIELDS}))
    prices: dict[str, list[PriceVersion]] = {}
    for (model, effective_from), version_rows in rows.items():  # in model, newest-first order
        prices.setdefault(model, []).append(PriceVersion(effective_from, tuple(version_rows)))
    routes: dict[str, list[Route]] = {}
    for r in route_rows:
        credential = None
        if r["credential_secret_id"] is not None:
            credential = box.open(r["credential_secret_id"], r["secret_kind"], r["master_key_id"],
                                  r["wrapped_key"], r["ciphertext"]).decode()
        routes.setdefault(r["model"], []).append(Route(
            id=r["id"], model=r["model"], provider_id=r["provider_id"], provider=r["provider"],
            api_format=r["api_format"], status=r["status"], probe_status=r["probe_status"],
            base_url=r["base_url"].rstrip("/"), upstream_model=r["upstream_model"], credential=credential,
            connect_timeout_s=r["connect_timeout_ms"] / 1000, read_timeout_s=r["read_timeout_ms"] / 1000,
            priority=r["priority"], weight=r["weight"], responses_api=r["responses_api"],
        ))
    models = {
        m["name"]: ModelEntry(m["name"], m["kind"], m["owned_by"], m["created"],
                              tuple(routes.get(m["name"], ())), tuple(prices.get(m["name"], ())))
        for m in model_rows
    }
    return Catalogue(models, loaded_at)

"""Seed a demo org, key, models, prices and routes: what `make run` needs to answer a first request.

Idempotent: running it again reuses what exists (the demo key is passed in, so it keeps working across
runs); the upstream base URL and credential of the demo provider follow the latest call.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import msgspec

from shared.apikeys import create_api_key, hash_api_key, parse_api_key
from shared.crypto import box_from_settings, store_secret
from shared.settings import Settings, SettingsError, load_settings

__all__ = ["DEMO_BALANCE_MICROS", "DemoSeed", "seed_demo"]

DEMO_ORG_CODE = "demo"
DEMO_BALANCE_MICROS = 100_000_000  # 100 USD
DEMO_PROVIDER = "demo-upstream"
# (public model, kind, input µ$/Mtok, output µ$/Mtok): OpenAI's names, so a real upstream answers them too.
DEMO_MODELS = (
    ("gpt-4o-mini", "chat", 150_000, 600_000),
    ("text-embedding-3-small", "embedding", 20_000, 0),
)
# The components OpenAI bills gpt-4o-mini apart (its price list): cached input at half the input price.
DEMO_COMPONENTS = {"gpt-4o-mini": {"cached_input_micros_per_mtok": 75_000}}


class DemoSeed(msgspec.Struct, frozen=True):
    api_key: str
    org_id: int
    org_code: str
    chat_model: str
    embedding_model: str


async def seed_demo(
    settings: Settings,
    *,
    upstream_base_url: str,
    upstream_api_key: str | None = None,
    demo_api_key: str | None = None,
) -> DemoSeed:
    """Create (or refresh) the demo org, provider, routes and key; return how to call it."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            org_id = await _ensure_org(conn)
            await _ensure_catalogue(conn, settings, upstream_base_url, upstream_api_key)
            api_key = await _ensure_key(conn, settings, org_id, demo_api_key)
    finally:
        await conn.close()
    return DemoSeed(api_key, org_id, DEMO_ORG_CODE, DEMO_MODELS[0][0], DEMO_MODELS[1][0])


async def _ensure_org(conn: asyncpg.Connection) -> int:
    org_id = await conn.fetchval(
        """insert into orgs (name, code) values ('Demo Org', $1)
           on conflict (code) do update set name = orgs.name returning id""",
        DEMO_ORG_CODE,
    )
    credited = await conn.fetchval(
        """insert into balance_transactions (org_id, kind, amount_micros, external_id, reason)
           values ($1, 'adjustment', $2, 'demo-seed-credit', 'demo seed credit')
           on conflict do nothing returning id""",
        org_id, DEMO_BALANCE_MICROS,
    )
    if credited is not None:
        await conn.execute(
            """insert into org_balances (org_id, balance_micros) values ($1, $2)
               on conflict (org_id) do update
               set balance_micros = org_balances.balance_micros + excluded.balance_micros, updated_at = now()""",
            org_id, DEMO_BALANCE_MICROS,
        )
    return org_id


async def _ensure_catalogue(
    conn: asyncpg.Connection, settings: Settings, base_url: str, api_key: str | None
) -> None:
    secret_id = None
    if api_key:
        box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)
        secret_id = await store_secret(conn, box, "provider_credential", api_key, hint=api_key[-4:])
    provider_id = await conn.fetchval(
        """insert into providers (name, api_format, base_url, credential_secret_id)
           values ($1, 'openai', $2, $3)
           on conflict (name) do update set base_url = excluded.base_url,
                                            credential_secret_id = excluded.credential_secret_id
           returning id""",
        DEMO_PROVIDER, base_url.rstrip("/"), secret_id,
    )
    for model, kind, input_price, output_price in DEMO_MODELS:
        await conn.execute(
            "insert into models (name, kind) values ($1, $2) on conflict (name) do nothing", model, kind
        )
        components = DEMO_COMPONENTS.get(model, {})
        names = "".join(f", {c}" for c in components)
        params = "".join(f", ${i}" for i in range(4, 4 + len(components)))
        await conn.execute(
            f"""insert into model_prices (model, input_micros_per_mtok, output_micros_per_mtok, effective_from{names})
                select $1, $2, $3, '2000-01-01'{params}
                where not exists (select 1 from model_prices where model = $1)""",
            model, input_price, output_price, *components.values(),
        )
        await conn.execute(
            """insert into routes (model, provider_id, upstream_model) values ($1, $2, $1)
               on conflict do nothing""",
            model, provider_id,
        )


async def _ensure_key(conn: asyncpg.Connection, settings: Settings, org_id: int, key: str | None) -> str:
    pepper = settings.key_pepper.encode()
    if key is not None:
        if parse_api_key(key) is None:
            raise ValueError("the demo API key is malformed")
        if await conn.fetchval("select 1 from api_keys where key_hash = $1", hash_api_key(pepper, key)):
            return key
    _, key = await create_api_key(conn, pepper, org_id, name="demo", key=key)
    return key


def main() -> None:
    """`rr-seed`: seed the demo data against DATABASE_URL; prints the demo key."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(str(exc))
    base_url = os.environ.get("UPSTREAM_BASE_URL", "http://127.0.0.1:9100/v1")
    seed = asyncio.run(
        seed_demo(settings, upstream_base_url=base_url, upstream_api_key=os.environ.get("UPSTREAM_API_KEY"))
    )
    print(f"demo org {seed.org_code}: key {seed.api_key}")

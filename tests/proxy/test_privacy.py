"""A unique canary sent through every endpoint appears nowhere we keep data afterwards."""

from __future__ import annotations

import asyncio
import secrets

import httpx

from tests.conftest import Factory, Server, Tenant, wait_for_rows


async def redis_contains(redis, prefix: str, needle: bytes) -> list[str]:
    found = []
    async for key in redis.scan_iter(match=prefix + "*", count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            values = [await redis.get(key)]
        elif kind == "hash":
            values = [k + v for k, v in (await redis.hgetall(key)).items()]
        elif kind == "list":
            values = await redis.lrange(key, 0, -1)
        elif kind in ("set",):
            values = list(await redis.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [repr(fields).encode() for _, fields in await redis.xrange(key)]
        else:
            values = []
        if any(v and needle in v for v in values):
            found.append(key.decode())
    return found


async def postgres_contains(db, needle: str) -> list[str]:
    tables = await db.fetch(
        "select tablename from pg_tables where schemaname = 'public'"
    )
    found = []
    for t in tables:
        name = t["tablename"]
        hit = await db.fetchval(f'select count(*) from "{name}" x where x::text like $1', f"%{needle}%")
        if hit:
            found.append(name)
    return found


async def test_canary_is_stored_nowhere(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                        tenant: Tenant, factory: Factory, db, redis, settings) -> None:
    canary = f"CANARY-{secrets.token_hex(8)}"
    embed_model = await factory.model(tenant.provider_id, kind="embedding")
    await factory.publish_config(proxy, tenant.api_key, embed_model)
    url = proxy.url + "/v1"
    trace = f"privacy-{secrets.token_hex(4)}"
    calls = [
        ("/chat/completions", {"model": tenant.model, "messages": [{"role": "user", "content": canary}]}),
        ("/chat/completions", {"model": tenant.model, "stream": True,
                               "messages": [{"role": "system", "content": canary}, {"role": "user", "content": "x"}]}),
        ("/completions", {"model": tenant.model, "prompt": canary}),
        ("/completions", {"model": tenant.model, "prompt": canary, "stream": True}),
        ("/embeddings", {"model": embed_model, "input": [canary]}),
        ("/chat/completions", {"model": tenant.model, "messages": canary}),  # 400
        ("/chat/completions", {"model": "missing-model", "messages": [{"content": canary}]}),  # 404
        ("/embeddings", {"model": tenant.model, "input": canary}),  # 400: wrong kind
    ]
    for i, (path, body) in enumerate(calls):
        await client.post(url + path, headers={**tenant.auth, "x-request-id": f"{trace}-{i}"}, json=body)
    await client.post(url + "/chat/completions", headers={**tenant.auth, "x-request-id": f"{trace}-raw"},
                      content=b'{"model": "' + canary.encode() + b'", "messages": [')  # malformed JSON
    await client.post(url + "/chat/completions", headers={"x-request-id": f"{trace}-noauth"},
                      json={"model": tenant.model, "messages": [{"content": canary}]})

    rows = await wait_for_rows(db, "select 1 from request_logs where client_request_id like $1",
                               f"{trace}-%", count=len(calls) + 2)
    assert len(rows) == len(calls) + 2
    await asyncio.sleep(0.2)
    assert await postgres_contains(db, canary) == []
    assert await redis_contains(redis, settings.redis_prefix, canary.encode()) == []
    assert canary not in proxy.log()
    # The detectors themselves work: they find what we do store (the client's trace id) ...
    assert "request_logs" in await postgres_contains(db, trace)
    probe = settings.redis_prefix + "privacy-probe"
    await redis.set(probe, f"x{canary}x", ex=30)
    assert await redis_contains(redis, settings.redis_prefix, canary.encode()) == [probe]
    await redis.delete(probe)

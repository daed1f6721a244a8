"""Secrets sent to the control plane (passwords, BYOK and provider credentials, issued API keys and refresh
tokens) appear in no PostgreSQL row, no Redis key or value, and no log line afterwards."""

from __future__ import annotations

import secrets

from tests.conftest import Factory, Server
from tests.control_plane.conftest import Portal


async def _redis_contents(redis, prefix: str) -> bytes:
    chunks = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        chunks.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            chunks.append(await redis.get(key) or b"")
        elif kind == "hash":
            chunks += [b for pair in (await redis.hgetall(key)).items() for b in pair]
        elif kind == "set":
            chunks += list(await redis.smembers(key))
        elif kind == "zset":
            chunks += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            chunks += [b for _, fields in await redis.xrange(key) for pair in fields.items() for b in pair]
    return b"\n".join(c if isinstance(c, bytes) else str(c).encode() for c in chunks)


async def test_secrets_never_stored_or_logged_in_clear(portal: Portal, factory: Factory, db, redis, settings,
                                                       control_plane: Server) -> None:
    canary = f"canary{secrets.token_hex(8)}"
    password, new_password = f"{canary}-password", f"{canary}-new-password"
    email = f"{canary}@example.com"
    resp = await portal.request("POST", "/v1/auth/signup", json={"email": email, "password": password,
                                                                 "org_name": "Privacy"})
    body = resp.json()
    owner = body["tokens"]
    auth = {"authorization": f"Bearer {owner['access_token']}"}
    org_id = body["org_id"]
    await portal.login(email, f"{canary}-wrong")
    refresh = (await portal.request("POST", "/v1/auth/refresh", json={"refresh_token": owner["refresh_token"]})).json()
    await portal.request("POST", "/v1/auth/password", headers=auth,
                         json={"current_password": f"{canary}-wrong", "new_password": new_password})
    await portal.request("POST", "/v1/auth/password", headers=auth,
                         json={"current_password": password, "new_password": new_password})
    key = (await portal.request("POST", f"/v1/orgs/{org_id}/keys", headers=auth, json={"name": "k"})).json()["key"]
    provider_id = await factory.provider("http://127.0.0.1:9/v1")
    byok = f"sk-{canary}-byok"
    await portal.request("PUT", f"/v1/orgs/{org_id}/byok/{provider_id}", headers=auth, json={"api_key": byok})
    admin = await portal.platform_admin()
    upstream = f"sk-{canary}-upstream"
    await portal.request("POST", "/v1/admin/providers", admin, json={
        "name": f"p-{canary}", "base_url": "http://127.0.0.1:9/v1", "api_key": upstream})

    needles = [password, new_password, f"{canary}-wrong", key, byok, upstream, owner["refresh_token"],
               refresh["refresh_token"], owner["refresh_token"].split(".")[1]]

    # PostgreSQL: every row of every table, as text.
    tables = [r["t"] for r in await db.fetch(
        """select format('%I.%I', table_schema, table_name) as t from information_schema.tables
           where table_schema = 'public' and table_type = 'BASE TABLE'""")]
    for table in tables:
        for needle in needles:
            hits = await db.fetchval(f"select count(*) from {table} x where x::text like $1", f"%{needle}%")
            assert hits == 0, f"{table} holds a secret in clear"
    # The canary does appear where it should (the email), which proves the scan reads the rows.
    assert await db.fetchval("select count(*) from users x where x::text like $1", f"%{canary}%") == 1

    stored = await _redis_contents(redis, settings.redis_prefix)
    log = control_plane.log()
    for needle in needles:
        assert needle.encode() not in stored, "a secret in Redis"
        assert needle not in log, "a secret in the control plane's log"

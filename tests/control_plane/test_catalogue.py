"""Platform admin supply chain (providers, models, routes, prices with effective dates) as the proxy sees
it, the public catalogue, BYOK credentials (always masked), and the admin org list."""

from __future__ import annotations

import asyncio
import datetime
import secrets

import httpx

from tests.conftest import Factory, Server
from tests.control_plane.conftest import Portal


async def _proxy_models(proxy: Server, key: str) -> set[str]:
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    return {m["id"] for m in resp.json()["data"]}


async def _eventually(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_admin_builds_a_model_the_proxy_serves(portal: Portal, proxy: Server, mock_upstream: Server,
                                                     factory: Factory, db) -> None:
    admin = await portal.platform_admin()
    name = f"cp-model-{secrets.token_hex(3)}"
    upstream_key = "sk-upstream-0123456789abcdef"
    resp = await portal.request("POST", "/v1/admin/providers", admin, json={
        "name": f"prov-{name}", "base_url": mock_upstream.url + "/v1", "api_key": upstream_key})
    assert resp.status_code == 201, resp.text
    provider = resp.json()
    assert provider["credential_hint"] == "sk-…cdef" and upstream_key not in resp.text
    for status in (201, 409):  # the second time: it exists
        resp = await portal.request("POST", "/v1/admin/models", admin, json={"name": name, "kind": "chat"})
        assert resp.status_code == status
    route = await portal.request("POST", "/v1/admin/routes", admin, json={
        "model": name, "provider_id": provider["id"], "upstream_model": "gpt-4o-mini"})
    assert route.status_code == 201 and route.json()["provider_name"] == provider["name"]

    # Prices: never sooner than the configured lead (1 s in tests); the default is exactly that lead.
    too_soon = datetime.datetime.now(datetime.UTC).isoformat()
    resp = await portal.request("POST", "/v1/admin/prices", admin, json={
        "model": name, "input_micros_per_mtok": 1_000_000, "output_micros_per_mtok": 2_000_000,
        "effective_from": too_soon})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "price_too_soon"
    resp = await portal.request("POST", "/v1/admin/prices", admin, json={
        "model": name, "input_micros_per_mtok": 1_000_000, "output_micros_per_mtok": 2_000_000})
    assert resp.status_code == 201
    effective = datetime.datetime.fromisoformat(resp.json()["effective_from"])
    lead = (effective - datetime.datetime.now(datetime.UTC)).total_seconds()
    assert 0 < lead <= 1.0
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)).isoformat()
    resp = await portal.request("POST", "/v1/admin/prices", admin, json={
        "model": name, "input_micros_per_mtok": 3_000_000, "output_micros_per_mtok": 4_000_000,
        "effective_from": later})
    assert resp.status_code == 201
    prices = (await portal.request("GET", "/v1/admin/prices", admin, params={"model": name})).json()
    assert [p["input_micros_per_mtok"] for p in prices] == [3_000_000, 1_000_000]

    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await _eventually(lambda: _has(proxy, key, name))
    await asyncio.sleep(max(0.0, (effective - datetime.datetime.now(datetime.UTC)).total_seconds()))
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                               json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    # The public catalogue shows the price in force now, not the scheduled one.
    user = await portal.signup()
    listed = {m["name"]: m for m in (await portal.request("GET", "/v1/models", user)).json()}
    assert listed[name]["price"]["input_micros_per_mtok"] == 1_000_000

    # Disabling the only route takes the model away from the proxy.
    resp = await portal.request("PATCH", f"/v1/admin/routes/{route.json()['id']}", admin, json={"status": "disabled"})
    assert resp.status_code == 200 and resp.json()["status"] == "disabled"
    await _eventually(lambda: _lacks(proxy, key, name))
    resp = await portal.request("PATCH", f"/v1/admin/providers/{provider['id']}", admin, json={"api_key": None})
    assert resp.status_code == 200 and resp.json()["credential_hint"] is None
    assert (await portal.request("DELETE", f"/v1/admin/routes/{route.json()['id']}", admin)).status_code == 204
    assert (await portal.request("DELETE", f"/v1/admin/routes/{route.json()['id']}", admin)).status_code == 404


async def _has(proxy: Server, key: str, model: str) -> bool:
    return model in await _proxy_models(proxy, key)


async def _lacks(proxy: Server, key: str, model: str) -> bool:
    return model not in await _proxy_models(proxy, key)


async def test_byok_credentials_are_encrypted_and_always_masked(portal: Portal, factory: Factory, db) -> None:
    owner = await portal.signup()
    developer = await portal.member(owner, owner.org_id, "developer")
    provider_id = await factory.provider("http://127.0.0.1:9/v1")
    secret = "sk-proj-" + secrets.token_hex(16)
    url = f"/v1/orgs/{owner.org_id}/byok"
    resp = await portal.request("PUT", f"{url}/{provider_id}", owner, json={"api_key": secret})
    assert resp.status_code == 200 and resp.json()["credential_hint"] == f"sk-…{secret[-4:]}"
    assert secret not in resp.text
    listed = await portal.request("GET", url, developer)  # developers may see which providers have one
    assert listed.status_code == 200 and secret not in listed.text
    assert [c["provider_id"] for c in listed.json()] == [provider_id]
    assert (await portal.request("PUT", f"{url}/{provider_id}", developer, json={"api_key": secret})).status_code == 403
    row = await db.fetchrow("""select s.* from org_provider_credentials c join secrets s on s.id = c.secret_id
                               where c.org_id = $1""", owner.org_id)
    assert row["kind"] == "byok_credential" and row["org_id"] == owner.org_id
    assert secret.encode() not in bytes(row["ciphertext"]) and secret not in row["hint"]
    # Replacing it leaves one secret row; deleting removes it.
    resp = await portal.request("PUT", f"{url}/{provider_id}", owner, json={"api_key": "short-key"})
    assert resp.json()["credential_hint"] == "…"
    assert await db.fetchval("select count(*) from secrets where org_id = $1", owner.org_id) == 1
    assert (await portal.request("DELETE", f"{url}/{provider_id}", owner)).status_code == 204
    assert await db.fetchval("select count(*) from secrets where org_id = $1", owner.org_id) == 0
    assert (await portal.request("DELETE", f"{url}/{provider_id}", owner)).status_code == 404
    assert (await portal.request("PUT", f"{url}/999999999", owner, json={"api_key": secret})).status_code == 404


async def test_admin_org_list_and_search(portal: Portal) -> None:
    admin = await portal.platform_admin()
    tag = secrets.token_hex(3)
    owner = await portal.signup(org_name=f"Searchable {tag}")
    found = (await portal.request("GET", "/v1/admin/orgs", admin, params={"q": f"searchable {tag}"})).json()
    assert [o["id"] for o in found["data"]] == [owner.org_id]
    by_email = (await portal.request("GET", "/v1/admin/orgs", admin, params={"q": owner.email.upper()})).json()
    assert owner.org_id in [o["id"] for o in by_email["data"]]
    assert (await portal.request("GET", "/v1/admin/orgs", admin, params={"q": "%"})).status_code == 200
    page = (await portal.request("GET", "/v1/admin/orgs", admin, params={"limit": 1})).json()
    nxt = (await portal.request("GET", "/v1/admin/orgs", admin, params={"limit": 1,
                                                                         "after_id": page["next_after_id"]})).json()
    assert nxt["data"][0]["id"] > page["data"][0]["id"]
    detail = (await portal.request("GET", f"/v1/admin/orgs/{owner.org_id}", admin)).json()
    assert detail["owners"] == [owner.email] and detail["org"]["id"] == owner.org_id
    assert (await portal.request("GET", "/v1/admin/orgs/999999999", admin)).status_code == 404


SMUGGLING = "sk-proj-abcdefgh\r\ncontent-length: 0\r\n\r\nPOST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
UNSENDABLE = [SMUGGLING, "sk-proj-abcdefgh\n", "sk-proj-abcd\tefgh", "sk-proj-ab\x00cdefgh", "sk-proj-abcdéfgh",
              " sk-proj-abcdefgh", "sk-proj-abcd efgh", "sk-proj-\x7fabcdefgh"]


async def test_values_that_would_reach_an_upstream_request_head_are_refused_when_stored(
    portal: Portal, factory: Factory, db,
) -> None:
    """BYOK and provider credentials, base URLs and upstream model names: visible ASCII only, 422 naming the
    field, nothing stored (the proxy refuses them again when it sends: tests/proxy/test_upstream_safety.py)."""
    owner = await portal.signup()
    admin = await portal.platform_admin()
    provider_id = await factory.provider("http://127.0.0.1:9/v1")
    for bad in UNSENDABLE:
        resp = await portal.request("PUT", f"/v1/orgs/{owner.org_id}/byok/{provider_id}", owner, json={"api_key": bad})
        assert resp.status_code == 422 and "api_key" in resp.json()["error"]["message"], (bad, resp.text)
        resp = await portal.request("POST", "/v1/admin/providers", admin, json={
            "name": f"p-{secrets.token_hex(3)}", "base_url": "http://127.0.0.1:9/v1", "api_key": bad})
        assert resp.status_code == 422 and "api_key" in resp.json()["error"]["message"], (bad, resp.text)
        resp = await portal.request("PATCH", f"/v1/admin/providers/{provider_id}", admin, json={"api_key": bad})
        assert resp.status_code == 422, (bad, resp.text)
    assert await db.fetchval("select count(*) from secrets where org_id = $1", owner.org_id) == 0
    for url in ("http://127.0.0.1:9/v1\r\nx-injected: 1", "http://127.0.0.1:9/v1\n", "http://127.0.0.1:9/v\x001",
                "http://exämple.com/v1", "http://127.0.0.1:9/v 1"):
        resp = await portal.request("POST", "/v1/admin/providers", admin, json={
            "name": f"p-{secrets.token_hex(3)}", "base_url": url})
        assert resp.status_code == 422 and "base_url" in resp.json()["error"]["message"], (url, resp.text)
        resp = await portal.request("PATCH", f"/v1/admin/providers/{provider_id}", admin, json={"base_url": url})
        assert resp.status_code == 422, (url, resp.text)
    model = f"m-{secrets.token_hex(3)}"
    created = await portal.request("POST", "/v1/admin/models", admin, json={"name": model, "kind": "chat"})
    assert created.status_code == 201
    for name in ("gpt-4o\r\nx: y", "gpt-4o\n", "gpt\x00", "gpt 4o"):
        resp = await portal.request("POST", "/v1/admin/routes", admin, json={
            "model": model, "provider_id": provider_id, "upstream_model": name})
        assert resp.status_code == 422 and "upstream_model" in resp.json()["error"]["message"], (name, resp.text)
    assert await db.fetchval("select count(*) from routes where model = $1", model) == 0
    # What is allowed still is: a real key and URL.
    good = await portal.request("PUT", f"/v1/orgs/{owner.org_id}/byok/{provider_id}", owner,
                                json={"api_key": "sk-proj-" + secrets.token_hex(16)})
    assert good.status_code == 200


async def test_a_price_with_components_and_tiers_is_one_version(portal: Portal, db) -> None:
    admin = await portal.platform_admin()
    name = f"cp-tiered-{secrets.token_hex(3)}"
    created = await portal.request("POST", "/v1/admin/models", admin, json={"name": name, "kind": "chat"})
    assert created.status_code == 201
    when = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    resp = await portal.request("POST", "/v1/admin/prices", admin, json={
        "model": name, "input_micros_per_mtok": 2_500_000, "output_micros_per_mtok": 10_000_000,
        "cached_input_micros_per_mtok": 1_250_000, "effective_from": when,
        "tiers": [{"min_prompt_tokens": 200_000, "input_micros_per_mtok": 5_000_000,
                   "output_micros_per_mtok": 15_000_000},
                  {"service_tier": "flex", "input_micros_per_mtok": 1_250_000, "output_micros_per_mtok": 5_000_000}]})
    assert resp.status_code == 201, resp.text
    base = resp.json()
    assert (base["service_tier"], base["min_prompt_tokens"], base["cached_input_micros_per_mtok"]) == ("default", 0,
                                                                                                     1_250_000)
    assert base["reasoning_micros_per_mtok"] is None  # unset: falls back to the output price (documented)
    listed = (await portal.request("GET", "/v1/admin/prices", admin, params={"model": name})).json()
    assert [(p["service_tier"], p["min_prompt_tokens"], p["input_micros_per_mtok"]) for p in listed] == [
        ("default", 0, 2_500_000), ("default", 200_000, 5_000_000), ("flex", 0, 1_250_000)]
    assert len({p["effective_from"] for p in listed}) == 1  # one version
    for bad in ([{"input_micros_per_mtok": 1, "output_micros_per_mtok": 1}],  # the base row again
                [{"service_tier": "Flex!", "input_micros_per_mtok": 1, "output_micros_per_mtok": 1}],
                [{"min_prompt_tokens": -1, "input_micros_per_mtok": 1, "output_micros_per_mtok": 1}],
                [{"service_tier": "flex", "input_micros_per_mtok": 1}]):
        resp = await portal.request("POST", "/v1/admin/prices", admin, json={
            "model": name, "input_micros_per_mtok": 1, "output_micros_per_mtok": 1, "tiers": bad})
        assert resp.status_code == 422, (bad, resp.text)
    resp = await portal.request("POST", "/v1/admin/prices", admin, json={
        "model": name, "input_micros_per_mtok": 1, "output_micros_per_mtok": 1, "reasoning_micros_per_mtok": -5})
    assert resp.status_code == 422
    assert await db.fetchval("select count(*) from model_prices where model = $1", name) == 3

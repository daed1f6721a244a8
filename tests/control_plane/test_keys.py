"""API keys through the control plane, end to end with a real proxy: create → use → limit → revoke, and an
org suspension that stops every key of the org within seconds."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest_asyncio

from tests.conftest import Factory, Server
from tests.control_plane.conftest import Account, Portal

CHAT = {"messages": [{"role": "user", "content": "Say hello"}]}


async def _chat(proxy: Server, key: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(proxy.url + "/v1/chat/completions", json={"model": model, **CHAT},
                               headers={"authorization": f"Bearer {key}"})


async def _wait_for_status(proxy: Server, key: str, model: str, status: int, timeout: float = 5.0) -> float:
    """Seconds until the proxy answers `status` for this key."""
    start = time.monotonic()
    while True:
        resp = await _chat(proxy, key, model)
        if resp.status_code == status:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"still {resp.status_code} after {timeout} s: {resp.text}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def funded(portal: Portal, factory: Factory, proxy: Server,
                 mock_upstream: Server) -> tuple[Account, str, Account]:
    """(owner of a new org credited with 10 USD, a model routed to the mock upstream, a platform admin)."""
    owner = await portal.signup(org_name="Keys Inc")
    admin = await portal.platform_admin()
    resp = await portal.request("POST", f"/v1/admin/orgs/{owner.org_id}/adjustments", admin,
                                json={"amount_micros": 10_000_000, "reason": "test credit"})
    assert resp.status_code == 201, resp.text
    model = await factory.model(await factory.provider(mock_upstream.url + "/v1"))
    return owner, model, admin


async def test_key_created_in_the_portal_works_at_the_proxy_until_revoked(
        portal: Portal, funded, proxy: Server, factory: Factory, db) -> None:
    owner, model, _ = funded
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/keys", owner,
                                json={"name": "ci", "allowed_models": [model], "monthly_spend_cap_micros": 5_000_000})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    key, view = created["key"], created["api_key"]
    assert key.startswith(f"rr-{view['prefix']}_") and view["status"] == "active"
    assert view["allowed_models"] == [model] and view["monthly_spend_cap_micros"] == 5_000_000
    # Only the prefix and a keyed hash are stored; the key is never shown again.
    row = await db.fetchrow("select * from api_keys where id = $1", view["id"])
    assert key.encode() not in bytes(row["key_hash"]) and key not in str(dict(row))
    listed = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/keys", owner)).json()
    assert [k["id"] for k in listed] == [view["id"]] and "key" not in listed[0]

    await factory.publish_config(proxy, key, model)
    assert (await _chat(proxy, key, model)).status_code == 200

    resp = await portal.request("DELETE", f"/v1/orgs/{owner.org_id}/keys/{view['id']}", owner)
    assert resp.status_code == 204
    elapsed = await _wait_for_status(proxy, key, model, 401, timeout=3.0)
    assert elapsed < 3.0
    assert (await _chat(proxy, key, model)).json()["error"]["code"] == "api_key_revoked"
    after = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/keys/{view['id']}", owner)).json()
    assert after["status"] == "revoked" and after["revoked_at"]
    assert (await portal.request("GET", f"/v1/orgs/{owner.org_id}/keys", owner)).json() == []
    with_revoked = await portal.request("GET", f"/v1/orgs/{owner.org_id}/keys", owner,
                                        params={"include_revoked": "true"})
    assert [k["id"] for k in with_revoked.json()] == [view["id"]]
    # A revoked key can't be edited back to life; revoking again changes nothing.
    resp = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/keys/{view['id']}", owner, json={"name": "x"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "key_revoked"
    assert (await portal.request("DELETE", f"/v1/orgs/{owner.org_id}/keys/{view['id']}", owner)).status_code == 204


async def test_limit_changes_reach_the_proxy(portal: Portal, funded, proxy: Server, factory: Factory) -> None:
    owner, model, _ = funded
    created = (await portal.request("POST", f"/v1/orgs/{owner.org_id}/keys", owner, json={"name": "x"})).json()
    key, key_id = created["key"], created["api_key"]["id"]
    await factory.publish_config(proxy, key, model)
    assert (await _chat(proxy, key, model)).status_code == 200
    # Allowed models: the model disappears for this key.
    resp = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/keys/{key_id}", owner,
                                json={"allowed_models": []})
    assert resp.status_code == 200 and resp.json()["allowed_models"] == []
    await _wait_for_status(proxy, key, model, 404)
    # Back to every model, with one request per minute.
    resp = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/keys/{key_id}", owner,
                                json={"allowed_models": None, "rpm_limit": 1})
    assert resp.json()["allowed_models"] is None and resp.json()["rpm_limit"] == 1
    await _wait_for_status(proxy, key, model, 429)
    # Expiry in the past is refused; an unknown model name too.
    resp = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/keys/{key_id}", owner,
                                json={"expires_at": "2001-01-01T00:00:00Z"})
    assert resp.status_code == 422
    resp = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/keys/{key_id}", owner,
                                json={"allowed_models": ["no-such-model"]})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "unknown_model"


async def test_suspending_an_org_stops_its_keys_within_seconds(
        portal: Portal, funded, proxy: Server, factory: Factory) -> None:
    owner, model, admin = funded
    keys = []
    for name in ("one", "two"):
        keys.append((await portal.request("POST", f"/v1/orgs/{owner.org_id}/keys", owner,
                                          json={"name": name})).json()["key"])
    await factory.publish_config(proxy, keys[0], model)
    for key in keys:
        assert (await _chat(proxy, key, model)).status_code == 200

    resp = await portal.request("PATCH", f"/v1/admin/orgs/{owner.org_id}", admin, json={"status": "suspended"})
    assert resp.status_code == 200 and resp.json()["status"] == "suspended"
    for key in keys:
        assert await _wait_for_status(proxy, key, model, 401, timeout=3.0) < 3.0
    # Members can still sign in and read (e.g. to see why); the org's keys just don't work.
    assert (await portal.request("GET", f"/v1/orgs/{owner.org_id}", owner)).json()["status"] == "suspended"

    resp = await portal.request("PATCH", f"/v1/admin/orgs/{owner.org_id}", admin, json={"status": "active"})
    assert resp.status_code == 200
    for key in keys:
        await _wait_for_status(proxy, key, model, 200, timeout=3.0)

    entries = (await portal.request("GET", "/v1/admin/audit-log", admin, params={"org_id": owner.org_id})).json()
    actions = [e["action"] for e in entries["data"]]
    assert actions[:2] == ["org.resume", "org.suspend"]
    suspend = entries["data"][1]
    assert suspend["changes"] == {"status": {"before": "active", "after": "suspended"}}
    assert suspend["actor_user_id"] == admin.user_id and suspend["actor_role"] == "platform_admin"
    assert suspend["ip"] == admin.ip


async def _upstream_auth(mock: Server, model: str) -> list[str | None]:
    async with httpx.AsyncClient(timeout=10) as http:
        records = (await http.get(mock.url + "/_mock/requests")).json()
    return [r["authorization"] for r in records if r["model"] == model]


async def test_byok_credential_set_in_the_portal_is_used_by_the_proxy(
        portal: Portal, funded, proxy: Server, factory: Factory, mock_upstream: Server, db) -> None:
    owner, model, _ = funded
    provider_id = await db.fetchval("select provider_id from routes where model = $1", model)
    key = (await portal.request("POST", f"/v1/orgs/{owner.org_id}/keys", owner, json={"name": "b"})).json()["key"]
    await factory.publish_config(proxy, key, model)
    assert (await _chat(proxy, key, model)).status_code == 200
    own = "sk-own-" + "7" * 20
    resp = await portal.request("PUT", f"/v1/orgs/{owner.org_id}/byok/{provider_id}", owner, json={"api_key": own})
    assert resp.status_code == 200 and own not in resp.text
    await _until_upstream_sees(proxy, mock_upstream, key, model, lambda auth: auth == f"Bearer {own}")
    # Deleted: requests go out with the platform's credential (none for this provider) again.
    assert (await portal.request("DELETE", f"/v1/orgs/{owner.org_id}/byok/{provider_id}", owner)).status_code == 204
    await _until_upstream_sees(proxy, mock_upstream, key, model, lambda auth: auth != f"Bearer {own}")


async def _until_upstream_sees(proxy: Server, mock: Server, key: str, model: str, check, timeout: float = 3.0) -> None:
    """Send requests until the upstream receives one whose Authorization passes `check` (the proxy learns of
    the change through an event, within moments)."""
    deadline = time.monotonic() + timeout
    while True:
        assert (await _chat(proxy, key, model)).status_code == 200
        if check((await _upstream_auth(mock, model))[-1]):
            return
        assert time.monotonic() < deadline, "the proxy never used the changed credential"
        await asyncio.sleep(0.05)

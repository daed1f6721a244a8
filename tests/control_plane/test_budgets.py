"""Budgets through the control plane: created, changed and deleted in the portal, audited, and applied by a
real proxy within moments; hostile values refused with a clear 4xx; another org's key refused like a missing
one."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Factory, Server
from tests.control_plane.conftest import Account, Portal

CHAT = {"messages": [{"role": "user", "content": "Say hello"}]}


async def _chat(proxy: Server, key: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(proxy.url + "/v1/chat/completions", json={"model": model, **CHAT, "max_tokens": 10},
                               headers={"authorization": f"Bearer {key}"})


async def _until(proxy: Server, key: str, model: str, status: int, timeout: float = 5.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = await _chat(proxy, key, model)
        if resp.status_code == status:
            return resp
        assert time.monotonic() < deadline, f"still {resp.status_code} after {timeout} s: {resp.text}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def org_with_key(portal: Portal, factory: Factory, proxy: Server, mock_upstream: Server):
    """(owner, key id, full key, model) of a new org credited with 10 USD, the key already known to the proxy."""
    owner = await portal.signup(org_name="Budgets Inc")
    admin = await portal.platform_admin()
    resp = await portal.request("POST", f"/v1/admin/orgs/{owner.org_id}/adjustments", admin,
                                json={"amount_micros": 10_000_000, "reason": "test credit"})
    assert resp.status_code == 201, resp.text
    model = await factory.model(await factory.provider(mock_upstream.url + "/v1"))
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/keys", owner, json={"name": "b"})
    key, key_id = resp.json()["key"], resp.json()["api_key"]["id"]
    await factory.publish_config(proxy, key, model)
    assert (await _chat(proxy, key, model)).status_code == 200  # the proxy caches the key's record now
    return owner, key_id, key, model


async def test_a_budget_set_in_the_portal_applies_at_the_proxy_within_moments(
        portal: Portal, org_with_key, proxy: Server, db) -> None:
    owner, key_id, key, model = org_with_key
    base = f"/v1/orgs/{owner.org_id}/budgets"
    resp = await portal.request("POST", base, owner, json={"api_key_id": key_id, "period": "day",
                                                           "limit_micros": 1})
    assert resp.status_code == 201, resp.text
    budget = resp.json()
    assert {k: budget[k] for k in ("scope", "api_key_id", "period", "window", "limit_micros", "alert_percent",
                                   "time_zone")} == {"scope": "key", "api_key_id": key_id, "period": "day",
                                                     "window": "calendar", "limit_micros": 1, "alert_percent": 80,
                                                     "time_zone": "UTC"}
    refused = await _until(proxy, key, model, 402, timeout=3.0)
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert refused.json()["error"]["budget"]["id"] == budget["id"]

    # Raising the limit opens it again; an org budget then binds the same key.
    resp = await portal.request("PATCH", f"{base}/{budget['id']}", owner,
                                json={"limit_micros": 1_000_000, "alert_percent": None})
    assert resp.status_code == 200 and resp.json()["alert_percent"] is None
    await _until(proxy, key, model, 200, timeout=3.0)
    resp = await portal.request("POST", base, owner, json={"period": "month", "window": "rolling", "limit_micros": 2})
    assert resp.status_code == 201 and resp.json()["scope"] == "org"
    org_budget = resp.json()["id"]
    refused = await _until(proxy, key, model, 402, timeout=3.0)
    assert refused.json()["error"]["budget"]["scope"] == "org"
    listed = (await portal.request("GET", base, owner)).json()
    assert [b["id"] for b in listed] == [org_budget, budget["id"]]
    assert (await portal.request("DELETE", f"{base}/{org_budget}", owner)).status_code == 204
    await _until(proxy, key, model, 200, timeout=3.0)
    assert (await portal.request("GET", f"{base}/{org_budget}", owner)).status_code == 404

    actions = [r["action"] for r in await db.fetch(
        "select action from audit_log where org_id = $1 and target_type = 'budget' order by id", owner.org_id)]
    assert actions == ["budget.create", "budget.update", "budget.create", "budget.delete"]
    change = await db.fetchval("""select changes from audit_log where org_id = $1 and action = 'budget.update'""",
                               owner.org_id)
    assert '"limit_micros": {"after": 1000000, "before": 1}' in change


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"period": "day", "limit_micros": 0}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": -5}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 10**15 + 1}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 2**63}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 1.5}, 422, "invalid_request"),
    ({"period": "fortnight", "limit_micros": 100}, 422, "invalid_request"),
    ({"period": "DAY", "limit_micros": 100}, 422, "invalid_request"),
    ({"period": "day", "window": "sliding", "limit_micros": 100}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 100, "alert_percent": 0}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 100, "alert_percent": 101}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 100, "time_zone": "Mars/Olympus"}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 100, "api_key_id": 0}, 422, "invalid_request"),
    ({"period": "day", "limit_micros": 100, "api_key_id": 2**62}, 422, "invalid_request"),
    ({"limit_micros": 100}, 422, "invalid_request"),
])
async def test_hostile_budgets_are_refused(portal: Portal, body: dict, status: int, code: str, db) -> None:
    owner = await portal.signup(org_name="Hostile budgets")
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/budgets", owner, json=body)
    assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), resp.text
    assert not await db.fetchval("select count(*) from budgets where org_id = $1", owner.org_id)


async def test_a_budget_for_another_orgs_key_or_a_revoked_key_is_refused_as_missing(
        portal: Portal, factory: Factory, db) -> None:
    attacker, victim = await portal.signup(org_name="A"), await portal.signup(org_name="B")
    victim_key, _ = await factory.key(victim.org_id)
    resp = await portal.request("POST", f"/v1/orgs/{attacker.org_id}/budgets", attacker,
                                json={"api_key_id": victim_key, "period": "day", "limit_micros": 1})
    assert (resp.status_code, resp.json()["error"]["code"]) == (404, "not_found")
    revoked, _ = await factory.key(attacker.org_id)
    await db.execute("update api_keys set revoked_at = now() where id = $1", revoked)
    resp = await portal.request("POST", f"/v1/orgs/{attacker.org_id}/budgets", attacker,
                                json={"api_key_id": revoked, "period": "day", "limit_micros": 1})
    assert resp.status_code == 404
    # Another org's budget cannot be read, changed or deleted through one's own org.
    theirs = await db.fetchval("""insert into budgets (org_id, period, window_kind, limit_micros)
                                  values ($1, 'day', 'calendar', 5) returning id""", victim.org_id)
    for method, body in (("GET", None), ("PATCH", {"limit_micros": 10**12}), ("DELETE", None)):
        resp = await portal.request(method, f"/v1/orgs/{attacker.org_id}/budgets/{theirs}", attacker, json=body)
        assert resp.status_code == 404, (method, resp.text)
    assert await db.fetchval("select limit_micros from budgets where id = $1", theirs) == 5
    # The schema refuses it too: a key budget must name a key of its own org.
    with pytest.raises(Exception, match="foreign key"):
        await db.execute("""insert into budgets (org_id, api_key_id, period, window_kind, limit_micros)
                            values ($1, $2, 'day', 'calendar', 5)""", attacker.org_id, victim_key)


async def test_one_budget_per_scope_period_and_window(portal: Portal, factory: Factory) -> None:
    owner = await portal.signup(org_name="Dupes")
    base = f"/v1/orgs/{owner.org_id}/budgets"
    assert (await portal.request("POST", base, owner, json={"period": "day", "limit_micros": 5})).status_code == 201
    resp = await portal.request("POST", base, owner, json={"period": "day", "limit_micros": 9})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "budget_exists")
    for other in ({"period": "day", "window": "rolling"}, {"period": "week"}):
        assert (await portal.request("POST", base, owner, json={**other, "limit_micros": 5})).status_code == 201
    key_id, _ = await factory.key(owner.org_id)  # the key's own day budget is another scope
    resp = await portal.request("POST", base, owner, json={"api_key_id": key_id, "period": "day", "limit_micros": 5})
    assert resp.status_code == 201


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["period", "window", "limit_micros", "alert_percent", "api_key_id",
                                             "extra"]),
                            st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=20),
                                      st.floats(allow_nan=False, allow_infinity=False),
                                      st.lists(st.integers(), max_size=3))))
async def test_generated_budget_bodies_get_a_4xx_or_a_budget(portal: Portal, body: dict, db) -> None:
    owner = await portal.signup(org_name="Generated")
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/budgets", owner, json=body)
    assert resp.status_code in (201, 404, 409, 422), resp.text
    if resp.status_code == 201:
        row = await db.fetchrow("select * from budgets where id = $1", resp.json()["id"])
        assert 1 <= row["limit_micros"] <= 10**15 and row["period"] in ("day", "week", "month")
    else:
        assert set(resp.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize("role", ["developer", "viewer"])
async def test_roles_without_budgets_manage_cannot_lift_a_budget(portal: Portal, role: str) -> None:
    owner = await portal.signup(org_name="Roles")
    member: Account = await portal.member(owner, owner.org_id, role)
    base = f"/v1/orgs/{owner.org_id}/budgets"
    budget = (await portal.request("POST", base, owner, json={"period": "day", "limit_micros": 5})).json()
    assert (await portal.request("GET", base, member)).status_code == 200
    resp = await portal.request("PATCH", f"{base}/{budget['id']}", member, json={"limit_micros": 10**15})
    assert resp.status_code == 403
    assert (await portal.request("DELETE", f"{base}/{budget['id']}", member)).status_code == 403

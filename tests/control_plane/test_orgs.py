"""Orgs, members and roles, org settings, and the audit log they write."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.control_plane.conftest import Portal


async def test_a_user_may_belong_to_several_orgs(portal: Portal) -> None:
    alice = await portal.signup(org_name="Alice's")
    bob = await portal.signup(org_name="Bob's")
    resp = await portal.request("POST", f"/v1/orgs/{bob.org_id}/members", bob, json={"email": alice.email,
                                                                                     "role": "developer"})
    assert resp.status_code == 201
    created = await portal.request("POST", "/v1/orgs", alice, json={"name": "Third"})
    assert created.status_code == 201 and created.json()["code"].startswith("third-")
    orgs = (await portal.request("GET", "/v1/orgs", alice)).json()
    assert {(o["id"], o["role"]) for o in orgs} == {(alice.org_id, "owner"), (bob.org_id, "developer"),
                                                     (created.json()["id"], "owner")}
    assert len({o["code"] for o in orgs}) == 3


async def test_member_management_rules(portal: Portal) -> None:
    owner = await portal.signup()
    org = owner.org_id
    admin = await portal.member(owner, org, "admin")
    dev = await portal.member(owner, org, "developer")
    newcomer = await portal.signup()

    # Admins manage non-owners, but can't grant, change or remove the owner role.
    resp = await portal.request("POST", f"/v1/orgs/{org}/members", admin, json={"email": newcomer.email,
                                                                                "role": "owner"})
    assert resp.status_code == 403
    resp = await portal.request("POST", f"/v1/orgs/{org}/members", admin, json={"email": newcomer.email,
                                                                                "role": "billing"})
    assert resp.status_code == 201
    assert (await portal.request("PATCH", f"/v1/orgs/{org}/members/{dev.user_id}", admin,
                                 json={"role": "viewer"})).status_code == 200
    assert (await portal.request("PATCH", f"/v1/orgs/{org}/members/{dev.user_id}", admin,
                                 json={"role": "owner"})).status_code == 403
    assert (await portal.request("PATCH", f"/v1/orgs/{org}/members/{owner.user_id}", admin,
                                 json={"role": "viewer"})).status_code == 403
    assert (await portal.request("DELETE", f"/v1/orgs/{org}/members/{owner.user_id}", admin)).status_code == 403

    # Unknown users, duplicates and non-members.
    resp = await portal.request("POST", f"/v1/orgs/{org}/members", owner, json={"email": "nobody@example.com",
                                                                                "role": "viewer"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "user_not_found"
    resp = await portal.request("POST", f"/v1/orgs/{org}/members", owner, json={"email": dev.email.upper(),
                                                                                "role": "viewer"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "already_member"
    stranger = await portal.signup()
    assert (await portal.request("DELETE", f"/v1/orgs/{org}/members/{stranger.user_id}", owner)).status_code == 404

    # The last owner stays.
    resp = await portal.request("PATCH", f"/v1/orgs/{org}/members/{owner.user_id}", owner, json={"role": "admin"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "last_owner"
    assert (await portal.request("DELETE", f"/v1/orgs/{org}/members/{owner.user_id}", owner)).status_code == 409
    # A removed member loses access at once.
    assert (await portal.request("DELETE", f"/v1/orgs/{org}/members/{dev.user_id}", owner)).status_code == 204
    assert (await portal.request("GET", f"/v1/orgs/{org}", dev)).status_code == 404
    members = (await portal.request("GET", f"/v1/orgs/{org}/members", owner)).json()
    assert {m["email"]: m["role"] for m in members} == {owner.email: "owner", admin.email: "admin",
                                                         newcomer.email: "billing"}


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(portal: Portal, db) -> None:
    first = await portal.signup()
    org = first.org_id
    second = await portal.member(first, org, "owner")
    results = await asyncio.gather(
        portal.request("PATCH", f"/v1/orgs/{org}/members/{second.user_id}", first, json={"role": "admin"}),
        portal.request("PATCH", f"/v1/orgs/{org}/members/{first.user_id}", second, json={"role": "admin"}),
    )
    statuses = sorted(r.status_code for r in results)
    # One demotion wins; the other is refused: as last owner (409), or as its caller was just demoted (403).
    assert statuses in ([200, 403], [200, 409]), [r.text for r in results]
    assert await db.fetchval("select count(*) from memberships where org_id = $1 and role = 'owner'", org) == 1


async def test_org_settings_and_their_bounds(portal: Portal, settings) -> None:
    owner = await portal.signup()
    url = f"/v1/orgs/{owner.org_id}"
    resp = await portal.request("PATCH", url, owner, json={"request_log_retention_days": 7, "name": "Renamed"})
    assert resp.status_code == 200 and resp.json()["request_log_retention_days"] == 7
    assert resp.json()["effective_request_log_retention_days"] == 7
    too_long = settings.log_retention_max_days + 1
    resp = await portal.request("PATCH", url, owner, json={"request_log_retention_days": too_long})
    assert resp.status_code == 422 and str(settings.log_retention_max_days) in resp.json()["error"]["message"]
    resp = await portal.request("PATCH", url, owner, json={"request_log_retention_days": None})
    assert resp.status_code == 200 and resp.json()["request_log_retention_days"] is None
    assert resp.json()["effective_request_log_retention_days"] == settings.log_retention_default_days
    assert resp.json()["name"] == "Renamed"

    resp = await portal.request("PATCH", url + "/billing-settings", owner, json={
        "billing_email": "Billing@Example.com", "alert_emails": ["B@example.com", "a@example.com", "b@example.com"],
        "low_balance_threshold_micros": 2_500_000})
    body = resp.json()
    assert resp.status_code == 200 and body["alert_emails"] == ["a@example.com", "b@example.com"]
    assert body["low_balance_threshold_micros"] == 2_500_000 and body["billing_email"] == "Billing@Example.com"
    resp = await portal.request("PATCH", url + "/billing-settings", owner, json={"low_balance_threshold_micros": 1.5})
    assert resp.status_code == 422  # money is integer micro-units, never a float
    resp = await portal.request("PATCH", url + "/billing-settings", owner, json={"billing_email": "not-an-email"})
    assert resp.status_code == 422


async def test_audit_log_records_who_what_before_after_and_where(portal: Portal) -> None:
    owner = await portal.signup()
    org = owner.org_id
    admin = await portal.member(owner, org, "admin")
    await portal.request("PATCH", f"/v1/orgs/{org}", admin, json={"name": "New name"})
    created = (await portal.request("POST", f"/v1/orgs/{org}/keys", admin, json={"name": "k"})).json()
    await portal.request("DELETE", f"/v1/orgs/{org}/keys/{created['api_key']['id']}", admin)

    # Only owners read their org's log.
    assert (await portal.request("GET", f"/v1/orgs/{org}/audit-log", admin)).status_code == 403
    page = (await portal.request("GET", f"/v1/orgs/{org}/audit-log", owner)).json()
    entries = {e["action"]: e for e in page["data"]}
    assert list(entries)[:4] == ["api_key.revoke", "api_key.create", "org.update", "member.add"]
    rename = entries["org.update"]
    assert rename["changes"] == {"name": {"before": "Acme", "after": "New name"}}
    assert (rename["actor_user_id"], rename["actor_email"], rename["actor_role"], rename["ip"]) == \
        (admin.user_id, admin.email, "admin", admin.ip)
    assert rename["org_id"] == org and rename["target_type"] == "org" and rename["created_at"]
    assert created["key"] not in str(page)
    assert entries["api_key.create"]["changes"]["prefix"]["after"] == created["api_key"]["prefix"]
    # Filter and keyset pagination.
    only = (await portal.request("GET", f"/v1/orgs/{org}/audit-log", owner, params={"action": "org.update"})).json()
    assert [e["action"] for e in only["data"]] == ["org.update"]
    first = (await portal.request("GET", f"/v1/orgs/{org}/audit-log", owner, params={"limit": 2})).json()
    rest = (await portal.request("GET", f"/v1/orgs/{org}/audit-log", owner,
                                 params={"before_id": first["next_before_id"]})).json()
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in page["data"]]


async def test_audit_log_redacts_secrets(portal: Portal, factory) -> None:
    owner = await portal.signup()
    admin = await portal.platform_admin()
    provider_id = await factory.provider("http://127.0.0.1:9/v1")
    secret = "sk-very-secret-0123456789"
    await portal.request("PUT", f"/v1/orgs/{owner.org_id}/byok/{provider_id}", owner, json={"api_key": secret})
    resp = await portal.request("POST", "/v1/admin/providers", admin, json={
        "name": f"p-{owner.user_id}", "base_url": "http://127.0.0.1:9/v1", "api_key": secret})
    assert resp.status_code == 201
    log = (await portal.request("GET", "/v1/admin/audit-log", admin, params={"limit": 200})).text
    assert secret not in log and "[redacted]" in log


async def test_audit_log_is_append_only(portal: Portal, db) -> None:
    await portal.signup()
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("update audit_log set action = 'x'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute("delete from audit_log")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute("truncate audit_log")

"""The webhooks, budgets and mail pages over plain HTTP: a signing secret shown once and stored only
encrypted, the API's refusals next to their fields, row errors on a budget's own row, a mail password never
shown back, and a test mail that really arrives (aiosmtpd on loopback)."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.controllers.budgets import BudgetCreate
from control_plane.portal.forms import FormInvalid, decode_form
from control_plane.portal.pages.budgets import _errors, _limit_fields
from tests.conftest import Server
from tests.control_plane.conftest import Portal
from tests.notify_helpers import MailCatcher
from tests.portal.test_pages import browser_session, token_of

_SECRET = re.compile(r'id="new-secret-value" readonly value="(whsec_[^"]+)"')


async def _post(http: httpx.AsyncClient, path: str, form: dict | list, page: str) -> httpx.Response:
    token = await token_of(http, page)
    data: dict[str, str | list[str]] = {"_csrf_token": token}
    for name, value in (form.items() if isinstance(form, dict) else form):  # a repeated name: a list of values
        data[name] = [*data[name], value] if isinstance(data.get(name), list) else (
            [data[name], value] if name in data else value)
    return await http.post(path, data=data)


async def test_a_webhook_secret_is_shown_once_rotated_and_stored_only_encrypted(
        portal_server: Server, api: Portal, db) -> None:
    owner = await api.signup(org_name="Hooked")
    http = await browser_session(portal_server, owner.email)
    base = f"/portal/orgs/{owner.org_id}/webhooks"
    # Problems next to their fields: no event type; a URL the API's check refuses.
    resp = await _post(http, base, {"url": "http://127.0.0.1:9/hook"}, base)
    assert resp.status_code == 200 and 'id="e-event_types"' in resp.text
    resp = await _post(http, base, [("url", "ftp://127.0.0.1/x"), ("event_types", "key.created")], base)
    assert 'id="e-url"' in resp.text and 'id="e-event_types"' not in resp.text
    assert 'value="key.created" id="f-event-key-created" checked' in resp.text  # the choice is kept
    resp = await _post(http, base, [("url", "http://127.0.0.1:9/hook"), ("event_types", "no.such")], base)
    assert 'id="e-event_types"' in resp.text
    assert await db.fetchval("select count(*) from webhook_endpoints where org_id = $1", owner.org_id) == 0

    resp = await _post(http, base, [("url", "http://127.0.0.1:9/hook"), ("event_types", "key.created"),
                                    ("event_types", "key.revoked"), ("description", "ops")], base)
    assert resp.status_code == 201
    secret = _SECRET.search(resp.text).group(1)
    row = await db.fetchrow("select id, event_types, secret_id from webhook_endpoints where org_id = $1",
                            owner.org_id)
    assert row["event_types"] == ["key.created", "key.revoked"]
    stored = await db.fetchrow("select * from secrets where id = $1", row["secret_id"])
    assert secret not in repr(dict(stored)) and secret.encode() not in b"".join(
        v for v in dict(stored).values() if isinstance(v, bytes))
    listing = await http.get(base)
    assert secret not in listing.text and "new-secret-value" not in listing.text
    assert "http://127.0.0.1:9/hook" in listing.text

    resp = await _post(http, f"{base}/{row['id']}/rotate", {}, base)
    rotated = _SECRET.search(resp.text).group(1)
    assert rotated != secret and "keeps signing too until" in resp.text
    resp = await _post(http, f"{base}/{row['id']}/active", {"active": "false"}, base)
    assert resp.status_code == 303
    assert await db.fetchval("select active from webhook_endpoints where id = $1", row["id"]) is False
    # Another org's endpoint is not found from this org's page.
    other = await api.signup(org_name="Other hooks")
    resp = await _post(http, f"/portal/orgs/{other.org_id}/webhooks/{row['id']}/delete", {}, base)
    assert resp.status_code == 404
    resp = await _post(http, f"{base}/{row['id']}/delete", {}, base)
    assert resp.status_code == 303
    assert await db.fetchval("select count(*) from webhook_endpoints where org_id = $1", owner.org_id) == 0
    assert await db.fetchval("select count(*) from secrets where id = $1", row["secret_id"]) == 0
    actions = await db.fetch("select action from audit_log where org_id = $1 and action like 'webhook%' order by id",
                             owner.org_id)
    assert [a["action"] for a in actions] == ["webhook_endpoint.create", "webhook_endpoint.rotate_secret",
                                              "webhook_endpoint.update", "webhook_endpoint.delete"]
    await http.aclose()


async def test_replaying_a_delivery_makes_a_new_pending_one_and_a_developer_may_only_look(
        portal_server: Server, api: Portal, db) -> None:
    owner = await api.signup(org_name="Replayed")
    http = await browser_session(portal_server, owner.email)
    base = f"/portal/orgs/{owner.org_id}/webhooks"
    await _post(http, base, [("url", "http://127.0.0.1:9/hook"), ("event_types", "key.revoked")], base)
    endpoint_id = await db.fetchval("select id from webhook_endpoints where org_id = $1", owner.org_id)
    # A delivery the worker made and gave up on (notifications are off in the test stack).
    event_id = await db.fetchval("insert into event_outbox (org_id, event_type, dispatched_at) values "
                                 "($1, 'key.revoked', now()) returning id", owner.org_id)
    delivery_id = await db.fetchval(
        """insert into webhook_deliveries (org_id, endpoint_id, event_id, event_type, status, attempts,
                                           next_attempt_at, last_attempt_at, response_status, latency_ms, error,
                                           created_at, completed_at)
           values ($1, $2, $3, 'key.revoked', 'failed', 8, now(), now(), 503, 1234, 'http_status', now(), now())
           returning id""", owner.org_id, endpoint_id, event_id)
    page = (await http.get(base)).text
    row = re.search(rf'<tr id="delivery-{delivery_id}">(.*?)</tr>', page, re.S).group(1)
    assert "failed" in row and ">8<" in row and ">503<" in row and "1234 ms" in row and f"evt_{event_id}" in row
    resp = await _post(http, f"{base}/deliveries/{delivery_id}/replay", {}, base)
    assert resp.status_code == 303
    replay = await db.fetchrow("select status, replay_of, event_id from webhook_deliveries where replay_of = $1",
                               delivery_id)
    assert (replay["status"], replay["event_id"]) == ("pending", event_id)
    filtered = (await http.get(base + "?status=failed")).text
    assert f'id="delivery-{delivery_id}"' in filtered and "(replay of" not in filtered

    developer = await api.member(owner, owner.org_id, "developer")
    dev = await browser_session(portal_server, developer.email)
    page = (await dev.get(base)).text
    assert f'id="delivery-{delivery_id}"' in page and "/replay" not in page and "/rotate" not in page
    assert 'action="' + base + '"' not in page.replace('method="get" action="' + base + '"', "")
    for path in (base, f"{base}/{endpoint_id}/rotate", f"{base}/{endpoint_id}/delete",
                 f"{base}/deliveries/{delivery_id}/replay"):
        resp = await _post(dev, path, {"url": "http://127.0.0.1:9/x", "event_types": "key.created"}, base)
        assert resp.status_code == 403, path
    assert await db.fetchval("select count(*) from webhook_deliveries where org_id = $1", owner.org_id) == 2
    # Leave no pending delivery behind for the notification worker tests sharing this database.
    await _post(http, f"{base}/{endpoint_id}/delete", {}, base)
    assert await db.fetchval("select count(*) from webhook_deliveries where org_id = $1", owner.org_id) == 0
    await http.aclose()
    await dev.aclose()


@pytest.mark.parametrize(("form", "field"), [
    ({"limit": ""}, "limit"), ({"limit": "abc"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "0.0000001"}, "limit"),
    ({"limit": "2000000000"}, "limit"), ({"limit": "5", "alert_percent": "150"}, "alert_percent"),
    ({"limit": "5", "alert_percent": "x"}, "alert_percent"), ({"limit": "5", "period": "year"}, "period"),
    ({"limit": "5", "scope": "999999999"}, "scope"), ({"limit": "5", "window": "sliding"}, "window"),
])
async def test_a_budget_form_says_each_problem_next_to_its_field(
        portal_server: Server, api: Portal, db, form: dict, field: str) -> None:
    owner = await api.signup(org_name="Budgeted")
    http = await browser_session(portal_server, owner.email)
    base = f"/portal/orgs/{owner.org_id}/budgets"
    resp = await _post(http, base, {"period": "month", "window": "calendar", "scope": "org", **form}, base)
    assert resp.status_code == 200 and f'id="e-{field}"' in resp.text, resp.text[-3000:]
    assert await db.fetchval("select count(*) from budgets where org_id = $1", owner.org_id) == 0
    await http.aclose()


async def test_budgets_are_created_changed_and_deleted_and_a_duplicate_is_refused(
        portal_server: Server, api: Portal, factory, db) -> None:
    owner = await api.signup(org_name="Budget flow")
    key_id, _ = await factory.key(owner.org_id)
    http = await browser_session(portal_server, owner.email)
    base = f"/portal/orgs/{owner.org_id}/budgets"
    resp = await _post(http, base, {"scope": "org", "period": "month", "window": "calendar", "limit": "12.345678",
                                    "alert_percent": ""}, base)
    assert resp.status_code == 303
    resp = await _post(http, base, {"scope": str(key_id), "period": "day", "window": "rolling", "limit": "1.5",
                                    "alert_percent": "50"}, base)
    assert resp.status_code == 303
    rows = await db.fetch("select id, api_key_id, period, window_kind, limit_micros, alert_percent from budgets "
                          "where org_id = $1 order by id", owner.org_id)
    assert [tuple(r)[1:] for r in rows] == [(None, "month", "calendar", 12_345_678, None),
                                            (key_id, "day", "rolling", 1_500_000, 50)]
    resp = await _post(http, base, {"scope": "org", "period": "month", "window": "calendar", "limit": "3"}, base)
    assert 'class="error banner"' in resp.text and "already has" in resp.text
    org_budget, key_budget = rows[0]["id"], rows[1]["id"]
    resp = await _post(http, f"{base}/{key_budget}", {"limit": "-1", "alert_percent": "50"}, base)
    assert f'id="e-limit-{key_budget}"' in resp.text and 'value="-1"' in resp.text  # on its own row, as typed
    assert f'id="e-limit-{org_budget}"' not in resp.text
    resp = await _post(http, f"{base}/{key_budget}", {"limit": "2.25", "alert_percent": ""}, base)
    assert resp.status_code == 303
    assert tuple(await db.fetchrow("select limit_micros, alert_percent from budgets where id = $1", key_budget)) == (
        2_250_000, None)
    resp = await _post(http, f"{base}/{org_budget}/delete", {}, base)
    assert resp.status_code == 303
    assert await db.fetchval("select count(*) from budgets where org_id = $1", owner.org_id) == 1
    # The billing role manages org budgets without seeing the keys; a viewer only reads.
    billing = await browser_session(portal_server, (await api.member(owner, owner.org_id, "billing")).email)
    page = (await billing.get(base)).text
    assert "Create budget" in page and f'<option value="{key_id}"' not in page and f"#{key_id}" in page
    viewer = await browser_session(portal_server, (await api.member(owner, owner.org_id, "viewer")).email)
    page = (await viewer.get(base)).text
    assert "$2.25" in page and "Create budget" not in page and "/delete" not in page
    for path in (base, f"{base}/{key_budget}", f"{base}/{key_budget}/delete"):
        assert (await _post(viewer, path, {"limit": "1", "period": "day", "window": "calendar"}, base)
                ).status_code == 403
    assert await db.fetchval("select limit_micros from budgets where id = $1", key_budget) == 2_250_000
    for client in (http, billing, viewer):
        await client.aclose()


async def test_mail_settings_never_show_the_password_and_a_test_mail_arrives(
        portal_server: Server, api: Portal, db) -> None:
    admin = await api.platform_admin()
    http = await browser_session(portal_server, admin.email)
    base = "/portal/admin/mail"
    settings = {"host": "smtp.example.com", "port": "25", "tls_mode": "none", "from_address": "relay@example.com"}
    resp = await _post(http, f"{base}/settings", settings, base)
    assert 'id="e-tls_mode"' in resp.text and "loopback" in resp.text
    resp = await _post(http, f"{base}/settings", {**settings, "port": "70000"}, base)
    assert 'id="e-port"' in resp.text
    catcher = MailCatcher().start()
    try:
        password = "canary-smtp-password-7f3e"
        resp = await _post(http, f"{base}/settings", {**settings, "host": "127.0.0.1", "port": str(catcher.port),
                                                       "username": "relay", "password": password}, base)
        assert resp.status_code == 303
        page = (await http.get(base)).text
        assert password not in page and "(set; never shown)" in page and f"127.0.0.1:{catcher.port}" in page
        assert password not in repr(await db.fetch("select * from audit_log where action like 'smtp%'"))
        # Saving again with the password left empty keeps it (aiosmtpd here takes no login: it is only stored).
        resp = await _post(http, f"{base}/settings", {**settings, "host": "127.0.0.1", "port": str(catcher.port),
                                                       "username": ""}, base)
        assert "(set; never shown)" in (await http.get(base)).text
        resp = await _post(http, f"{base}/test", {"to": "not an address"}, base)
        assert 'id="e-to"' in resp.text
        resp = await _post(http, f"{base}/test", {"to": "ops@example.com"}, base)
        assert resp.status_code == 303
        mails = await catcher.wait_for("ops@example.com", 1)
        assert len(mails) == 1
        catcher.refuse_next = 1
        resp = await _post(http, f"{base}/test", {"to": "ops@example.com"}, base)
        assert "did not accept" in resp.text and "SMTP 451" in resp.text
        page = (await http.get(base)).text
        assert "SMTP 451" in page.split("Failed mails</h2>")[1]  # the refused one is in the failed list
    finally:
        catcher.stop()
    # Others may not see the page at all.
    owner = await api.signup(org_name="No mail")
    other = await browser_session(portal_server, owner.email)
    assert (await other.get(base)).status_code == 403
    assert (await _post(other, f"{base}/test", {"to": "x@example.com"}, "/portal/account")).status_code == 403
    await other.aclose()
    await http.aclose()


@given(st.text(max_size=30), st.text(max_size=8))
def test_any_budget_limit_or_threshold_text_is_a_field_error_or_exact(limit: str, percent: str) -> None:
    """Generated form input: either an error on the limit or threshold field, or the exact amount."""
    values = {"limit": limit, "alert_percent": percent}
    try:
        data = decode_form({**_limit_fields(values), "period": "day", "window": "calendar"}, BudgetCreate)
    except FormInvalid as exc:
        assert set(_errors(exc)) <= {"limit", "alert_percent"} and _errors(exc)
    else:
        assert 1 <= data.limit_micros <= 10**15 and (data.alert_percent is None or 1 <= data.alert_percent <= 100)
        assert data.alert_percent == (int(percent.strip()) if percent.strip() else None)

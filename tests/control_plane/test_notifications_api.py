"""The notification endpoints of the control plane (which runs without the development setting here):
webhook URLs refused at registration (SSRF, plain http, credentials), the secret shown once and audited
redacted, SMTP settings (TLS required off loopback, the password never shown) and the test mail."""

from __future__ import annotations

import pytest

from tests.control_plane.conftest import Portal
from tests.control_plane.test_notify_mail import catcher, smtp  # noqa: F401 (fixtures)
from tests.notify_helpers import MailCatcher


@pytest.mark.parametrize(("url", "code"), [
    ("https://127.0.0.1/hook", "private_address"),
    ("https://[::1]:8443/hook", "private_address"),
    ("https://169.254.169.254/latest/meta-data/", "private_address"),
    ("https://10.0.0.1/hook", "private_address"),
    ("https://[::ffff:10.0.0.1]/hook", "private_address"),
    ("https://localhost/hook", "private_address"),
    ("https://0.0.0.0/hook", "private_address"),
    ("https://224.0.0.1/hook", "private_address"),
    ("http://93.184.215.14/hook", "insecure_url"),
    ("https://user:pw@93.184.215.14/hook", "invalid_url"),
    ("ftp://93.184.215.14/hook", "insecure_url"),
    ("https://93.184.215.14/ho ok", "invalid_url"),
    ("https://exa\u00e9mple.com/", "invalid_url"),
])
async def test_a_hostile_webhook_url_is_refused_at_registration(portal: Portal, db, url: str, code: str) -> None:
    owner = await portal.signup()
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/webhooks", owner,
                                json={"url": url, "event_types": ["balance.low"]})
    assert resp.status_code in (400, 422), resp.text
    assert resp.json()["error"]["code"] == code, resp.text
    assert await db.fetchval("select count(*) from webhook_endpoints where org_id = $1", owner.org_id) == 0


async def test_an_endpoint_is_registered_with_a_secret_shown_once_and_changed_with_checks(portal: Portal,
                                                                                      db) -> None:
    owner = await portal.signup()
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/webhooks", owner, json={
        "url": "https://93.184.215.14/hook", "event_types": ["budget.exceeded", "budget.exceeded", "payment.failed"]})
    assert resp.status_code == 201, resp.text
    secret, endpoint = resp.json()["secret"], resp.json()["endpoint"]
    assert endpoint["event_types"] == ["budget.exceeded", "payment.failed"]
    for path in ("", f"/{endpoint['id']}"):
        listed = await portal.request("GET", f"/v1/orgs/{owner.org_id}/webhooks{path}", owner)
        assert listed.status_code == 200 and secret not in listed.text
    ciphertext = await db.fetchval("select ciphertext from secrets s join webhook_endpoints w on w.secret_id = s.id"
                                   " where w.id = $1", endpoint["id"])
    assert secret.encode() not in ciphertext  # envelope-encrypted
    bad = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/webhooks/{endpoint['id']}", owner,
                               json={"url": "https://169.254.169.254/"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "private_address"
    unknown = await portal.request("POST", f"/v1/orgs/{owner.org_id}/webhooks", owner, json={
        "url": "https://93.184.215.14/hook", "event_types": ["balance.lowish"]})
    assert unknown.status_code in (400, 422)
    # Paused (a public address: no test may ever deliver to it).
    paused = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/webhooks/{endpoint['id']}", owner,
                                  json={"active": False})
    assert paused.status_code == 200 and paused.json()["active"] is False
    audit = await db.fetch("select action, changes::text as changes from audit_log where org_id = $1 "
                           "and action like 'webhook%' order by id", owner.org_id)
    assert [a["action"] for a in audit] == ["webhook_endpoint.create", "webhook_endpoint.update"]
    assert secret not in audit[0]["changes"] and "[redacted]" in audit[0]["changes"]


async def test_smtp_settings_need_tls_off_loopback_and_never_show_the_password(portal: Portal, db) -> None:
    admin = await portal.platform_admin()
    plain = await portal.request("PUT", "/v1/admin/mail/settings", admin, json={
        "host": "smtp.example.com", "port": 25, "tls_mode": "none", "from_address": "relay@example.com"})
    assert plain.status_code == 422 and plain.json()["error"]["code"] == "tls_required"
    password = "smtp-pass-0123456789"
    resp = await portal.request("PUT", "/v1/admin/mail/settings", admin, json={
        "host": "smtp.example.com", "port": 587, "tls_mode": "starttls", "from_address": "relay@example.com",
        "username": "relay", "password": password})
    assert resp.status_code == 200, resp.text
    assert resp.json()["password_set"] is True and password not in resp.text
    got = await portal.request("GET", "/v1/admin/mail/settings", admin)
    assert got.json()["host"] == "smtp.example.com" and password not in got.text
    audit = await db.fetchval("select changes::text from audit_log where action = 'smtp.settings.update' "
                              "order by id desc limit 1")
    assert password not in audit
    member = await portal.signup()
    assert (await portal.request("GET", "/v1/admin/mail/settings", member)).status_code == 403


async def test_the_test_mail_reaches_the_smtp_server(portal: Portal, smtp: MailCatcher) -> None:  # noqa: F811
    admin = await portal.platform_admin()
    resp = await portal.request("POST", "/v1/admin/mail/test", admin, json={"to": "check@example.com"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"sent": True, "error": None}
    (mail,) = smtp.to("check@example.com")
    assert mail.subject == "Rocket Relay test mail" and "test mail" in mail.text() and mail.html()

"""The portal in a real browser (Debian's Chromium, headless, through Playwright): a customer's whole path
from sign-up to a paid top-up and a revoked key, a platform admin approving a crypto top-up and changing a
price, and a viewer who sees no write buttons and is refused when posting anyway. Every page visited is
checked for console errors and accessibility (axe-core) and screenshotted."""

from __future__ import annotations

import re
import secrets

import httpx
import pytest
from playwright.async_api import expect

from control_plane.seed import ensure_platform_admin
from shared.billing import BillingScripts, apply_ledger_entry
from shared.redis_keys import RedisKeys
from tests.conftest import Factory, Server, wait_for_rows
from tests.control_plane.conftest import PASSWORD, LocalStripe, Portal
from tests.invariants import OrgExpectation, assert_money_invariants
from tests.notify_helpers import MailCatcher
from tests.portal.conftest import Visit

pytestmark = pytest.mark.browser

START_CREDIT = 10_000_000


def dollars(text: str) -> int:
    """"$9.999987" → micro-units, exactly."""
    match = re.search(r"(-?)\$([\d,]+)(?:\.(\d{1,6}))?", text)
    assert match, text
    return (-1 if match.group(1) else 1) * (int(match.group(2).replace(",", "")) * 1_000_000
                                            + int((match.group(3) or "").ljust(6, "0")))


async def sign_in(visit: Visit, email: str, password: str = PASSWORD) -> None:
    await visit.goto("/portal/login")
    await visit.page.fill("#f-email", email)
    await visit.page.fill("#f-password", password)
    await visit.page.click("form[action='/portal/login'] button[type=submit]")
    await visit.page.wait_for_load_state("load")


async def test_customer_signs_up_uses_a_key_tops_up_and_revokes_it(
        visit_factory, portal_server: Server, proxy: Server, worker, mock_upstream: Server, factory: Factory,
        local_stripe: LocalStripe, db, redis, settings) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id, price=(2_000_000, 4_000_000))
    visit = await visit_factory("customer")
    page = visit.page

    # Sign up: a validation error next to the field first, then the real thing.
    await visit.goto("/portal/signup")
    await visit.check("signup")
    email = f"c-{secrets.token_hex(4)}@example.com"
    await page.fill("#f-email", email)
    await page.fill("#f-password", "short")
    await page.fill("#f-org_name", "Browser Co")
    await page.click("main button[type=submit]")
    assert "invalid" in await page.locator(".field:has(#f-password)").get_attribute("class")
    assert await page.locator("#e-password").is_visible()
    await visit.check("signup-invalid")
    await page.fill("#f-password", PASSWORD)
    await page.click("main button[type=submit]")
    await page.wait_for_url(re.compile(r"/portal/orgs/\d+/$"))
    org_id = int(re.search(r"/orgs/(\d+)/", page.url).group(1))
    assert "create an API key" in await page.locator(".flash").inner_text()
    await visit.check("dashboard-new")
    # A welcome credit (an admin adjustment through the ledger), so the first request can be paid.
    await apply_ledger_entry(db, BillingScripts(redis), RedisKeys(settings.redis_prefix, settings.billing_shards),
                             org_id, "adjustment", START_CREDIT, reason="welcome credit")

    # Create a key: the secret is shown once, with a copy button.
    await visit.goto(f"/portal/orgs/{org_id}/keys")
    await visit.check("keys-empty")
    await page.fill("#f-name", "browser key")
    await page.fill("#f-rpm_limit", "not a number")
    await page.click("form[action$='/keys'] button[type=submit]")
    assert await page.locator("#e-rpm_limit").is_visible()
    await page.fill("#f-rpm_limit", "600")
    await page.fill("#f-monthly_spend_cap", "5.50")
    await page.click("form[action$='/keys'] button[type=submit]")
    api_key = await page.locator("#new-key-value").input_value()
    assert api_key.startswith("rr-")
    await page.click("[data-copy=new-key-value]")
    # The clipboard write is asynchronous on a secure origin: wait for the button to say so.
    await expect(page.locator("[data-copy=new-key-value]")).to_have_text("Copied", timeout=5_000)
    await visit.check("keys-created")
    await visit.goto(f"/portal/orgs/{org_id}/keys")  # shown once: not on the next view of the page
    assert await page.locator("#new-key-value").count() == 0
    assert api_key not in await page.content()
    key_cap = await db.fetchrow("select rpm_limit, monthly_spend_cap_micros from api_keys where org_id = $1", org_id)
    assert (key_cap["rpm_limit"], key_cap["monthly_spend_cap_micros"]) == (600, 5_500_000)

    # A request through the proxy with it.
    await factory.publish_config(proxy, api_key, model)
    async with httpx.AsyncClient(timeout=20.0) as http:
        resp = await http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"},
                               json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 16})
    assert resp.status_code == 200, resp.text
    request_id = resp.headers["x-request-id"]
    await wait_for_rows(db, "select 1 from usage_records where org_id = $1", org_id, timeout=15.0)
    await wait_for_rows(db, "select 1 from request_logs where org_id = $1", org_id, timeout=15.0)

    # The request in the logs, with its evidence; the balance lower on the dashboard.
    await visit.goto(f"/portal/orgs/{org_id}/logs")
    row = page.locator("tbody tr", has_text=request_id[:18])
    assert await row.count() == 1
    await visit.check("logs")
    await row.locator("a").click()
    await page.wait_for_url(re.compile(r"/logs/"))
    assert model in await page.locator("main").inner_text()
    await visit.check("evidence")
    await visit.goto(f"/portal/orgs/{org_id}/usage")
    assert model in await page.locator("main table").inner_text()
    await visit.check("usage")
    await visit.goto(f"/portal/orgs/{org_id}/")
    balance = dollars(await page.locator("#balance").inner_text())
    cost = await db.fetchval("select cost_micros from usage_records where org_id = $1", org_id)
    assert 0 < cost and balance == START_CREDIT - cost
    assert dollars(await page.locator("#spend-today").inner_text()) == cost
    assert await page.locator("#usage-chart").count() == 1
    await visit.check("dashboard")

    # Top up through the local Stripe: the hosted checkout, Pay, back to billing, credited by the webhooks.
    local_stripe.register_webhook(f"portal-{org_id}", portal_server.url + "/v1/webhooks/stripe",
                                  ["checkout.session.completed", "payment_intent.succeeded"])
    await visit.goto(f"/portal/orgs/{org_id}/billing")
    await visit.check("billing")
    await page.fill("#f-amount", "1")
    await page.click("form[action$='/billing/topup'] button[type=submit]")
    await page.locator("#e-amount").wait_for()  # below the platform's minimum: said next to the field (htmx swap)
    assert "between" in await page.locator("#e-amount").inner_text()
    await visit.check("billing-invalid")
    await page.fill("#f-amount", "15")
    await page.click("form[action$='/billing/topup'] button[type=submit]")
    await page.wait_for_url(re.compile(re.escape(local_stripe.server.url) + "/checkout/"))
    await page.click("button")  # "Pay with test card" on the local Stripe's page
    await page.wait_for_url(re.compile(r"/portal/orgs/\d+/billing\?checkout=success"))
    visit.problems.clear()  # the local Stripe's page is not ours (localstripe refuses its favicon request: 401)
    await wait_for_rows(db, "select 1 from payments where org_id = $1 and status = 'succeeded'", org_id, timeout=15.0)
    await page.reload()
    assert "succeeded" in await page.locator("main table").first.inner_text()
    assert dollars(await page.locator("#billing-balance").inner_text()) == START_CREDIT - cost + 15_000_000
    await visit.check("billing-paid")

    # Revoke the key: it stops working at the proxy.
    await visit.goto(f"/portal/orgs/{org_id}/keys")
    await page.click("form[action$='/revoke'] button")
    assert "revoked" in await page.locator(".flash").inner_text()
    assert await page.locator(".badge.revoked").count() == 1
    await visit.check("keys-revoked")
    async with httpx.AsyncClient(timeout=20.0) as http:
        for _ in range(100):
            resp = await http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"},
                                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
            if resp.status_code == 401:
                break
    assert resp.status_code == 401

    # A webhook endpoint: the event types chosen, the signing secret shown once, then rotated.
    await visit.goto(f"/portal/orgs/{org_id}/webhooks")
    await visit.check("webhooks-empty")
    await page.fill("#f-url", "http://127.0.0.1:9/hooks/rocket")
    await page.click("form[action$='/webhooks'] button[type=submit]")
    assert await page.locator("#e-event_types").is_visible()  # no event type chosen
    await visit.check("webhooks-invalid")
    await page.check("#f-event-key-revoked")
    await page.check("#f-event-budget-exceeded")
    await page.click("form[action$='/webhooks'] button[type=submit]")
    signing_secret = await page.locator("#new-secret-value").input_value()
    assert signing_secret.startswith("whsec_")
    await visit.check("webhooks-created")
    await page.click("form[action$='/rotate'] button")
    rotated = await page.locator("#new-secret-value").input_value()
    assert rotated.startswith("whsec_") and rotated != signing_secret
    await visit.check("webhooks-rotated")
    await visit.goto(f"/portal/orgs/{org_id}/webhooks")
    assert await page.locator("#new-secret-value").count() == 0 and rotated not in await page.content()
    assert "budget.exceeded" in await page.locator("main table").first.inner_text()
    assert await db.fetchval("select event_types from webhook_endpoints where org_id = $1", org_id) == [
        "budget.exceeded", "key.revoked"]
    # Deleted again (after a confirm): later events of this org reach no endpoint of a test that is over.
    await page.click("form[action$='/delete'] button")
    assert "deleted" in await page.locator(".flash").inner_text()
    assert await db.fetchval("select count(*) from webhook_endpoints where org_id = $1", org_id) == 0

    # A budget for the org: an impossible limit said next to its field, then a monthly one.
    await visit.goto(f"/portal/orgs/{org_id}/budgets")
    await visit.check("budgets-empty")
    await page.fill("#f-limit", "0")
    await page.click("form[action$='/budgets'] button[type=submit]")
    assert await page.locator("#e-limit").is_visible()
    await visit.check("budgets-invalid")
    await page.fill("#f-limit", "40")
    await page.select_option("#f-window", "rolling")
    await page.click("form[action$='/budgets'] button[type=submit]")
    assert "budget for the org created" in await page.locator(".flash").inner_text()
    await visit.check("budgets")
    assert tuple(await db.fetchrow("select period, window_kind, limit_micros, alert_percent from budgets "
                                   "where org_id = $1", org_id)) == ("month", "rolling", 40_000_000, 80)

    # The other pages of the owner, on a phone-sized screen as well.
    for path in ("members", "settings"):
        await visit.goto(f"/portal/orgs/{org_id}/{path}")
        await visit.check(path)
    phone = await visit_factory("customer-phone", mobile=True)
    await sign_in(phone, email)
    await phone.check("dashboard-phone")
    for path in ("keys", "webhooks", "budgets"):
        await phone.goto(f"/portal/orgs/{org_id}/{path}")
        await phone.check(f"{path}-phone")
    await visit.goto("/portal/account")
    await visit.check("account")
    await page.click("form[action='/portal/logout'] button")
    await page.wait_for_url(re.compile(r"/portal/login$"))
    await visit.check("login")

    await assert_money_invariants(db, redis, settings, {org_id: OrgExpectation(billed=1)})


async def test_platform_admin_approves_a_crypto_top_up_and_changes_a_price(
        visit_factory, api: Portal, factory: Factory, mock_upstream: Server, db, redis, settings) -> None:
    owner = await api.signup(org_name="Crypto payer")
    visit = await visit_factory("crypto-owner")
    await sign_in(visit, owner.email)
    page = visit.page
    await visit.goto(f"/portal/orgs/{owner.org_id}/billing")
    await page.select_option("#f-network", "ethereum")
    await page.fill("#f-tx_hash", "0x123")
    await page.fill("#f-sender_address", "0x" + "ab" * 20)
    await page.fill("#f-crypto_amount", "25")
    await page.click("form[action$='/billing/crypto'] button[type=submit]")
    assert await page.locator("#e-tx_hash").is_visible()
    await visit.check("crypto-invalid")
    tx_hash = "0x" + secrets.token_hex(32)
    await page.fill("#f-tx_hash", tx_hash)
    await page.click("form[action$='/billing/crypto'] button[type=submit]")
    assert "submitted" in await page.locator(".flash").inner_text()
    assert "pending" in await page.locator("main table").first.inner_text()
    payment_id, stored_hash = await db.fetchrow("select id, crypto_tx_hash from payments where org_id = $1",
                                                owner.org_id)

    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id)
    email = f"admin-{secrets.token_hex(4)}@example.com"
    await ensure_platform_admin(settings, email, PASSWORD)
    admin = await visit_factory("admin")
    await sign_in(admin, email)
    page = admin.page
    await page.wait_for_url(re.compile(r"/portal/"))
    for path in ("orgs", "supply", "quality", "audit", "stripe"):
        await admin.goto(f"/portal/admin/{path}")
        await admin.check(f"admin-{path}")
    route_id = await db.fetchval("select id from routes where model = $1", model)
    await admin.goto(f"/portal/admin/quality/{route_id}")  # one route's probe status and history
    assert model in await page.locator("main").inner_text()
    await admin.check("admin-quality-route")

    # Mail: settings pointing at an SMTP catcher on loopback, then a test mail that arrives.
    await admin.goto("/portal/admin/mail")
    await admin.check("admin-mail-empty")
    catcher = MailCatcher().start()
    try:
        await page.fill("#f-host", "127.0.0.1")
        await page.fill("#f-port", str(catcher.port))
        await page.select_option("#f-tls_mode", "none")
        await page.fill("#f-username", "relay")
        await page.fill("#f-password", "smtp-secret-in-browser")
        await page.fill("#f-from_address", "no-reply@example.com")
        await page.click("form[action$='/mail/settings'] button[type=submit]")
        assert "saved" in await page.locator(".flash").inner_text()
        assert "smtp-secret-in-browser" not in await page.content()
        await admin.check("admin-mail-saved")
        # The catcher offers no login: with a user set, the test mail fails, and the page says so.
        await page.fill("#f-to", "ops@example.com")
        await page.click("form[action$='/mail/test'] button[type=submit]")
        assert "did not accept" in await page.locator(".error.banner").inner_text()
        assert "SMTP error" in await page.locator("main table").inner_text()  # in the failed mails
        await admin.check("admin-mail-test-failed")
        await page.fill("#f-username", "")
        await page.check("#f-remove_password")
        await page.click("form[action$='/mail/settings'] button[type=submit]")
        assert "saved" in await page.locator(".flash").inner_text()
        assert await page.locator("#f-remove_password").count() == 0  # no password stored any more
        await page.fill("#f-to", "ops@example.com")
        await page.click("form[action$='/mail/test'] button[type=submit]")
        assert "accepted" in await page.locator(".flash").inner_text()
        assert len(await catcher.wait_for("ops@example.com", 1)) == 1
        await admin.check("admin-mail-tested")
    finally:
        catcher.stop()
    await admin.goto("/portal/admin/orgs?q=" + owner.email)
    assert "Crypto payer" in await page.locator("main table").inner_text()

    await admin.goto("/portal/admin/crypto")
    row = page.locator("tbody tr", has_text=stored_hash)
    await admin.check("admin-crypto")
    await row.locator(f"#amt-{payment_id}").fill("24.5")
    await row.locator("form[action$='/approve'] button").click()
    assert "approved" in await page.locator(".flash").inner_text()
    assert await page.locator("tbody tr", has_text=stored_hash).count() == 0
    assert await db.fetchval("select balance_micros from org_balances where org_id = $1", owner.org_id) == 24_500_000

    await admin.goto("/portal/admin/pricing")
    await admin.check("admin-pricing")
    await page.select_option("#f-model", model)
    await page.fill("#f-input", "abc")
    await page.click("form[action='/portal/admin/pricing'] button[type=submit]")
    assert await page.locator("#e-input").is_visible()
    await page.fill("#f-input", "3")
    await page.fill("#f-output", "9.5")
    await page.fill("#f-cached_input", "0.75")
    await page.click("form[action='/portal/admin/pricing'] button[type=submit]")
    assert "scheduled" in await page.locator(".flash").inner_text()
    await admin.check("admin-pricing-scheduled")
    price = await db.fetchrow("""select input_micros_per_mtok, output_micros_per_mtok, cached_input_micros_per_mtok
                                 from model_prices where model = $1 order by id desc limit 1""", model)
    assert tuple(price) == (3_000_000, 9_500_000, 750_000)
    assert await db.fetchval("select count(*) from audit_log where action = 'price.create' and actor_email = $1",
                             email) == 1

    await visit.goto(f"/portal/orgs/{owner.org_id}/billing")
    assert "approved" in await visit.page.locator("main table").first.inner_text()
    await visit.check("billing-approved")
    await assert_money_invariants(db, redis, settings, {owner.org_id: OrgExpectation()})


async def test_a_viewer_sees_no_write_buttons_and_is_refused_when_posting(
        visit_factory, api: Portal, factory: Factory, db) -> None:
    owner = await api.signup(org_name="Viewed")
    viewer = await api.member(owner, owner.org_id, "viewer")
    key_id, _ = await factory.key(owner.org_id)
    visit = await visit_factory("viewer")
    await sign_in(visit, viewer.email)
    page = visit.page
    org = f"/portal/orgs/{owner.org_id}"
    budget_id = await db.fetchval("""insert into budgets (org_id, period, window_kind, limit_micros) values
                                     ($1, 'week', 'calendar', 7000000) returning id""", owner.org_id)
    for path in ("/", "/keys", f"/keys/{key_id}", "/budgets", "/logs", "/usage", "/billing", "/members", "/settings"):
        await visit.goto(org + path)
        await visit.check(f"viewer{path.replace('/', '-') or '-dashboard'}")
        posting = await page.locator("form[method=post]").evaluate_all("fs => fs.map(f => f.action)")
        assert [a for a in posting if not a.endswith("/portal/logout")] == [], (path, posting)
    nav = await page.locator("nav.sidebar").inner_text()
    assert "Platform admin" not in nav and "API keys" in nav
    await visit.goto(org + "/budgets")
    assert "$7.00" in await page.locator("main table").inner_text()  # seen, not changeable
    await visit.goto("/portal/admin/orgs")
    assert await page.locator("h1").inner_text() == "Not allowed"
    await visit.check("viewer-admin-refused", error_status=403)
    await visit.goto(org + "/webhooks")  # webhooks.read is not a viewer's
    assert await page.locator("h1").inner_text() == "Not allowed"
    assert "Webhooks" not in nav
    await visit.check("viewer-webhooks-refused", error_status=403)

    await visit.goto(org + "/")
    token = await visit.csrf_token()  # the sign-out form's
    refused = {f"{org}/keys": {"name": "x"}, f"{org}/keys/{key_id}/revoke": {},
               f"{org}/billing/topup": {"amount": "20"}, f"{org}/members": {"email": viewer.email, "role": "owner"},
               f"{org}/settings/org": {"name": "Mine"},
               f"{org}/settings/alerts": {"billing_email": "a@example.com"}, "/portal/admin/pricing": {},
               f"{org}/budgets": {"scope": "org", "period": "day", "window": "calendar", "limit": "1"},
               f"{org}/budgets/{budget_id}": {"limit": "1"}, f"{org}/budgets/{budget_id}/delete": {},
               f"{org}/webhooks": {"url": "http://127.0.0.1:9/x", "event_types": "key.created"},
               "/portal/admin/mail/settings": {"host": "127.0.0.1", "port": "25", "tls_mode": "none",
                                               "from_address": "a@example.com"},
               "/portal/admin/mail/test": {"to": "a@example.com"}}
    for path, form in refused.items():
        resp = await page.request.post(visit.base_url + path, form={**form, "_csrf_token": token})
        assert resp.status == 403, (path, resp.status)
    assert await db.fetchval("select revoked_at from api_keys where id = $1", key_id) is None
    assert await db.fetchval("select name from orgs where id = $1", owner.org_id) == "Viewed"
    assert await db.fetchval("select limit_micros from budgets where org_id = $1", owner.org_id) == 7_000_000
    assert await db.fetchval("select count(*) from webhook_endpoints where org_id = $1", owner.org_id) == 0
    # Without the CSRF token the same post is refused before anything runs, even for the owner's session.
    resp = await page.request.post(visit.base_url + f"{org}/keys", form={"name": "x"})
    assert resp.status == 403 and "expired" in await resp.text()

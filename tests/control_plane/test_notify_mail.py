"""Mail end to end, across processes: the proxy serves 50 concurrent requests, rr-worker's flusher detects
the balance crossing its threshold and its notify loop mails the org's alert emails through a real SMTP server
(aiosmtpd) — exactly once per downward crossing; a crypto top-up reviewed in the control plane sends a
receipt to the billing contact and re-arms the alert, and only then does a new crossing send a second one.
Mail retries and the failed-mail record run with the worker in this process and an injected clock."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Iterator

import httpx
import msgspec
import pytest
import pytest_asyncio

from shared.crypto import box_from_settings
from shared.notify.events import emit
from shared.notify.mail import save_smtp_config
from shared.settings import Settings
from shared.workers.notify import NotifyWorker
from tests.conftest import Factory, Server, start_worker, stop_process, wait_for_rows
from tests.control_plane.conftest import Account, Portal
from tests.invariants import OrgExpectation, assert_money_invariants
from tests.notify_helpers import Clock, MailCatcher

PRICE = (100_000_000, 100_000_000)  # 100 µ$ per token in and out: a request costs a few thousand µ$


@pytest.fixture(scope="module")
def catcher() -> Iterator[MailCatcher]:
    smtp = MailCatcher().start()
    yield smtp
    smtp.stop()


@pytest_asyncio.fixture
async def smtp(catcher: MailCatcher, db, settings: Settings) -> MailCatcher:
    """The catcher as the platform's SMTP account (loopback: no TLS)."""
    box = box_from_settings(settings.master_key_bytes, settings.master_key_id)
    async with db.acquire() as conn, conn.transaction():
        await save_smtp_config(conn, box, host="127.0.0.1", port=catcher.port, tls_mode="none", username=None,
                               from_address="relay@example.com", password=None)
    catcher.refuse_next = 0
    return catcher


@pytest.fixture
def notify_worker(settings: Settings) -> Iterator[None]:
    process = start_worker(settings, notify_enabled=True, notify_interval_s=0.1)
    yield
    stop_process(process)


async def _top_up(portal: Portal, admin: Account, owner: Account, micros: int) -> int:
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/payments/crypto", owner, json={
        "network": "tron", "tx_hash": secrets.token_hex(32), "sender_address": "TR7NHqjeKQxGTCi8q8ZY4pL8otSzgjLj6t",
        "amount_micros": micros})
    assert resp.status_code == 201, resp.text
    payment_id = resp.json()["id"]
    resp = await portal.request("POST", f"/v1/admin/payments/{payment_id}/approve", admin,
                                json={"amount_micros": micros})
    assert resp.status_code == 200, resp.text
    return payment_id


async def _burst(proxy: Server, api_key: str, model: str, n: int) -> int:
    """n concurrent chat requests; returns how many were answered 200 (billed)."""
    async with httpx.AsyncClient(timeout=30) as http:
        answers = await asyncio.gather(*(
            http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"},
                      json={"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
            for _ in range(n)))
    return sum(r.status_code == 200 for r in answers)


async def _settled(db, org_id: int, records: int) -> int:
    rows = await wait_for_rows(db, "select 1 from usage_records where org_id = $1", org_id, count=records,
                               timeout=20)
    assert len(rows) == records
    await wait_for_rows(db, "select 1 from event_outbox where org_id = $1 and dispatched_at is null", org_id,
                        count=0)
    return await db.fetchval("select balance_micros from org_balances where org_id = $1", org_id)


async def test_one_low_balance_mail_per_downward_crossing_and_a_receipt_per_top_up(
    portal: Portal, factory: Factory, proxy: Server, mock_upstream: Server, smtp: MailCatcher, notify_worker,
    db, redis, settings: Settings,
) -> None:
    owner = await portal.signup(org_name="Alerted org")
    admin = await portal.platform_admin()
    alerts, billing = f"ops-{secrets.token_hex(3)}@example.com", f"bill-{secrets.token_hex(3)}@example.com"
    resp = await portal.request("PATCH", f"/v1/orgs/{owner.org_id}/billing-settings", owner, json={
        "billing_email": billing, "alert_emails": [alerts], "low_balance_threshold_micros": 20_000_000 - 1})
    assert resp.status_code == 200, resp.text
    first = await _top_up(portal, admin, owner, 20_000_000)  # from 0 to just above the threshold: no alert
    (receipt,) = await smtp.wait_for(billing, 1)
    assert f"payment {first}" in receipt.subject and "Credited: $20.000000" in receipt.text()
    _, api_key = await factory.key(owner.org_id)
    model = await factory.model(await factory.provider(mock_upstream.url + "/v1"), price=PRICE)
    await factory.publish_config(proxy, api_key, model)

    # 1. 50 concurrent requests: the balance crosses the threshold once, whatever the batches.
    billed = await _burst(proxy, api_key, model, 50)
    assert billed == 50
    balance = await _settled(db, owner.org_id, billed)
    assert balance < 20_000_000 - 1
    mails = await smtp.wait_for(alerts, 1)
    await asyncio.sleep(1.0)  # a second alert would have been sent by now (the loop runs every 0.1 s)
    assert len(smtp.to(alerts)) == 1, [m.subject for m in smtp.to(alerts)]
    low = mails[0]
    assert low.subject.startswith("Low balance") and "Alerted org" in low.subject
    assert "Threshold: $19.999999" in low.text() and "<b>Alerted org</b>" in low.html()
    assert api_key not in low.raw() and api_key.split("_")[0] not in low.raw()

    # 2. More requests below the threshold: still one mail (not once per request).
    billed += await _burst(proxy, api_key, model, 10)
    balance = await _settled(db, owner.org_id, billed)
    await asyncio.sleep(0.5)
    assert len(smtp.to(alerts)) == 1

    # 3. A top-up lifts the balance just above the threshold: a receipt, and the alert is re-armed...
    lift = (20_000_000 - 1) - balance + 1_000
    payment_id = await _top_up(portal, admin, owner, lift)
    receipts = await smtp.wait_for(billing, 2)
    assert len(receipts) == 2 and f"payment {payment_id}" in receipts[1].subject
    assert f"Credited: ${lift // 1_000_000}.{lift % 1_000_000:06d}" in receipts[1].text()
    assert len(smtp.to(alerts)) == 1
    # ...so the next crossing (the first request costs more than the 1,000 µ$ above it) mails again.
    billed += await _burst(proxy, api_key, model, 50)
    await _settled(db, owner.org_id, billed)
    await smtp.wait_for(alerts, 2)
    await asyncio.sleep(1.0)
    assert len(smtp.to(alerts)) == 2
    crossings = await db.fetch("select dedupe_key from event_outbox where org_id = $1 and event_type = 'balance.low'"
                               " order by id", owner.org_id)
    assert [c["dedupe_key"] for c in crossings] == ["crossing-1", "crossing-2"]
    assert await db.fetchval("select count(*) from mail_messages where org_id = $1 and status = 'sent'",
                             owner.org_id) == 4  # two alerts, two receipts
    await assert_money_invariants(db, redis, settings, {owner.org_id: OrgExpectation(billed=billed)})


# --- retries and the failed-mail record (in process, injected clock) -------------------------------------


def _worker(settings: Settings, db, redis, clock: Clock, **overrides: object) -> NotifyWorker:
    tuned = msgspec.structs.replace(settings, mail_backoff_base_s=30.0, mail_backoff_max_s=60.0,
                                    webhook_backoff_jitter=0.0, **overrides)
    return NotifyWorker(tuned, db, redis, clock=clock, rng=random.Random(1))


async def _mail(db, org_id: int) -> dict:
    rows = await db.fetch("select * from mail_messages where org_id = $1", org_id)
    assert len(rows) == 1, rows
    return dict(rows[0])


async def test_a_refused_mail_is_retried_after_backoff(factory: Factory, smtp: MailCatcher, db, redis,
                                                       settings: Settings) -> None:
    to = f"b-{secrets.token_hex(3)}@example.com"
    org = await factory.org(billing_email=to)
    await emit(db, org, "payment.failed", {"payment_id": 7, "method": "stripe", "amount_micros": 5_000_000,
                                           "reason": None})
    smtp.refuse_next = 2
    clock = Clock()
    w = _worker(settings, db, redis, clock)
    await w.run_once()
    row = await _mail(db, org)
    assert (row["status"], row["attempts"], row["error"]) == ("pending", 1, "SMTP 451")
    clock.advance(29)
    await w.run_once()
    assert (await _mail(db, org))["attempts"] == 1  # not before its backoff
    clock.advance(1)
    await w.run_once()
    assert (await _mail(db, org))["attempts"] == 2
    clock.advance(60)
    await w.run_once()
    row = await _mail(db, org)
    assert (row["status"], row["attempts"]) == ("sent", 3)
    (mail,) = smtp.to(to)
    assert mail.subject.startswith("Payment failed") and "Amount: $5.000000" in mail.text()


async def test_a_mail_that_finally_fails_is_recorded_for_admins(portal: Portal, factory: Factory, smtp: MailCatcher,
                                                                db, redis, settings: Settings) -> None:
    to = f"a-{secrets.token_hex(3)}@example.com"
    org = await factory.org(alert_emails=[to], low_balance_threshold_micros=10)
    await emit(db, org, "balance.depleted", {"balance_micros": 0})
    smtp.refuse_next = 100
    clock = Clock()
    w = _worker(settings, db, redis, clock, mail_max_attempts=3)
    for _ in range(5):
        await w.run_once()
        clock.advance(61)
    smtp.refuse_next = 0
    row = await _mail(db, org)
    assert (row["status"], row["attempts"], row["error"]) == ("failed", 3, "SMTP 451")
    assert smtp.to(to) == []
    admin = await portal.platform_admin()
    resp = await portal.request("GET", "/v1/admin/mail/messages", admin, params={"org_id": org})
    assert resp.status_code == 200, resp.text
    assert [(m["status"], m["template"], m["recipients"]) for m in resp.json()] == [("failed", "balance_depleted",
                                                                                      [to])]
    viewer = await portal.signup()
    assert (await portal.request("GET", "/v1/admin/mail/messages", viewer)).status_code == 403

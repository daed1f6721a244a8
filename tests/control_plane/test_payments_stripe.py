"""Stripe money in, end to end: the real `stripe` library against the local Stripe (localstripe and our
fixture's Checkout Sessions), webhook events signed for real and delivered to a real control plane.

After every money test the invariants hold: the org's balance is the sum of its ledger rows and the live
(Redis) balance agrees; each payment is credited exactly once whatever the order and the repetitions.
"""

from __future__ import annotations

import json
import random
import secrets
import time

import httpx
import pytest
import pytest_asyncio

from shared.billing import BillingScripts, rebuild_balance
from shared.payments.ledger import retry_live_credits
from shared.payments.stripe_events import store_event
from shared.redis_keys import RedisKeys
from tests.conftest import Server, start_worker, stop_process, wait_for_rows
from tests.control_plane.conftest import Account, LocalStripe, Portal, start_control_plane
from tests.invariants import OrgExpectation, assert_money_invariants


@pytest_asyncio.fixture
async def payer(portal: Portal, local_stripe: LocalStripe, db, redis, settings) -> Account:
    """A new org's owner; the org has a live balance, so the tests see Redis agree with the ledger."""
    owner = await portal.signup(org_name="Payer")
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    await rebuild_balance(db, BillingScripts(redis), keys, owner.org_id)
    return owner


async def _invariants(db, redis, settings, *org_ids: int) -> None:
    await assert_money_invariants(db, redis, settings, {o: OrgExpectation() for o in org_ids}, timeout=5.0)


async def _ledger(db, org_id: int) -> list[tuple[str, int, str | None]]:
    rows = await db.fetch("""select kind, amount_micros, external_id from balance_transactions where org_id = $1
                             order by id""", org_id)
    return [(r["kind"], r["amount_micros"], r["external_id"]) for r in rows]


async def _balance(db, org_id: int) -> int:
    return await db.fetchval("select balance_micros from org_balances where org_id = $1", org_id)


async def _start_topup(portal: Portal, owner: Account, amount_micros: int) -> dict:
    resp = await portal.request("POST", f"/v1/orgs/{owner.org_id}/payments/stripe-checkout", owner,
                                json={"amount_micros": amount_micros})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _paid_topup(portal: Portal, owner: Account, stripe_: LocalStripe, amount_micros: int):
    """A top-up paid at the local Stripe: (checkout session, payment intent, charge) as Stripe returns them."""
    started = await _start_topup(portal, owner, amount_micros)
    stripe_.pay(started["url"])
    session = stripe_.client.v1.checkout.sessions.retrieve(started["checkout_session_id"]).to_dict()
    intent = stripe_.client.v1.payment_intents.retrieve(session["payment_intent"]).to_dict()
    charge_id = intent["latest_charge"]["id"] if isinstance(intent["latest_charge"], dict) else intent["latest_charge"]
    charge = stripe_.client.v1.charges.retrieve(charge_id).to_dict()
    return started, session, intent, charge


async def _deliver_all(stripe_: LocalStripe, url: str, events: list[dict], *, times: int = 3, seed: int = 7) -> None:
    deliveries = [e for e in events for _ in range(times)]
    random.Random(seed).shuffle(deliveries)
    async with httpx.AsyncClient(timeout=20.0) as http:
        for event in deliveries:
            resp = await stripe_.deliver(http, url, event)
            assert resp.status_code == 200, resp.text


# --- Customers and Checkout ---------------------------------------------------------------------------------


async def test_checkout_creates_one_customer_and_a_session_within_bounds(portal: Portal, payer: Account,
                                                                        local_stripe: LocalStripe, db) -> None:
    first = await _start_topup(portal, payer, 10_000_000)
    second = await _start_topup(portal, payer, 25_000_000)
    customer = await db.fetchval("select customer_id from stripe_customers where org_id = $1", payer.org_id)
    assert customer and customer.startswith("cus_")
    stored = local_stripe.client.v1.customers.retrieve(customer).to_dict()
    assert stored["metadata"]["rr_org_id"] == str(payer.org_id)
    session = local_stripe.client.v1.checkout.sessions.retrieve(first["checkout_session_id"]).to_dict()
    assert session["customer"] == customer and session["amount_total"] == 1000 and session["currency"] == "usd"
    assert session["metadata"] == {"rr_org_id": str(payer.org_id), "rr_payment_id": str(first["payment_id"])}
    again = local_stripe.client.v1.checkout.sessions.retrieve(second["checkout_session_id"]).to_dict()
    assert again["customer"] == customer and again["amount_total"] == 2500
    page = await portal.request("GET", f"/v1/orgs/{payer.org_id}/payments", payer)
    assert [(p["status"], p["amount_micros"], p["credited_micros"]) for p in page.json()["data"]] == [
        ("pending", 25_000_000, 0), ("pending", 10_000_000, 0)]

    for amount, code in ((4_990_000, "amount_out_of_bounds"), (10_000_010_000, "amount_out_of_bounds"),
                         (10_005_000, "amount_not_whole_cents"), (0, "amount_out_of_bounds")):
        resp = await portal.request("POST", f"/v1/orgs/{payer.org_id}/payments/stripe-checkout", payer,
                                    json={"amount_micros": amount})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == code, (amount, resp.text)
    for body in ({"amount_micros": 10.5}, {"amount_micros": "1000000"}, {"amount_micros": -10_000_000}, {}):
        resp = await portal.request("POST", f"/v1/orgs/{payer.org_id}/payments/stripe-checkout", payer, json=body)
        assert resp.status_code in (400, 422), (body, resp.text)
    assert await _balance(db, payer.org_id) == 0


async def test_a_customer_stripe_forgot_is_replaced(portal: Portal, payer: Account, local_stripe: LocalStripe,
                                                    db) -> None:
    await db.execute("insert into stripe_customers (org_id, customer_id) values ($1, 'cus_gone_from_stripe')",
                     payer.org_id)
    started = await _start_topup(portal, payer, 5_000_000)
    customer = await db.fetchval("select customer_id from stripe_customers where org_id = $1", payer.org_id)
    assert customer != "cus_gone_from_stripe"
    session = local_stripe.client.v1.checkout.sessions.retrieve(started["checkout_session_id"]).to_dict()
    assert session["customer"] == customer


# --- Webhooks: exactly once ---------------------------------------------------------------------------------


async def test_events_delivered_three_times_in_shuffled_order_credit_once(
        portal: Portal, payer: Account, local_stripe: LocalStripe, control_plane: Server, db, redis,
        settings) -> None:
    _, session_a, intent_a, _ = await _paid_topup(portal, payer, local_stripe, 10_000_000)
    _, session_b, intent_b, _ = await _paid_topup(portal, payer, local_stripe, 7_000_000)
    events = [LocalStripe.event("checkout.session.completed", session_a),
              LocalStripe.event("payment_intent.succeeded", intent_a),
              LocalStripe.event("checkout.session.completed", session_b),
              LocalStripe.event("payment_intent.succeeded", intent_b)]
    await _deliver_all(local_stripe, control_plane.url, events, times=3, seed=11)
    assert sorted(await _ledger(db, payer.org_id)) == sorted([
        ("topup", 10_000_000, f"stripe:{intent_a['id']}"), ("topup", 7_000_000, f"stripe:{intent_b['id']}")])
    assert await _balance(db, payer.org_id) == 17_000_000
    payments = (await portal.request("GET", f"/v1/orgs/{payer.org_id}/payments", payer)).json()["data"]
    assert {(p["status"], p["credited_micros"], p["stripe_payment_intent_id"]) for p in payments} == {
        ("succeeded", 10_000_000, intent_a["id"]), ("succeeded", 7_000_000, intent_b["id"])}
    assert await db.fetchval("select count(*) from stripe_events where id = any($1::text[])",
                             [e["id"] for e in events]) == 4
    await _invariants(db, redis, settings, payer.org_id)


async def test_bad_signature_or_stale_timestamp_is_400_and_changes_nothing(
        payer: Account, portal: Portal, local_stripe: LocalStripe, control_plane: Server, db) -> None:
    _, session, _, _ = await _paid_topup(portal, payer, local_stripe, 5_000_000)
    event = LocalStripe.event("checkout.session.completed", session)
    payload = json.dumps(event).encode()
    url = control_plane.url + "/v1/webhooks/stripe"
    now = int(time.time())
    good = local_stripe.sign(payload)
    attempts = {
        "wrong secret": (payload, local_stripe.sign(payload, secret="whsec_not_ours")),
        "stale timestamp": (payload, local_stripe.sign(payload, timestamp=now - 301)),
        "tampered body": (payload.replace(b"5000000", b"9000000").replace(b'"amount_total": 500',
                                                                          b'"amount_total": 900'), good),
        "signature of another body": (payload + b" ", good),
        "no header": (payload, None),
        "garbage header": (payload, "t=abc,v1=zz"),
        "no v1": (payload, good.split(",")[0]),
        "not utf-8": (b"\xff\xfe" + payload, good),
    }
    async with httpx.AsyncClient(timeout=10.0) as http:
        for name, (body, header) in attempts.items():
            headers = {"content-type": "application/json", **({"stripe-signature": header} if header else {})}
            resp = await http.post(url, content=body, headers=headers)
            assert resp.status_code == 400, (name, resp.status_code, resp.text)
            assert resp.json()["error"]["code"] == "invalid_webhook", name
            assert "whsec" not in resp.text
    assert not await db.fetchval("select count(*) from stripe_events where id = $1", event["id"])
    assert await _balance(db, payer.org_id) == 0
    # The same event, correctly signed and within the tolerance, is taken.
    async with httpx.AsyncClient(timeout=10.0) as http:
        resp = await local_stripe.deliver(http, control_plane.url, event, timestamp=now - 200)
    assert resp.status_code == 200 and await _balance(db, payer.org_id) == 5_000_000


@pytest.mark.parametrize("failpoint", ["stripe.after_store", "stripe.before_commit", "stripe.after_commit"])
async def test_control_plane_killed_between_receipt_and_ledger_credits_once(
        failpoint: str, portal: Portal, payer: Account, local_stripe: LocalStripe, settings, db, redis) -> None:
    _, session, intent, _ = await _paid_topup(portal, payer, local_stripe, 12_000_000)
    event = LocalStripe.event("checkout.session.completed", session)
    doomed = start_control_plane(settings, failpoint=failpoint)
    try:
        async with httpx.AsyncClient(timeout=10.0) as http:
            with pytest.raises(httpx.HTTPError):  # the process exits: Stripe gets no answer, and delivers again
                await local_stripe.deliver(http, doomed.url, event)
        doomed.process.wait(10)  # granian's main process follows its dead worker
        assert f"failpoint {failpoint}: exiting" in doomed.log(), doomed.log()[-2000:]
    finally:
        doomed.stop()
    row = await db.fetchrow("select status from stripe_events where id = $1", event["id"])
    assert row is not None  # stored before the crash in every case
    if failpoint == "stripe.after_commit":
        assert row["status"] == "processed" and await _balance(db, payer.org_id) == 12_000_000
        assert await db.fetchval("select count(*) from pending_live_credits p join balance_transactions t "
                                 "on t.id = p.transaction_id where t.org_id = $1", payer.org_id) == 1
    else:
        assert row["status"] == "pending" and await _balance(db, payer.org_id) == 0

    restarted = start_control_plane(settings)
    try:
        async with httpx.AsyncClient(timeout=10.0) as http:
            resp = await local_stripe.deliver(http, restarted.url, event)
            assert resp.status_code == 200 and resp.json()["duplicate"] is True
            other_type = LocalStripe.event("payment_intent.succeeded", intent)
            assert (await local_stripe.deliver(http, restarted.url, other_type)).status_code == 200
    finally:
        restarted.stop()
    # What the dead process never applied to the live balance, rr-worker's outbox retry does.
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    await retry_live_credits(db, BillingScripts(redis), keys, min_age_s=0)
    assert await _ledger(db, payer.org_id) == [("topup", 12_000_000, f"stripe:{intent['id']}")]
    await _invariants(db, redis, settings, payer.org_id)


async def test_refunds_and_disputes_debit_once_in_any_order(
        portal: Portal, payer: Account, local_stripe: LocalStripe, control_plane: Server, db, redis,
        settings) -> None:
    _, session, intent, charge = await _paid_topup(portal, payer, local_stripe, 20_000_000)
    # Two partial refunds at the local Stripe: each charge.refunded carries the cumulative amount refunded.
    local_stripe.client.v1.refunds.create(params={"payment_intent": intent["id"], "amount": 500})
    after_first = local_stripe.client.v1.charges.retrieve(charge["id"]).to_dict()
    local_stripe.client.v1.refunds.create(params={"payment_intent": intent["id"], "amount": 300})
    after_second = local_stripe.client.v1.charges.retrieve(charge["id"]).to_dict()
    assert (after_first["amount_refunded"], after_second["amount_refunded"]) == (500, 800)
    # localstripe has no disputes: the fixture writes the dispute objects Stripe would send.
    dispute = {"id": "dp_" + intent["id"][3:], "object": "dispute", "charge": charge["id"],
               "payment_intent": intent["id"], "amount": 400, "currency": "usd", "status": "needs_response"}
    events = [
        LocalStripe.event("charge.refunded", after_second),  # the later refund first, before the payment
        LocalStripe.event("charge.refunded", after_first),
        LocalStripe.event("charge.dispute.created", dispute),
        LocalStripe.event("checkout.session.completed", session),
        LocalStripe.event("payment_intent.succeeded", intent),
    ]
    async with httpx.AsyncClient(timeout=20.0) as http:
        for event in events:  # in this order first: the reversals wait for the payment
            assert (await local_stripe.deliver(http, control_plane.url, event)).status_code == 200
    await _deliver_all(local_stripe, control_plane.url, events, times=2, seed=3)
    ledger = await _ledger(db, payer.org_id)
    outcomes = [tuple(r) for r in await db.fetch("select type, status, outcome from stripe_events "
                                                 "where id = any($1::text[])", [e["id"] for e in events])]
    assert sorted(ledger) == sorted([
        ("topup", 20_000_000, f"stripe:{intent['id']}"),
        ("payment_reversal", -8_000_000, f"stripe:refund:{charge['id']}:800"),
        ("payment_reversal", -4_000_000, f"stripe:dispute:{dispute['id']}"),
    ]), (ledger, outcomes)
    payment = (await portal.request("GET", f"/v1/orgs/{payer.org_id}/payments", payer)).json()["data"][0]
    assert (payment["status"], payment["credited_micros"], payment["reversed_micros"]) == ("disputed", 20_000_000,
                                                                                          12_000_000)
    # Won: the disputed amount comes back, once.
    won = LocalStripe.event("charge.dispute.closed", {**dispute, "status": "won"})
    await _deliver_all(local_stripe, control_plane.url, [won], times=3)
    assert await _balance(db, payer.org_id) == 20_000_000 - 8_000_000
    payment = (await portal.request("GET", f"/v1/orgs/{payer.org_id}/payments", payer)).json()["data"][0]
    assert (payment["status"], payment["reversed_micros"]) == ("partially_refunded", 8_000_000)
    await _invariants(db, redis, settings, payer.org_id)


async def test_a_dispute_lost_before_it_was_opened_debits_once(
        portal: Portal, payer: Account, local_stripe: LocalStripe, control_plane: Server, db, redis,
        settings) -> None:
    _, session, intent, charge = await _paid_topup(portal, payer, local_stripe, 6_000_000)
    dispute = {"id": "dp_lost" + intent["id"][3:], "object": "dispute", "charge": charge["id"],
               "payment_intent": intent["id"], "amount": 600, "currency": "usd"}
    events = [LocalStripe.event("charge.dispute.closed", {**dispute, "status": "lost"}),
              LocalStripe.event("charge.dispute.created", {**dispute, "status": "needs_response"}),
              LocalStripe.event("checkout.session.completed", session)]
    await _deliver_all(local_stripe, control_plane.url, events, times=3, seed=5)
    assert sorted(await _ledger(db, payer.org_id)) == sorted([
        ("topup", 6_000_000, f"stripe:{intent['id']}"),
        ("payment_reversal", -6_000_000, f"stripe:dispute:{dispute['id']}")])
    await _invariants(db, redis, settings, payer.org_id)


async def test_unsupported_currency_is_held_not_credited(portal: Portal, payer: Account, local_stripe: LocalStripe,
                                                         control_plane: Server, db) -> None:
    _, session, _, _ = await _paid_topup(portal, payer, local_stripe, 5_000_000)
    event = LocalStripe.event("checkout.session.completed", {**session, "currency": "eur"})
    await _deliver_all(local_stripe, control_plane.url, [event], times=2)
    row = await db.fetchrow("select status, outcome from stripe_events where id = $1", event["id"])
    assert row["status"] == "held" and "USD only" in row["outcome"]
    assert await _balance(db, payer.org_id) == 0


async def test_stored_events_keep_identifiers_and_amounts_only(portal: Portal, payer: Account,
                                                               local_stripe: LocalStripe, control_plane: Server,
                                                               db) -> None:
    _, session, _, _ = await _paid_topup(portal, payer, local_stripe, 5_000_000)
    private = {**session, "customer_details": {"email": "card-holder@example.com", "name": "Card Holder",
                                               "address": {"line1": "1 Secret Street"}},
               "metadata": {**session["metadata"], "note": "private-note"}}
    event = LocalStripe.event("checkout.session.completed", private)
    await _deliver_all(local_stripe, control_plane.url, [event], times=1)
    facts = json.dumps(await db.fetchval("select facts from stripe_events where id = $1", event["id"]))
    for secret in ("card-holder@example.com", "Card Holder", "Secret Street", "private-note"):
        assert secret not in facts


# --- Subscriptions ------------------------------------------------------------------------------------------


async def test_each_paid_invoice_credits_the_plan_allowance_once(
        portal: Portal, payer: Account, local_stripe: LocalStripe, control_plane: Server, db, redis,
        settings) -> None:
    admin = await portal.platform_admin()
    resp = await portal.request("POST", "/v1/admin/plans", admin, json={
        "name": f"Team {payer.org_id}", "price_cents": 2000, "monthly_allowance_micros": 25_000_000})
    assert resp.status_code == 201, resp.text
    plan = resp.json()
    resp = await portal.request("POST", f"/v1/orgs/{payer.org_id}/subscriptions", payer, json={"plan_id": plan["id"]})
    assert resp.status_code == 201, resp.text
    paid = local_stripe.pay(resp.json()["url"])
    session = local_stripe.client.v1.checkout.sessions.retrieve(paid["id"]).to_dict()
    invoice = local_stripe.client.v1.invoices.retrieve(paid["invoice"]).to_dict()
    subscription = local_stripe.client.v1.subscriptions.retrieve(paid["subscription"]).to_dict()
    assert invoice["status"] == "paid" and invoice["amount_paid"] == 2000
    t = int(time.time())
    # A second month's invoice, as Stripe would send it a month later.
    next_month = {**invoice, "id": invoice["id"] + "m2", "payment_intent": None, "charge": None}
    events = [LocalStripe.event("invoice.paid", invoice),  # before the checkout tells us the subscription
              LocalStripe.event("checkout.session.completed", session),
              LocalStripe.event("invoice.paid", next_month),
              LocalStripe.event("customer.subscription.updated", {**subscription, "status": "past_due"},
                                created=t + 10),
              LocalStripe.event("customer.subscription.updated", {**subscription, "status": "active"},
                                created=t + 5)]
    await _deliver_all(local_stripe, control_plane.url, events, times=3, seed=13)
    outcomes = [tuple(r) for r in await db.fetch("select type, status, outcome from stripe_events "
                                                 "where id = any($1::text[])", [e["id"] for e in events])]
    assert sorted(await _ledger(db, payer.org_id)) == sorted([
        ("topup", 25_000_000, f"stripe:{invoice['id']}"),
        ("topup", 25_000_000, f"stripe:{next_month['id']}")]), outcomes
    subs = (await portal.request("GET", f"/v1/orgs/{payer.org_id}/subscriptions", payer)).json()
    assert [(s["subscription_id"], s["status"], s["plan_id"]) for s in subs] == [
        (subscription["id"], "past_due", plan["id"])]  # the older "active" came late and changed nothing
    await _deliver_all(local_stripe, control_plane.url, [
        LocalStripe.event("customer.subscription.deleted", {**subscription, "status": "canceled"}, created=t + 20),
        LocalStripe.event("customer.subscription.updated", {**subscription, "status": "active"}, created=t + 30)],
        times=2, seed=1)
    subs = (await portal.request("GET", f"/v1/orgs/{payer.org_id}/subscriptions", payer)).json()
    assert subs[0]["status"] == "canceled"  # a deletion is final
    payments = (await portal.request("GET", f"/v1/orgs/{payer.org_id}/payments", payer)).json()["data"]
    assert sorted((p["purpose"], p["amount_micros"], p["credited_micros"]) for p in payments) == [
        ("subscription", 20_000_000, 25_000_000)] * 2
    await _invariants(db, redis, settings, payer.org_id)


# --- The whole way: localstripe's own webhooks -----------------------------------------------------------


async def test_a_top_up_paid_at_the_local_stripe_is_credited_by_its_webhooks(
        portal: Portal, payer: Account, local_stripe: LocalStripe, control_plane: Server, db, redis,
        settings) -> None:
    # localstripe sends the events it knows (payment_intent.succeeded) and our fixture's
    # checkout.session.completed itself, signed with the secret it is given, to the registered URL.
    local_stripe.register_webhook(f"rr-{payer.org_id}", control_plane.url + "/v1/webhooks/stripe",
                                  ["checkout.session.completed", "payment_intent.succeeded"])
    started = await _start_topup(portal, payer, 15_000_000)
    local_stripe.pay(started["url"])
    # Stored (committed) first, processed right after in the same webhook request: wait for both processed.
    rows = await wait_for_rows(db, "select type from stripe_events where facts->'metadata'->>'rr_payment_id' = $1"
                                   " and status = 'processed'", str(started["payment_id"]), count=2, timeout=15.0)
    assert {r["type"] for r in rows} == {"checkout.session.completed", "payment_intent.succeeded"}
    assert await _balance(db, payer.org_id) == 15_000_000
    assert len(await _ledger(db, payer.org_id)) == 1
    receipt = await portal.request("GET", f"/v1/orgs/{payer.org_id}/payments/{started['payment_id']}/receipt", payer)
    assert receipt.status_code == 200 and receipt.json()["paid_micros"] == 15_000_000
    await _invariants(db, redis, settings, payer.org_id)


async def test_rr_worker_processes_an_event_a_webhook_request_left_behind(
        portal: Portal, payer: Account, local_stripe: LocalStripe, db, redis, settings) -> None:
    _, session, intent, _ = await _paid_topup(portal, payer, local_stripe, 8_000_000)
    event = LocalStripe.event("checkout.session.completed", session)
    assert await store_event(db, event)  # stored, as by a control plane that died right after
    worker = start_worker(settings, stripe_sweep_delay_s=0)
    try:
        rows = await wait_for_rows(db, "select 1 from stripe_events where id = $1 and status = 'processed'",
                                   event["id"], timeout=15.0)
        assert rows
    finally:
        stop_process(worker)
    assert await _ledger(db, payer.org_id) == [("topup", 8_000_000, f"stripe:{intent['id']}")]
    await _invariants(db, redis, settings, payer.org_id)


async def test_stripe_settings_are_masked_audited_and_kept_with_their_server(portal: Portal, local_stripe: LocalStripe,
                                                                            db) -> None:
    admin = await portal.platform_admin()
    shown = await portal.request("GET", "/v1/admin/stripe", admin)
    assert shown.status_code == 200
    assert shown.json()["secret_key"] == "sk_…ocal" and shown.json()["webhook_secret"] == "whs…test"
    assert local_stripe.secret_key not in shown.text and local_stripe.webhook_secret not in shown.text
    # Moving the API base without the key would send the stored key to another server.
    moved = await portal.request("PATCH", "/v1/admin/stripe", admin, json={"api_base": "https://stripe.attacker.example"})
    assert moved.status_code == 422 and moved.json()["error"]["code"] == "secret_key_required"
    same = await portal.request("PATCH", "/v1/admin/stripe", admin, json={
        "secret_key": local_stripe.secret_key, "webhook_secret": local_stripe.webhook_secret,
        "api_base": local_stripe.server.url})
    assert same.status_code == 200 and local_stripe.secret_key not in same.text
    for bad in ({"secret_key": "pk_live_publishable"}, {"webhook_secret": "nope"}, {"api_base": "ftp://x"},
                {"secret_key": "sk_test_x\r\nHost: evil"}):
        assert (await portal.request("PATCH", "/v1/admin/stripe", admin, json=bad)).status_code == 422, bad
    changes = await db.fetchval("""select changes::text from audit_log where action = 'stripe.settings.update'
                                   and actor_user_id = $1 order by id desc limit 1""", admin.user_id)
    assert local_stripe.secret_key not in changes and local_stripe.webhook_secret not in changes
    owner = await portal.signup(org_name="Not an admin")
    assert (await portal.request("GET", "/v1/admin/stripe", owner)).status_code == 403


# --- Notifications --------------------------------------------------------------------------------------------


async def test_stripe_payments_announce_success_once_and_each_failure(
        portal: Portal, payer: Account, local_stripe: LocalStripe, control_plane: Server, db, redis,
        settings) -> None:
    started, session, intent, _ = await _paid_topup(portal, payer, local_stripe, 6_000_000)
    events = [LocalStripe.event("checkout.session.completed", session),
              LocalStripe.event("payment_intent.succeeded", intent)]
    await _deliver_all(local_stripe, control_plane.url, events, times=3, seed=5)
    failed_intent = {**intent, "id": f"pi_failed_{secrets.token_hex(4)}", "status": "requires_payment_method"}
    failures = [LocalStripe.event("payment_intent.payment_failed", failed_intent) for _ in range(2)]
    await _deliver_all(local_stripe, control_plane.url, failures, times=2, seed=3)
    rows = await db.fetch("select event_type, payload from event_outbox where org_id = $1 and event_type like "
                          "'payment.%' order by id", payer.org_id)
    payloads = [(r["event_type"], json.loads(r["payload"])) for r in rows]
    assert payloads == [
        ("payment.succeeded", {"payment_id": started["payment_id"], "method": "stripe", "credited_micros": 6_000_000,
                               "transaction_id": payloads[0][1]["transaction_id"]}),
        *[("payment.failed", {"payment_id": started["payment_id"], "method": "stripe", "amount_micros": 6_000_000,
                              "reason": None})] * 2,  # one notice per failed attempt, each redelivery stored once
    ]
    await _invariants(db, redis, settings, payer.org_id)

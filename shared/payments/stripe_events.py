"""Stripe webhook events: verified, reduced, stored as a durable queue, and each applied exactly once.

Receipt (`verify_event`, `store_event`, in the webhook request): the `Stripe-Signature` header is checked
with stripe's own `WebhookSignature` (HMAC-SHA256 over "t.payload" with the signing secret, timestamp within
the tolerance); the event is reduced to the identifiers and amounts we act on (`facts`: no names, emails,
addresses or card details reach our database) and inserted into `stripe_events`, unique on the event id.
The webhook answers 200 only after that commit: a crash before it means Stripe delivers again.

Processing (`EventProcessor`, inline after receipt and in rr-worker): each due event is locked (`skip
locked`, so concurrent processors never take the same one) and handled in ONE transaction with its ledger
effect, then marked processed. Idempotency does not rest on the event id alone: every money movement is a
ledger row keyed by what Stripe moved, so the same payment reported by two event types is credited once:

    top-up                  topup             stripe:<payment intent id>    (checkout.session.completed and
                                                                             payment_intent.succeeded)
    subscription invoice    topup             stripe:<invoice id>           (invoice.paid; the plan's allowance)
    refund                  payment_reversal  stripe:refund:<charge>:<cumulative refunded cents>
    dispute opened / lost   payment_reversal  stripe:dispute:<dispute id>
    dispute won             payment_reversal  stripe:dispute:<dispute id>:reinstated

Order: Stripe does not promise any. An event about a payment we have not credited yet (a refund before the
checkout completed, an invoice before its subscription is known) is left `waiting` and retried whenever
another event takes effect (and on a back-off), so every order ends in the same state. Refunds carry
Stripe's cumulative refunded amount, and only the part beyond what was applied is debited, so partial
refunds in any order debit each cent once. Subscription state applies only from events at least as new as
the last one applied, and a deletion is final.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import stripe

from shared import failpoints
from shared.billing import BillingScripts, ExternalIdTaken
from shared.notify.events import emit
from shared.payments.ledger import cents_to_micros, flush_live_credits, ledger_entry
from shared.redis_keys import RedisKeys

__all__ = ["HANDLED_TYPES", "BadWebhook", "EventProcessor", "reduce_event", "store_event", "verify_event"]

log = logging.getLogger("rocket_relay.payments")

HANDLED_TYPES = frozenset({
    "checkout.session.completed", "payment_intent.succeeded", "invoice.paid", "charge.refunded",
    "charge.dispute.created", "charge.dispute.closed", "customer.subscription.updated",
    "customer.subscription.deleted", "payment_intent.payment_failed", "invoice.payment_failed",
})
# A waiting event is retried on this back-off (seconds, doubling) and held for an admin after this many tries
# (about two days): a refund of a charge this platform never saw must not be retried forever.
_WAIT_BACKOFF_S, _WAIT_BACKOFF_MAX_S, _MAX_ATTEMPTS = 2, 3600, 60
_MAX_ID = 255


class BadWebhook(Exception):
    """The request is not a correctly signed, recent, well-formed Stripe event (400; nothing stored)."""


def verify_event(payload: bytes, signature_header: str | None, secret: str, tolerance_s: int) -> dict[str, Any]:
    """The event, if `payload` carries a valid signature by `secret` made within `tolerance_s`."""
    try:
        stripe.WebhookSignature.verify_header(payload, signature_header, secret, tolerance_s)
    except stripe.SignatureVerificationError as exc:
        reason = "stale timestamp" if "tolerance" in str(exc) else "bad or missing signature"
        raise BadWebhook(f"Stripe-Signature check failed: {reason}.") from None
    except (UnicodeDecodeError, ValueError, OverflowError):
        raise BadWebhook("Stripe-Signature check failed: malformed request.") from None
    try:
        event = msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        raise BadWebhook("The event is not JSON.") from None
    if not (isinstance(event, dict) and _str(event.get("id")) and _str(event.get("type"))
            and _int(event.get("created")) is not None and isinstance(event.get("data"), dict)
            and isinstance(event["data"].get("object"), dict)):
        raise BadWebhook("The event lacks id, type, created or data.object.")
    return event


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_ID else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else None


def _id(value: Any) -> str | None:
    """An id field, whether Stripe sent it as a string or expanded into an object."""
    return _str(value.get("id")) if isinstance(value, dict) else _str(value)


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _our_metadata(*sources: Any) -> dict[str, str]:
    """Our own metadata keys (`rr_*`) only: a customer's other metadata is none of our business."""
    out: dict[str, str] = {}
    for meta in sources:
        if isinstance(meta, dict):
            for key, value in meta.items():
                if isinstance(key, str) and key.startswith("rr_") and _str(value) and key not in out:
                    out[key] = value
    return out


def reduce_event(event: dict[str, Any]) -> dict[str, Any]:
    """What we keep of an event: the identifiers, amounts, statuses and our own metadata, nothing else."""
    obj = event["data"]["object"]
    kind = event["type"]
    facts: dict[str, Any] = {"object_id": _id(obj), "currency": _str(obj.get("currency")),
                             "customer": _id(obj.get("customer")), "status": _str(obj.get("status"))}
    if kind == "checkout.session.completed":
        facts |= {"mode": _str(obj.get("mode")), "payment_status": _str(obj.get("payment_status")),
                  "amount_cents": _int(obj.get("amount_total")), "payment_intent": _id(obj.get("payment_intent")),
                  "subscription": _id(obj.get("subscription")), "metadata": _our_metadata(obj.get("metadata"))}
    elif kind == "payment_intent.succeeded":
        facts |= {"amount_cents": _int(obj.get("amount_received")) or _int(obj.get("amount")),
                  "charge": _id(obj.get("latest_charge")), "invoice": _id(obj.get("invoice")),
                  "metadata": _our_metadata(obj.get("metadata"))}
    elif kind == "payment_intent.payment_failed":
        facts |= {"amount_cents": _int(obj.get("amount")), "metadata": _our_metadata(obj.get("metadata"))}
    elif kind == "invoice.payment_failed":
        details = obj.get("subscription_details") or _dig(obj, "parent", "subscription_details")
        facts |= {"amount_cents": _int(obj.get("amount_due")),
                  "subscription": _id(obj.get("subscription")) or _id(_dig(details, "subscription"))}
    elif kind == "invoice.paid":
        details = obj.get("subscription_details") or _dig(obj, "parent", "subscription_details")
        facts |= {"amount_cents": _int(obj.get("amount_paid")),
                  "subscription": _id(obj.get("subscription")) or _id(_dig(details, "subscription")),
                  "payment_intent": _id(obj.get("payment_intent")), "charge": _id(obj.get("charge")),
                  "metadata": _our_metadata(_dig(details, "metadata"), obj.get("metadata"))}
    elif kind == "charge.refunded":
        facts |= {"amount_cents": _int(obj.get("amount")), "refunded_cents": _int(obj.get("amount_refunded")),
                  "charge": _id(obj), "payment_intent": _id(obj.get("payment_intent"))}
    elif kind in ("charge.dispute.created", "charge.dispute.closed"):
        facts |= {"amount_cents": _int(obj.get("amount")), "charge": _id(obj.get("charge")),
                  "payment_intent": _id(obj.get("payment_intent"))}
    elif kind in ("customer.subscription.updated", "customer.subscription.deleted"):
        facts |= {"metadata": _our_metadata(obj.get("metadata"))}
    return facts


async def store_event(conn: asyncpg.Connection | asyncpg.Pool, event: dict[str, Any]) -> bool:
    """Queue a verified event; False if this event id was stored before (a redelivery)."""
    status = await conn.execute(
        """insert into stripe_events (id, type, stripe_created, facts) values ($1, $2, $3, $4::text::jsonb)
           on conflict (id) do nothing""",  # as text: the same on pools with and without a jsonb codec
        event["id"], event["type"], event["created"], msgspec.json.encode(reduce_event(event)).decode())
    return status == "INSERT 0 1"


# --- Processing ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # "processed", "waiting" or "held"
    detail: str


def _done(detail: str) -> Outcome:
    return Outcome("processed", detail)


def _wait(detail: str) -> Outcome:
    return Outcome("waiting", detail)


def _hold(detail: str) -> Outcome:
    return Outcome("held", detail)


@dataclass
class _Work:
    """One event's transaction: the connection, and what it changed."""

    conn: asyncpg.Connection
    created: list[int] = field(default_factory=list)  # ledger transactions for the live balance
    effect: bool = False  # something changed that a waiting event may have been waiting for

    async def entry(self, org_id: int, kind: str, amount: int, external_id: str, reason: str):
        result = await ledger_entry(self.conn, org_id, kind, amount, external_id, reason)
        if result.created:
            self.created.append(result.transaction_id)
            self.effect = True
        return result


def _share(credited: int, part: int, whole: int) -> int:
    """The part of what a payment credited that `part` of its `whole` paid cents stands for (exact for
    top-ups, where credited = whole cents; proportional for a plan whose allowance differs from its price)."""
    if whole <= 0:
        return 0
    return credited * min(part, whole) // whole


class EventProcessor:
    """Applies stored events; `process_due` is called after each receipt and by rr-worker's loop."""

    def __init__(self, pool: asyncpg.Pool, scripts: BillingScripts, keys: RedisKeys, *, failpoint: str = "") -> None:
        self.pool = pool
        self.scripts = scripts
        self.keys = keys
        self.failpoint = failpoint

    async def process_due(self, limit: int = 100, *, min_age_s: float = 0.0) -> int:
        """Process up to `limit` due events, oldest first, received at least `min_age_s` ago (rr-worker sweeps
        up what a webhook request left behind, and leaves fresh ones to it); returns how many were handled."""
        handled = 0
        while handled < limit and await self._process_one(min_age_s):
            handled += 1
        return handled

    async def _process_one(self, min_age_s: float) -> bool:
        event_id = None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """select id, type, stripe_created, facts::text as facts, attempts from stripe_events
                       where status in ('pending', 'waiting') and next_attempt_at <= now()
                         and received_at <= now() - make_interval(secs => $1)
                       order by next_attempt_at, received_at, id limit 1 for update skip locked""", min_age_s)
                if row is None:
                    return False
                event_id = row["id"]
                work = _Work(conn)
                facts = msgspec.json.decode(row["facts"])
                try:
                    outcome = await self._handle(work, row["type"], row["stripe_created"], facts, event_id)
                except ExternalIdTaken:
                    outcome = _hold("this payment id is already credited to another org")
                failpoints.hit(self.failpoint, failpoints.STRIPE_BEFORE_COMMIT)
                await self._finish(conn, row, outcome)
                if work.effect:
                    # What a waiting event waited for may have just arrived.
                    await conn.execute("""update stripe_events set next_attempt_at = now()
                                          where status = 'waiting' and next_attempt_at > now()""")
        except (asyncpg.PostgresError, ValueError, TypeError, KeyError) as exc:
            if event_id is None:
                raise
            # One bad event must not stop the queue: back off, and hold it after enough attempts.
            log.error("stripe event %s failed (%s)", event_id, type(exc).__name__, exc_info=exc)
            await self.pool.execute(
                """update stripe_events set attempts = attempts + 1, outcome = $2,
                          status = case when attempts + 1 >= $3 then 'held' else status end,
                          next_attempt_at = now() + make_interval(secs => least($4 * power(2, attempts), $5))
                   where id = $1""", event_id, f"error: {type(exc).__name__}", _MAX_ATTEMPTS,
                _WAIT_BACKOFF_S, _WAIT_BACKOFF_MAX_S)
            return True
        failpoints.hit(self.failpoint, failpoints.STRIPE_AFTER_COMMIT)
        await flush_live_credits(self.pool, self.scripts, self.keys, work.created)
        return True

    @staticmethod
    async def _finish(conn: asyncpg.Connection, row: asyncpg.Record, outcome: Outcome) -> None:
        if outcome.status == "waiting" and row["attempts"] + 1 >= _MAX_ATTEMPTS:
            outcome = _hold(f"gave up waiting: {outcome.detail}")
        if outcome.status == "waiting":
            await conn.execute(
                """update stripe_events set status = 'waiting', attempts = attempts + 1, outcome = $2,
                          next_attempt_at = now() + make_interval(secs => least($3 * power(2, attempts), $4))
                   where id = $1""", row["id"], outcome.detail, _WAIT_BACKOFF_S, _WAIT_BACKOFF_MAX_S)
        else:
            if outcome.status == "held":
                log.warning("stripe event %s held: %s", row["id"], outcome.detail)
            await conn.execute(
                """update stripe_events set status = $2, attempts = attempts + 1, outcome = $3, processed_at = now()
                   where id = $1""", row["id"], outcome.status, outcome.detail)

    async def _handle(self, work: _Work, kind: str, created: int, facts: dict[str, Any],
                      event_id: str = "") -> Outcome:
        if kind == "payment_intent.payment_failed":
            return await self._topup_failed(work, facts, event_id)
        if kind == "invoice.payment_failed":
            return await self._invoice_failed(work, facts, event_id)
        if kind == "checkout.session.completed":
            return await self._checkout_completed(work, facts)
        if kind == "payment_intent.succeeded":
            return await self._payment_intent_succeeded(work, facts)
        if kind == "invoice.paid":
            return await self._invoice_paid(work, facts)
        if kind == "charge.refunded":
            return await self._charge_refunded(work, facts)
        if kind in ("charge.dispute.created", "charge.dispute.closed"):
            return await self._dispute(work, kind, facts)
        if kind in ("customer.subscription.updated", "customer.subscription.deleted"):
            return await self._subscription_changed(work, kind, created, facts)
        return _done("ignored: not a type we act on")

    # --- top-ups ---

    async def _topup_payment(self, work: _Work, facts: dict[str, Any]) -> asyncpg.Record | Outcome:
        """The pending top-up row our metadata names, locked; or an Outcome saying why there is none."""
        meta = facts.get("metadata") or {}
        try:
            payment_id, org_id = int(meta["rr_payment_id"]), int(meta["rr_org_id"])
        except (KeyError, ValueError):
            return _done("ignored: not a Rocket Relay top-up (no rr_payment_id)")
        payment = await work.conn.fetchrow(
            """select * from payments where id = $1 and org_id = $2 and method = 'stripe' and purpose = 'topup'
               for update""", payment_id, org_id)
        if payment is None:
            return _hold(f"no top-up {payment_id} of org {org_id}")
        customer = facts.get("customer")
        if payment["stripe_customer_id"] and customer and customer != payment["stripe_customer_id"]:
            return _hold("the event's customer is not the org's")
        return payment

    async def _credit_topup(self, work: _Work, payment: asyncpg.Record, facts: dict[str, Any],
                            payment_intent: str | None, charge: str | None) -> Outcome:
        cents = facts.get("amount_cents")
        if facts.get("currency") != "usd":
            return _hold(f"currency {facts.get('currency')!r} is not supported (USD only)")
        if not payment_intent or not cents:
            return _hold("a paid top-up without a payment intent or amount")
        amount = cents_to_micros(cents)
        result = await work.entry(payment["org_id"], "topup", amount, f"stripe:{payment_intent}",
                                  f"Stripe top-up (payment {payment['id']})")
        await work.conn.execute(
            """update payments set stripe_payment_intent_id = coalesce(stripe_payment_intent_id, $2),
                      stripe_charge_id = coalesce(stripe_charge_id, $3), updated_at = now(),
                      status = case when status = 'pending' then 'succeeded' else status end,
                      credited_micros = case when $4 then $5 else credited_micros end,
                      paid_cents = coalesce(paid_cents, $6),
                      transaction_id = coalesce(transaction_id, $7),
                      succeeded_at = coalesce(succeeded_at, now())
               where id = $1""",
            payment["id"], payment_intent, charge, result.created, amount, cents, result.transaction_id)
        if not result.created:
            return _done("already credited (same payment intent)")
        await emit(work.conn, payment["org_id"], "payment.succeeded",
                   {"payment_id": payment["id"], "method": "stripe", "credited_micros": amount,
                    "transaction_id": result.transaction_id}, dedupe_key=f"payment-{payment['id']}")
        note = "" if amount == payment["amount_micros"] else f" (checkout asked {payment['amount_micros']})"
        return _done(f"credited {amount} micros{note}")

    async def _topup_failed(self, work: _Work, facts: dict[str, Any], event_id: str) -> Outcome:
        """A card payment of a top-up failed: the payment stays pending (the customer may try again in the
        same checkout), and its billing contact is told, once per Stripe event."""
        payment = await self._topup_payment(work, facts)
        if isinstance(payment, Outcome):
            return payment
        cents = facts.get("amount_cents")
        await emit(work.conn, payment["org_id"], "payment.failed",
                   {"payment_id": payment["id"], "method": "stripe",
                    "amount_micros": cents_to_micros(cents) if cents else None, "reason": None},
                   dedupe_key=f"stripe-{event_id}")
        return _done("payment failure announced")

    async def _invoice_failed(self, work: _Work, facts: dict[str, Any], event_id: str) -> Outcome:
        subscription = facts.get("subscription")
        sub = await work.conn.fetchrow("select org_id from stripe_subscriptions where subscription_id = $1",
                                       subscription) if subscription else None
        if sub is None:
            return _done("ignored: an invoice of no known subscription")
        cents = facts.get("amount_cents")
        await emit(work.conn, sub["org_id"], "payment.failed",
                   {"payment_id": None, "method": "stripe", "invoice": facts.get("object_id"),
                    "amount_micros": cents_to_micros(cents) if cents else None, "reason": None},
                   dedupe_key=f"stripe-{event_id}")
        return _done("invoice payment failure announced")

    async def _checkout_completed(self, work: _Work, facts: dict[str, Any]) -> Outcome:
        if facts.get("mode") == "subscription":
            return await self._subscription_checkout(work, facts)
        payment = await self._topup_payment(work, facts)
        if isinstance(payment, Outcome):
            return payment
        if payment["stripe_checkout_session_id"] not in (None, facts.get("object_id")):
            return _hold("the checkout session is not the one of this top-up")
        if payment["stripe_checkout_session_id"] is None:
            await work.conn.execute("update payments set stripe_checkout_session_id = $2 where id = $1",
                                    payment["id"], facts.get("object_id"))
        if facts.get("payment_status") != "paid":
            return _done("checkout completed, payment not yet paid (payment_intent.succeeded will credit it)")
        return await self._credit_topup(work, payment, facts, facts.get("payment_intent"), None)

    async def _payment_intent_succeeded(self, work: _Work, facts: dict[str, Any]) -> Outcome:
        payment = await self._topup_payment(work, facts)
        if isinstance(payment, Outcome):
            return payment
        return await self._credit_topup(work, payment, facts, facts.get("object_id"), facts.get("charge"))

    # --- subscriptions ---

    async def _org_of_customer(self, work: _Work, customer: str | None) -> int | None:
        if not customer:
            return None
        return await work.conn.fetchval("select org_id from stripe_customers where customer_id = $1", customer)

    async def _subscription_checkout(self, work: _Work, facts: dict[str, Any]) -> Outcome:
        meta = facts.get("metadata") or {}
        subscription = facts.get("subscription")
        try:
            org_id, plan_id = int(meta["rr_org_id"]), int(meta["rr_plan_id"])
        except (KeyError, ValueError):
            return _done("ignored: not a Rocket Relay subscription checkout")
        if not subscription:
            return _hold("a subscription checkout without a subscription id")
        customer_org = await self._org_of_customer(work, facts.get("customer"))
        if customer_org is not None and customer_org != org_id:
            return _hold("the event's customer is not the org's")
        status = await work.conn.execute(
            """insert into stripe_subscriptions as s (subscription_id, org_id, plan_id, status, checkout_session_id)
               values ($1, $2, (select id from billing_plans where id = $3), 'active', $4)
               on conflict (subscription_id) do update
               set checkout_session_id = coalesce(s.checkout_session_id, excluded.checkout_session_id),
                   plan_id = coalesce(s.plan_id, excluded.plan_id)
               where s.checkout_session_id is null""",
            subscription, org_id, plan_id, facts.get("object_id"))
        work.effect = True
        return _done("subscription recorded" if status.endswith("1") else "subscription already known")

    async def _subscription_of(self, work: _Work, subscription: str, facts: dict[str, Any]) -> asyncpg.Record | None:
        """The subscription row (locked), created from our metadata on the event (org and plan) if it is not
        known yet; None while neither the event nor an earlier one says which org and plan it is."""
        row = await work.conn.fetchrow("select * from stripe_subscriptions where subscription_id = $1 for update",
                                       subscription)
        if row is not None:
            return row
        meta = facts.get("metadata") or {}
        org_id = None
        if "rr_org_id" in meta and meta["rr_org_id"].isdigit():
            org_id = int(meta["rr_org_id"])
        org_id = org_id or await self._org_of_customer(work, facts.get("customer"))
        plan = int(meta["rr_plan_id"]) if meta.get("rr_plan_id", "").isdigit() else None
        if org_id is None or plan is None or not await work.conn.fetchval("select 1 from orgs where id = $1", org_id):
            return None
        await work.conn.execute(
            """insert into stripe_subscriptions (subscription_id, org_id, plan_id, status)
               values ($1, $2, (select id from billing_plans where id = $3), 'active')""", subscription, org_id, plan)
        work.effect = True
        return await work.conn.fetchrow("select * from stripe_subscriptions where subscription_id = $1 for update",
                                        subscription)

    async def _invoice_paid(self, work: _Work, facts: dict[str, Any]) -> Outcome:
        invoice, subscription = facts.get("object_id"), facts.get("subscription")
        if not subscription:
            return _done("ignored: an invoice of no subscription")
        if facts.get("currency") != "usd":
            return _hold(f"currency {facts.get('currency')!r} is not supported (USD only)")
        sub = await self._subscription_of(work, subscription, facts)
        if sub is None:
            return _wait("subscription not known yet")
        customer_org = await self._org_of_customer(work, facts.get("customer"))
        if customer_org is not None and customer_org != sub["org_id"]:
            return _hold("the invoice's customer is not the subscription's org")
        plan = await work.conn.fetchrow("select id, name, monthly_allowance_micros from billing_plans where id = $1",
                                        sub["plan_id"]) if sub["plan_id"] else None
        if plan is None:
            return _hold("the subscription has no plan")
        allowance = plan["monthly_allowance_micros"]
        result = await work.entry(sub["org_id"], "topup", allowance, f"stripe:{invoice}",
                                  f"Plan {plan['name']}: monthly allowance")
        if not result.created:
            return _done("already credited (same invoice)")
        payment_id = await work.conn.fetchval(
            """insert into payments (org_id, method, purpose, status, amount_micros, credited_micros, paid_cents,
                                     currency, transaction_id, stripe_customer_id, stripe_invoice_id,
                                     stripe_payment_intent_id, stripe_charge_id, stripe_subscription_id, plan_id,
                                     succeeded_at)
               values ($1, 'stripe', 'subscription', 'succeeded', $2, $3, $4, 'usd', $5, $6, $7, $8, $9, $10, $11,
                       now())
               on conflict (stripe_invoice_id) do nothing returning id""",
            sub["org_id"], cents_to_micros(facts.get("amount_cents") or 0), allowance, facts.get("amount_cents") or 0,
            result.transaction_id, facts.get("customer"), invoice, facts.get("payment_intent"), facts.get("charge"),
            subscription, plan["id"])
        await emit(work.conn, sub["org_id"], "payment.succeeded",
                   {"payment_id": payment_id, "method": "stripe", "credited_micros": allowance,
                    "transaction_id": result.transaction_id}, dedupe_key=f"invoice-{invoice}")
        return _done(f"credited the monthly allowance, {allowance} micros")

    async def _subscription_changed(self, work: _Work, kind: str, created: int, facts: dict[str, Any]) -> Outcome:
        subscription = facts.get("object_id")
        status = "canceled" if kind.endswith(".deleted") else (facts.get("status") or "unknown")
        sub = await self._subscription_of(work, subscription, facts)
        if sub is None:
            return _wait("subscription's org not known yet")
        if sub["status"] == "canceled":
            return _done("already canceled (final)")
        if created < sub["event_created"] and status != "canceled":  # a deletion is final whenever it arrives
            return _done("older than the state applied")
        await work.conn.execute(
            """update stripe_subscriptions set status = $2, event_created = greatest(event_created, $3),
                      updated_at = now()
               where subscription_id = $1""", subscription, status, created)
        return _done(f"subscription {status}")

    # --- money back: refunds and disputes ---

    async def _charged_payment(self, work: _Work, facts: dict[str, Any]) -> asyncpg.Record | None:
        charge, intent = facts.get("charge"), facts.get("payment_intent")
        if not charge and not intent:
            return None
        return await work.conn.fetchrow(
            """select * from payments where method = 'stripe' and credited_micros > 0
                 and ((stripe_charge_id = $1 and $1 is not null) or (stripe_payment_intent_id = $2 and $2 is not null))
               order by id limit 1 for update""", charge, intent)

    async def _charge_refunded(self, work: _Work, facts: dict[str, Any]) -> Outcome:
        payment = await self._charged_payment(work, facts)
        if payment is None:
            return _wait("the refunded payment is not credited yet")
        level = facts.get("refunded_cents") or 0
        if level <= payment["refunded_cents"]:
            return _done("refund already applied")
        whole = payment["paid_cents"] or facts.get("amount_cents") or 0
        debit = _share(payment["credited_micros"], level, whole) - _share(payment["credited_micros"],
                                                                          payment["refunded_cents"], whole)
        key = facts.get("charge") or facts.get("payment_intent")
        if debit:
            await work.entry(payment["org_id"], "payment_reversal", -debit, f"stripe:refund:{key}:{level}",
                             f"Stripe refund (payment {payment['id']})")
        await work.conn.execute(
            """update payments set refunded_cents = $2, reversed_micros = reversed_micros + $3,
                      stripe_charge_id = coalesce(stripe_charge_id, $4), updated_at = now(),
                      status = case when status = 'disputed' then status
                                    when $2::bigint >= $5::bigint then 'refunded' else 'partially_refunded' end
               where id = $1""", payment["id"], level, debit, facts.get("charge"), whole)
        return _done(f"refund debited {debit} micros")

    async def _dispute(self, work: _Work, kind: str, facts: dict[str, Any]) -> Outcome:
        payment = await self._charged_payment(work, facts)
        if payment is None:
            return _wait("the disputed payment is not credited yet")
        dispute = facts.get("object_id")
        whole = payment["paid_cents"] or facts.get("amount_cents") or 0
        debit = _share(payment["credited_micros"], facts.get("amount_cents") or 0, whole)
        # Opening debits; a close applies the opening too (it may be the first we hear of the dispute).
        opened = await work.entry(payment["org_id"], "payment_reversal", -debit, f"stripe:dispute:{dispute}",
                                  f"Stripe dispute (payment {payment['id']})")
        debited = -await work.conn.fetchval("select amount_micros from balance_transactions where id = $1",
                                            opened.transaction_id)
        if opened.created:
            await work.conn.execute(
                """update payments set reversed_micros = reversed_micros + $2, status = 'disputed', updated_at = now()
                   where id = $1""", payment["id"], debited)
        if kind == "charge.dispute.created":
            return _done(f"dispute debited {debited} micros" if opened.created else "dispute already applied")
        if facts.get("status") not in ("won", "warning_closed"):
            return _done(f"dispute closed ({facts.get('status')}): the debit stands")
        back = await work.entry(payment["org_id"], "payment_reversal", debited, f"stripe:dispute:{dispute}:reinstated",
                                f"Stripe dispute won (payment {payment['id']})")
        if not back.created:
            return _done("dispute reinstatement already applied")
        await work.conn.execute(
            """update payments set reversed_micros = reversed_micros - $2, updated_at = now(),
                      status = case when refunded_cents = 0 then 'succeeded'
                                    when refunded_cents >= coalesce(paid_cents, 0) then 'refunded'
                                    else 'partially_refunded' end
               where id = $1""", payment["id"], debited)
        return _done(f"dispute won: {debited} micros credited back")

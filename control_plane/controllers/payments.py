"""Money in, for an org: Stripe Checkout top-ups and plan subscriptions, crypto top-up claims, the payments
list and receipts; and the public list of plans.

A Checkout top-up is a `payments` row (pending) before Stripe is called, so the session's metadata can name
it; the webhook (`control_plane.controllers.webhooks`) credits it once paid. A crypto claim is checked
(formats and checksums per network, `shared.payments.networks`), its hash must be new across all orgs, and
it waits for a platform admin's review (`admin_payments`). Every step is in the audit log.
"""

from __future__ import annotations

import datetime
import secrets
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Controller, get, post
from litestar.params import JSONBody, Parameter

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, IdParam, LimitParam, NonNegMicros, PositiveId
from control_plane.errors import BadGateway, Conflict, Invalid, NotFound, ServiceUnavailable
from control_plane.permissions import require
from control_plane.state import MAX_ID, ControlPlane
from shared.payments.ledger import NotWholeCents, micros_to_cents
from shared.payments.networks import NETWORKS, InvalidTransfer, validate_transfer
from shared.payments.stripe_account import (
    StripeNotConfigured,
    StripeUnavailable,
    create_checkout_session,
    load_stripe_config,
    stripe_client,
)

__all__ = ["PAYMENT_COLUMNS", "Payment", "PaymentsController", "PlansController", "payment_view"]

PAYMENT_COLUMNS = """id, org_id, method, purpose, status, amount_micros, credited_micros, reversed_micros, currency,
    created_at, succeeded_at, stripe_checkout_session_id, stripe_payment_intent_id, stripe_charge_id,
    stripe_invoice_id, stripe_subscription_id, plan_id, crypto_network, crypto_tx_hash, crypto_sender_address,
    chain_check, review_reason, reviewed_at, transaction_id"""
RECEIPT_STATUSES = ("succeeded", "refunded", "partially_refunded", "disputed", "approved")

# The exact formats (hex digits, base58/bech32 alphabets, checksums) are checked per network by
# `validate_transfer`, which names the field that is wrong.
TxHash = Annotated[str, msgspec.Meta(min_length=1, max_length=100, description="64 hex digits (EVM: with 0x)")]
Address = Annotated[str, msgspec.Meta(min_length=1, max_length=100, description="The sending address")]
NetworkName = Literal[tuple(NETWORKS)]  # type: ignore[valid-type]


class Payment(msgspec.Struct, frozen=True):
    id: int
    org_id: int
    method: str  # "stripe" or "crypto"
    purpose: str  # "topup" or "subscription" (a paid plan invoice)
    # stripe: pending, succeeded, partially_refunded, refunded, disputed, failed; crypto: pending, approved, rejected
    status: str
    amount_micros: int  # asked (checkout), paid (invoice) or claimed (crypto)
    credited_micros: int  # what the balance was credited
    reversed_micros: int  # debited again by refunds and lost disputes
    currency: str
    created_at: datetime.datetime
    succeeded_at: datetime.datetime | None
    stripe_checkout_session_id: str | None
    stripe_payment_intent_id: str | None
    stripe_charge_id: str | None
    stripe_invoice_id: str | None
    stripe_subscription_id: str | None
    plan_id: int | None
    crypto_network: str | None
    crypto_tx_hash: str | None
    crypto_sender_address: str | None
    chain_check: str | None  # what a chain verifier found ("unverified": none is configured)
    review_reason: str | None  # the reviewer's note or rejection reason
    reviewed_at: datetime.datetime | None
    transaction_id: int | None  # the ledger row that credited it


def payment_view(row: asyncpg.Record) -> Payment:
    return Payment(**dict(row))


class PaymentPage(msgspec.Struct, frozen=True):
    data: list[Payment]
    next_before_id: int | None


class TopupRequest(msgspec.Struct, frozen=True):
    amount_micros: NonNegMicros  # whole cents, within the platform's bounds


class SubscribeRequest(msgspec.Struct, frozen=True):
    plan_id: PositiveId


class CheckoutStarted(msgspec.Struct, frozen=True):
    checkout_session_id: str
    url: str | None  # send the customer here (Stripe's hosted page)
    payment_id: int | None  # the top-up's payment row (None for a subscription: each paid invoice gets one)


class CryptoClaim(msgspec.Struct, frozen=True):
    network: NetworkName
    tx_hash: TxHash
    sender_address: Address
    amount_micros: NonNegMicros  # the USD value claimed; the reviewer credits what the chain shows


class Plan(msgspec.Struct, frozen=True):
    id: int
    name: str
    price_cents: int
    monthly_allowance_micros: int
    active: bool


class Subscription(msgspec.Struct, frozen=True):
    subscription_id: str
    plan_id: int | None
    plan_name: str | None
    status: str
    updated_at: datetime.datetime


class Receipt(msgspec.Struct, frozen=True):
    receipt_number: str
    issued_at: datetime.datetime
    org_name: str
    org_code: str
    billing_email: str | None
    payment: Payment
    description: str
    paid_micros: int  # what was paid (Stripe) or approved (crypto), in USD micro-units
    net_credited_micros: int  # credited minus refunds and lost disputes


def _return_url(cp: ControlPlane, outcome: str, payment_id: int | None) -> str:
    base = cp.settings.checkout_return_url
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}checkout={outcome}" + (f"&payment={payment_id}" if payment_id else "")


async def _stripe(cp: ControlPlane):
    try:
        return stripe_client(await load_stripe_config(cp.pool, cp.box), cp.stripe_http)
    except StripeNotConfigured:
        raise ServiceUnavailable("Payments by card are not available: Stripe is not configured.",
                                 code="stripe_not_configured") from None


class PlansController(Controller):
    path = "/v1/plans"
    dependencies = DEPENDENCIES
    tags = ("billing",)

    @get("/", guards=[require("catalogue.read")])
    async def list_plans(self, cp: CP) -> list[Plan]:
        """The subscription plans on offer: a monthly price, and the allowance each paid month credits."""
        rows = await cp.pool.fetch("""select id, name, price_cents, monthly_allowance_micros, active
                                      from billing_plans where active order by price_cents, id""")
        return [Plan(**dict(r)) for r in rows]


class PaymentsController(Controller):
    path = "/v1/orgs/{org_id:int}"
    dependencies = DEPENDENCIES
    tags = ("billing",)

    @get("/payments", guards=[require("billing.read")])
    async def list_payments(self, cp: CP, org_id: IdParam,
                            before_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                            limit: LimitParam = 50) -> PaymentPage:
        """The org's payments, newest first: Stripe top-ups and plan invoices, crypto claims."""
        rows = await cp.pool.fetch(
            f"""select {PAYMENT_COLUMNS} from payments where org_id = $1 and ($2::bigint is null or id < $2)
                order by id desc limit $3""", org_id, before_id, limit + 1)
        data = [payment_view(r) for r in rows[:limit]]
        return PaymentPage(data, data[-1].id if len(rows) > limit else None)

    @get("/payments/{payment_id:int}", guards=[require("billing.read")])
    async def get_payment(self, cp: CP, org_id: IdParam, payment_id: IdParam) -> Payment:
        row = await cp.pool.fetchrow(f"select {PAYMENT_COLUMNS} from payments where id = $1 and org_id = $2",
                                     payment_id, org_id)
        if row is None:
            raise NotFound("No such payment.")
        return payment_view(row)

    @get("/payments/{payment_id:int}/receipt", guards=[require("receipts.read")], opt={"errors": (409,)})
    async def get_receipt(self, cp: CP, org_id: IdParam, payment_id: IdParam) -> Receipt:
        """A receipt for a completed payment (409 while it is pending, rejected or failed)."""
        row = await cp.pool.fetchrow(f"select {PAYMENT_COLUMNS} from payments where id = $1 and org_id = $2",
                                     payment_id, org_id)
        if row is None:
            raise NotFound("No such payment.")
        if row["status"] not in RECEIPT_STATUSES:
            raise Conflict(f"There is no receipt for a {row['status']} payment.", code="no_receipt")
        org = await cp.pool.fetchrow("select name, code, billing_email from orgs where id = $1", org_id)
        payment = payment_view(row)
        if payment.method == "crypto":
            description = f"Crypto top-up, {payment.crypto_network} transaction {payment.crypto_tx_hash}"
            paid = payment.credited_micros
        elif payment.purpose == "subscription":
            plan = await cp.pool.fetchval("select name from billing_plans where id = $1", payment.plan_id)
            description = f"Plan {plan or payment.plan_id}: monthly subscription (invoice {payment.stripe_invoice_id})"
            paid = payment.amount_micros
        else:
            description = f"Card top-up (Stripe payment {payment.stripe_payment_intent_id})"
            paid = payment.credited_micros
        return Receipt(f"RR-{org['code']}-{payment.id:06d}", payment.succeeded_at or payment.created_at, org["name"],
                       org["code"], org["billing_email"], payment, description, paid,
                       payment.credited_micros - payment.reversed_micros)

    @post("/payments/stripe-checkout", guards=[require("payments.create")], status_code=201,
          opt={"errors": (502, 503)})
    async def start_stripe_topup(self, cp: CP, principal: Caller, org_id: IdParam,
                                 data: JSONBody[TopupRequest]) -> CheckoutStarted:
        """Start a card top-up: a Stripe Checkout session for `amount_micros` (whole cents, within the
        platform's bounds). The balance is credited when Stripe reports the payment, exactly once."""
        settings = cp.settings
        if not settings.topup_min_micros <= data.amount_micros <= settings.topup_max_micros:
            raise Invalid(f"amount_micros must lie between {settings.topup_min_micros} and "
                          f"{settings.topup_max_micros}.", code="amount_out_of_bounds")
        try:
            cents = micros_to_cents(data.amount_micros)
        except NotWholeCents:
            raise Invalid("amount_micros must be a whole number of cents (a multiple of 10000).",
                          code="amount_not_whole_cents") from None
        client = await _stripe(cp)
        org = await cp.pool.fetchrow("select code from orgs where id = $1", org_id)
        async with cp.pool.acquire() as conn, conn.transaction():
            payment_id = await conn.fetchval(
                """insert into payments (org_id, method, purpose, status, amount_micros, created_by)
                   values ($1, 'stripe', 'topup', 'pending', $2, $3) returning id""",
                org_id, data.amount_micros, principal.user_id)
            await audit.record(conn, principal, "payment.checkout", "payment", payment_id, org_id=org_id,
                               after={"method": "stripe", "amount_micros": data.amount_micros})
        meta = {"rr_org_id": str(org_id), "rr_payment_id": str(payment_id)}
        params = {
            "mode": "payment", "client_reference_id": str(org_id), "metadata": meta,
            "payment_intent_data": {"metadata": meta},
            "line_items": [{"quantity": 1, "price_data": {
                "currency": "usd", "unit_amount": cents, "product_data": {"name": "Rocket Relay credit"}}}],
            "success_url": _return_url(cp, "success", payment_id), "cancel_url": _return_url(cp, "cancel", payment_id),
        }
        try:
            session = await create_checkout_session(cp.pool, client, org_id=org_id, org_code=org["code"],
                                                    idempotency_key=f"rr-checkout-{payment_id}", params=params)
        except StripeUnavailable as exc:
            await cp.pool.execute("update payments set status = 'failed', updated_at = now() where id = $1",
                                  payment_id)
            raise BadGateway(str(exc)) from None
        await cp.pool.execute(
            """update payments set stripe_checkout_session_id = $2, stripe_customer_id = $3, updated_at = now()
               where id = $1""", payment_id, session.id, session.customer_id)
        return CheckoutStarted(session.id, session.url, payment_id)

    @post("/subscriptions", guards=[require("payments.create")], status_code=201, opt={"errors": (502, 503)})
    async def start_subscription(self, cp: CP, principal: Caller, org_id: IdParam,
                                 data: JSONBody[SubscribeRequest]) -> CheckoutStarted:
        """Subscribe to a plan through Stripe Checkout; each paid monthly invoice credits the plan's allowance."""
        plan = await cp.pool.fetchrow("select id, name, price_cents from billing_plans where id = $1 and active",
                                      data.plan_id)
        if plan is None:
            raise Invalid("No such plan on offer.", code="unknown_plan")
        client = await _stripe(cp)
        org = await cp.pool.fetchrow("select code from orgs where id = $1", org_id)
        meta = {"rr_org_id": str(org_id), "rr_plan_id": str(plan["id"])}
        params = {
            "mode": "subscription", "client_reference_id": str(org_id), "metadata": meta,
            "subscription_data": {"metadata": meta},
            "line_items": [{"quantity": 1, "price_data": {
                "currency": "usd", "unit_amount": plan["price_cents"], "recurring": {"interval": "month"},
                "product_data": {"name": f"Rocket Relay plan {plan['name']}"}}}],
            "success_url": _return_url(cp, "success", None), "cancel_url": _return_url(cp, "cancel", None),
        }
        # Each call is a new session (the key only makes the client's own network retries safe).
        key = f"rr-subscribe-{org_id}-{secrets.token_hex(8)}"
        try:
            session = await create_checkout_session(cp.pool, client, org_id=org_id, org_code=org["code"],
                                                    idempotency_key=key, params=params)
        except StripeUnavailable as exc:
            raise BadGateway(str(exc)) from None
        await audit.record(cp.pool, principal, "subscription.checkout", "plan", plan["id"], org_id=org_id,
                           after={"plan_id": plan["id"], "checkout_session_id": session.id})
        return CheckoutStarted(session.id, session.url, None)

    @get("/subscriptions", guards=[require("billing.read")])
    async def list_subscriptions(self, cp: CP, org_id: IdParam) -> list[Subscription]:
        rows = await cp.pool.fetch(
            """select s.subscription_id, s.plan_id, p.name as plan_name, s.status, s.updated_at
               from stripe_subscriptions s left join billing_plans p on p.id = s.plan_id
               where s.org_id = $1 order by s.updated_at desc""", org_id)
        return [Subscription(**dict(r)) for r in rows]

    @post("/payments/crypto", guards=[require("payments.create")], status_code=201, opt={"errors": (409,)})
    async def claim_crypto_topup(self, cp: CP, principal: Caller, org_id: IdParam,
                                 data: JSONBody[CryptoClaim]) -> Payment:
        """Claim a crypto transfer to the platform's address. Formats are checked per network; a transaction
        hash can be claimed once across all orgs. A platform admin reviews it; the org sees the status here."""
        settings = cp.settings
        if not 1 <= data.amount_micros <= settings.topup_max_micros:
            raise Invalid(f"amount_micros must lie between 1 and {settings.topup_max_micros}.",
                          code="amount_out_of_bounds")
        try:
            transfer = validate_transfer(data.network, data.tx_hash, data.sender_address)
        except InvalidTransfer as exc:
            raise Invalid(str(exc), code=f"invalid_{exc.field}") from None
        check = await cp.chain_verifier.check(transfer, data.amount_micros)
        try:
            async with cp.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""insert into payments (org_id, method, purpose, status, amount_micros, crypto_network,
                                              crypto_tx_hash, crypto_sender_address, chain_check, created_by)
                        values ($1, 'crypto', 'topup', 'pending', $2, $3, $4, $5, $6, $7)
                        returning {PAYMENT_COLUMNS}""",
                    org_id, data.amount_micros, transfer.network, transfer.tx_hash, transfer.sender_address,
                    check.status, principal.user_id)
                await audit.record(conn, principal, "crypto_payment.submit", "payment", row["id"], org_id=org_id,
                                   after={"network": transfer.network, "tx_hash": transfer.tx_hash,
                                          "sender_address": transfer.sender_address,
                                          "amount_micros": data.amount_micros})
        except asyncpg.UniqueViolationError:
            raise Conflict("This transaction hash has already been submitted.", code="tx_hash_taken") from None
        return payment_view(row)

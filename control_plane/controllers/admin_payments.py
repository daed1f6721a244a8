"""Platform admin of money in: the Stripe settings (secrets masked), plans, the payments of all orgs,
the review of crypto claims (approve with the credited amount, or reject with a reason), and the Stripe
events that could not be applied.

Approving credits the ledger in the same transaction that marks the claim approved, keyed by the
transaction hash: a second approval (or an approval after a rejection) finds the claim no longer pending
and changes nothing. Every change is in the audit log.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Annotated, Literal

import msgspec
from litestar import Controller, get, patch, post
from litestar.params import FromQuery, JSONBody, Parameter
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, IdParam, LimitParam, mask_secret, set_fields
from control_plane.controllers.payments import PAYMENT_COLUMNS, Payment, Plan, payment_view
from control_plane.errors import Conflict, Invalid, NotFound
from control_plane.permissions import require
from control_plane.state import MAX_ID, ControlPlane
from shared.notify.events import emit
from shared.payments.ledger import flush_live_credits, ledger_entry
from shared.payments.stripe_account import load_stripe_config, save_stripe_config

__all__ = ["AdminPaymentsController"]

StripeSecretKey = Annotated[str, msgspec.Meta(min_length=8, max_length=255, pattern=r"^(sk|rk)_[A-Za-z0-9_]+$(?!\n)")]
WebhookSecret = Annotated[str, msgspec.Meta(min_length=8, max_length=255, pattern=r"^whsec_[A-Za-z0-9_]+$(?!\n)")]
ApiBase = Annotated[str, msgspec.Meta(min_length=8, max_length=200, pattern=r"^https?://[\x21-\x7e]+$(?!\n)")]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
PlanName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class StripeSettings(msgspec.Struct, frozen=True):
    secret_key: str | None  # masked (`sk_…abcd`), never in full
    webhook_secret: str | None  # masked
    api_base: str | None  # None: Stripe's own API
    origin: str  # "admin", or "dev" when `make run` configured its local Stripe
    webhook_tolerance_s: int


class StripeSettingsUpdate(msgspec.Struct, frozen=True):
    secret_key: StripeSecretKey | UnsetType | None = UNSET
    webhook_secret: WebhookSecret | UnsetType | None = UNSET
    api_base: ApiBase | UnsetType | None = UNSET


class PlanCreate(msgspec.Struct, frozen=True):
    name: PlanName
    price_cents: Annotated[int, msgspec.Meta(ge=50, le=100_000_000)]
    monthly_allowance_micros: Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]


class PlanUpdate(msgspec.Struct, frozen=True):
    active: bool | UnsetType = UNSET
    name: PlanName | UnsetType = UNSET


class AdminPaymentPage(msgspec.Struct, frozen=True):
    data: list[Payment]
    next_after_id: int | None


class Approval(msgspec.Struct, frozen=True):
    amount_micros: Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]  # what the chain shows arrived, in USD micros
    note: Reason | None = None


class Rejection(msgspec.Struct, frozen=True):
    reason: Reason


class StripeEvent(msgspec.Struct, frozen=True):
    id: str
    type: str
    status: str
    attempts: int
    outcome: str | None
    received_at: datetime.datetime
    processed_at: datetime.datetime | None


def _fingerprint(value: str | None) -> str | None:
    """What the audit log may record of a secret: that it changed (values are redacted anyway)."""
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()[:12]


async def _settings_view(cp: ControlPlane) -> StripeSettings:
    config = await load_stripe_config(cp.pool, cp.box)
    return StripeSettings(mask_secret(config.secret_key) if config.secret_key else None,
                          mask_secret(config.webhook_secret) if config.webhook_secret else None,
                          config.api_base, config.origin, cp.settings.stripe_webhook_tolerance_s)


class AdminPaymentsController(Controller):
    path = "/v1/admin"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    @get("/stripe", guards=[require("platform.stripe.read")])
    async def get_stripe(self, cp: CP) -> StripeSettings:
        return await _settings_view(cp)

    @patch("/stripe", guards=[require("platform.stripe.manage")])
    async def update_stripe(self, cp: CP, principal: Caller, data: JSONBody[StripeSettingsUpdate]) -> StripeSettings:
        """Set the Stripe secret key, the webhook signing secret (`whsec_…`) and the API base (null: Stripe's).
        Secrets are stored envelope-encrypted and shown masked from then on."""
        fields = set_fields(data)
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await load_stripe_config(conn, cp.box)
            if "api_base" in fields and fields["api_base"] != before.api_base and before.secret_key \
                    and "secret_key" not in fields:
                # The client sends the secret key to the API base: moving it must not hand a stored key
                # (which nobody can read back) to another server.
                raise Invalid("Changing api_base needs the secret_key in the same request.",
                              code="secret_key_required")
            await save_stripe_config(conn, cp.box, **fields)
            await audit.record(
                conn, principal, "stripe.settings.update", "stripe_config", None, org_id=None,
                before={"secret_key": _fingerprint(before.secret_key),
                        "webhook_secret": _fingerprint(before.webhook_secret), "api_base": before.api_base},
                after={"secret_key": _fingerprint(fields.get("secret_key", before.secret_key)),
                       "webhook_secret": _fingerprint(fields.get("webhook_secret", before.webhook_secret)),
                       "api_base": fields.get("api_base", before.api_base)})
        return await _settings_view(cp)

    @get("/plans", guards=[require("platform.stripe.read")])
    async def list_plans(self, cp: CP) -> list[Plan]:
        rows = await cp.pool.fetch("select id, name, price_cents, monthly_allowance_micros, active from billing_plans "
                                   "order by id")
        return [Plan(**dict(r)) for r in rows]

    @post("/plans", guards=[require("platform.plans.manage")], opt={"errors": (409,)})
    async def create_plan(self, cp: CP, principal: Caller, data: JSONBody[PlanCreate]) -> Plan:
        """A subscription plan: its monthly price in cents and the allowance each paid invoice credits."""
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """insert into billing_plans (name, price_cents, monthly_allowance_micros) values ($1, $2, $3)
                   returning id, name, price_cents, monthly_allowance_micros, active""",
                data.name, data.price_cents, data.monthly_allowance_micros)
            await audit.record(conn, principal, "plan.create", "plan", row["id"], org_id=None, after=dict(row))
        return Plan(**dict(row))

    @patch("/plans/{plan_id:int}", guards=[require("platform.plans.manage")], opt={"errors": (409,)})
    async def update_plan(self, cp: CP, principal: Caller, plan_id: IdParam, data: JSONBody[PlanUpdate]) -> Plan:
        """Rename a plan or stop offering it (existing subscriptions keep their plan)."""
        fields = set_fields(data)
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("select id, name, price_cents, monthly_allowance_micros, active "
                                         "from billing_plans where id = $1 for update", plan_id)
            if before is None:
                raise NotFound("No such plan.")
            after = before
            if fields:
                sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
                after = await conn.fetchrow(f"""update billing_plans set {sets} where id = $1
                                                returning id, name, price_cents, monthly_allowance_micros, active""",
                                            plan_id, *fields.values())
                await audit.record(conn, principal, "plan.update", "plan", plan_id, org_id=None,
                                   before={k: before[k] for k in fields}, after={k: after[k] for k in fields})
        return Plan(**dict(after))

    @get("/payments", guards=[require("platform.payments.read")])
    async def list_payments(self, cp: CP, status: FromQuery[Literal[
                                "pending", "succeeded", "refunded", "partially_refunded", "disputed", "approved",
                                "rejected", "failed"] | None] = None,
                            method: FromQuery[Literal["stripe", "crypto"] | None] = None,
                            org_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                            after_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                            limit: LimitParam = 50) -> AdminPaymentPage:
        """Payments of all orgs, oldest first (`?method=crypto&status=pending` is the review queue)."""
        rows = await cp.pool.fetch(
            f"""select {PAYMENT_COLUMNS} from payments
                where ($1::text is null or status = $1) and ($2::text is null or method = $2)
                  and ($3::bigint is null or org_id = $3) and ($4::bigint is null or id > $4)
                order by id limit $5""", status, method, org_id, after_id, limit + 1)
        data = [payment_view(r) for r in rows[:limit]]
        return AdminPaymentPage(data, data[-1].id if len(rows) > limit else None)

    @post("/payments/{payment_id:int}/approve", guards=[require("platform.payments.review")], status_code=200,
          opt={"errors": (409,)})
    async def approve_crypto(self, cp: CP, principal: Caller, payment_id: IdParam,
                             data: JSONBody[Approval]) -> Payment:
        """Approve a pending crypto claim, crediting `amount_micros` (what arrived) to its org, exactly once."""
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("select * from payments where id = $1 and method = 'crypto' for update",
                                      payment_id)
            if row is None:
                raise NotFound("No such crypto payment.")
            if row["status"] != "pending":
                raise Conflict(f"This payment was already reviewed ({row['status']}).", code="already_reviewed")
            result = await ledger_entry(conn, row["org_id"], "topup", data.amount_micros,
                                        f"crypto:{row['crypto_tx_hash']}",
                                        f"Crypto top-up ({row['crypto_network']}), payment {payment_id}",
                                        actor_user_id=principal.user_id)
            after = await conn.fetchrow(
                f"""update payments set status = 'approved', credited_micros = $2, transaction_id = $3,
                           reviewer_user_id = $4, reviewed_at = now(), review_reason = $5, succeeded_at = now(),
                           updated_at = now()
                    where id = $1 returning {PAYMENT_COLUMNS}""",
                payment_id, data.amount_micros, result.transaction_id, principal.user_id, data.note)
            await audit.record(conn, principal, "crypto_payment.approve", "payment", payment_id, org_id=row["org_id"],
                               before={"status": "pending", "credited_micros": 0},
                               after={"status": "approved", "credited_micros": data.amount_micros,
                                      "review_reason": data.note, "transaction_id": result.transaction_id})
            await emit(conn, row["org_id"], "payment.succeeded",
                       {"payment_id": payment_id, "method": "crypto", "credited_micros": data.amount_micros,
                        "transaction_id": result.transaction_id}, dedupe_key=f"payment-{payment_id}")
        await flush_live_credits(cp.pool, cp.scripts, cp.keys, [result.transaction_id] if result.created else [])
        return payment_view(after)

    @post("/payments/{payment_id:int}/reject", guards=[require("platform.payments.review")], status_code=200,
          opt={"errors": (409,)})
    async def reject_crypto(self, cp: CP, principal: Caller, payment_id: IdParam, data: JSONBody[Rejection]) -> Payment:
        """Reject a pending crypto claim with a reason the org sees. Final: it can't be approved afterwards,
        and its hash stays taken."""
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("select status, org_id from payments where id = $1 and method = 'crypto' "
                                      "for update", payment_id)
            if row is None:
                raise NotFound("No such crypto payment.")
            if row["status"] != "pending":
                raise Conflict(f"This payment was already reviewed ({row['status']}).", code="already_reviewed")
            after = await conn.fetchrow(
                f"""update payments set status = 'rejected', reviewer_user_id = $2, reviewed_at = now(),
                           review_reason = $3, updated_at = now()
                    where id = $1 returning {PAYMENT_COLUMNS}""", payment_id, principal.user_id, data.reason)
            await audit.record(conn, principal, "crypto_payment.reject", "payment", payment_id, org_id=row["org_id"],
                               before={"status": "pending"}, after={"status": "rejected", "review_reason": data.reason})
            await emit(conn, row["org_id"], "payment.failed",
                       {"payment_id": payment_id, "method": "crypto", "amount_micros": after["amount_micros"],
                        "reason": data.reason}, dedupe_key=f"payment-{payment_id}")
        return payment_view(after)

    @get("/stripe-events", guards=[require("platform.payments.read")])
    async def list_stripe_events(self, cp: CP, status: FromQuery[Literal[
                                     "pending", "waiting", "processed", "held"] | None] = "held",
                                 limit: LimitParam = 50) -> list[StripeEvent]:
        """Stripe events by status, newest first: `held` (the default) are those that could not be applied."""
        rows = await cp.pool.fetch(
            """select id, type, status, attempts, outcome, received_at, processed_at from stripe_events
               where ($1::text is null or status = $1) order by received_at desc limit $2""", status, limit)
        return [StripeEvent(**dict(r)) for r in rows]


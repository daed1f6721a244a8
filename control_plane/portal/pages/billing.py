"""Billing: balance, top-up by Stripe Checkout, crypto claims and their review status, payments,
transactions and the subscription.

The Checkout redirect goes to another origin, which the CSP's `form-action 'self'` forbids for a form's
own navigation; so the form is posted by htmx, whose `HX-Redirect` answer moves the page by script. Without
script the answer is a page with a link to the checkout.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.payments import (
    CryptoClaim,
    PaymentsController,
    PlansController,
    SubscribeRequest,
    TopupRequest,
)
from control_plane.controllers.usage import UsageController
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call, permitted
from control_plane.portal.forms import FormErrors, FormInvalid, decode_form, form_values, usd_to_micros
from control_plane.portal.render import flash, page, redirect
from control_plane.portal.security import SECURITY_HEADERS
from shared.payments.networks import NETWORKS

__all__ = ["BillingPages"]

PageId = Annotated[int | None, Parameter(ge=1, le=2**53 - 1)]


class BillingPages(Controller):
    path = "/portal/orgs/{org_id:int}/billing"

    async def _page(self, request: Request, org_id: int, *, payments_before: int | None = None,
                    transactions_before: int | None = None, status_code: int = 200, **context) -> Template:
        principal = request.state.principal
        balance = await call(request, UsageController.balance, org_id=org_id)
        payments = await call(request, PaymentsController.list_payments, org_id=org_id, before_id=payments_before,
                              limit=20)
        transactions = await call(request, UsageController.transactions, org_id=org_id,
                                  before_id=transactions_before, limit=20)
        subscriptions = await call(request, PaymentsController.list_subscriptions, org_id=org_id)
        plans = await call(request, PlansController.list_plans) if permitted(principal, "payments.create") else []
        context.setdefault("topup_errors", {})
        context.setdefault("crypto_errors", {})
        context.setdefault("values", {})
        return await page(request, "billing.html", status_code=status_code, balance=balance, payments=payments,
                          transactions=transactions, subscriptions=subscriptions, plans=plans,
                          networks=list(NETWORKS), checkout=request.query_params.get("checkout"), **context)

    @get("/", guards=[require("billing.read")])
    async def billing(self, request: Request, org_id: IdParam, payments_before: PageId = None,
                      transactions_before: PageId = None) -> Template:
        return await self._page(request, org_id, payments_before=payments_before,
                                transactions_before=transactions_before)

    async def _to_checkout(self, request: Request, started) -> Response | Template:
        if request.headers.get("hx-request") == "true":
            return Response(b"", status_code=200, headers={**SECURITY_HEADERS, "hx-redirect": started.url})
        return await page(request, "checkout.html", url=started.url)

    @post("/topup", guards=[require("payments.create")])
    async def topup(self, request: Request, org_id: IdParam) -> Response | Template:
        values = await form_values(request)
        try:
            amount = usd_to_micros(values.get("amount", ""), "amount") if values.get("amount") else ""
            data = decode_form({"amount_micros": amount}, TopupRequest)
            started = await call(request, PaymentsController.start_stripe_topup, org_id=org_id, data=data)
        except FormInvalid as exc:
            errors = FormErrors({"amount": next(iter(exc.errors.values()))})
            return await self._page(request, org_id, status_code=422, topup_errors=errors, values=values)
        except ApiError as exc:
            if exc.status == 403:
                raise
            return await self._page(request, org_id, status_code=exc.status, topup_errors={"amount": exc.message},
                                    values=values)
        return await self._to_checkout(request, started)

    @post("/subscribe", guards=[require("payments.create")])
    async def subscribe(self, request: Request, org_id: IdParam) -> Response | Template:
        values = await form_values(request)
        try:
            data = decode_form({"plan_id": values.get("plan_id", "")}, SubscribeRequest)
            started = await call(request, PaymentsController.start_subscription, org_id=org_id, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            message = exc.message if isinstance(exc, ApiError) else "Choose a plan."
            return await self._page(request, org_id, status_code=422, topup_errors={"plan_id": message})
        return await self._to_checkout(request, started)

    @post("/crypto", guards=[require("payments.create")])
    async def crypto(self, request: Request, org_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        fields = ("network", "tx_hash", "sender_address")
        try:
            amount = usd_to_micros(values["crypto_amount"], "amount_micros") if values.get("crypto_amount") else ""
            data = decode_form({**{f: values.get(f, "").strip() for f in fields}, "amount_micros": amount},
                               CryptoClaim)
            payment = await call(request, PaymentsController.claim_crypto_topup, org_id=org_id, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            if isinstance(exc, FormInvalid):
                errors = dict(exc.errors)
            else:  # the API's codes name the field: invalid_tx_hash, tx_hash_taken, amount_out_of_bounds
                field = next((f for f in (*fields, "amount") if f in exc.code), "")
                errors = {field: exc.message}
            if "amount_micros" in errors:
                errors["crypto_amount"] = errors.pop("amount_micros")
            if "amount" in errors:
                errors["crypto_amount"] = errors.pop("amount")
            return await self._page(request, org_id, status_code=422, crypto_errors=errors, values=values)
        flash(request, f"Crypto top-up #{payment.id} submitted: a platform admin reviews it; its status shows below.")
        return redirect(f"/portal/orgs/{org_id}/billing")

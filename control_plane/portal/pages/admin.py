"""Platform admin: orgs (search, suspend/resume, balance adjustments), pricing with components and effective
dates, the supply chain (providers, routes and their status), model quality (status, findings, evidence),
the crypto review queue, the audit log and the Stripe settings (secrets masked)."""

from __future__ import annotations

import datetime
from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.params import Parameter
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.admin_catalogue import AdminCatalogueController, PriceCreate, RouteUpdate
from control_plane.controllers.admin_orgs import Adjustment, AdminOrgsController, AdminOrgUpdate
from control_plane.controllers.admin_payments import (
    AdminPaymentsController,
    Approval,
    Rejection,
    StripeSettingsUpdate,
)
from control_plane.controllers.audit_log import AdminAuditController
from control_plane.controllers.quality import AdminQualityController
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call
from control_plane.portal.forms import FormInvalid, decode_form, form_values, usd_to_micros
from control_plane.portal.render import flash, page, redirect

__all__ = ["AdminPages"]

Text = Annotated[str | None, Parameter(max_length=200)]
PageId = Annotated[int | None, Parameter(ge=1, le=2**53 - 1)]
# The price form's fields, in dollars per million tokens (the API's *_micros_per_mtok), in display order.
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write_5m", "cache_write_1h", "reasoning",
                "input_image", "input_audio", "output_image", "output_audio")


def _raise_forbidden(exc: Exception) -> None:
    if isinstance(exc, ApiError) and exc.status in (403, 404):
        raise exc


class AdminPages(Controller):
    path = "/portal/admin"

    # --- orgs -------------------------------------------------------------------------------------------

    @get("/orgs", guards=[require("platform.orgs.read")])
    async def orgs(self, request: Request, q: Text = None, after_id: PageId = None) -> Template:
        result = await call(request, AdminOrgsController.list_orgs, q=q or None, after_id=after_id, limit=50)
        return await page(request, "admin/orgs.html", result=result, q=q or "", errors={})

    @post("/orgs/{org_id:int}/status", guards=[require("platform.orgs.manage")])
    async def set_status(self, request: Request, org_id: IdParam) -> Redirect:
        values = await form_values(request)
        data = decode_form({"status": values.get("status", "")}, AdminOrgUpdate)
        org = await call(request, AdminOrgsController.update_org, org_id=org_id, data=data)
        flash(request, f"{org.name} is now {org.status}.")
        return redirect("/portal/admin/orgs")

    @post("/orgs/{org_id:int}/adjust", guards=[require("platform.balance.adjust")])
    async def adjust(self, request: Request, org_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            amount = usd_to_micros(values.get("amount", ""), "amount_micros") if values.get("amount") else ""
            data = decode_form({"amount_micros": amount, "reason": values.get("reason", "").strip()}, Adjustment)
            result = await call(request, AdminOrgsController.adjust_balance, org_id=org_id, data=data)
        except (FormInvalid, ApiError) as exc:
            _raise_forbidden(exc)
            errors = dict(exc.errors) if isinstance(exc, FormInvalid) else {"amount_micros": exc.message}
            listing = await call(request, AdminOrgsController.list_orgs, q=None, after_id=None, limit=50)
            return await page(request, "admin/orgs.html", status_code=422, result=listing, q="",
                              errors={org_id: errors})
        flash(request, f"Adjustment #{result.transaction_id} applied; the balance is now {result.balance_micros} µ$.")
        return redirect("/portal/admin/orgs")

    # --- pricing ----------------------------------------------------------------------------------------

    async def _pricing(self, request: Request, status_code: int = 200, **context) -> Template:
        prices = await call(request, AdminCatalogueController.list_prices, model=None)
        models = await call(request, AdminCatalogueController.list_models)
        now = datetime.datetime.now(datetime.UTC)
        current = {}
        for p in prices:  # newest first per model: the first row in force is the current one
            if p.effective_from <= now and p.service_tier == "default" and p.min_prompt_tokens == 0:
                current.setdefault(p.model, p.id)
        context.setdefault("values", {})
        context.setdefault("errors", {})
        return await page(request, "admin/pricing.html", status_code=status_code, prices=prices, models=models,
                          current=set(current.values()), now=now, price_fields=PRICE_FIELDS,
                          min_lead_s=request.app.state.cp.settings.price_min_lead_s, **context)

    @get("/pricing", guards=[require("platform.catalogue.read")])
    async def pricing(self, request: Request) -> Template:
        return await self._pricing(request)

    @post("/pricing", guards=[require("platform.catalogue.manage")])
    async def create_price(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        try:
            fields: dict = {"model": values.get("model", "")}
            for name in PRICE_FIELDS:
                text = values.get(name, "").strip()
                fields[f"{name}_micros_per_mtok"] = usd_to_micros(text, name) if text else ""
            request_fee = values.get("request", "").strip()
            fields["request_micros"] = usd_to_micros(request_fee, "request") if request_fee else ""
            when = values.get("effective_from", "").strip()
            fields["effective_from"] = (f"{when}:00Z" if len(when) == 16 else when) or ""
            data = decode_form(fields, PriceCreate)
            await call(request, AdminCatalogueController.create_price, data=data)
        except (FormInvalid, ApiError) as exc:
            _raise_forbidden(exc)
            if isinstance(exc, FormInvalid):
                errors = {k.removesuffix("_micros_per_mtok").removesuffix("_micros"): v for k, v in exc.errors.items()}
            else:
                errors = {"effective_from" if exc.code == "price_too_soon" else "model": exc.message}
            return await self._pricing(request, 422, values=values, errors=errors)
        flash(request, f"Price for {data.model} scheduled; every proxy applies it from its effective time.")
        return redirect("/portal/admin/pricing")

    # --- supply chain and quality ----------------------------------------------------------------------

    @get("/supply", guards=[require("platform.catalogue.read")])
    async def supply(self, request: Request) -> Template:
        providers = await call(request, AdminCatalogueController.list_providers)
        routes = await call(request, AdminCatalogueController.list_routes, model=None)
        return await page(request, "admin/supply.html", providers=providers, routes=routes)

    @post("/supply/routes/{route_id:int}/status", guards=[require("platform.catalogue.manage")])
    async def route_status(self, request: Request, route_id: IdParam) -> Redirect:
        values = await form_values(request)
        data = decode_form({"status": values.get("status", "")}, RouteUpdate)
        route = await call(request, AdminCatalogueController.update_route, route_id=route_id, data=data)
        flash(request, f"Route {route.id} ({route.model} via {route.provider_name}) is now {route.status}.")
        return redirect("/portal/admin/supply")

    @get("/quality", guards=[require("platform.quality.read")])
    async def quality(self, request: Request) -> Template:
        routes = await call(request, AdminQualityController.list_routes, model=None, probe_status=None)
        return await page(request, "admin/quality.html", routes=routes)

    @get("/quality/{route_id:int}", guards=[require("platform.quality.read")])
    async def quality_route(self, request: Request, route_id: IdParam) -> Template:
        detail = await call(request, AdminQualityController.route_detail, route_id=route_id, limit=50)
        return await page(request, "admin/quality_route.html", detail=detail)

    # --- crypto review, audit, Stripe -------------------------------------------------------------------

    async def _crypto(self, request: Request, status_code: int = 200, **context) -> Template:
        pending = await call(request, AdminPaymentsController.list_payments, status="pending", method="crypto",
                             org_id=None, after_id=None, limit=100)
        context.setdefault("errors", {})
        return await page(request, "admin/crypto.html", status_code=status_code, pending=pending, **context)

    @get("/crypto", guards=[require("platform.payments.read")])
    async def crypto(self, request: Request) -> Template:
        return await self._crypto(request)

    @post("/crypto/{payment_id:int}/approve", guards=[require("platform.payments.review")])
    async def approve(self, request: Request, payment_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            amount = usd_to_micros(values.get("amount", ""), "amount_micros") if values.get("amount") else ""
            data = decode_form({"amount_micros": amount, "note": values.get("note", "").strip() or None}, Approval)
            payment = await call(request, AdminPaymentsController.approve_crypto, payment_id=payment_id, data=data)
        except (FormInvalid, ApiError) as exc:
            _raise_forbidden(exc)
            message = next(iter(exc.errors.values())) if isinstance(exc, FormInvalid) else exc.message
            return await self._crypto(request, 422, errors={payment_id: message})
        flash(request, f"Payment #{payment.id} approved: {payment.credited_micros} µ$ credited to org "
                       f"{payment.org_id}.")
        return redirect("/portal/admin/crypto")

    @post("/crypto/{payment_id:int}/reject", guards=[require("platform.payments.review")])
    async def reject(self, request: Request, payment_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form({"reason": values.get("reason", "").strip()}, Rejection)
            payment = await call(request, AdminPaymentsController.reject_crypto, payment_id=payment_id, data=data)
        except (FormInvalid, ApiError) as exc:
            _raise_forbidden(exc)
            message = "Give the reason the org will see." if isinstance(exc, FormInvalid) else exc.message
            return await self._crypto(request, 422, errors={payment_id: message})
        flash(request, f"Payment #{payment.id} rejected.")
        return redirect("/portal/admin/crypto")

    @get("/audit", guards=[require("platform.audit.read")])
    async def audit(self, request: Request, action: Text = None, before_id: PageId = None) -> Template:
        result = await call(request, AdminAuditController.admin_audit, org_id=None, actor_user_id=None,
                            action=action or None, before_id=before_id, limit=50)
        return await page(request, "admin/audit.html", result=result, action=action or "")

    @get("/stripe", guards=[require("platform.stripe.read")])
    async def stripe(self, request: Request) -> Template:
        current = await call(request, AdminPaymentsController.get_stripe)
        return await page(request, "admin/stripe.html", stripe=current, errors={})

    @post("/stripe", guards=[require("platform.stripe.manage")])
    async def update_stripe(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        fields = {k: values.get(k, "").strip() for k in ("secret_key", "webhook_secret", "api_base")}
        try:
            data = decode_form(fields, StripeSettingsUpdate)  # empty fields: unchanged
            await call(request, AdminPaymentsController.update_stripe, data=data)
        except (FormInvalid, ApiError) as exc:
            _raise_forbidden(exc)
            errors = exc.errors if isinstance(exc, FormInvalid) else {"api_base": exc.message}
            current = await call(request, AdminPaymentsController.get_stripe)
            return await page(request, "admin/stripe.html", status_code=422, stripe=current, errors=errors)
        flash(request, "Stripe settings saved (secrets are stored encrypted and shown masked).")
        return redirect("/portal/admin/stripe")

"""Org settings: name and request-log retention, billing contact and low-balance alerts, BYOK credentials
(masked: only a hint of each is ever shown)."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.byok import ByokController
from control_plane.controllers.orgs import BillingSettingsUpdate, OrgsController, OrgUpdate
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call, permitted
from control_plane.portal.forms import FormInvalid, decode_form, form_values, usd_to_micros
from control_plane.portal.render import flash, page, redirect

__all__ = ["SettingsPages"]


class SettingsPages(Controller):
    path = "/portal/orgs/{org_id:int}/settings"

    async def _page(self, request: Request, org_id: int, status_code: int = 200, **context) -> Template:
        org = await call(request, OrgsController.get_org, org_id=org_id)
        byok = (await call(request, ByokController.list_credentials, org_id=org_id)
                if permitted(request.state.principal, "byok.read") else None)
        context.setdefault("org_errors", {})
        context.setdefault("alert_errors", {})
        settings = request.app.state.cp.settings
        return await page(request, "settings.html", status_code=status_code, settings_org=org, byok=byok,
                          retention_bounds=(settings.log_retention_min_days, settings.log_retention_max_days),
                          **context)

    @get("/", guards=[require("org.read")])
    async def settings(self, request: Request, org_id: IdParam) -> Template:
        return await self._page(request, org_id)

    @post("/org", guards=[require("org.update")])
    async def update_org(self, request: Request, org_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        fields = {"name": values.get("name", "").strip(),
                  "request_log_retention_days": values.get("request_log_retention_days", "").strip() or None}
        try:
            await call(request, OrgsController.update, org_id=org_id, data=decode_form(fields, OrgUpdate))
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            errors = exc.errors if isinstance(exc, FormInvalid) else {"request_log_retention_days": exc.message}
            return await self._page(request, org_id, 422, org_errors=errors)
        flash(request, "Organization settings saved.")
        return redirect(f"/portal/orgs/{org_id}/settings")

    @post("/alerts", guards=[require("billing_settings.update")])
    async def update_alerts(self, request: Request, org_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            threshold = values.get("low_balance_threshold", "").strip()
            fields = {"billing_email": values.get("billing_email", "").strip() or None,
                      "alert_emails": [e.strip() for e in values.get("alert_emails", "").split(",") if e.strip()],
                      "low_balance_threshold_micros":
                          usd_to_micros(threshold, "low_balance_threshold") if threshold else None}
            data = decode_form(fields, BillingSettingsUpdate)
            await call(request, OrgsController.update_billing, org_id=org_id, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            errors = dict(exc.errors) if isinstance(exc, FormInvalid) else {"": exc.message}
            if "low_balance_threshold_micros" in errors:
                errors["low_balance_threshold"] = errors.pop("low_balance_threshold_micros")
            return await self._page(request, org_id, 422, alert_errors=errors)
        flash(request, "Billing contact and alerts saved.")
        return redirect(f"/portal/orgs/{org_id}/settings")

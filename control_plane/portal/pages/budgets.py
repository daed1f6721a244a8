"""Budgets: spend limits of the org or one of its keys per day, week or month (calendar or rolling), with a
soft threshold that sends `budget.exceeded` alerts first. List, create, change the limit or the threshold,
delete; each problem is said next to its field."""

from __future__ import annotations

from typing import get_args

from litestar import Controller, Request, get, post
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.budgets import BudgetCreate, BudgetsController, BudgetUpdate, Period, Window
from control_plane.controllers.keys import KeysController
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call, permitted
from control_plane.portal.forms import FormErrors, FormInvalid, decode_form, form_values, usd_to_micros
from control_plane.portal.render import flash, page, redirect

__all__ = ["BudgetsPages"]

PERIODS = get_args(Period)
WINDOWS = get_args(Window)
# The API's field names as the form's: the limit is typed in dollars, the scope is one select.
_FORM_NAMES = {"limit_micros": "limit", "api_key_id": "scope"}


def _errors(exc: FormInvalid | ApiError) -> FormErrors:
    if isinstance(exc, FormInvalid):
        return FormErrors({_FORM_NAMES.get(k, k): v for k, v in exc.errors.items()})
    if exc.status == 404:  # the chosen key (revoked meanwhile, or not this org's)
        return FormErrors({"scope": exc.message})
    return FormErrors({"": exc.message})


def _limit_fields(values: dict[str, str]) -> dict:
    """The limit (dollars → micro-units) and the soft threshold (empty: none, an explicit null)."""
    limit = values.get("limit", "").strip()
    if not limit:  # said next to the field, not as the decoder's "missing field limit_micros"
        raise FormInvalid(FormErrors({"limit": "Enter the limit in dollars, like 50."}))
    percent = values.get("alert_percent", "").strip()
    return {"limit_micros": usd_to_micros(limit, "limit"), "alert_percent": percent or None}


class BudgetsPages(Controller):
    path = "/portal/orgs/{org_id:int}/budgets"

    async def _page(self, request: Request, org_id: int, status_code: int = 200, **context) -> Template:
        budgets = await call(request, BudgetsController.list_budgets, org_id=org_id)
        # Key budgets are chosen by key, for those who may see keys (the billing role sets org budgets).
        keys = (await call(request, KeysController.list_keys, org_id=org_id, include_revoked=False)
                if permitted(request.state.principal, "keys.read") else [])
        context.setdefault("values", {"period": "month", "window": "calendar", "alert_percent": "80"})
        context.setdefault("errors", {})
        context.setdefault("row_errors", {})
        return await page(request, "budgets.html", status_code=status_code, budgets=budgets, keys=keys,
                          key_names={k.id: f"{k.name or '(unnamed)'} ({k.prefix}…)" for k in keys},
                          periods=PERIODS, windows=WINDOWS, **context)

    @get("/", guards=[require("budgets.read")])
    async def budgets(self, request: Request, org_id: IdParam) -> Template:
        return await self._page(request, org_id)

    @post("/", guards=[require("budgets.manage")])
    async def create(self, request: Request, org_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        scope = values.get("scope", "org")
        try:
            fields = {**_limit_fields(values), "period": values.get("period", ""), "window": values.get("window", ""),
                      "api_key_id": None if scope == "org" else scope}
            data = decode_form(fields, BudgetCreate)
            budget = await call(request, BudgetsController.create, org_id=org_id, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            return await self._page(request, org_id, 422, values=values, errors=_errors(exc))
        flash(request, f"{budget.window.capitalize()} {budget.period} budget for the {budget.scope} created; every "
                       "proxy applies it within moments.")
        return redirect(f"/portal/orgs/{org_id}/budgets")

    @post("/{budget_id:int}", guards=[require("budgets.manage")])
    async def update(self, request: Request, org_id: IdParam, budget_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form(_limit_fields(values), BudgetUpdate)
            await call(request, BudgetsController.update, org_id=org_id, budget_id=budget_id, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status in (403, 404):
                raise
            return await self._page(request, org_id, 422, row_errors={budget_id: _errors(exc)},
                                    row_values={budget_id: values})
        flash(request, "Budget saved; every proxy applies it within moments.")
        return redirect(f"/portal/orgs/{org_id}/budgets")

    @post("/{budget_id:int}/delete", guards=[require("budgets.manage")])
    async def remove(self, request: Request, org_id: IdParam, budget_id: IdParam) -> Redirect:
        await call(request, BudgetsController.remove, org_id=org_id, budget_id=budget_id)
        flash(request, "Budget deleted.")
        return redirect(f"/portal/orgs/{org_id}/budgets")

"""An org's dashboard: balance and available credit, spend today and this month, usage by day and model."""

from __future__ import annotations

import datetime

from litestar import Controller, Request, get
from litestar.response import Template

from control_plane.common import IdParam
from control_plane.controllers.usage import UsageController
from control_plane.permissions import require
from control_plane.portal.api import call, permitted
from control_plane.portal.render import page

__all__ = ["DashboardPage", "chart_series"]

CHART_DAYS = 30


def chart_series(rows: list, days: list[datetime.date]) -> dict:
    """Cost per day and model, as the chart draws it: {"labels": [day…], "series": [{"model", "data"}]}."""
    index = {day: i for i, day in enumerate(days)}
    by_model: dict[str, list[int]] = {}
    for row in rows:
        if row.day in index:
            by_model.setdefault(row.model, [0] * len(days))[index[row.day]] += row.cost_micros
    return {"labels": [d.isoformat() for d in days],
            "series": [{"model": m, "data": v} for m, v in sorted(by_model.items())]}


class DashboardPage(Controller):
    path = "/portal/orgs/{org_id:int}"

    @get("/", guards=[require("org.read")])
    async def dashboard(self, request: Request, org_id: IdParam) -> Template:
        principal = request.state.principal
        today = datetime.datetime.now(datetime.UTC).date()
        month_start = today.replace(day=1)
        days = [today - datetime.timedelta(days=n) for n in range(CHART_DAYS - 1, -1, -1)]
        balance = usage = None
        if permitted(principal, "billing.read"):
            balance = await call(request, UsageController.balance, org_id=org_id)
        if permitted(principal, "usage.read"):
            usage = await call(request, UsageController.usage, org_id=org_id, start=min(month_start, days[0]),
                               end=today)
        spend = None
        if usage is not None:
            spend = {"today": sum(r.cost_micros for r in usage.data if r.day == today),
                     "month": sum(r.cost_micros for r in usage.data if r.day >= month_start),
                     "requests_today": sum(r.requests for r in usage.data if r.day == today)}
        available = None
        if balance is not None:
            live = balance.live_balance_micros if balance.live_balance_micros is not None else balance.balance_micros
            available = live - (balance.reserved_micros or 0) + balance.credit_limit_micros
        chart = chart_series(usage.data, days) if usage is not None else None
        return await page(request, "dashboard.html", balance=balance, available=available, spend=spend,
                          chart=chart, has_usage=bool(usage and usage.data))

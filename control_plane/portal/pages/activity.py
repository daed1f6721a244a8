"""Request logs (filters, paging), one request's evidence (route, models, usage components and their cost),
and usage by model and key with cost components."""

from __future__ import annotations

import datetime
from typing import Annotated

from litestar import Controller, Request, get
from litestar.params import Parameter
from litestar.response import Template

from control_plane.common import IdParam
from control_plane.controllers.keys import KeysController
from control_plane.controllers.usage import UsageController
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call, permitted
from control_plane.portal.render import page

__all__ = ["ActivityPages", "usage_by_model_and_key"]

Text = Annotated[str | None, Parameter(max_length=400)]


def _when(text: str | None, field: str, errors: dict) -> datetime.datetime | None:
    """A `datetime-local` input (taken as UTC) or an ISO time; a problem is noted next to its field."""
    if not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        errors[field] = "Enter a date and time, like 2026-05-01T09:30."
        return None
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value


def _day(text: str | None, field: str, errors: dict) -> datetime.date | None:
    if not text:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        errors[field] = "Enter a date, like 2026-05-01."
        return None


def _int(text: str | None, field: str, errors: dict, low: int, high: int) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not low <= int(text) <= high:
        errors[field] = f"Enter a number from {low} to {high}."
        return None
    return int(text)


def usage_by_model_and_key(rows: list) -> list[dict]:
    """The daily rows summed per (model, key), components included, dearest first."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        m = merged.setdefault((r.model, r.api_key_id), {"model": r.model, "api_key_id": r.api_key_id, "requests": 0,
                                                        "prompt_tokens": 0, "completion_tokens": 0,
                                                        "cost_micros": 0, "components": {}})
        for f in ("requests", "prompt_tokens", "completion_tokens", "cost_micros"):
            m[f] += getattr(r, f)
        for name, c in r.components.items():
            tokens, cost = m["components"].get(name, (0, 0))
            m["components"][name] = (tokens + c.tokens, cost + c.cost_micros)
    return sorted(merged.values(), key=lambda m: (-m["cost_micros"], m["model"], m["api_key_id"] or 0))


async def _keys(request: Request, org_id: int) -> dict:
    """The org's keys by id, to name them (prefix, name) — for roles that may read keys; ids otherwise."""
    if not permitted(request.state.principal, "keys.read"):
        return {}
    return {k.id: k for k in await call(request, KeysController.list_keys, org_id=org_id, include_revoked=True)}


class ActivityPages(Controller):
    path = "/portal/orgs/{org_id:int}"

    @get("/logs", guards=[require("usage.read")])
    async def logs(self, request: Request, org_id: IdParam, model: Text = None, key_id: Text = None,
                   status: Text = None, start: Text = None, end: Text = None, cursor: Text = None) -> Template:
        errors: dict[str, str] = {}
        filters = {"model": model or "", "key_id": key_id or "", "status": status or "", "start": start or "",
                   "end": end or ""}
        arguments = {"org_id": org_id, "model": model or None, "key_id": _int(key_id, "key_id", errors, 1, 2**53 - 1),
                     "status": _int(status, "status", errors, 100, 599), "start": _when(start, "start", errors),
                     "end": _when(end, "end", errors), "cursor": cursor or None}
        result = None
        if not errors:
            try:
                result = await call(request, UsageController.request_logs, **arguments)
            except ApiError as exc:
                if exc.status == 403:
                    raise
                errors["cursor" if exc.code == "invalid_cursor" else "start"] = exc.message
        keys = await _keys(request, org_id)
        return await page(request, "logs.html", status_code=422 if errors else 200, result=result, filters=filters,
                          errors=errors, keys=keys)

    @get("/logs/{request_id:str}", guards=[require("usage.read")])
    async def evidence(self, request: Request, org_id: IdParam,
                       request_id: Annotated[str, Parameter(max_length=64)]) -> Template:
        record = await call(request, UsageController.request_log, org_id=org_id, request_id=request_id)
        return await page(request, "evidence.html", record=record)

    @get("/usage", guards=[require("usage.read")])
    async def usage(self, request: Request, org_id: IdParam, start: Text = None, end: Text = None) -> Template:
        errors: dict[str, str] = {}
        first, last = _day(start, "start", errors), _day(end, "end", errors)
        result = None
        if not errors:
            try:
                result = await call(request, UsageController.usage, org_id=org_id, start=first, end=last)
            except ApiError as exc:
                if exc.status == 403:
                    raise
                errors["start"] = exc.message
        keys = await _keys(request, org_id)
        return await page(request, "usage.html", status_code=422 if errors else 200, result=result,
                          rows=usage_by_model_and_key(result.data) if result else [], keys=keys, errors=errors,
                          filters={"start": start or "", "end": end or ""})

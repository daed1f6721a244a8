"""Outbound webhooks: the org's endpoints (register, pause/resume, rotate the signing secret, delete) and the
deliveries with their status and a Replay button. A signing secret is shown once, on the answer to the form
that made it (like a new API key), and stored nowhere by the page."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from litestar import Controller, Request, get, post
from litestar.params import FromQuery, Parameter
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.org_webhooks import (
    EndpointCreate,
    EndpointUpdate,
    EventType,
    Rotation,
    WebhookDeliveriesController,
    WebhookEndpointsController,
)
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call
from control_plane.portal.forms import FormErrors, FormInvalid, api_error_field, decode_form, form_values
from control_plane.portal.render import flash, page, redirect

__all__ = ["WebhooksPages"]

EVENT_TYPES = get_args(EventType)
_FIELDS = ("url", "event_types", "description")
DeliveryStatus = FromQuery[Literal["pending", "succeeded", "failed", "refused"] | None]
EndpointFilter = Annotated[int | None, Parameter(ge=1, le=2**53 - 1)]
PageId = Annotated[int | None, Parameter(ge=1, le=2**53 - 1)]


def _reraise_refusal(exc: Exception) -> None:
    if isinstance(exc, ApiError) and exc.status in (403, 404):
        raise exc


class WebhooksPages(Controller):
    path = "/portal/orgs/{org_id:int}/webhooks"

    async def _page(self, request: Request, org_id: int, status_code: int = 200, *, endpoint_id: int | None = None,
                    status: str | None = None, before_id: int | None = None, **context) -> Template:
        endpoints = await call(request, WebhookEndpointsController.list_endpoints, org_id=org_id)
        deliveries = await call(request, WebhookDeliveriesController.list_deliveries, org_id=org_id,
                                endpoint_id=endpoint_id, status=status, before_id=before_id, limit=50)
        context.setdefault("values", {})
        context.setdefault("errors", {})
        return await page(request, "webhooks.html", status_code=status_code, endpoints=endpoints,
                          deliveries=deliveries, event_types=EVENT_TYPES, urls={e.id: e.url for e in endpoints},
                          filters={"endpoint_id": endpoint_id, "status": status}, **context)

    @get("/", guards=[require("webhooks.read")])
    async def webhooks(self, request: Request, org_id: IdParam, endpoint_id: EndpointFilter = None,
                       status: DeliveryStatus = None, before_id: PageId = None) -> Template:
        return await self._page(request, org_id, endpoint_id=endpoint_id, status=status, before_id=before_id)

    @post("/", guards=[require("webhooks.manage")])
    async def create(self, request: Request, org_id: IdParam) -> Template:
        values = await form_values(request)
        chosen = [str(v) for v in (await request.form()).getall("event_types", [])]
        fields = {"url": values.get("url", "").strip(), "description": values.get("description", "").strip(),
                  "event_types": chosen or ""}
        try:
            if not chosen:
                raise FormInvalid(FormErrors({"event_types": "Choose at least one event type."}))
            created = await call(request, WebhookEndpointsController.create_endpoint, org_id=org_id,
                                 data=decode_form(fields, EndpointCreate))
        except (FormInvalid, ApiError) as exc:
            _reraise_refusal(exc)
            errors = exc.errors if isinstance(exc, FormInvalid) else _api_errors(exc)
            return await self._page(request, org_id, 422, values={**values, "event_types": chosen}, errors=errors)
        return await self._page(request, org_id, 201, secret=created.secret, secret_for=created.endpoint)

    @post("/{endpoint_id:int}/rotate", guards=[require("webhooks.manage")])
    async def rotate(self, request: Request, org_id: IdParam, endpoint_id: IdParam) -> Template:
        rotated = await call(request, WebhookEndpointsController.rotate_secret, org_id=org_id,
                             endpoint_id=endpoint_id, data=Rotation())
        return await self._page(request, org_id, secret=rotated.secret, secret_for=rotated.endpoint, rotated=True)

    @post("/{endpoint_id:int}/active", guards=[require("webhooks.manage")])
    async def set_active(self, request: Request, org_id: IdParam, endpoint_id: IdParam) -> Redirect:
        values = await form_values(request)
        active = values.get("active") == "true"
        endpoint = await call(request, WebhookEndpointsController.update_endpoint, org_id=org_id,
                              endpoint_id=endpoint_id, data=EndpointUpdate(active=active))
        flash(request, f"{endpoint.url} {'resumed' if active else 'paused: no deliveries until it is resumed'}.")
        return redirect(f"/portal/orgs/{org_id}/webhooks")

    @post("/{endpoint_id:int}/delete", guards=[require("webhooks.manage")])
    async def remove(self, request: Request, org_id: IdParam, endpoint_id: IdParam) -> Redirect:
        endpoint = await call(request, WebhookEndpointsController.get_endpoint, org_id=org_id,
                              endpoint_id=endpoint_id)
        await call(request, WebhookEndpointsController.delete_endpoint, org_id=org_id, endpoint_id=endpoint_id)
        flash(request, f"{endpoint.url} deleted, with its secrets and deliveries.")
        return redirect(f"/portal/orgs/{org_id}/webhooks")

    @post("/deliveries/{delivery_id:int}/replay", guards=[require("webhooks.manage")])
    async def replay(self, request: Request, org_id: IdParam, delivery_id: IdParam) -> Template | Redirect:
        try:
            new = await call(request, WebhookDeliveriesController.replay, org_id=org_id, delivery_id=delivery_id)
        except ApiError as exc:
            _reraise_refusal(exc)
            return await self._page(request, org_id, exc.status, row_errors={delivery_id: exc.message})
        flash(request, f"Delivery {delivery_id} replayed as delivery {new.id} (same webhook-id {new.event_id}).")
        return redirect(f"/portal/orgs/{org_id}/webhooks")


def _api_errors(exc: ApiError) -> FormErrors:
    # The API's only 422 past the form's own decoding is the URL check (not https, a private address, …).
    if exc.status == 422:
        return FormErrors({"url": exc.message})
    return api_error_field(exc, _FIELDS)

"""API keys: the list, create (the secret is shown once, on the answer to the form, and stored nowhere),
limits and budget (the monthly spend cap), revoke."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.keys import KeyCreate, KeysController, KeyUpdate
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call
from control_plane.portal.forms import FormErrors, FormInvalid, api_error_field, decode_form, form_values, usd_to_micros
from control_plane.portal.render import flash, page, redirect

__all__ = ["KeysPages"]

_FIELDS = ("name", "rpm_limit", "tpm_limit", "monthly_spend_cap_micros", "allowed_models", "expires_at")


def _key_fields(values: dict[str, str]) -> dict:
    """The key form's fields as the API's: dollars → micro-units, a comma list of models, a UTC time."""
    fields: dict = {k: values.get(k, "").strip() for k in ("name", "rpm_limit", "tpm_limit")}
    cap = values.get("monthly_spend_cap", "").strip()
    fields["monthly_spend_cap_micros"] = usd_to_micros(cap, "monthly_spend_cap") if cap else ""
    models = [m.strip() for m in values.get("allowed_models", "").split(",") if m.strip()]
    fields["allowed_models"] = models or ""
    expires = values.get("expires_at", "").strip()
    fields["expires_at"] = f"{expires}:00Z" if len(expires) == 16 else expires  # datetime-local, taken as UTC
    return fields


def _errors(exc: FormInvalid) -> FormErrors:
    # The form names the cap in dollars.
    return FormErrors({("monthly_spend_cap" if k == "monthly_spend_cap_micros" else k): v
                       for k, v in exc.errors.items()})


class KeysPages(Controller):
    path = "/portal/orgs/{org_id:int}/keys"

    async def _list(self, request: Request, org_id: int, **context) -> Template:
        keys = await call(request, KeysController.list_keys, org_id=org_id, include_revoked=True)
        context.setdefault("values", {})
        context.setdefault("errors", {})
        return await page(request, "keys.html", keys=keys, **context)

    @get("/", guards=[require("keys.read")])
    async def keys(self, request: Request, org_id: IdParam) -> Template:
        return await self._list(request, org_id)

    @post("/", guards=[require("keys.manage")])
    async def create(self, request: Request, org_id: IdParam) -> Template:
        values = await form_values(request)
        try:
            data = decode_form(_key_fields(values), KeyCreate)
            created = await call(request, KeysController.create, org_id=org_id, data=data)
        except FormInvalid as exc:
            return await self._list(request, org_id, status_code=422, values=values, errors=_errors(exc))
        except ApiError as exc:
            if exc.status == 403:
                raise
            return await self._list(request, org_id, status_code=exc.status, values=values,
                                    errors=api_error_field(exc, _FIELDS))
        return await self._list(request, org_id, status_code=201, created=created)

    @get("/{key_id:int}", guards=[require("keys.read")])
    async def key(self, request: Request, org_id: IdParam, key_id: IdParam) -> Template:
        key = await call(request, KeysController.get_key, org_id=org_id, key_id=key_id)
        return await page(request, "key.html", key=key, values=None, errors={})

    @post("/{key_id:int}", guards=[require("keys.manage")])
    async def update(self, request: Request, org_id: IdParam, key_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            fields = {k: (None if v == "" else v) for k, v in _key_fields(values).items()}
            fields["name"] = values.get("name", "").strip()
            data = decode_form(fields, KeyUpdate)
            await call(request, KeysController.update, org_id=org_id, key_id=key_id, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status in (403, 404):
                raise
            key = await call(request, KeysController.get_key, org_id=org_id, key_id=key_id)
            errors = _errors(exc) if isinstance(exc, FormInvalid) else api_error_field(exc, _FIELDS)
            return await page(request, "key.html", status_code=422, key=key, values=values, errors=errors)
        flash(request, "Key limits saved; every proxy applies them within moments.")
        return redirect(f"/portal/orgs/{org_id}/keys/{key_id}")

    @post("/{key_id:int}/revoke", guards=[require("keys.manage")])
    async def revoke(self, request: Request, org_id: IdParam, key_id: IdParam) -> Redirect:
        key = await call(request, KeysController.get_key, org_id=org_id, key_id=key_id)
        await call(request, KeysController.revoke, org_id=org_id, key_id=key_id)
        flash(request, f"Key {key.prefix}… revoked: requests with it are refused from now on.")
        return redirect(f"/portal/orgs/{org_id}/keys")

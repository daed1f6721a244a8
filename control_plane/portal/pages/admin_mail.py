"""Platform admin of mail: the SMTP settings (the password is never shown back, only whether one is set),
"send test mail", and the mails that finally failed."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.response import Redirect, Template

from control_plane.controllers.admin_mail import AdminMailController, MailSettingsUpdate, TestMail
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call
from control_plane.portal.forms import FormErrors, FormInvalid, decode_form, form_values
from control_plane.portal.render import flash, page, redirect

__all__ = ["AdminMailPages"]

_FIELDS = ("host", "port", "tls_mode", "username", "password", "from_address")


def _settings_fields(values: dict[str, str]) -> dict:
    """The form as the API's update: an empty password keeps the stored one (left out), "remove" drops it
    (an explicit null); an empty user is none."""
    fields: dict = {k: values.get(k, "").strip() for k in ("host", "port", "tls_mode", "from_address")}
    fields["username"] = values.get("username", "").strip() or None
    if values.get("remove_password") == "yes":
        fields["password"] = None
    elif values.get("password"):
        fields["password"] = values["password"]  # as typed: spaces may be part of it
    return fields


class AdminMailPages(Controller):
    path = "/portal/admin/mail"

    async def _page(self, request: Request, status_code: int = 200, **context) -> Template:
        current = await call(request, AdminMailController.get_settings)
        failed = await call(request, AdminMailController.list_messages, status="failed", org_id=None, limit=50)
        context.setdefault("values", None)
        context.setdefault("errors", {})
        context.setdefault("test_errors", {})
        return await page(request, "admin/mail.html", status_code=status_code, mail=current, failed=failed,
                          tls_modes=("starttls", "implicit", "none"), **context)

    @get("/", guards=[require("platform.mail.read")])
    async def mail(self, request: Request) -> Template:
        return await self._page(request)

    @post("/settings", guards=[require("platform.mail.manage")])
    async def save(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form(_settings_fields(values), MailSettingsUpdate)
            await call(request, AdminMailController.put_settings, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            errors = exc.errors if isinstance(exc, FormInvalid) else FormErrors(
                {"tls_mode" if exc.code == "tls_required" else "": exc.message})
            return await self._page(request, 422, values=values, errors=errors)
        flash(request, "Mail settings saved (the password is stored encrypted and never shown).")
        return redirect("/portal/admin/mail")

    @post("/test", guards=[require("platform.mail.manage")])
    async def send_test(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form({"to": values.get("to", "").strip()}, TestMail)
            result = await call(request, AdminMailController.send_test, data=data)
        except (FormInvalid, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status == 403:
                raise
            errors = exc.errors if isinstance(exc, FormInvalid) else FormErrors({"": exc.message})
            return await self._page(request, 422, test_values=values, test_errors=errors)
        if not result.sent:
            return await self._page(request, 422, test_values=values, test_errors=FormErrors(
                {"": f"The mail server did not accept the test mail: {result.error}."}))
        flash(request, f"Test mail accepted by the mail server for {data.to}.")
        return redirect("/portal/admin/mail")

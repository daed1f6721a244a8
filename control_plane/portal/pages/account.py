"""Sign-up, login, logout, password change and the org switcher.

Signing up or in starts a session family through the API's own endpoint functions (the same login limits,
password checks and audit entries); the encrypted cookie then carries the user id and that family's id.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.params import Parameter, QueryParameter
from litestar.response import Redirect, Template

from control_plane.controllers.auth import AuthController, LoginRequest, MeController, PasswordChange, SignupRequest
from control_plane.errors import ApiError
from control_plane.permissions import require
from control_plane.portal.api import call
from control_plane.portal.forms import FormInvalid, api_error_field, decode_form, form_values
from control_plane.portal.render import flash, page, redirect

__all__ = ["AccountPages", "RootPage"]

NextParam = Annotated[str | None, QueryParameter(name="next", max_length=300)]


def _safe_next(target: str | None) -> str:
    """Only a path of the portal itself: never an open redirect to another site."""
    if target and target.startswith("/portal/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/portal/"


def _start(request: Request, user_id: int, refresh_token: str) -> None:
    request.set_session({"uid": user_id, "sid": refresh_token.partition(".")[0]})


class RootPage(Controller):
    path = "/"

    @get("/", guards=[require("public")])
    async def root(self, checkout: Annotated[str | None, Parameter(max_length=20)] = None) -> Redirect:
        """The site's root (and Stripe's way back, `RR_CHECKOUT_RETURN_URL`): into the portal."""
        return redirect("/portal/" + (f"?checkout={checkout}" if checkout in ("success", "cancel") else ""))


class AccountPages(Controller):
    path = "/portal"

    @get("/", guards=[require("orgs.list")])
    async def home(self, request: Request,
                   checkout: Annotated[str | None, Parameter(max_length=20)] = None) -> Redirect:
        """The org the user last looked at (or their first), else their account page. Back from a Stripe
        checkout (`?checkout=success|cancel`): that org's billing page."""
        me = await call(request, MeController.me)
        ids = [m.org_id for m in me.memberships]
        last = request.session.get("org")
        if ids:
            org_id = last if last in ids else ids[0]
            if checkout in ("success", "cancel"):
                return redirect(f"/portal/orgs/{org_id}/billing?checkout={checkout}")
            return redirect(f"/portal/orgs/{org_id}/")
        return redirect("/portal/admin/orgs" if me.is_platform_admin else "/portal/account")

    @get("/login", guards=[require("public")])
    async def login_form(self, request: Request, next_: NextParam = None) -> Template:
        return await page(request, "login.html", next=_safe_next(next_), values={}, errors={})

    @post("/login", guards=[require("public")])
    async def login(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        target = _safe_next(values.get("next"))
        try:
            data = decode_form({"email": values.get("email", ""), "password": values.get("password", "")},
                               LoginRequest)
            tokens = await call(request, AuthController.login, data=data)
        except FormInvalid as exc:
            return await page(request, "login.html", status_code=422, next=target, values=values, errors=exc.errors)
        except ApiError as exc:
            return await page(request, "login.html", status_code=exc.status, next=target,
                              values={"email": values.get("email", "")}, errors={"": exc.message})
        claims = request.app.state.cp.tokens.verify_access(tokens.access_token)
        _start(request, claims.user_id, tokens.refresh_token)
        return redirect(target)

    @get("/signup", guards=[require("public")])
    async def signup_form(self, request: Request) -> Template:
        return await page(request, "signup.html", values={}, errors={})

    @post("/signup", guards=[require("public")])
    async def signup(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form({k: values.get(k, "") for k in ("email", "password", "org_name")}, SignupRequest)
            result = await call(request, AuthController.signup, data=data)
        except FormInvalid as exc:
            return await page(request, "signup.html", status_code=422, values=values, errors=exc.errors)
        except ApiError as exc:
            errors = {"email": exc.message} if exc.code == "email_taken" else {"": exc.message}
            return await page(request, "signup.html", status_code=exc.status, values=values, errors=errors)
        _start(request, result.user_id, result.tokens.refresh_token)
        flash(request, "Welcome! Your organization is ready: create an API key to send your first request.")
        return redirect(f"/portal/orgs/{result.org_id}/")

    @post("/logout", guards=[require("auth.logout")])
    async def logout(self, request: Request) -> Redirect:
        await call(request, AuthController.logout)
        request.clear_session()
        return redirect("/portal/login")

    @get("/account", guards=[require("account.read")])
    async def account(self, request: Request) -> Template:
        return await page(request, "account.html", errors={})

    @post("/account/password", guards=[require("account.update")])
    async def change_password(self, request: Request) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form({k: values.get(k, "") for k in ("current_password", "new_password")}, PasswordChange)
            await call(request, AuthController.change_password, data=data)
        except FormInvalid as exc:
            return await page(request, "account.html", status_code=422, errors=exc.errors)
        except ApiError as exc:
            return await page(request, "account.html", status_code=exc.status,
                              errors=api_error_field(exc, ("current_password",)) if exc.status != 401
                              else {"current_password": exc.message})
        flash(request, "Password changed. Your other sessions have been signed out.")
        return redirect("/portal/account")

    @get("/switch", guards=[require("orgs.list")])
    async def switch(self, request: Request, org_id: Annotated[int, Parameter(ge=1, le=2**53 - 1)]) -> Redirect:
        """The org switcher's target (a GET form: it changes nothing but where you look)."""
        return redirect(f"/portal/orgs/{org_id}/")

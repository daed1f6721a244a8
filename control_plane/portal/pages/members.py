"""Members and roles: the list, add an existing user by email, change a role, remove."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.response import Redirect, Template

from control_plane.common import IdParam
from control_plane.controllers.orgs import MemberAdd, MemberUpdate, OrgsController
from control_plane.errors import ApiError
from control_plane.permissions import ORG_ROLES, require
from control_plane.portal.api import call
from control_plane.portal.forms import FormInvalid, decode_form, form_values
from control_plane.portal.render import flash, page, redirect

__all__ = ["MembersPages"]


class MembersPages(Controller):
    path = "/portal/orgs/{org_id:int}/members"

    async def _page(self, request: Request, org_id: int, status_code: int = 200, **context) -> Template:
        members = await call(request, OrgsController.members, org_id=org_id)
        context.setdefault("values", {})
        context.setdefault("errors", {})
        return await page(request, "members.html", status_code=status_code, members=members, roles=ORG_ROLES,
                          **context)

    @get("/", guards=[require("members.read")])
    async def members(self, request: Request, org_id: IdParam) -> Template:
        return await self._page(request, org_id)

    @post("/", guards=[require("members.manage")])
    async def add(self, request: Request, org_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form({"email": values.get("email", "").strip(), "role": values.get("role", "")}, MemberAdd)
            member = await call(request, OrgsController.add_member, org_id=org_id, data=data)
        except FormInvalid as exc:
            return await self._page(request, org_id, 422, values=values, errors=exc.errors)
        except ApiError as exc:
            if exc.status == 403 and exc.code != "forbidden":
                raise
            field = "role" if exc.status == 403 else "email"
            return await self._page(request, org_id, exc.status, values=values, errors={field: exc.message})
        flash(request, f"{member.email} added as {member.role}.")
        return redirect(f"/portal/orgs/{org_id}/members")

    @post("/{user_id:int}/role", guards=[require("members.manage")])
    async def change_role(self, request: Request, org_id: IdParam, user_id: IdParam) -> Template | Redirect:
        values = await form_values(request)
        try:
            data = decode_form({"role": values.get("role", "")}, MemberUpdate)
            member = await call(request, OrgsController.update_member, org_id=org_id, user_id=user_id, data=data)
        except (FormInvalid, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else "Choose one of the roles."
            return await self._page(request, org_id, getattr(exc, "status", 422), row_errors={user_id: message})
        flash(request, f"{member.email} is now {member.role}.")
        return redirect(f"/portal/orgs/{org_id}/members")

    @post("/{user_id:int}/remove", guards=[require("members.manage")])
    async def remove(self, request: Request, org_id: IdParam, user_id: IdParam) -> Template | Redirect:
        try:
            await call(request, OrgsController.remove_member, org_id=org_id, user_id=user_id)
        except ApiError as exc:
            return await self._page(request, org_id, exc.status, row_errors={user_id: exc.message})
        flash(request, "Member removed (the org's API keys stay).")
        return redirect(f"/portal/orgs/{org_id}/members")

"""Rendering a page: the template plus what the layout needs (who is signed in, their orgs, the navigation
they may see, `can(action)` for buttons), the flash message of the previous step and the security headers."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.response import Redirect, Template

from control_plane.controllers.auth import MeController
from control_plane.portal.api import call, permitted
from control_plane.portal.nav import ADMIN_NAV, ORG_NAV
from control_plane.portal.security import SECURITY_HEADERS

__all__ = ["flash", "page", "redirect"]


def flash(request: Request, message: str) -> None:
    """A one-line confirmation shown on the next page (kept in the encrypted session cookie)."""
    request.session["flash"] = message[:300]


def redirect(path: str) -> Redirect:
    return Redirect(path, status_code=303, headers=SECURITY_HEADERS)


async def page(request: Request, template: str, *, status_code: int = 200, **context: Any) -> Template:
    """`template` with the layout's context. A form shown again with its problems (`status_code` 4xx, as
    the API would answer) is sent as 200: the problems are in the page, next to their fields, and a
    browser reports a 4xx document as a failed load. Refusals (403, 404) are error pages of their status."""
    if 400 <= status_code < 500 and status_code not in (403, 404):
        status_code = 200
    principal = request.state.get("principal")
    me = org = None
    if principal is not None:
        me = await call(request, MeController.me)
        org = next((m for m in me.memberships if m.org_id == principal.org_id), None)
        request.session["org"] = principal.org_id if org else request.session.get("org")

    def can(action: str) -> bool:
        return permitted(principal, action)

    base = {
        "me": me, "principal": principal, "org": org, "can": can,
        "org_nav": [n for n in ORG_NAV if can(n.action)] if org else [],
        "admin_nav": [n for n in ADMIN_NAV if can(n.action)],
        "flash": request.session.pop("flash", None) if "session" in request.scope else None,
        "path": request.url.path,
    }
    return Template(template_name=f"portal/{template}", context={**base, **context}, status_code=status_code,
                    headers=SECURITY_HEADERS)

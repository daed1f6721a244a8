"""How a page does what the JSON API does: it runs the API endpoint's own function.

A page never repeats an endpoint's SQL or rules: `call(request, KeysController.create, org_id=…, data=…)`
runs the function behind `POST /v1/orgs/{org_id}/keys` with the page's caller, after checking that the
caller may do that endpoint's action (its `require(...)` guard's, from the one permission table). So a page
may show several endpoints' data, each only to those allowed it, and a form posted by a role that may not
do the action gets the same 403 as the API gives.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.handlers import HTTPRouteHandler

from control_plane.errors import Forbidden
from control_plane.permissions import PERMISSIONS, Scope, allowed, scope_of
from control_plane.principal import Principal

__all__ = ["action_of", "call", "permitted"]


def action_of(handler: HTTPRouteHandler) -> str:
    (action,) = [g.action for g in handler.guards or () if hasattr(g, "action")]
    return action


def permitted(principal: Principal | None, action: str) -> bool:
    """Whether the caller of a page may do `action` (for an org action: in the page's org)."""
    scope = scope_of(action)
    if scope == Scope.PUBLIC:
        return True
    if principal is None:
        return False
    if scope == Scope.USER:
        return action in PERMISSIONS["user"]
    if scope == Scope.PLATFORM:
        return principal.is_platform_admin
    return principal.org_id is not None and allowed(principal.role, action)


async def call(request: Request, handler: HTTPRouteHandler, **arguments: Any) -> Any:
    """Run the API endpoint `handler` for the page's caller; 403 if they may not do its action."""
    principal = request.state.get("principal")
    if not permitted(principal, action_of(handler)):
        raise Forbidden(f"Your role ({getattr(principal, 'role', None) or 'none'}) may not do this.")
    controller = handler.fn.__qualname__.split(".")[0]
    owner = handler.fn.__globals__[controller]  # handlers call their controller's static helpers via self
    parameters = handler.fn.__code__.co_varnames[:handler.fn.__code__.co_argcount]
    if "cp" in parameters:
        arguments.setdefault("cp", request.app.state.cp)
    if "principal" in parameters:
        arguments.setdefault("principal", principal)
    if "request" in parameters:
        arguments.setdefault("request", request)
    return await handler.fn(owner, **arguments)

"""Who may do what: the one permission table, and the `require(action)` guard every endpoint carries.

Principals: `anonymous` (no credentials), `metrics_scraper` (the bearer of RR_METRICS_TOKEN, for
`GET /metrics` only), `user` (any signed-in user, for their own account),
`platform_admin` (users with the platform-admin flag, for system-wide operations) and the five org roles,
which apply to the org named by the path's `{org_id}` only. An org role grants nothing outside its org and a
platform admin gets no org role implicitly. `app.create_app` refuses to start if an endpoint has no
`require(...)` guard, and the role × endpoint test walks every endpoint against this table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ORG_ROLES", "PERMISSIONS", "Scope", "allowed", "require", "scope_of"]

ORG_ROLES = ("owner", "admin", "developer", "billing", "viewer")

_READ_ORG = {"org.read", "members.read", "usage.read", "route_evidence.read", "budgets.read"}

PERMISSIONS: dict[str, frozenset[str]] = {
    "anonymous": frozenset({"public"}),
    # A Prometheus scraper, by the bearer token RR_METRICS_TOKEN (not a user: no access token, no role).
    "metrics_scraper": frozenset({"metrics.read"}),
    "user": frozenset({"account.read", "account.update", "auth.logout", "orgs.create", "orgs.list",
                        "catalogue.read"}),
    "platform_admin": frozenset({
        "platform.orgs.read", "platform.orgs.manage", "platform.balance.adjust",
        "platform.catalogue.read", "platform.catalogue.manage", "platform.audit.read", "platform.usage.read",
        "platform.rejected_rows.read", "platform.quality.read", "platform.quality.manage",
        "platform.stripe.read", "platform.stripe.manage", "platform.plans.manage",
        "platform.payments.read", "platform.payments.review", "platform.mail.read", "platform.mail.manage",
    }),
    "owner": frozenset({
        *_READ_ORG, "org.update", "billing_settings.update", "members.manage", "members.manage_owners",
        "keys.read", "keys.manage", "billing.read", "byok.read", "byok.manage", "audit.read",
        "payments.create", "receipts.read", "budgets.manage", "webhooks.read", "webhooks.manage",
    }),
    "admin": frozenset({
        *_READ_ORG, "org.update", "billing_settings.update", "members.manage",
        "keys.read", "keys.manage", "billing.read", "byok.read", "byok.manage", "payments.create", "receipts.read",
        "budgets.manage", "webhooks.read", "webhooks.manage",
    }),
    "developer": frozenset({*_READ_ORG, "keys.read", "keys.manage", "byok.read", "webhooks.read"}),
    "billing": frozenset({*_READ_ORG, "billing.read", "billing_settings.update", "payments.create", "receipts.read",
                          "budgets.manage"}),
    "viewer": frozenset({*_READ_ORG, "keys.read", "billing.read"}),
}


class Scope:
    PUBLIC = "public"  # no credentials needed
    USER = "user"  # any signed-in user
    PLATFORM = "platform"  # platform admins
    ORG = "org"  # members of the path's org with a role that allows the action
    METRICS = "metrics"  # the holder of RR_METRICS_TOKEN (404 for anyone else, and while no token is set)


def scope_of(action: str) -> str:
    if action in PERMISSIONS["anonymous"]:
        return Scope.PUBLIC
    if action in PERMISSIONS["metrics_scraper"]:
        return Scope.METRICS
    if action in PERMISSIONS["user"]:
        return Scope.USER
    if action in PERMISSIONS["platform_admin"]:
        return Scope.PLATFORM
    if any(action in PERMISSIONS[role] for role in ORG_ROLES):
        return Scope.ORG
    raise ValueError(f"action {action!r} is not in the permission table")


def allowed(role: str | None, action: str) -> bool:
    """Whether an org `role` may do an org `action` (False for no role)."""
    return role is not None and action in PERMISSIONS.get(role, ())


Guard = Callable[[Any, Any], Awaitable[None]]


def require(action: str) -> Guard:
    """The guard of an endpoint doing `action`: authenticates and authorizes, or raises 401/403/404.

    On success the caller's `Principal` is in `request.state.principal` (not for public actions).
    """
    scope = scope_of(action)  # an unknown action fails at import time, not at request time

    async def guard(connection: Any, _handler: Any) -> None:
        if scope == Scope.PUBLIC:
            return
        if scope == Scope.METRICS:
            return connection.app.state.cp.authorize_metrics(connection)
        connection.state.principal = await connection.app.state.cp.authorize(connection, action, scope)

    guard.action = action  # type: ignore[attr-defined]  # read by create_app and the permission tests
    guard.__qualname__ = f"require({action!r})"
    return guard

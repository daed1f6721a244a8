"""The control plane's ASGI application (Litestar): controllers, the error handlers, OpenAPI, lifespan.

Nothing happens at import time; `create_app` builds the app, and its start-up hook opens the PostgreSQL
pools (the primary's, and the read replica's if one is set) and the Redis client that hang off
`app.state.cp` until shutdown. `create_app` also checks that every endpoint carries exactly one
`require(...)` guard — an endpoint nobody thought to protect can't ship — and documents the shared error
responses and the bearer-token security of each operation from that guard.
"""

from __future__ import annotations

import asyncpg
import msgspec
from litestar import Litestar
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from control_plane.body_deadline import BodyDeadline
from control_plane.controllers.admin_catalogue import AdminCatalogueController
from control_plane.controllers.admin_mail import AdminMailController
from control_plane.controllers.admin_orgs import AdminOrgsController
from control_plane.controllers.admin_payments import AdminPaymentsController
from control_plane.controllers.admin_rejected import AdminRejectedRowsController
from control_plane.controllers.admin_usage import AdminUsageController
from control_plane.controllers.audit_log import AdminAuditController, OrgAuditController
from control_plane.controllers.auth import AuthController, MeController
from control_plane.controllers.budgets import BudgetsController
from control_plane.controllers.byok import ByokController, CatalogueController
from control_plane.controllers.health import HealthController
from control_plane.controllers.keys import KeysController
from control_plane.controllers.org_webhooks import WebhookDeliveriesController, WebhookEndpointsController
from control_plane.controllers.orgs import OrgsController
from control_plane.controllers.payments import PaymentsController, PlansController
from control_plane.controllers.quality import AdminQualityController, RouteEvidenceController
from control_plane.controllers.usage import UsageController
from control_plane.controllers.webhooks import WebhooksController
from control_plane.errors import ErrorBody, exception_handlers
from control_plane.metrics import ControlPlaneMetrics, MetricsController, RequestMetrics
from control_plane.permissions import Scope, scope_of
from control_plane.portal import portal_router, session_middleware, static_router, template_config
from control_plane.state import ControlPlane
from shared.redis_client import open_redis
from shared.settings import Settings, load_settings

__all__ = ["CONTROLLERS", "create_app", "endpoint_actions", "page_actions"]

CONTROLLERS = [
    HealthController, AuthController, MeController, OrgsController, KeysController, BudgetsController, UsageController,
    CatalogueController, ByokController, OrgAuditController, AdminOrgsController, AdminCatalogueController,
    AdminAuditController, AdminUsageController, AdminRejectedRowsController, AdminQualityController,
    RouteEvidenceController, PaymentsController, PlansController, AdminPaymentsController, WebhooksController,
    WebhookEndpointsController, WebhookDeliveriesController, AdminMailController,
    MetricsController,
]

_ERROR_DESCRIPTIONS = {
    400: "Malformed request.", 401: "Missing, invalid or expired credentials.",
    403: "Signed in, but not allowed to do this.", 404: "No such object (or not visible to you).",
    409: "Conflicts with the current state.", 422: "Invalid input.", 429: "Too many attempts; see Retry-After.",
    502: "A payment provider refused the call.", 503: "A payment provider is not configured or not reachable.",
}


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=lambda v: msgspec.json.encode(v).decode(),
                              decoder=msgspec.json.decode)


def _route_handlers(app: Litestar, *, pages: bool = False):
    """(path, method, handler) of every API endpoint we declared (not the framework's OPTIONS/schema ones),
    or with `pages` of every portal page."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if handler.fn.__module__.startswith("control_plane.") and bool(handler.opt.get("portal")) == pages:
                for method in sorted(handler.http_methods):
                    yield route.path, method, handler


def _action_of(handler) -> str:
    actions = [g.action for g in handler.guards or () if hasattr(g, "action")]
    if len(actions) != 1:
        raise RuntimeError(f"endpoint {handler} must have exactly one require(...) guard, has {len(actions)}")
    return actions[0]


def endpoint_actions(app: Litestar) -> list[tuple[str, str, str]]:
    """(path template, HTTP method, action) of every endpoint: what the permission tests walk."""
    return [(path, method, _action_of(handler)) for path, method, handler in _route_handlers(app)]


def page_actions(app: Litestar) -> list[tuple[str, str, str]]:
    """(path template, HTTP method, action) of every portal page: what the portal's permission test walks."""
    return [(path, method, _action_of(handler)) for path, method, handler in _route_handlers(app, pages=True)]


def _check_pages(app: Litestar) -> None:
    """Pages keep the API's discipline: exactly one guard each, and an org page names its org in the path."""
    for path, method, handler in _route_handlers(app, pages=True):
        if scope_of(_action_of(handler)) == Scope.ORG and not path.startswith("/portal/orgs/{org_id:int}"):
            raise RuntimeError(f"{method} {path}: an org page needs the org in the path as {{org_id:int}}")


def _document(app: Litestar) -> None:
    """Check every endpoint's guard, and state its error responses and security in the OpenAPI document."""
    for path, method, handler in _route_handlers(app):
        scope = scope_of(_action_of(handler))
        if scope == Scope.ORG and not path.startswith("/v1/orgs/{org_id:int}"):
            raise RuntimeError(f"{method} {path}: an org action needs the org in the path as {{org_id:int}}")
        codes = {400, 422, *handler.opt.get("errors", ())}
        if scope == Scope.METRICS:
            continue  # not in the document (include_in_schema=False); a scraper's token, not a user's
        if scope != Scope.PUBLIC:
            codes.add(401)
            handler.security = [{"BearerAuth": []}]
        if scope in (Scope.ORG, Scope.PLATFORM):
            codes.add(403)
        if scope == Scope.ORG or "{" in path:
            codes.add(404)
        if method in ("POST", "PUT", "PATCH", "DELETE") and scope != Scope.PUBLIC:
            codes.add(409)
        handler.responses = {
            **{code: ResponseSpec(data_container=ErrorBody, description=_ERROR_DESCRIPTIONS[code],
                                  generate_examples=False) for code in sorted(codes)},
            **(handler.responses or {}),
        }


def create_app(settings: Settings | None = None) -> Litestar:
    """The app for `settings` (default: from the environment); granian calls this once per worker."""
    settings = settings or load_settings()
    metrics = ControlPlaneMetrics(settings)

    async def start(app: Litestar) -> None:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10, command_timeout=30,
                                         init=_init_connection)
        read_pool = None
        if settings.database_read_url:
            # Small, and opened lazily (min_size=0): a replica that is down fails only the listings that read
            # from it, never the start-up, sign-in or top-ups, which use the primary; one that does not
            # answer fails them after 5 s (asyncpg's connect timeout is 60 s).
            read_pool = await asyncpg.create_pool(settings.database_read_url, min_size=0, max_size=4, timeout=5,
                                                  command_timeout=30, init=_init_connection)
        redis = await open_redis(settings.redis_url, cluster=settings.redis_cluster)
        app.state.cp = ControlPlane(settings, pool, redis, read_pool)
        if metrics.writer is not None:
            metrics.writer.start()

    async def stop(app: Litestar) -> None:
        if metrics.writer is not None:
            await metrics.writer.close()
        cp = app.state.get("cp")
        if cp is not None:
            await cp.close()

    app = Litestar(
        route_handlers=[*CONTROLLERS, portal_router(settings), static_router()],
        template_config=template_config(),
        exception_handlers=exception_handlers,
        on_startup=[start],
        on_shutdown=[stop],
        request_max_body_size=256 * 1024,
        middleware=[RequestMetrics, DefineMiddleware(BodyDeadline, timeout_s=settings.body_read_timeout_s),
                    session_middleware(settings)],
        openapi_config=OpenAPIConfig(
            title="Rocket Relay control plane",
            version="1",
            description="Portal (accounts, orgs, API keys, usage, billing settings, BYOK) and platform admin. "
                        "Errors: `{\"error\": {\"code\", \"message\"}}`. Money: integer micro-units "
                        "(`*_micros`, 1 USD = 1,000,000).",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin()],
            components=Components(security_schemes={
                "BearerAuth": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT",
                                             description="An access token from /v1/auth/login or /v1/auth/refresh."),
            }),
        ),
        debug=False,
    )
    app.state.cp_metrics = metrics
    _document(app)
    _check_pages(app)
    return app

"""The portal: server-rendered pages for customers and platform admins, under /portal.

Each page is guarded by `require(action)` like every API endpoint, authenticates by the session cookie only
(see `control_plane.state.ControlPlane._claims`), and does its work by running the API endpoints' own
functions (`portal.api.call`). The pages' router carries the cookie session, CSRF protection on every
unsafe request, HTML error pages and the security headers; static files are served from /static.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.middleware.base import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from control_plane.permissions import require
from control_plane.portal.errors import portal_exception_handlers
from control_plane.portal.filters import FILTERS
from control_plane.portal.pages.account import AccountPages, RootPage
from control_plane.portal.pages.activity import ActivityPages
from control_plane.portal.pages.admin import AdminPages
from control_plane.portal.pages.admin_mail import AdminMailPages
from control_plane.portal.pages.billing import BillingPages
from control_plane.portal.pages.budgets import BudgetsPages
from control_plane.portal.pages.dashboard import DashboardPage
from control_plane.portal.pages.keys import KeysPages
from control_plane.portal.pages.members import MembersPages
from control_plane.portal.pages.settings import SettingsPages
from control_plane.portal.pages.webhooks import WebhooksPages
from control_plane.portal.security import csrf_config, session_config
from shared.settings import Settings

__all__ = ["PAGES", "portal_router", "session_middleware", "static_router", "template_config"]

_HERE = Path(__file__).resolve().parent.parent
PAGES = [RootPage, AccountPages, DashboardPage, KeysPages, BudgetsPages, ActivityPages, BillingPages, MembersPages,
         WebhooksPages, SettingsPages, AdminPages, AdminMailPages]


def template_config() -> TemplateConfig:
    def setup(engine: JinjaTemplateEngine) -> None:
        engine.engine.filters.update(FILTERS)
        engine.engine.autoescape = True

    return TemplateConfig(directory=_HERE / "templates", engine=JinjaTemplateEngine, engine_callback=setup)


def portal_router(settings: Settings) -> Router:
    return Router(
        path="/", route_handlers=PAGES, include_in_schema=False, opt={"portal": True},
        middleware=[DefineMiddleware(CSRFMiddleware, config=csrf_config(settings))],
        exception_handlers=portal_exception_handlers,
    )


def session_middleware(settings: Settings) -> DefineMiddleware:
    """The cookie session, on the app (a router's middleware is deep-copied, which its cipher refuses);
    it skips every path outside /portal, so the API never reads or sets the cookie."""
    return session_config(settings).middleware


def static_router() -> Router:
    return create_static_files_router(path="/static", directories=[_HERE / "static"], include_in_schema=False,
                                      cache_control=CacheControlHeader(public=True, max_age=3600),
                                      guards=[require("public")])

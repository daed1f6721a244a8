"""Errors on the portal's pages as pages: not signed in → the login page; anything else an error page
with the same status and message the API would give (never a stack trace or the request's content)."""

from __future__ import annotations

import logging
from urllib.parse import quote

from litestar import Request, Response
from litestar.exceptions import HTTPException, PermissionDeniedException
from litestar.response import Template

from control_plane.errors import ApiError, Unauthorized
from control_plane.portal.render import redirect
from control_plane.portal.security import SECURITY_HEADERS

__all__ = ["portal_exception_handlers"]

log = logging.getLogger("rocket_relay.control_plane.portal")


def _error_page(request: Request, status: int, title: str, message: str) -> Template:
    # Exception handlers are synchronous: the page has the bare layout (no org navigation to look up).
    context = {"me": None, "org": None, "org_nav": [], "admin_nav": [], "flash": None, "path": request.url.path,
               "title": title, "message": message, "can": lambda _action: False}
    return Template(template_name="portal/error.html", context=context, status_code=status,
                    headers=SECURITY_HEADERS)


def _api_error(request: Request, exc: ApiError) -> Response | Template:
    if isinstance(exc, Unauthorized) and request.method == "GET":
        return redirect(f"/portal/login?next={quote(request.url.path)}")
    titles = {401: "Please sign in", 403: "Not allowed", 404: "Not found", 409: "Conflict", 429: "Slow down"}
    return _error_page(request, exc.status, titles.get(exc.status, "Something went wrong"), exc.message)


def _http_error(request: Request, exc: HTTPException) -> Template:
    if isinstance(exc, PermissionDeniedException) and "CSRF" in (exc.detail or ""):
        return _error_page(request, 403, "Form expired",
                                 "This form had expired or came from another site. Reload the page and try again.")
    if exc.status_code >= 500:
        log.error("HTTP %d on a portal page", exc.status_code)
        return _error_page(request, 500, "Something went wrong", "Internal error.")
    return _error_page(request, exc.status_code, "Request refused", exc.detail or "Request refused.")


def _internal_error(request: Request, exc: Exception) -> Template:
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return _error_page(request, 500, "Something went wrong", "Internal error.")


portal_exception_handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}

"""The portal's browser security: the session cookie, CSRF protection and the response headers (a strict CSP).

- Session: Litestar's client-side cookie session (AES-256-GCM, `cryptography`), holding only the user id
  and the id of a session family of `control_plane.tokens` (the same Redis record a login through the API
  creates). So logout, a password change or a platform-wide end of sessions end portal sessions the same
  way; a copied cookie is worthless once its family is gone, and the portal stores nothing new.
- CSRF: Litestar's double-submit middleware (HMAC-signed token cookie, compared with the form field
  `_csrf_token` or the `x-csrftoken` header) on every unsafe request to the portal.
- Keys: HKDF-SHA256 of the key pepper (or `RR_JWT_SECRET`) with labels of their own, like the access-token key.
- Secure cookies: always, except on a loopback listener (plain-HTTP local use) unless configured otherwise.
"""

from __future__ import annotations

import ipaddress

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from litestar.config.csrf import CSRFConfig
from litestar.middleware.session.client_side import CookieBackendConfig

from shared.settings import Settings

__all__ = ["CSP", "SECURITY_HEADERS", "SESSION_COOKIE", "csrf_config", "secure_cookies", "session_config"]

SESSION_COOKIE = "rr_portal"
CSRF_COOKIE = "rr_csrf"

# Everything the portal loads is its own: no inline script or style, no other origin, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _derive(settings: Settings, label: bytes) -> bytes:
    source = (settings.jwt_secret or settings.key_pepper).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(source)


def secure_cookies(settings: Settings) -> bool:
    if settings.portal_secure_cookies != "auto":
        return settings.portal_secure_cookies == "always"
    host = settings.control_plane_host.strip("[]")
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def session_config(settings: Settings) -> CookieBackendConfig:
    return CookieBackendConfig(
        secret=_derive(settings, b"rocket-relay portal session cookie v1"), key=SESSION_COOKIE,
        max_age=settings.refresh_token_ttl_s, path="/portal", httponly=True, secure=secure_cookies(settings),
        # lax: the way back from Stripe's checkout is a cross-site top-level GET. Outside the portal the
        # middleware does nothing (and `ControlPlane._claims` reads a session on portal pages only).
        samesite="lax", exclude=[r"^/(v1|static|docs|schema)(/|$)", r"^/(healthz|readyz|openapi\.json)$"])


def csrf_config(settings: Settings) -> CSRFConfig:
    return CSRFConfig(secret=_derive(settings, b"rocket-relay portal csrf v1").hex(), cookie_name=CSRF_COOKIE,
                      cookie_path="/portal", cookie_secure=secure_cookies(settings), cookie_httponly=True,
                      cookie_samesite="strict", header_name="x-csrftoken")

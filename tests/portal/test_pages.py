"""The portal over plain HTTP: its security (CSP and headers, cookie flags, CSRF, no cookie on the API and
no token on the pages, no open redirect, logout ends the cookie) and the role × page matrix generated from
the app's pages; money in forms and on pages is exact (hypothesis)."""

from __future__ import annotations

import base64
import re
from decimal import Decimal

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.app import create_app, page_actions
from control_plane.permissions import ORG_ROLES, Scope, allowed, scope_of
from control_plane.portal.filters import micros_to_dollars, usd
from control_plane.portal.forms import FormInvalid, usd_to_micros
from control_plane.portal.security import CSP, secure_cookies
from shared.settings import load_settings
from tests.conftest import Server
from tests.control_plane.conftest import PASSWORD, Account, Portal

_SETTINGS = load_settings({}, database_url="postgresql://unused", redis_url="redis://unused", key_pepper="p" * 24,
                          master_key=base64.b64encode(b"m" * 32).decode())
PAGES = page_actions(create_app(_SETTINGS))
_TOKEN = re.compile(r'name="_csrf_token" value="([^"]+)"')


async def browser_session(server: Server, email: str, password: str = PASSWORD) -> httpx.AsyncClient:
    """An HTTP client signed in to the portal the way a browser is (cookies, the form's CSRF token)."""
    http = httpx.AsyncClient(base_url=server.url, timeout=20.0, headers={"x-forwarded-for": "10.9.8.7"})
    form = await http.get("/portal/login")
    token = _TOKEN.search(form.text).group(1)
    resp = await http.post("/portal/login", data={"email": email, "password": password, "_csrf_token": token})
    assert resp.status_code == 303, resp.text
    return http


async def token_of(http: httpx.AsyncClient, path: str) -> str:
    return _TOKEN.search((await http.get(path)).text).group(1)


async def test_pages_carry_a_strict_csp_and_cookies_are_httponly_and_samesite(portal_server: Server) -> None:
    async with httpx.AsyncClient(base_url=portal_server.url) as http:
        resp = await http.get("/portal/login")
    assert resp.status_code == 200
    assert resp.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    assert resp.headers["x-frame-options"] == "DENY" and resp.headers["cache-control"] == "no-store"
    cookie = resp.headers["set-cookie"].lower()
    assert "rr_csrf=" in cookie and "httponly" in cookie and "samesite=strict" in cookie and "path=/portal" in cookie
    assert "secure" not in cookie  # loopback: plain HTTP
    for path in ("/static/vendor/htmx.min.js", "/static/vendor/chart.umd.min.js", "/static/portal.css"):
        async with httpx.AsyncClient(base_url=portal_server.url) as http:
            assert (await http.get(path)).status_code == 200, path


def test_cookies_are_secure_except_on_loopback() -> None:
    def with_host(host: str, mode: str = "auto"):
        return msgspec.structs.replace(_SETTINGS, control_plane_host=host, portal_secure_cookies=mode)

    assert not secure_cookies(with_host("127.0.0.1")) and not secure_cookies(with_host("::1"))
    assert not secure_cookies(with_host("localhost"))
    assert secure_cookies(with_host("0.0.0.0")) and secure_cookies(with_host("10.0.0.5"))
    assert secure_cookies(with_host("cp.internal"))
    assert secure_cookies(with_host("127.0.0.1", "always")) and not secure_cookies(with_host("0.0.0.0", "never"))
    with pytest.raises(Exception, match="RR_PORTAL_SECURE_COOKIES"):
        msgspec.structs.replace(_SETTINGS, portal_secure_cookies="sometimes").__post_init__()


async def test_login_sets_an_httponly_session_that_only_pages_accept_and_logout_ends(
        portal_server: Server, api: Portal) -> None:
    owner = await api.signup(org_name="Cookie Co")
    http = await browser_session(portal_server, owner.email)
    session = http.cookies.get("rr_portal")
    assert session and owner.email not in session  # encrypted
    assert (await http.get(f"/portal/orgs/{owner.org_id}/")).status_code == 200
    # The cookie never authorizes the API (which has no CSRF protection) ...
    assert (await http.get("/v1/me")).status_code == 401
    # ... and a bearer token never a page.
    async with httpx.AsyncClient(base_url=portal_server.url) as bare:
        resp = await bare.get(f"/portal/orgs/{owner.org_id}/", headers=owner.auth)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/portal/login")
    # A copy of the cookie is worthless after logout: the session family is gone.
    copy = httpx.AsyncClient(base_url=portal_server.url, cookies={"rr_portal": session})
    token = await token_of(http, f"/portal/orgs/{owner.org_id}/")
    resp = await http.post("/portal/logout", data={"_csrf_token": token})
    assert resp.status_code == 303
    resp = await copy.get(f"/portal/orgs/{owner.org_id}/")
    assert resp.status_code == 303 and "/portal/login" in resp.headers["location"]
    await copy.aclose()
    await http.aclose()


async def test_every_post_needs_the_csrf_token(portal_server: Server, api: Portal, db) -> None:
    owner = await api.signup(org_name="Csrf Co")
    http = await browser_session(portal_server, owner.email)
    for path, form in ((f"/portal/orgs/{owner.org_id}/keys", {"name": "x"}),
                       (f"/portal/orgs/{owner.org_id}/settings/org", {"name": "Hijacked"}),
                       ("/portal/logout", {}), ("/portal/signup", {"email": "a@b.c", "password": PASSWORD,
                                                                    "org_name": "x"})):
        for token in (None, "forged", (await token_of(http, "/portal/login"))[:-2] + "xx"):
            resp = await http.post(path, data={**form, **({"_csrf_token": token} if token else {})})
            assert resp.status_code == 403, (path, token, resp.status_code)
            assert "Form expired" in resp.text
    assert await db.fetchval("select count(*) from api_keys where org_id = $1", owner.org_id) == 0
    assert await db.fetchval("select name from orgs where id = $1", owner.org_id) == "Csrf Co"
    await http.aclose()


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"])
async def test_login_never_redirects_off_the_portal(portal_server: Server, api: Portal, target: str) -> None:
    owner = await api.signup(org_name="Redirect Co")
    async with httpx.AsyncClient(base_url=portal_server.url, headers={"x-forwarded-for": "10.7.7.7"}) as http:
        token = _TOKEN.search((await http.get("/portal/login")).text).group(1)
        resp = await http.post("/portal/login", data={"email": owner.email, "password": PASSWORD, "next": target,
                                                       "_csrf_token": token})
    assert resp.status_code == 303 and resp.headers["location"] == "/portal/"


async def test_a_wrong_password_is_said_next_to_the_form_and_counts_as_a_failed_login(
        portal_server: Server, api: Portal) -> None:
    owner = await api.signup(org_name="Wrong Co")
    async with httpx.AsyncClient(base_url=portal_server.url, headers={"x-forwarded-for": "10.6.6.6"}) as http:
        for _ in range(6):  # the test limit per (address, email) is 5
            token = _TOKEN.search((await http.get("/portal/login")).text).group(1)
            resp = await http.post("/portal/login", data={"email": owner.email, "password": "wrong password!",
                                                           "_csrf_token": token})
        assert resp.status_code == 200 and "Too many failed logins" in resp.text
        assert "rr_portal" not in http.cookies


def _page_call(path: str, org_id: int, key_id: int) -> str | None:
    """A concrete URL for a GET page, or None for pages that need an object this test does not make."""
    path = path.replace("{org_id:int}", str(org_id)).replace("{key_id:int}", str(key_id))
    return None if "{" in path else path


@pytest.mark.parametrize("role", [*ORG_ROLES, "outsider", "platform_admin"])
async def test_role_by_page_matrix(portal_server: Server, api: Portal, factory, role: str) -> None:
    """Every GET page, generated from the app: allowed → 200; a role without the action → 403; an org the
    caller is not a member of → 404; a platform page for a non-admin → 403."""
    owner = await api.signup(org_name="Matrix Co")
    key_id, _ = await factory.key(owner.org_id)
    if role in ORG_ROLES:
        user: Account = owner if role == "owner" else await api.member(owner, owner.org_id, role)
    elif role == "outsider":
        user = await api.signup(org_name="Elsewhere")
    else:
        user = await api.platform_admin()
    http = await browser_session(portal_server, user.email)
    checked = 0
    for path, method, action in PAGES:
        url = _page_call(path, owner.org_id, key_id) if method == "GET" else None
        if url is None or scope_of(action) == Scope.PUBLIC or path in ("/portal", "/portal/switch"):
            continue
        resp = await http.get(url)
        scope = scope_of(action)
        if scope == Scope.USER:
            expected = 200
        elif scope == Scope.PLATFORM:
            expected = 200 if role == "platform_admin" else 403
        elif role in ORG_ROLES:
            expected = 200 if allowed(role, action) else 403
        else:
            expected = 404
        assert resp.status_code == expected, (role, url, resp.status_code)
        checked += 1
    assert checked >= 18  # every GET page with only the org and a key in its path (webhooks, budgets, mail too)
    await http.aclose()


@given(st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1))
def test_dollars_in_forms_round_trip_exactly(micros: int) -> None:
    assert usd_to_micros(micros_to_dollars(micros), "amount") == micros
    shown = usd(micros, 6)
    assert Decimal(shown.replace("$", "").replace(",", "")) == Decimal(micros) / 1_000_000


@given(st.text(max_size=40))
def test_any_text_in_a_money_field_is_a_field_error_or_exact(text: str) -> None:
    try:
        micros = usd_to_micros(text, "amount")
    except FormInvalid as exc:
        assert set(exc.errors) == {"amount"}
    else:
        assert isinstance(micros, int) and abs(micros) <= 2**53 - 1


def test_money_is_shown_rounded_half_up_and_small_amounts_keep_their_digits() -> None:
    assert usd(12_345_678) == "$12.35" and usd(12_344_999) == "$12.34" and usd(-1_005_000) == "-$1.01"
    assert usd(123) == "$0.000123" and usd(0) == "$0.00" and usd(None) == "—"
    assert usd(1_234_567_890_000) == "$1,234,567.89" and usd(999_999) == "$1.00"

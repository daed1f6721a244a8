"""Accounts: signup, login, token refresh, logout, the caller's own profile and password change."""

from __future__ import annotations

import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, Request, get, post
from litestar.params import JSONBody

from control_plane import audit
from control_plane.accounts import create_org
from control_plane.common import CP, DEPENDENCIES, Caller, Email
from control_plane.errors import Conflict, TooManyRequests, Unauthorized
from control_plane.permissions import Scope, require
from control_plane.principal import Principal
from control_plane.state import ControlPlane
from control_plane.tokens import RefreshOutcome

Password = Annotated[str, msgspec.Meta(min_length=10, max_length=256, description="At least 10 characters.")]
OrgName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class SignupRequest(msgspec.Struct, frozen=True):
    email: Email
    password: Password
    org_name: OrgName


class LoginRequest(msgspec.Struct, frozen=True):
    email: Annotated[str, msgspec.Meta(max_length=254)]
    password: Annotated[str, msgspec.Meta(max_length=256)]


class RefreshRequest(msgspec.Struct, frozen=True):
    refresh_token: Annotated[str, msgspec.Meta(max_length=256)]


class PasswordChange(msgspec.Struct, frozen=True):
    current_password: Annotated[str, msgspec.Meta(max_length=256)]
    new_password: Password


class Tokens(msgspec.Struct, frozen=True):
    access_token: str
    refresh_token: str
    expires_in: int  # seconds the access token is valid
    token_type: str = "Bearer"


class Membership(msgspec.Struct, frozen=True):
    org_id: int
    org_name: str
    org_code: str
    org_status: str
    role: str


class Me(msgspec.Struct, frozen=True):
    id: int
    email: str
    is_platform_admin: bool
    created_at: datetime.datetime
    memberships: list[Membership]


class SignupResult(msgspec.Struct, frozen=True):
    user_id: int
    org_id: int
    org_code: str
    tokens: Tokens


_INVALID_LOGIN = "Incorrect email or password."


async def _tokens(cp: ControlPlane, user_id: int) -> Tokens:
    family, refresh = await cp.tokens.start_session(user_id)
    return Tokens(cp.tokens.issue_access(user_id, family), refresh, cp.tokens.access_ttl_s)


class AuthController(Controller):
    path = "/v1/auth"
    dependencies = DEPENDENCIES
    tags = ("accounts",)

    @post("/signup", guards=[require("public")], opt={"errors": (409,)})
    async def signup(self, cp: CP, request: Request, data: JSONBody[SignupRequest]) -> SignupResult:
        """Create a user, their first org (with a unique short code) and the owner membership; logs in."""
        password_hash = await cp.passwords.hash(data.password)
        async with cp.pool.acquire() as conn, conn.transaction():
            try:
                user_id = await conn.fetchval(
                    "insert into users (email, password_hash) values ($1, $2) returning id",
                    data.email.strip(), password_hash)
            except asyncpg.UniqueViolationError:
                raise Conflict("An account with this email already exists.", code="email_taken") from None
            org = await create_org(conn, data.org_name, user_id)
            actor = Principal(user_id, data.email, False, "", cp.client_ip(request), Scope.ORG, org["id"], "owner")
            await audit.record(conn, actor, "org.create", "org", org["id"], org_id=org["id"],
                               after={"name": org["name"], "code": org["code"]})
        return SignupResult(user_id, org["id"], org["code"], await _tokens(cp, user_id))

    @post("/login", guards=[require("public")], status_code=200, opt={"errors": (401, 429)})
    async def login(self, cp: CP, request: Request, data: JSONBody[LoginRequest]) -> Tokens:
        """Exchange email and password for tokens. Unknown email and wrong password get the same answer."""
        ip = cp.client_ip(request)
        wait = await cp.login_limiter.blocked_for(ip, data.email)
        if wait:
            raise TooManyRequests("Too many failed logins; try again later.", code="too_many_attempts",
                                  headers={"retry-after": str(wait)})
        row = await cp.pool.fetchrow("select id, password_hash from users where lower(email) = lower($1)",
                                     data.email.strip())
        if not await cp.passwords.verify(row["password_hash"] if row else None, data.password):
            await cp.login_limiter.record_failure(ip, data.email)
            raise Unauthorized(_INVALID_LOGIN, code="invalid_credentials")
        await cp.login_limiter.record_success(ip, data.email)
        if cp.passwords.needs_rehash(row["password_hash"]):
            await cp.pool.execute("update users set password_hash = $2 where id = $1",
                                  row["id"], await cp.passwords.hash(data.password))
        return await _tokens(cp, row["id"])

    @post("/refresh", guards=[require("public")], status_code=200, opt={"errors": (401,)})
    async def refresh(self, cp: CP, data: JSONBody[RefreshRequest]) -> Tokens:
        """Trade a refresh token for new tokens; the old refresh token stops working. Presenting an already
        used refresh token ends the whole session (every token descended from the same login)."""
        outcome, user_id, family, refresh = await cp.tokens.rotate(data.refresh_token)
        if outcome == RefreshOutcome.REUSED:
            raise Unauthorized("This refresh token was already used; the session has been ended for safety.",
                               code="refresh_token_reused")
        if outcome != RefreshOutcome.ROTATED or not await cp.pool.fetchval(
                "select 1 from users where id = $1", user_id):
            raise Unauthorized("Invalid or expired refresh token.", code="invalid_refresh_token")
        return Tokens(cp.tokens.issue_access(user_id, family), refresh, cp.tokens.access_ttl_s)

    @post("/logout", guards=[require("auth.logout")], status_code=204)
    async def logout(self, cp: CP, principal: Caller) -> None:
        """End this session: its refresh token and every access token issued in it stop working."""
        await cp.tokens.end_session(principal.user_id, principal.session_id)

    @post("/password", guards=[require("account.update")], status_code=204, opt={"errors": (401, 429)})
    async def change_password(self, cp: CP, principal: Caller, data: JSONBody[PasswordChange]) -> None:
        """Change the password; every other session of this user ends."""
        wait = await cp.login_limiter.blocked_for(principal.ip, principal.email)
        if wait:
            raise TooManyRequests("Too many failed attempts; try again later.", code="too_many_attempts",
                                  headers={"retry-after": str(wait)})
        stored = await cp.pool.fetchval("select password_hash from users where id = $1", principal.user_id)
        if not await cp.passwords.verify(stored, data.current_password):
            await cp.login_limiter.record_failure(principal.ip, principal.email)
            raise Unauthorized("The current password is incorrect.", code="invalid_credentials")
        new_hash = await cp.passwords.hash(data.new_password)
        async with cp.pool.acquire() as conn, conn.transaction():
            await conn.execute("update users set password_hash = $2 where id = $1", principal.user_id, new_hash)
            await audit.record(conn, principal, "user.password_change", "user", principal.user_id, org_id=None,
                               before={"password": stored}, after={"password": new_hash})
        await cp.tokens.end_user_sessions(principal.user_id, keep=principal.session_id)


class MeController(Controller):
    path = "/v1/me"
    dependencies = DEPENDENCIES
    tags = ("accounts",)

    @get("/", guards=[require("account.read")])
    async def me(self, cp: CP, principal: Caller) -> Me:
        """The signed-in user and the orgs they belong to, with their role in each."""
        user = await cp.pool.fetchrow("select id, email, is_platform_admin, created_at from users where id = $1",
                                      principal.user_id)
        rows = await cp.pool.fetch(
            """select o.id, o.name, o.code, o.status, m.role from memberships m join orgs o on o.id = m.org_id
               where m.user_id = $1 order by o.id""", principal.user_id)
        return Me(user["id"], user["email"], user["is_platform_admin"], user["created_at"],
                  [Membership(r["id"], r["name"], r["code"], r["status"], r["role"]) for r in rows])

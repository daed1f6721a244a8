"""`ControlPlane`: what every request needs, built once per worker on start-up and kept on `app.state.cp`.

It also authenticates and authorizes requests (`authorize`, called by the `require(...)` guard), since
that needs the token service, Redis and PostgreSQL it holds.

Two PostgreSQL pools: `pool` on the primary, for every write and every read that must see a write (the
caller's own, a moment ago: balances, keys, members, sessions, authorization); and `read_pool`, for the heavy
listings that tolerate a replica's lag (usage, request logs, the audit log, admin usage). Without
`RR_DATABASE_READ_URL` both are the same pool.
"""

from __future__ import annotations

import asyncpg
import stripe
from redis.asyncio import Redis

from control_plane.errors import Forbidden, NotFound, Unauthorized
from control_plane.limits import LoginLimiter
from control_plane.passwords import Passwords
from control_plane.permissions import Scope, allowed
from control_plane.principal import ClientAddress, Principal
from control_plane.redis_keys import ControlPlaneKeys
from control_plane.tokens import AccessClaims, TokenService
from shared.billing import BillingScripts
from shared.crypto import box_from_settings
from shared.metrics.exposition import metrics_allowed
from shared.payments.networks import ChainVerifier, NoChainVerifier
from shared.payments.stripe_events import EventProcessor
from shared.redis_keys import RedisKeys
from shared.settings import Settings

__all__ = ["MAX_ID", "ControlPlane"]

MAX_ID = 2**53 - 1  # ids and amounts in the API stay exact in JSON clients that use doubles

_PRINCIPAL_SQL = """
select u.email, u.is_platform_admin, m.role
from users u left join memberships m on m.user_id = u.id and m.org_id = $2
where u.id = $1
"""


class ControlPlane:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis,
                 read_pool: asyncpg.Pool | None = None) -> None:
        self.settings = settings
        self.pool = pool
        # Possibly seconds behind the primary: only for reads whose page says "as of a moment ago".
        self.read_pool = read_pool or pool
        self.redis = redis
        self.keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self.cp_keys = ControlPlaneKeys(settings.redis_prefix)
        self.scripts = BillingScripts(redis)
        self.box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)
        self.tokens = TokenService(settings, redis, self.cp_keys)
        self.passwords = Passwords(time_cost=settings.password_time_cost, memory_kib=settings.password_memory_kib)
        self.login_limiter = LoginLimiter(settings, redis, self.cp_keys)
        self.client_address = ClientAddress(settings.trusted_proxy_header, settings.trusted_proxies)
        # Payments: one connection pool for Stripe calls, the webhook events' processor (also run by
        # rr-worker), and the seam where a chain verifier of crypto top-ups plugs in.
        self.stripe_http = stripe.HTTPXClient(timeout=settings.stripe_timeout_s)
        self.stripe_events = EventProcessor(pool, self.scripts, self.keys, failpoint=settings.failpoint)
        self.chain_verifier: ChainVerifier = NoChainVerifier()

    async def close(self) -> None:
        await self.stripe_http.close_async()
        await self.redis.aclose()
        if self.read_pool is not self.pool:
            await self.read_pool.close()
        await self.pool.close()

    def client_ip(self, connection) -> str | None:
        client = connection.scope.get("client")
        return self.client_address.resolve(client[0] if client else None, connection.headers)

    async def publish_config(self) -> None:
        """Tell every proxy that models, prices, providers or routes changed (they reload within moments)."""
        await self.redis.publish(self.keys.events_channel, "config")

    def authorize_metrics(self, connection) -> None:
        """A metrics scrape: only with `Bearer <RR_METRICS_TOKEN>`; anyone else (and everyone while no token is
        set) gets the 404 of an unknown path, so nobody learns the endpoint exists."""
        if not metrics_allowed(connection.headers.get("authorization"), self.settings.metrics_token):
            raise NotFound("No such endpoint.")

    def _claims(self, connection) -> AccessClaims:
        """Who the credentials say is calling: a bearer access token on the API; on the portal's pages
        (handlers with `opt["portal"]`) only the session cookie, so that a cookie never authorizes an API
        call (which has no CSRF protection) and a token never a page."""
        if connection.route_handler.opt.get("portal"):
            session = connection.scope.get("session") or {}
            user_id, family = session.get("uid"), session.get("sid")
            if isinstance(user_id, int) and isinstance(family, str):
                return AccessClaims(user_id, family)
            raise Unauthorized("Sign in to continue.", code="not_signed_in")
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        claims = self.tokens.verify_access(token.strip()) if scheme.lower() == "bearer" else None
        if claims is None:
            raise Unauthorized("A valid access token is required (Authorization: Bearer …).",
                               headers={"www-authenticate": "Bearer"})
        return claims

    async def authorize(self, connection, action: str, scope: str) -> Principal:
        """The caller, if their access token is valid, their session alive and `action` allowed to them.

        401 without valid credentials; 403 for a platform action by a non-admin or an org action the role
        doesn't allow; 404 for an org the caller is not a member of — the same answer as for no such org.
        """
        claims = self._claims(connection)
        org_id = None
        if scope == Scope.ORG:
            org_id = connection.path_params.get("org_id")
            if not isinstance(org_id, int) or not 1 <= org_id <= MAX_ID:
                raise NotFound("Organization not found.")
        if not await self.tokens.session_alive(claims.session_id):
            raise Unauthorized("This session has ended; log in again.", code="session_ended",
                               headers={"www-authenticate": "Bearer"})
        row = await self.pool.fetchrow(_PRINCIPAL_SQL, claims.user_id, org_id or 0)
        if row is None:
            raise Unauthorized("This account no longer exists.", headers={"www-authenticate": "Bearer"})
        principal = Principal(claims.user_id, row["email"], row["is_platform_admin"], claims.session_id,
                              self.client_ip(connection), scope, org_id, row["role"] if org_id else None)
        if scope == Scope.PLATFORM and not principal.is_platform_admin:
            raise Forbidden("This requires a platform administrator.")
        if scope == Scope.ORG:
            if principal.role is None:
                raise NotFound("Organization not found.")
            if not allowed(principal.role, action):
                raise Forbidden(f"Your role ({principal.role}) may not do this ({action}).")
        return principal

"""Control-plane fixtures: a real `rr-control-plane` (granian) process on this run's database and Redis,
and a small portal client that signs users up, logs them in and gives them roles through the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest
import pytest_asyncio
import stripe

from control_plane.seed import ensure_platform_admin
from shared.crypto import box_from_settings
from shared.db.migrate import migrate
from shared.embedded import free_port
from shared.payments.stripe_account import save_stripe_config
from shared.settings import Settings
from tests.conftest import Server, settings_env, start_server

PASSWORD = "correct horse battery"

# Cheap Argon2 in tests (the cost is a setting; production keeps the RFC 9106 profile). The forwarding
# header is trusted from 127.0.0.1, so each test can act from its own client IP (login limits are per IP).
CONTROL_PLANE_OVERRIDES = {
    "password_time_cost": 1,
    "password_memory_kib": 256,
    "trusted_proxy_header": "X-Forwarded-For",
    "price_min_lead_s": 1.0,
    "login_max_failures_per_ip_email": 5,
    "login_max_failures_per_ip": 8,
    "login_max_failures_per_email": 12,
    "login_window_s": 60,
}


def start_control_plane(settings: Settings, **overrides: object) -> Server:
    port = free_port()
    env = settings_env(settings, control_plane_port=port, **{**CONTROL_PLANE_OVERRIDES, **overrides})
    return start_server([sys.executable, "-m", "control_plane.main"], env, port, "/readyz", "control-plane")


@contextlib.contextmanager
def isolated_database(admin_url: str, settings: Settings, suffix: str) -> Iterator[Settings]:
    """`settings` on a fresh, migrated database and a Redis prefix of their own, for tests that change
    things at random or globally (fuzzing, the dev stack's seed); dropped afterwards."""
    name = f"{urlsplit(settings.database_url).path.lstrip('/')}_{suffix}"
    parts = urlsplit(admin_url)
    isolated = msgspec.structs.replace(
        settings, database_url=urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment)),
        redis_prefix=f"{settings.redis_prefix}{suffix}:")

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'create database "{name}"'))
    try:
        asyncio.run(migrate(isolated.database_url))
        yield isolated
    finally:
        asyncio.run(execute(f'drop database if exists "{name}" with (force)'))


@pytest.fixture(scope="session")
def control_plane(settings: Settings) -> Iterator[Server]:
    server = start_control_plane(settings)
    yield server
    server.stop()


def random_ip() -> str:
    return f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


@dataclass
class Account:
    user_id: int
    email: str
    org_id: int  # the org its signup created
    access_token: str
    refresh_token: str
    password: str = PASSWORD
    ip: str = field(default_factory=random_ip)

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access_token}", "x-forwarded-for": self.ip}


class Portal:
    """Talks to the control plane over HTTP, as a browser or script would."""

    def __init__(self, server: Server, http: httpx.AsyncClient, settings: Settings) -> None:
        self.url = server.url
        self.http = http
        self.settings = settings

    async def request(self, method: str, path: str, account: Account | None = None, **kwargs) -> httpx.Response:
        headers = {**(account.auth if account else {"x-forwarded-for": random_ip()}), **kwargs.pop("headers", {})}
        return await self.http.request(method, self.url + path, headers=headers, **kwargs)

    async def signup(self, *, org_name: str = "Acme", email: str | None = None) -> Account:
        email = email or f"u-{secrets.token_hex(5)}@example.com"
        resp = await self.request("POST", "/v1/auth/signup",
                                  json={"email": email, "password": PASSWORD, "org_name": org_name})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        tokens = body["tokens"]
        return Account(body["user_id"], email, body["org_id"], tokens["access_token"], tokens["refresh_token"])

    async def login(self, email: str, password: str = PASSWORD, ip: str | None = None) -> httpx.Response:
        return await self.http.post(self.url + "/v1/auth/login", json={"email": email, "password": password},
                                    headers={"x-forwarded-for": ip or random_ip()})

    async def login_account(self, account: Account) -> Account:
        """A second session of the same user (a new token family)."""
        resp = await self.login(account.email, account.password)
        assert resp.status_code == 200, resp.text
        tokens = resp.json()
        return Account(account.user_id, account.email, account.org_id, tokens["access_token"],
                       tokens["refresh_token"], account.password)

    async def member(self, owner: Account, org_id: int, role: str) -> Account:
        """A new user with `role` in `org_id` (added by `owner`)."""
        user = await self.signup(org_name="Own org")
        resp = await self.request("POST", f"/v1/orgs/{org_id}/members", owner, json={"email": user.email, "role": role})
        assert resp.status_code == 201, resp.text
        return user

    async def platform_admin(self) -> Account:
        email = f"admin-{secrets.token_hex(4)}@example.com"
        user_id = await ensure_platform_admin(self.settings, email, PASSWORD)
        resp = await self.login(email)
        assert resp.status_code == 200, resp.text
        tokens = resp.json()
        me = await self.http.get(self.url + "/v1/me", headers={"authorization": f"Bearer {tokens['access_token']}"})
        orgs = me.json()["memberships"]
        return Account(user_id, email, orgs[0]["org_id"] if orgs else 0, tokens["access_token"],
                       tokens["refresh_token"])


@pytest_asyncio.fixture
async def portal(control_plane: Server, settings: Settings) -> AsyncIterator[Portal]:
    async with httpx.AsyncClient(timeout=20.0) as http:
        yield Portal(control_plane, http, settings)


# --- Payments: the local Stripe, configured as the platform's Stripe account ---------------------------

LOCAL_STRIPE_KEY = "sk_test_rocketrelay_local"
LOCAL_WEBHOOK_SECRET = "whsec_rocketrelay_local_test"


def start_local_stripe() -> Server:
    port = free_port()
    return start_server([sys.executable, "-m", "tests.fixtures.local_stripe", "--port", str(port)],
                        dict(os.environ), port, "/_config/health", "local-stripe")


@dataclass
class LocalStripe:
    """The local Stripe (localstripe + tests/fixtures/local_stripe.py), set as the platform's Stripe account,
    the real `stripe` library pointed at it, and a webhook sender that signs as Stripe signs."""

    server: Server
    secret_key: str = LOCAL_STRIPE_KEY
    webhook_secret: str = LOCAL_WEBHOOK_SECRET

    @property
    def client(self) -> stripe.StripeClient:
        return stripe.StripeClient(self.secret_key, base_addresses={"api": self.server.url})

    def pay(self, session_url: str) -> dict:
        """Press Pay on the hosted checkout page."""
        resp = httpx.post(session_url + "/pay", timeout=10.0)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def register_webhook(self, name: str, url: str, events: list[str]) -> None:
        """Have the local Stripe itself send these event types to `url`, signed with our secret."""
        resp = httpx.post(self.server.url + f"/_config/webhooks/{name}",
                          data={"url": url, "secret": self.webhook_secret, "events[]": events}, timeout=10.0)
        assert resp.status_code == 200, resp.text

    @staticmethod
    def event(kind: str, obj: dict, *, event_id: str | None = None, created: int | None = None) -> dict:
        return {"id": event_id or f"evt_{secrets.token_hex(12)}", "object": "event", "type": kind,
                "api_version": "2025-03-31", "created": created or int(time.time()), "livemode": False,
                "data": {"object": obj}}

    def sign(self, payload: bytes, *, secret: str | None = None, timestamp: int | None = None) -> str:
        return stripe.WebhookSignature.generate_signature_header(payload.decode(), secret or self.webhook_secret,
                                                                 timestamp)

    async def deliver(self, http: httpx.AsyncClient, base_url: str, event: dict, **sign_options) -> httpx.Response:
        payload = json.dumps(event).encode()
        return await http.post(base_url + "/v1/webhooks/stripe", content=payload,
                               headers={"stripe-signature": self.sign(payload, **sign_options),
                                        "content-type": "application/json"})


@pytest.fixture(scope="session")
def local_stripe_server() -> Iterator[Server]:
    server = start_local_stripe()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session")
async def local_stripe(local_stripe_server: Server, db: asyncpg.Pool, settings: Settings) -> LocalStripe:
    """The local Stripe as the platform's Stripe account of this test run (as an admin would set it)."""
    box = box_from_settings(settings.master_key_bytes, settings.master_key_id)
    async with db.acquire() as conn, conn.transaction():
        await save_stripe_config(conn, box, secret_key=LOCAL_STRIPE_KEY, webhook_secret=LOCAL_WEBHOOK_SECRET,
                                 api_base=local_stripe_server.url)
    return LocalStripe(local_stripe_server)

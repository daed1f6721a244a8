"""The role × endpoint matrix, generated from the app's endpoints and the one permission table.

Every endpoint is called by: anonymous, each of the five org roles (members of org A), a member of another
org only (outsider), and a platform admin who is no member of A. Allowed calls must succeed (2xx); the rest
are refused with 401 (anonymous), 403 (signed in, not allowed) or 404 (an org the caller is not a member of).
A new endpoint without an entry in EXAMPLES fails `test_every_endpoint_has_an_example`, so none is forgotten.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import pytest_asyncio

from control_plane.app import create_app, endpoint_actions
from control_plane.permissions import ORG_ROLES, PERMISSIONS, Scope, allowed, scope_of
from shared.crypto import box_from_settings, store_secret
from shared.notify.events import emit
from shared.notify.mail import save_smtp_config
from shared.settings import load_settings
from tests.conftest import Factory, Server
from tests.control_plane.conftest import PASSWORD, Account, LocalStripe, Portal
from tests.control_plane.test_usage import insert_request_log

# The app is built (not started) with placeholder settings, only to enumerate its endpoints.
_APP = create_app(load_settings({}, database_url="postgresql://unused", redis_url="redis://unused",
                                key_pepper="p" * 24, master_key=base64.b64encode(b"m" * 32).decode()))
ENDPOINTS = endpoint_actions(_APP)
PRINCIPALS = ("anonymous", *ORG_ROLES, "outsider", "platform_admin")


@dataclass
class World:
    org_id: int  # org A
    owner: Account
    accounts: dict[str, Account]  # principal name -> account
    target_org: int  # the org the platform-admin endpoints act on
    provider_id: int
    model: str
    route_id: int
    login_account: Account  # for the public login example
    stripe: LocalStripe  # the platform's Stripe account (the local Stripe)
    plan_id: int


@dataclass
class Call:
    params: dict[str, int] = field(default_factory=dict)  # path parameters
    json: object = None
    query: dict[str, str] | None = None
    account: Account | None = None  # overrides the principal's session (logout uses a throwaway one)
    content: bytes | None = None  # a raw body instead of `json` (the signed Stripe webhook)
    headers: dict[str, str] = field(default_factory=dict)


Example = Callable[[World, Portal, Factory, Account | None], Awaitable[Call]]
EXAMPLES: dict[tuple[str, str], Example] = {}


def example(method: str, path: str):
    def register(fn: Example) -> Example:
        EXAMPLES[(method, path)] = fn
        return fn
    return register


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def _fresh_member(w: World, portal: Portal) -> int:
    return (await portal.member(w.owner, w.org_id, "viewer")).user_id


async def _fresh_key(w: World, factory: Factory) -> int:
    return (await factory.key(w.org_id))[0]


# --- public -----------------------------------------------------------------------------------------------
for _path in ("/healthz", "/readyz", "/openapi.json", "/metrics", "/v1/me", "/v1/orgs", "/v1/models", "/v1/providers",
              "/v1/admin/orgs", "/v1/admin/models", "/v1/admin/prices", "/v1/admin/providers", "/v1/admin/routes",
              "/v1/admin/audit-log", "/v1/admin/uncharged-usage", "/v1/admin/rejected-rows",
              "/v1/admin/quality/routes", "/v1/admin/quality/spend", "/v1/plans",
              "/v1/admin/stripe", "/v1/admin/plans", "/v1/admin/payments", "/v1/admin/stripe-events",
              "/v1/admin/mail/settings", "/v1/admin/mail/messages"):
    EXAMPLES[("GET", _path)] = lambda w, p, f, a: _call()

for _path in ("", "/members", "/keys", "/balance", "/transactions", "/usage", "/request-logs", "/byok",
              "/audit-log", "/route-evidence", "/payments", "/subscriptions", "/budgets", "/webhooks",
              "/webhook-deliveries"):
    EXAMPLES[("GET", "/v1/orgs/{org_id:int}" + _path)] = lambda w, p, f, a: _call(org_id=w.org_id)


async def _call(**params: int) -> Call:
    return Call(params)


@example("POST", "/v1/auth/signup")
async def _(w, portal, factory, who):
    return Call(json={"email": _unique("s") + "@example.com", "password": PASSWORD, "org_name": "Signup"})


@example("POST", "/v1/auth/login")
async def _(w, portal, factory, who):
    return Call(json={"email": w.login_account.email, "password": PASSWORD})


@example("POST", "/v1/auth/refresh")
async def _(w, portal, factory, who):
    session = await portal.login_account(w.login_account)
    return Call(json={"refresh_token": session.refresh_token})


# --- any signed-in user -------------------------------------------------------------------------------
@example("POST", "/v1/auth/logout")
async def _(w, portal, factory, who):
    return Call(account=await portal.login_account(who) if who else None)


@example("POST", "/v1/auth/password")
async def _(w, portal, factory, who):
    return Call(json={"current_password": PASSWORD, "new_password": PASSWORD})


@example("POST", "/v1/orgs")
async def _(w, portal, factory, who):
    return Call(json={"name": "Another org"})


# --- org A --------------------------------------------------------------------------------------------
@example("GET", "/v1/orgs/{org_id:int}/request-logs/{request_id:str}")
async def _(w, portal, factory, who):
    request_id, _ = await insert_request_log(factory.db, w.org_id)
    return Call({"org_id": w.org_id, "request_id": request_id})


@example("PATCH", "/v1/orgs/{org_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"name": "Org A", "request_log_retention_days": 30})


@example("PATCH", "/v1/orgs/{org_id:int}/billing-settings")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"billing_email": "billing@example.com", "alert_emails": ["ops@example.com"],
                                       "low_balance_threshold_micros": 5_000_000})


@example("POST", "/v1/orgs/{org_id:int}/members")
async def _(w, portal, factory, who):
    user = await portal.signup(org_name="New member's org")
    return Call({"org_id": w.org_id}, {"email": user.email, "role": "viewer"})


@example("PATCH", "/v1/orgs/{org_id:int}/members/{user_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "user_id": await _fresh_member(w, portal)}, {"role": "developer"})


@example("DELETE", "/v1/orgs/{org_id:int}/members/{user_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "user_id": await _fresh_member(w, portal)})


@example("POST", "/v1/orgs/{org_id:int}/keys")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"name": "matrix", "rpm_limit": 60, "allowed_models": [w.model]})


@example("GET", "/v1/orgs/{org_id:int}/keys/{key_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "key_id": await _fresh_key(w, factory)})


@example("PATCH", "/v1/orgs/{org_id:int}/keys/{key_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "key_id": await _fresh_key(w, factory)}, {"tpm_limit": 1000, "name": "renamed"})


@example("DELETE", "/v1/orgs/{org_id:int}/keys/{key_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "key_id": await _fresh_key(w, factory)})


async def _fresh_budget(w: World, factory: Factory) -> int:
    return await factory.db.fetchval(
        """insert into budgets (org_id, api_key_id, period, window_kind, limit_micros)
           values ($1, $2, 'day', 'calendar', 1000000) returning id""", w.org_id, await _fresh_key(w, factory))


@example("POST", "/v1/orgs/{org_id:int}/budgets")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"api_key_id": await _fresh_key(w, factory), "period": "week",
                                       "window": "rolling", "limit_micros": 5_000_000})


@example("GET", "/v1/orgs/{org_id:int}/budgets/{budget_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "budget_id": await _fresh_budget(w, factory)})


@example("PATCH", "/v1/orgs/{org_id:int}/budgets/{budget_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "budget_id": await _fresh_budget(w, factory)}, {"limit_micros": 7_000_000})


@example("DELETE", "/v1/orgs/{org_id:int}/budgets/{budget_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "budget_id": await _fresh_budget(w, factory)})


@example("PUT", "/v1/orgs/{org_id:int}/byok/{provider_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "provider_id": w.provider_id}, {"api_key": "sk-matrix-0123456789abcdef"})


@example("DELETE", "/v1/orgs/{org_id:int}/byok/{provider_id:int}")
async def _(w, portal, factory, who):
    resp = await portal.request("PUT", f"/v1/orgs/{w.org_id}/byok/{w.provider_id}", w.owner,
                                json={"api_key": "sk-matrix-0123456789abcdef"})
    assert resp.status_code == 200, resp.text
    return Call({"org_id": w.org_id, "provider_id": w.provider_id})


# --- platform admin -----------------------------------------------------------------------------------
@example("GET", "/v1/admin/orgs/{org_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.target_org})


@example("PATCH", "/v1/admin/orgs/{org_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.target_org}, {"credit_limit_micros": 0, "rpm_limit": 1000})


@example("POST", "/v1/admin/orgs/{org_id:int}/adjustments")
async def _(w, portal, factory, who):
    return Call({"org_id": w.target_org}, {"amount_micros": 1, "reason": "matrix test"})


@example("POST", "/v1/admin/models")
async def _(w, portal, factory, who):
    return Call(json={"name": _unique("matrix-model"), "kind": "chat"})


@example("POST", "/v1/admin/prices")
async def _(w, portal, factory, who):
    return Call(json={"model": w.model, "input_micros_per_mtok": 1, "output_micros_per_mtok": 2})


@example("POST", "/v1/admin/providers")
async def _(w, portal, factory, who):
    return Call(json={"name": _unique("matrix-provider"), "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x" * 5})


@example("PATCH", "/v1/admin/providers/{provider_id:int}")
async def _(w, portal, factory, who):
    return Call({"provider_id": w.provider_id}, {"connect_timeout_ms": 4000})


@example("POST", "/v1/admin/routes")
async def _(w, portal, factory, who):
    return Call(json={"model": w.model, "provider_id": w.provider_id, "upstream_model": _unique("up")})


@example("PATCH", "/v1/admin/routes/{route_id:int}")
async def _(w, portal, factory, who):
    return Call({"route_id": w.route_id}, {"weight": 50})


@example("DELETE", "/v1/admin/routes/{route_id:int}")
async def _(w, portal, factory, who):
    return Call({"route_id": await factory.route(w.model, w.provider_id, _unique("up"))})


@example("GET", "/v1/admin/quality/routes/{route_id:int}")
async def _(w, portal, factory, who):
    return Call({"route_id": w.route_id})


@example("GET", "/v1/admin/quality/routes/{route_id:int}/probes")
async def _(w, portal, factory, who):
    return Call({"route_id": w.route_id})


@example("POST", "/v1/admin/quality/routes/{route_id:int}/rounds")
async def _(w, portal, factory, who):
    return Call({"route_id": w.route_id})


@example("POST", "/v1/admin/quality/routes/{route_id:int}/status")
async def _(w, portal, factory, who):
    route_id = await factory.route(w.model, w.provider_id, _unique("up"))
    return Call({"route_id": route_id}, {"status": "degraded", "reason": "matrix test"})


@example("POST", "/v1/admin/quality/references")
async def _(w, portal, factory, who):
    return Call(json={"model": w.model, "route_id": w.route_id, "reason": "matrix test"})


# --- payments -----------------------------------------------------------------------------------------
async def _paid_payment(w: World, factory: Factory) -> int:
    org = w.org_id
    txn = await factory.db.fetchval("""insert into balance_transactions (org_id, kind, amount_micros, external_id)
                                       values ($1, 'topup', 0, $2) returning id""", org, _unique("matrix-payment"))
    return await factory.db.fetchval(
        """insert into payments (org_id, method, purpose, status, amount_micros, credited_micros, transaction_id,
                                 succeeded_at)
           values ($1, 'stripe', 'topup', 'succeeded', 5000000, 5000000, $2, now()) returning id""", org, txn)


async def _pending_crypto(w: World, factory: Factory) -> int:
    return await factory.db.fetchval(
        """insert into payments (org_id, method, purpose, status, amount_micros, crypto_network, crypto_tx_hash,
                                 crypto_sender_address)
           values ($1, 'crypto', 'topup', 'pending', 1000000, 'ethereum', $2, $3) returning id""",
        w.target_org, secrets.token_hex(32), "0x" + "ab" * 20)


@example("GET", "/v1/orgs/{org_id:int}/payments/{payment_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "payment_id": await _paid_payment(w, factory)})


@example("GET", "/v1/orgs/{org_id:int}/payments/{payment_id:int}/receipt")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "payment_id": await _paid_payment(w, factory)})


@example("POST", "/v1/orgs/{org_id:int}/payments/stripe-checkout")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"amount_micros": 5_000_000})


@example("POST", "/v1/orgs/{org_id:int}/subscriptions")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"plan_id": w.plan_id})


@example("POST", "/v1/orgs/{org_id:int}/payments/crypto")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"network": "tron", "tx_hash": secrets.token_hex(32),
                                       "sender_address": "TR7NHqjeKQxGTCi8q8ZY4pL8otSzgjLj6t", "amount_micros": 1})


@example("PATCH", "/v1/admin/stripe")
async def _(w, portal, factory, who):
    return Call(json={"secret_key": w.stripe.secret_key, "webhook_secret": w.stripe.webhook_secret,
                      "api_base": w.stripe.server.url})


@example("POST", "/v1/admin/plans")
async def _(w, portal, factory, who):
    return Call(json={"name": _unique("plan"), "price_cents": 500, "monthly_allowance_micros": 5_000_000})


@example("PATCH", "/v1/admin/plans/{plan_id:int}")
async def _(w, portal, factory, who):
    return Call({"plan_id": w.plan_id}, {"active": True})


@example("POST", "/v1/admin/payments/{payment_id:int}/approve")
async def _(w, portal, factory, who):
    return Call({"payment_id": await _pending_crypto(w, factory)}, {"amount_micros": 1_000_000})


@example("POST", "/v1/admin/payments/{payment_id:int}/reject")
async def _(w, portal, factory, who):
    return Call({"payment_id": await _pending_crypto(w, factory)}, {"reason": "matrix"})


@example("POST", "/v1/webhooks/stripe")
async def _(w, portal, factory, who):
    # Public, and proven by its signature: an event of a type we do not act on is acknowledged.
    payload = json.dumps(LocalStripe.event("customer.created", {"id": "cus_matrix", "object": "customer"})).encode()
    return Call(content=payload, headers={"stripe-signature": w.stripe.sign(payload)})


# --- notifications ------------------------------------------------------------------------------------
# Registration resolves nothing for an IP literal, and a public one passes the SSRF check. Nothing may ever be
# delivered there (tests send no traffic off this machine): the registered endpoint subscribes to a type no
# code path of the matrix emits, and the endpoints made behind the API's back point at loopback's discard port.
PUBLIC_HOOK = "https://93.184.215.14/hook"
LOCAL_HOOK = "https://127.0.0.1:9/hook"


async def _fresh_endpoint(w: World, factory: Factory) -> int:
    box = box_from_settings(factory.settings.master_key_bytes, factory.settings.master_key_id)
    secret_id = await store_secret(factory.db, box, "webhook_signing_secret", "whsec_" + "A" * 44, org_id=w.org_id)
    return await factory.db.fetchval(
        """insert into webhook_endpoints (org_id, url, event_types, secret_id) values ($1, $2, '{key.created}', $3)
           returning id""", w.org_id, LOCAL_HOOK, secret_id)


async def _fresh_delivery(w: World, factory: Factory) -> int:
    endpoint_id = await _fresh_endpoint(w, factory)
    event_id = await emit(factory.db, w.org_id, "key.created", {"key_id": 1})
    await factory.db.execute("update event_outbox set dispatched_at = now() where id = $1", event_id)
    return await factory.db.fetchval(
        """insert into webhook_deliveries (org_id, endpoint_id, event_id, event_type, status, attempts,
                                           next_attempt_at, created_at)
           values ($1, $2, $3, 'key.created', 'failed', 3, now(), now()) returning id""", w.org_id, endpoint_id,
        event_id)


@example("POST", "/v1/orgs/{org_id:int}/webhooks")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id}, {"url": PUBLIC_HOOK, "event_types": ["budget.exceeded"]})


@example("GET", "/v1/orgs/{org_id:int}/webhooks/{endpoint_id:int}")
@example("DELETE", "/v1/orgs/{org_id:int}/webhooks/{endpoint_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "endpoint_id": await _fresh_endpoint(w, factory)})


@example("PATCH", "/v1/orgs/{org_id:int}/webhooks/{endpoint_id:int}")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "endpoint_id": await _fresh_endpoint(w, factory)}, {"active": False})


@example("POST", "/v1/orgs/{org_id:int}/webhooks/{endpoint_id:int}/rotate-secret")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "endpoint_id": await _fresh_endpoint(w, factory)}, {"overlap_s": 60})


@example("GET", "/v1/orgs/{org_id:int}/webhook-deliveries/{delivery_id:int}")
@example("POST", "/v1/orgs/{org_id:int}/webhook-deliveries/{delivery_id:int}/replay")
async def _(w, portal, factory, who):
    return Call({"org_id": w.org_id, "delivery_id": await _fresh_delivery(w, factory)})


@example("PUT", "/v1/admin/mail/settings")
async def _(w, portal, factory, who):
    # Port 9 (discard) on loopback: nothing is sent by saving settings.
    return Call(json={"host": "127.0.0.1", "port": 9, "tls_mode": "none", "from_address": "relay@example.com"})


@example("POST", "/v1/admin/mail/test")
async def _(w, portal, factory, who):
    async with factory.db.acquire() as conn, conn.transaction():
        box = box_from_settings(factory.settings.master_key_bytes, factory.settings.master_key_id)
        await save_smtp_config(conn, box, host="127.0.0.1", port=9, tls_mode="none", username=None,
                               from_address="relay@example.com")
    return Call(json={"to": "someone@example.com"})  # refused by the closed port: answered 200, sent false


# --- the matrix ---------------------------------------------------------------------------------------


def fill(path: str, params: dict[str, int | str]) -> str:
    """`/v1/orgs/{org_id:int}` with the given path parameters."""
    return re.sub(r"\{(\w+):\w+\}", lambda m: str(params[m.group(1)]), path)


def expected_statuses(action: str, who: str) -> set[int] | None:
    """None: the call must succeed; else the refusal statuses allowed."""
    scope = scope_of(action)
    if scope == Scope.PUBLIC:
        return None
    if scope == Scope.METRICS:
        return {404}  # a portal token is not the metrics token (tests/control_plane/test_metrics.py)
    if who == "anonymous":
        return {401}
    if scope == Scope.USER:
        return None
    if scope == Scope.PLATFORM:
        return None if who == "platform_admin" else {403}
    if who in ("outsider", "platform_admin"):
        return {404}
    return None if allowed(who, action) else {403}


@pytest_asyncio.fixture(scope="module")
async def world(control_plane: Server, settings, db, redis, redis_keys, mock_upstream: Server,
                local_stripe: LocalStripe) -> World:
    async with httpx.AsyncClient(timeout=20.0) as http:
        portal = Portal(control_plane, http, settings)
        factory = Factory(db, redis, redis_keys, settings)
        owner = await portal.signup(org_name="Org A")
        accounts: dict[str, Account] = {"owner": owner}
        for role in ORG_ROLES[1:]:
            accounts[role] = await portal.member(owner, owner.org_id, role)
        accounts["outsider"] = await portal.signup(org_name="Org B")
        accounts["platform_admin"] = await portal.platform_admin()
        target = await factory.org()
        provider_id = await factory.provider("http://127.0.0.1:9/v1")
        model = await factory.model(provider_id)
        route_id = await db.fetchval("select id from routes where model = $1", model)
        login_account = await portal.signup(org_name="Login")
        plan_id = await db.fetchval("""insert into billing_plans (name, price_cents, monthly_allowance_micros)
                                       values ($1, 1000, 10000000) returning id""", _unique("matrix-plan"))
        return World(owner.org_id, owner, accounts, target, provider_id, model, route_id, login_account,
                     local_stripe, plan_id)


def test_every_endpoint_has_an_example() -> None:
    missing = {(m, p) for p, m, _ in ENDPOINTS} - EXAMPLES.keys()
    assert not missing, f"add an example call for these endpoints: {sorted(missing)}"
    assert not EXAMPLES.keys() - {(m, p) for p, m, _ in ENDPOINTS}, "examples for endpoints that no longer exist"


def test_every_action_of_the_table_guards_an_endpoint() -> None:
    used = {action for _, _, action in ENDPOINTS}
    sub_rules = {"members.manage_owners"}  # checked inside the member endpoints
    declared = set().union(*PERMISSIONS.values())
    assert declared - used == sub_rules


@pytest.mark.parametrize(("path", "method", "action"), ENDPOINTS, ids=[f"{m} {p}" for p, m, _ in ENDPOINTS])
async def test_role_matrix(world: World, portal: Portal, factory: Factory, path: str, method: str,
                           action: str) -> None:
    build = EXAMPLES[(method, path)]
    failures = []
    for who in PRINCIPALS:
        account = world.accounts.get(who)
        call = await build(world, portal, factory, account)
        url = fill(path, call.params)
        body = {"content": call.content} if call.content is not None else {"json": call.json}
        resp = await portal.request(method, url, call.account or account, params=call.query, headers=call.headers,
                                    **body)
        want = expected_statuses(action, who)
        if want is None:
            if not 200 <= resp.status_code < 300:
                failures.append(f"{who}: expected success, got {resp.status_code} {resp.text[:200]}")
        elif resp.status_code not in want:
            failures.append(f"{who}: expected {sorted(want)}, got {resp.status_code} {resp.text[:200]}")
        elif set(resp.json()) != {"error"} or set(resp.json()["error"]) != {"code", "message"}:
            failures.append(f"{who}: refusal not in the error shape: {resp.text[:200]}")
    assert not failures, f"{method} {path} ({action}):\n" + "\n".join(failures)


# --- tenant isolation ---------------------------------------------------------------------------------

ORG_ENDPOINTS = [(p, m, a) for p, m, a in ENDPOINTS if scope_of(a) == Scope.ORG]


async def _org_b_state(db, org_id: int) -> dict:
    return {
        "org": dict(await db.fetchrow("select * from orgs where id = $1", org_id)),
        "members": [dict(r) for r in await db.fetch(
            "select user_id, role from memberships where org_id = $1 order by user_id", org_id)],
        "keys": [dict(r) for r in await db.fetch("select * from api_keys where org_id = $1 order by id", org_id)],
        "byok": [dict(r) for r in await db.fetch(
            "select * from org_provider_credentials where org_id = $1 order by provider_id", org_id)],
        "balance": await db.fetchval("select balance_micros from org_balances where org_id = $1", org_id),
    }


async def test_owner_of_one_org_cannot_read_or_change_another(portal: Portal, factory: Factory, db,
                                                             world: World) -> None:
    attacker = await portal.signup(org_name="Org A")
    victim = await portal.signup(org_name="Org B")
    b_world = World(victim.org_id, victim, {}, victim.org_id, world.provider_id, world.model, world.route_id, victim,
                    world.stripe, world.plan_id)
    resp = await portal.request("POST", f"/v1/orgs/{victim.org_id}/keys", victim, json={"name": "b"})
    b_key_id = resp.json()["api_key"]["id"]
    b_member = await portal.member(victim, victim.org_id, "admin")
    resp = await portal.request("PUT", f"/v1/orgs/{victim.org_id}/byok/{world.provider_id}", victim,
                                json={"api_key": "sk-victim-0123456789abcdef"})
    assert resp.status_code == 200
    before = await _org_b_state(db, victim.org_id)

    leaks = []
    for path, method, _ in ORG_ENDPOINTS:
        call = await EXAMPLES[(method, path)](b_world, portal, factory, victim)
        ids = {**call.params, "key_id": b_key_id, "user_id": b_member.user_id}
        # 1. B's org id (guessed or copied), with B's object ids.
        url = fill(path, {**ids, "org_id": victim.org_id})
        resp = await portal.request(method, url, attacker, json=call.json, params=call.query)
        if resp.status_code != 404 or resp.json()["error"]["code"] != "not_found":
            leaks.append(f"{method} {url}: {resp.status_code} {resp.text[:150]}")
        # 2. The attacker's own org id, with B's object ids (only paths that name an object of the org).
        if re.search(r"\{(key_id|user_id):", path):
            url = fill(path, {**ids, "org_id": attacker.org_id})
            resp = await portal.request(method, url, attacker, json=call.json, params=call.query)
            if resp.status_code != 404:
                leaks.append(f"{method} {url}: {resp.status_code} {resp.text[:150]}")
    assert not leaks, "\n".join(leaks)

    # Filters naming B's key under A's org find nothing of B's.
    for what in ("request-logs", "usage"):
        resp = await portal.request("GET", f"/v1/orgs/{attacker.org_id}/{what}", attacker,
                                    params={"key_id": b_key_id})
        assert resp.status_code == 200 and resp.json()["data"] == []
    # A's lists hold nothing of B's, and B is exactly as it was (the examples above only added to B
    # through B's own owner, never through the attacker).
    keys = (await portal.request("GET", f"/v1/orgs/{attacker.org_id}/keys", attacker)).json()
    assert b_key_id not in {k["id"] for k in keys}
    after = await _org_b_state(db, victim.org_id)
    assert after["org"] == before["org"] and after["balance"] == before["balance"]
    assert {r["user_id"]: r["role"] for r in before["members"]}.items() <= \
        {r["user_id"]: r["role"] for r in after["members"]}.items()
    b_key = next(k for k in after["keys"] if k["id"] == b_key_id)
    assert b_key == next(k for k in before["keys"] if k["id"] == b_key_id)
    # (The DELETE example re-set B's credential through B's own owner; it must still be there.)
    assert [r["provider_id"] for r in after["byok"]] == [r["provider_id"] for r in before["byok"]]
    assert not await db.fetchval("select count(*) from audit_log where org_id = $1 and actor_user_id = $2",
                                 victim.org_id, attacker.user_id)

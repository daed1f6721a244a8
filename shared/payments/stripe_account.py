"""The platform's Stripe account: its settings, the `stripe` client, a customer per org, Checkout sessions.

The secret key and the webhook signing secret are platform settings in PostgreSQL, envelope-encrypted
(`shared.crypto`), set by platform admins and never shown again in full. `api_base` points the client at
another Stripe-compatible server (the local Stripe of `make run` and the tests); unset, Stripe's own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import stripe

from shared.crypto import SecretBox, load_secret, store_secret

__all__ = [
    "CheckoutSession",
    "StripeConfig",
    "StripeNotConfigured",
    "StripeUnavailable",
    "create_checkout_session",
    "ensure_customer",
    "load_stripe_config",
    "save_stripe_config",
    "stripe_client",
]

SECRET_KEY_KIND = "stripe_secret_key"
WEBHOOK_SECRET_KIND = "stripe_webhook_secret"


class StripeNotConfigured(Exception):
    """No Stripe secret key (or, for webhooks, no signing secret) is set."""


class StripeUnavailable(Exception):
    """Stripe refused or failed a call; the message is safe to show (no key, no request body)."""


@dataclass(frozen=True, slots=True)
class StripeConfig:
    secret_key: str | None
    webhook_secret: str | None
    api_base: str | None
    origin: str

    def __repr__(self) -> str:  # never the secrets, even in a traceback
        return f"StripeConfig(api_base={self.api_base!r}, origin={self.origin!r})"


async def load_stripe_config(conn: asyncpg.Connection | asyncpg.Pool, box: SecretBox) -> StripeConfig:
    row = await conn.fetchrow("select secret_key_id, webhook_secret_id, api_base, origin from stripe_config")
    if row is None:
        return StripeConfig(None, None, None, "admin")
    key = await load_secret(conn, box, row["secret_key_id"]) if row["secret_key_id"] else None
    hook = await load_secret(conn, box, row["webhook_secret_id"]) if row["webhook_secret_id"] else None
    return StripeConfig(key, hook, row["api_base"], row["origin"])


_UNSET = object()


async def save_stripe_config(conn: asyncpg.Connection, box: SecretBox, *, secret_key: str | object | None = _UNSET,
                             webhook_secret: str | object | None = _UNSET, api_base: str | object | None = _UNSET,
                             origin: str = "admin") -> None:
    """Set the given fields (None clears one), inside the caller's transaction. Replaced secrets are deleted."""
    await conn.execute("insert into stripe_config (id) values (true) on conflict do nothing")
    row = await conn.fetchrow("select secret_key_id, webhook_secret_id from stripe_config for update")
    sets: dict[str, object] = {"origin": origin}
    old: list[uuid.UUID] = []
    for field, kind, value in (("secret_key_id", SECRET_KEY_KIND, secret_key),
                               ("webhook_secret_id", WEBHOOK_SECRET_KIND, webhook_secret)):
        if value is _UNSET:
            continue
        if row[field] is not None:
            old.append(row[field])
        sets[field] = None if value is None else await store_secret(conn, box, kind, value, hint=value[-4:])
    if api_base is not _UNSET:
        sets["api_base"] = api_base
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(sets, start=1))
    await conn.execute(f"update stripe_config set {assignments}, updated_at = now()", *sets.values())
    if old:
        await conn.execute("delete from secrets where id = any($1::uuid[])", old)


def stripe_client(config: StripeConfig, http_client: stripe.HTTPXClient) -> stripe.StripeClient:
    """A client for this configuration on the process's one `stripe.HTTPXClient` (its connection pool;
    built once at start-up with the timeout, closed on shutdown). Clients are cheap: one per call, so a
    changed key applies at once."""
    if not config.secret_key:
        raise StripeNotConfigured("Stripe is not configured (no secret key).")
    base = {"api": config.api_base} if config.api_base else None
    return stripe.StripeClient(config.secret_key, base_addresses=base, max_network_retries=2, http_client=http_client)


def _unavailable(exc: stripe.StripeError) -> StripeUnavailable:
    # Stripe's messages name parameters and ids, never the key; the status says whose fault it was.
    status = getattr(exc, "http_status", None)
    return StripeUnavailable(f"Stripe refused the request ({status or 'no answer'}): {exc.user_message or 'error'}")


async def ensure_customer(pool: asyncpg.Pool, client: stripe.StripeClient, org_id: int, org_code: str,
                          *, replace: str | None = None) -> str:
    """The org's Stripe customer id, created on first need. `replace`: a stored id Stripe no longer knows
    (another Stripe account, a wiped test account): a new customer takes its place."""
    if replace is not None:
        await pool.execute("delete from stripe_customers where org_id = $1 and customer_id = $2", org_id, replace)
    existing = await pool.fetchval("select customer_id from stripe_customers where org_id = $1", org_id)
    if existing:
        return existing
    try:
        customer = await client.v1.customers.create_async(
            params={"description": f"Rocket Relay org {org_code}",
                    "metadata": {"rr_org_id": str(org_id), "rr_org_code": org_code}},
            # Two concurrent first top-ups create one customer (Stripe replays the first answer).
            options={"idempotency_key": f"rr-customer-{org_id}-{replace or 'first'}"},
        )
    except stripe.StripeError as exc:
        raise _unavailable(exc) from None
    await pool.execute("insert into stripe_customers (org_id, customer_id) values ($1, $2) on conflict do nothing",
                       org_id, customer.id)
    return await pool.fetchval("select customer_id from stripe_customers where org_id = $1", org_id)


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str | None
    customer_id: str


async def create_checkout_session(pool: asyncpg.Pool, client: stripe.StripeClient, *, org_id: int, org_code: str,
                                  idempotency_key: str, params: dict) -> CheckoutSession:
    """A Checkout session for the org's customer; `params` without `customer`. Retries once with a new
    customer when Stripe no longer knows the stored one."""
    customer = await ensure_customer(pool, client, org_id, org_code)
    for attempt in range(2):
        try:
            session = await client.v1.checkout.sessions.create_async(
                params={**params, "customer": customer}, options={"idempotency_key": f"{idempotency_key}-{attempt}"})
            return CheckoutSession(session.id, session.url, customer)
        except stripe.InvalidRequestError as exc:
            if attempt == 0 and exc.code == "resource_missing" and exc.param == "customer":
                customer = await ensure_customer(pool, client, org_id, org_code, replace=customer)
                continue
            raise _unavailable(exc) from None
        except stripe.StripeError as exc:
            raise _unavailable(exc) from None
    raise AssertionError("unreachable")

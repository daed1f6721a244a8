"""The canary, everywhere: a unique string sent in every client-controlled field, through every endpoint and
path, appears nowhere we keep anything — a `pg_dump` of the whole database, every Redis key and stream entry,
every log of our processes, every mail the relay sent (caught by a real SMTP server) and every webhook body it
delivered (to a real receiver) — and neither does any secret in clear: the tenant's API keys, portal tokens,
BYOK and provider keys, a webhook signing secret, the SMTP password, Stripe's secret key and webhook secret, a
user's password, the metrics token, the master key and the key pepper. The scanners are shown to find a
deliberate leak in each of those places (`test_the_scanner_finds_a_deliberate_leak`), and end to end: a proxy
made to log request bodies (`tests/bodyleak`) is caught (`test_a_proxy_that_logs_bodies_is_caught`), so a pass
means something.

The stack is this module's own: a database and Redis prefix of its own (so the dump holds only what these
requests left), a proxy, a worker (billing flusher) and a control plane started for it. The mock upstream
and the local Stripe are providers: they receive prompts and keys by design, so their logs are not searched.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from shared.crypto import box_from_settings, store_secret
from shared.embedded import free_port
from shared.notify.mail import save_smtp_config
from shared.notify.webhooks import new_signing_secret
from shared.payments.stripe_account import save_stripe_config
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from tests.conftest import (
    Factory,
    Server,
    settings_env,
    start_proxy,
    start_server,
    start_worker,
    stop_process,
    wait_for_rows,
)
from tests.control_plane.conftest import LocalStripe, isolated_database, start_control_plane, start_local_stripe
from tests.notify_helpers import CaughtMail, MailCatcher, Received, Receiver
from tests.proxy.test_endpoints import configure_mock

CANARY = f"CANARY-{secrets.token_hex(8)}"
BYOK_SECRET = f"sk-byok-{secrets.token_hex(12)}"
PROVIDER_SECRET = f"sk-provider-{secrets.token_hex(12)}"
PASSWORD = f"pw-{secrets.token_hex(10)}"
SMTP_LOGIN = ("relay-canary", f"smtp-pw-{secrets.token_hex(10)}")
STRIPE_SECRET = f"sk_test_canary{secrets.token_hex(12)}"
STRIPE_WEBHOOK_SECRET = f"whsec_canary{secrets.token_hex(12)}"
BODYLEAK = Path(__file__).resolve().parent / "bodyleak"


@dataclass
class Stack:
    settings: Settings
    proxy: Server
    control_plane: Server
    worker_log: Path
    db: asyncpg.Pool
    redis: Redis
    factory: Factory
    mail: MailCatcher
    hooks: Receiver
    stripe: LocalStripe
    worker_metrics: str = ""  # the worker's /metrics URL
    metrics_dir: Path = Path()
    more_logs: list[Path] = field(default_factory=list)  # of processes a test added to the stack


METRICS_TOKEN = "canary-metrics-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def canary_settings(servers, settings: Settings) -> Iterator[Settings]:
    admin_url, _ = servers
    with isolated_database(admin_url, settings, f"canary{secrets.token_hex(3)}") as isolated:
        yield isolated


@pytest_asyncio.fixture(scope="module")
async def stack(canary_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # Metrics on in every process (they carry labels of client traffic), each server its own snapshot dir.
    metrics_dir = tmp_path_factory.mktemp("canary-metrics")
    worker_port = free_port()
    metrics = {"metrics_token": METRICS_TOKEN, "metrics_interval_s": 0.2}
    proxy = start_proxy(canary_settings, metrics_dir=metrics_dir, **metrics)
    control_plane = start_control_plane(canary_settings, metrics_dir=metrics_dir, **metrics)
    # Notifications on, to a mail catcher and a webhook receiver on loopback (hence the development setting).
    worker = start_worker(canary_settings, notify_enabled=True, notify_interval_s=0.2, webhook_allow_insecure=True,
                          worker_metrics_port=worker_port, **metrics)
    await wait_until_serving(f"http://127.0.0.1:{worker_port}/metrics")  # the flusher runs from here on
    db = await asyncpg.create_pool(canary_settings.database_url, min_size=1, max_size=4)
    redis = Redis.from_url(canary_settings.redis_url)
    factory = Factory(db, redis, RedisKeys(canary_settings.redis_prefix), canary_settings)
    # The mail catcher takes mail only with the SMTP login; the local Stripe is the platform's Stripe account.
    mail = MailCatcher(login=SMTP_LOGIN).start()
    hooks = await Receiver().start()
    stripe = LocalStripe(start_local_stripe(), STRIPE_SECRET, STRIPE_WEBHOOK_SECRET)
    box = box_from_settings(canary_settings.master_key_bytes, canary_settings.master_key_id)
    async with db.acquire() as conn, conn.transaction():
        await save_smtp_config(conn, box, host="127.0.0.1", port=mail.port, tls_mode="none", username=SMTP_LOGIN[0],
                               password=SMTP_LOGIN[1], from_address="relay@example.com")
        await save_stripe_config(conn, box, secret_key=STRIPE_SECRET, webhook_secret=STRIPE_WEBHOOK_SECRET,
                                 api_base=stripe.server.url)
    try:
        yield Stack(canary_settings, proxy, control_plane, worker.log_path, db, redis, factory, mail, hooks, stripe,
                    f"http://127.0.0.1:{worker_port}/metrics", metrics_dir)
    finally:
        stripe.server.stop()
        mail.stop()
        await hooks.stop()
        await db.close()
        await redis.aclose()
        stop_process(worker)
        control_plane.stop()
        proxy.stop()


async def wait_until_serving(url: str, timeout_s: float = 90.0) -> None:
    """Until the worker answers its /metrics (it imports numpy and scipy first: seconds on a busy machine)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            try:
                if (await http.get(url, headers={"authorization": f"Bearer {METRICS_TOKEN}"})).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"rr-worker did not serve {url} within {timeout_s} s")
            await asyncio.sleep(0.2)


# --- the scanners -----------------------------------------------------------------------------------------


def dump_postgres(settings: Settings) -> str:
    """The whole database as pg_dump writes it (schema and every row of every table and partition)."""
    return subprocess.run(["pg_dump", "--no-owner", "--data-only", settings.database_url], check=True,
                          capture_output=True, text=True, timeout=120).stdout


async def dump_redis(redis: Redis, prefix: str) -> bytes:
    """Every key of the prefix with its whole value, stream entries and consumer-group state included."""
    parts: list[bytes] = []
    async for key in redis.scan_iter(match=prefix + "*", count=1000):
        kind = (await redis.type(key)).decode()
        parts.append(key)
        if kind == "string":
            parts.append(await redis.get(key) or b"")
        elif kind == "hash":
            parts += [k + b"=" + v for k, v in (await redis.hgetall(key)).items()]
        elif kind == "list":
            parts += await redis.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(await redis.smembers(key))
        elif kind == "zset":
            parts += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                parts += [k + b"=" + v for k, v in fields.items()]
    return b"\n".join(parts)


def logs(stack: Stack) -> str:
    paths = [stack.proxy.log_path, stack.control_plane.log_path, stack.worker_log, *stack.more_logs]
    return "\n".join(path.read_text(errors="replace") for path in paths)


def outbound(stack: Stack) -> tuple[str, bytes]:
    """Every mail the relay sent (whole messages) and every webhook request it made (headers and body)."""
    mails = "\n".join(m.raw() for m in stack.mail.mails)
    hooks = b"\n".join(repr(r.headers).encode() + r.body for r in stack.hooks.requests)
    return mails, hooks


async def scrape_metrics(stack: Stack) -> str:
    """Every process's /metrics, as a scraper with the token reads them."""
    auth = {"authorization": f"Bearer {METRICS_TOKEN}"}
    async with httpx.AsyncClient(timeout=10) as http:
        pages = [await http.get(url, headers=auth) for url in (stack.proxy.url + "/metrics",
                                                                 stack.control_plane.url + "/metrics",
                                                                 stack.worker_metrics)]
    assert [p.status_code for p in pages] == [200, 200, 200]
    return "\n".join(p.text for p in pages)


async def leaks_of(stack: Stack, needles: list[str]) -> dict[str, list[str]]:
    """Where each needle was found, of 'postgres', 'redis', 'logs', 'mail', 'webhooks', 'metrics' (every store
    read once for all the needles)."""
    mails, hooks = outbound(stack)
    stores: dict[str, str | bytes] = {
        "postgres": await asyncio.to_thread(dump_postgres, stack.settings),
        "redis": await dump_redis(stack.redis, stack.settings.redis_prefix), "logs": logs(stack),
        "mail": mails, "webhooks": hooks, "metrics": await scrape_metrics(stack)}
    return {needle: [name for name, text in stores.items()
                     if (needle.encode() if isinstance(text, bytes) else needle) in text] for needle in needles}


async def leaks(stack: Stack, needle: str) -> list[str]:
    return (await leaks_of(stack, [needle]))[needle]


# --- the traffic ------------------------------------------------------------------------------------------


async def _tenant(stack: Stack, mock: Server) -> dict:
    f = stack.factory
    box = box_from_settings(stack.settings.master_key_bytes, stack.settings.master_key_id)
    ours = await store_secret(f.db, box, "provider_credential", PROVIDER_SECRET, hint="…")
    provider = await f.provider(mock.url + "/v1", credential_secret_id=ours)
    spare = await f.provider(mock.url + "/v1")
    anthropic = await f.provider(mock.url + "/v1", api_format="anthropic")
    tag = secrets.token_hex(3)
    chat = await f.model(provider, upstream_model=f"a-{tag}", priority=10)
    await f.route(chat, spare, f"b-{tag}", priority=0)  # failover target
    claude = await f.model(anthropic)
    embed = await f.model(provider, kind="embedding")
    # Alerts armed just below the opening balance (the first flushed request crosses it), a billing contact,
    # and a webhook endpoint for every event type: the notifications this traffic causes are searched too.
    org_id = await f.org(balance_micros=10_000_000, low_balance_threshold_micros=10_000_000 - 1,
                         alert_emails=["alerts@example.com"], billing_email="billing@example.com")
    signing_secret = new_signing_secret()
    hook_secret = await store_secret(f.db, box, "webhook_signing_secret", signing_secret, org_id=org_id)
    await f.db.execute(
        """insert into webhook_endpoints (org_id, url, event_types, secret_id)
           values ($1, $2, '{balance.low,balance.depleted,key.created,key.revoked,payment.succeeded,payment.failed}',
                   $3)""", org_id, stack.hooks.url, hook_secret)
    _, key = await f.key(org_id)
    _, limited = await f.key(org_id, rpm_limit=1)
    budgeted_id, budgeted = await f.key(org_id)
    await f.db.execute("""insert into budgets (org_id, api_key_id, period, window_kind, limit_micros)
                          values ($1, $2, 'day', 'rolling', 1)""", org_id, budgeted_id)
    poor_org = await f.org(balance_micros=1)
    _, poor = await f.key(poor_org)
    byok = await store_secret(f.db, box, "byok_credential", BYOK_SECRET, org_id=org_id, hint="…")
    await f.db.execute("insert into org_provider_credentials (org_id, provider_id, secret_id) values ($1, $2, $3)",
                       org_id, spare, byok)
    for model in (chat, claude, embed):
        await f.publish_config(stack.proxy, key, model)
    return {"chat": chat, "claude": claude, "embed": embed, "key": key, "limited": limited, "poor": poor,
            "budgeted": budgeted, "a": f"a-{tag}", "org_id": org_id, "signing_secret": signing_secret}


def _everywhere(model: str, **extra: object) -> dict:
    """A chat body with the canary in every field a client controls that is not metadata we keep."""
    return {"model": model, "user": CANARY, "metadata": {"note": CANARY},
            "messages": [{"role": "system", "content": CANARY}, {"role": "user", "content": f"say {CANARY}"}],
            "tools": [{"type": "function", "function": {"name": "lookup", "description": CANARY,
                                                        "parameters": {"type": "object", "properties": {
                                                            "q": {"type": "string", "description": CANARY}}}}}],
            **extra}


async def send_everything(stack: Stack, mock: Server) -> tuple[int, list[str]]:
    """Every endpoint and path; returns how many requests were made to the proxy, and the secrets in clear
    that the tenant and the user were given (API keys, webhook signing secret, portal tokens)."""
    t = await _tenant(stack, mock)
    base = stack.proxy.url + "/v1"
    auth = {"authorization": f"Bearer {t['key']}", "x-canary-header": CANARY}
    claude_body = {"model": t["claude"], "max_tokens": 20, "system": [{"type": "text", "text": CANARY}],
                   "metadata": {"user_id": CANARY}, "messages": [{"role": "user", "content": CANARY}]}
    calls: list[tuple[str, dict, dict]] = [
        ("/chat/completions", _everywhere(t["chat"]), auth),
        ("/chat/completions", _everywhere(t["chat"], stream=True), auth),
        ("/chat/completions", _everywhere(t["chat"], stream=True, stream_options={"include_usage": True}), auth),
        ("/completions", {"model": t["chat"], "prompt": CANARY, "user": CANARY}, auth),
        ("/completions", {"model": t["chat"], "prompt": [CANARY], "stream": True}, auth),
        ("/embeddings", {"model": t["embed"], "input": [CANARY, CANARY], "user": CANARY}, auth),
        ("/messages", claude_body, {"x-api-key": t["key"], "anthropic-beta": CANARY}),
        ("/messages", {**claude_body, "stream": True}, {"x-api-key": t["key"]}),
        ("/chat/completions", _everywhere(t["claude"]), auth),  # translated to Anthropic
        ("/messages/count_tokens", {k: v for k, v in claude_body.items() if k != "max_tokens"},
         {"x-api-key": t["key"]}),
        ("/responses", {"model": t["chat"], "input": CANARY, "instructions": CANARY, "user": CANARY,
                        "metadata": {"note": CANARY}}, auth),  # translated to Chat Completions
        ("/responses", {"model": t["chat"], "input": [{"role": "user", "content": CANARY}], "stream": True}, auth),
        ("/responses", {"model": t["claude"], "input": CANARY}, auth),  # through Chat Completions to Anthropic
        ("/chat/completions", {**_everywhere("no-such-model"), "models": [t["chat"]]}, auth),  # a fallback
        ("/chat/completions", {**_everywhere(t["chat"]), "messages": CANARY}, auth),  # 400
        ("/chat/completions", {**_everywhere(t["chat"]), "max_tokens": CANARY}, auth),  # 400 on a field
        ("/chat/completions", _everywhere("no-such-model"), auth),  # 404
        ("/chat/completions", _everywhere(t["chat"]), {"authorization": f"Bearer {t['poor']}"}),  # 402
        ("/chat/completions", _everywhere(t["chat"]), {"authorization": f"Bearer {t['limited']}"}),
        ("/chat/completions", _everywhere(t["chat"]), {"authorization": f"Bearer {t['limited']}"}),  # 429
        ("/chat/completions", _everywhere(t["chat"]), {"authorization": f"Bearer {t['budgeted']}"}),  # 402 budget
        ("/chat/completions", _everywhere(t["chat"]), {"authorization": "Bearer rr-wrong-key"}),  # 401
    ]
    async with httpx.AsyncClient(timeout=30) as http:
        for path, body, headers in calls:
            await http.post(base + path, json=body, headers=headers)
        await http.post(base + "/chat/completions", headers={**auth, "content-type": "application/json"},
                        content=b'{"model": "x", "messages": [{"content": "' + CANARY.encode() + b'"')  # bad JSON
        # Failover: route A fails with 500, then B (the org's BYOK credential) answers.
        await configure_mock(mock, {t["a"]: {"status": 500}})
        await http.post(base + "/chat/completions", json=_everywhere(t["chat"]), headers=auth)
        # An upstream error (both routes failing), and a stream broken after its first bytes.
        await configure_mock(mock, {t["a"]: {"status": 503}, f"b-{t['a'][2:]}": {"status": 500}})
        await http.post(base + "/chat/completions", json=_everywhere(t["chat"]), headers=auth)
        await configure_mock(mock, {t["a"]: {"chunks": 20, "fail_after_chunks": 2}})
        await http.post(base + "/chat/completions", json=_everywhere(t["chat"], stream=True), headers=auth)
        # A client that goes away mid-stream.
        await configure_mock(mock, {t["a"]: {"chunks": 50, "chunk_delay_ms": 50}})
        async with http.stream("POST", base + "/chat/completions", json=_everywhere(t["chat"], stream=True),
                               headers=auth) as resp:
            async for _ in resp.aiter_raw():
                break
        await configure_mock(mock, {})
        # The control plane: signup with the password, a BYOK credential set through the portal.
        cp = stack.control_plane.url
        email = f"c-{secrets.token_hex(4)}@example.com"
        signup = await http.post(cp + "/v1/auth/signup", json={
            "email": email, "password": PASSWORD, "org_name": "Canary org"})
        assert signup.status_code == 201, signup.text
        await http.post(cp + "/v1/auth/login", json={"email": "nobody@example.com", "password": PASSWORD})
        owner = {"authorization": f"Bearer {signup.json()['tokens']['access_token']}"}
        org = signup.json()["org_id"]
        claims = []
        for network in ("ethereum", "tron", "bitcoin"):  # refused formats: the values must not be kept either
            claims.append(await http.post(cp + f"/v1/orgs/{org}/payments/crypto", headers=owner, json={
                "network": network, "tx_hash": CANARY, "sender_address": CANARY, "amount_micros": 5_000_000}))
        assert {r.status_code for r in claims} == {422}, [r.text for r in claims]  # refused as malformed
        await http.post(cp + f"/v1/orgs/{org}/payments/stripe-checkout", headers=owner,
                        json={"amount_micros": CANARY})
        await _paid_at_stripe(stack, http, owner, org)
        await http.patch(cp + f"/v1/orgs/{org}", headers=owner, json={"name": "x" * 300 + CANARY})
        budgets = [await http.post(cp + f"/v1/orgs/{org}/budgets", headers=owner, json=body) for body in (
            {"period": CANARY, "limit_micros": 5}, {"period": "day", "window": CANARY, "limit_micros": 5},
            {"period": "day", "limit_micros": CANARY}, {"period": "day", "limit_micros": 5, "note": CANARY})]
        assert {r.status_code for r in budgets} == {422}, [r.text for r in budgets]
        await _through_the_portal(cp, email, org)
    keys = [t[name] for name in ("key", "limited", "poor", "budgeted", "signing_secret")]
    tokens = signup.json()["tokens"]
    return len(calls) + 6, [*keys, tokens["access_token"], tokens["refresh_token"]]


async def _paid_at_stripe(stack: Stack, http: httpx.AsyncClient, owner: dict, org: int) -> None:
    """A card top-up paid at the local Stripe: the control plane calls it with the secret key, and its webhook
    comes back signed with the webhook secret (both read from the database, decrypted)."""
    stack.stripe.register_webhook(f"canary-{org}", stack.control_plane.url + "/v1/webhooks/stripe",
                                  ["checkout.session.completed", "payment_intent.succeeded"])
    started = await http.post(stack.control_plane.url + f"/v1/orgs/{org}/payments/stripe-checkout", headers=owner,
                              json={"amount_micros": 5_000_000})
    assert started.status_code == 201, started.text
    await asyncio.to_thread(stack.stripe.pay, started.json()["url"])
    paid = "select 1 from payments where org_id = $1 and status = 'succeeded'"
    assert await wait_for_rows(stack.db, paid, org, timeout=20), "the paid top-up was not recorded"


async def _through_the_portal(cp: str, email: str, org: int) -> None:
    """The portal's forms (cookie session, CSRF token): a password, refused values and a wrong login."""
    token = re.compile(r'name="_csrf_token" value="([^"]+)"')
    async with httpx.AsyncClient(base_url=cp, timeout=20.0) as page:
        async def post(path: str, form: dict) -> httpx.Response:
            csrf = token.search((await page.get("/portal/login")).text).group(1)
            return await page.post(path, data={**form, "_csrf_token": csrf})

        await post("/portal/signup", {"email": CANARY, "password": PASSWORD, "org_name": CANARY})  # refused email
        await post("/portal/login", {"email": f"{CANARY}@example.com", "password": CANARY})
        resp = await post("/portal/login", {"email": email, "password": PASSWORD})  # the real password
        assert resp.status_code == 303, resp.text
        for path, form in ((f"/portal/orgs/{org}/keys", {"name": "k" * 300 + CANARY, "allowed_models": CANARY}),
                           (f"/portal/orgs/{org}/billing/crypto", {"network": "ethereum", "tx_hash": CANARY,
                                                                  "sender_address": CANARY, "crypto_amount": "5"}),
                           (f"/portal/orgs/{org}/billing/topup", {"amount": CANARY}),
                           (f"/portal/orgs/{org}/webhooks", {"url": f"ftp://{CANARY}.example/x", "description": CANARY,
                                                             "event_types": "key.created"}),
                           (f"/portal/orgs/{org}/budgets", {"scope": "org", "period": "day", "window": "calendar",
                                                            "limit": CANARY, "alert_percent": CANARY}),
                           (f"/portal/orgs/{org}/logs?model={CANARY}", {}),
                           ("/portal/account/password", {"current_password": CANARY, "new_password": CANARY})):
            if path.startswith(f"/portal/orgs/{org}/logs"):
                assert (await page.get(path)).status_code == 200
                continue
            resp = await post(path, form)
            assert resp.status_code == 200 and CANARY not in resp.headers.get("set-cookie", ""), path


async def test_the_canary_and_the_secrets_are_stored_nowhere(stack: Stack, mock_upstream: Server) -> None:
    made, given = await send_everything(stack, mock_upstream)
    rows = await wait_for_rows(stack.db, "select 1 from request_logs", count=made - 1, timeout=15)
    assert len(rows) >= made - 1  # the disconnected stream may still be settling
    # The billing flusher's batches (the worker may still be starting on a busy machine), then its last one.
    assert len(await wait_for_rows(stack.db, "select 1 from usage_records", count=5, timeout=60)) >= 5
    await asyncio.sleep(1.0)
    # The balance alert went out by mail (the SMTP login worked) and by webhook before anything is searched.
    assert await stack.mail.wait_for("alerts@example.com", 1, timeout=30)
    for _ in range(100):
        if stack.hooks.requests:
            break
        await asyncio.sleep(0.1)
    assert any(b'"balance.low"' in r.body for r in stack.hooks.requests)
    needles = [CANARY, BYOK_SECRET, PROVIDER_SECRET, PASSWORD, METRICS_TOKEN, SMTP_LOGIN[1], STRIPE_SECRET,
               STRIPE_WEBHOOK_SECRET, stack.settings.master_key, stack.settings.key_pepper, *given]
    found = {needle[:14]: where for needle, where in (await leaks_of(stack, needles)).items() if where}
    assert found == {}


@pytest.mark.parametrize("store", ["postgres", "redis", "logs", "mail", "webhooks", "metrics"])
async def test_the_scanner_finds_a_deliberate_leak(stack: Stack, store: str) -> None:
    """A body put on purpose where a careless change would put it is found: the search is not blind."""
    leak = f"LEAK-{secrets.token_hex(8)}"
    if store == "postgres":  # a request body logged into a request-log column
        await stack.db.execute(
            """insert into request_logs (created_at, request_id, path, method, status_code, stream, latency_ms,
                                         user_agent) values (now(), $1, '/v1/chat/completions', 'POST', 200, false, 1,
                                         $2)""", secrets.token_hex(12), f'{{"messages":[{{"content":"{leak}"}}]}}')
    elif store == "redis":  # a body cached next to a key record
        await stack.redis.set(stack.settings.redis_prefix + "apikey:debug", f"body={leak}", ex=60)
    elif store == "mail":  # a prompt quoted into an alert mail
        message = EmailMessage()
        message["Subject"] = "Low balance"
        message.set_content(f"your last prompt was {leak}")
        stack.mail.mails.append(CaughtMail(["alerts@example.com"], message))
    elif store == "webhooks":  # a prompt put into an event's data
        stack.hooks.requests.append(Received({}, f'{{"data": {{"prompt": "{leak}"}}}}'.encode()))
    elif store == "logs":  # a body written to a process log
        with stack.worker_log.open("a") as log:
            log.write(f"DEBUG request body: {leak}\n")
    else:  # a client's string made a metric label (a proxy worker's snapshot)
        snapshot = {"pid": 1, "at": 0.0, "g": {}, "h": {},
                    "c": {"rr_requests_total": [[["/v1/chat/completions", 200, leak, "", ""], 1]]}}
        (stack.metrics_dir / "proxy" / "1.snapshot").write_bytes(msgspec.msgpack.encode(snapshot))
    try:
        assert await leaks(stack, leak) == [store]
    finally:
        if store == "mail":
            stack.mail.mails.pop()
        elif store == "webhooks":
            stack.hooks.requests.pop()
        elif store == "metrics":
            (stack.metrics_dir / "proxy" / "1.snapshot").unlink()


def start_leaky_proxy(settings: Settings) -> Server:
    """A proxy of the stack that logs every request body (tests/bodyleak): what a careless change would do."""
    port = free_port()
    env = settings_env(settings, proxy_port=port)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BODYLEAK), env.get("PYTHONPATH")]))
    env["RR_TEST_LOG_BODIES"] = "1"
    return start_server([sys.executable, "-m", "proxy.main"], env, port, "/readyz", "leaky-proxy")


async def test_a_proxy_that_logs_bodies_is_caught(stack: Stack, mock_upstream: Server) -> None:
    """End to end: one real request whose body a proxy logs is found in the logs, and only there."""
    leaky = start_leaky_proxy(stack.settings)
    stack.more_logs.append(leaky.log_path)
    try:
        f = stack.factory
        model = await f.model(await f.provider(mock_upstream.url + "/v1"))
        _, key = await f.key(await f.org())
        await f.publish_config(leaky, key, model)
        leak = f"LEAK-{secrets.token_hex(8)}"
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(leaky.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                   json={"model": model, "messages": [{"role": "user", "content": leak}]})
        assert resp.status_code == 200, resp.text
        assert await wait_for_rows(stack.db, "select 1 from request_logs where model = $1", model, timeout=15)
        assert await leaks(stack, leak) == ["logs"]
    finally:
        leaky.stop()

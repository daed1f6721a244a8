"""Notification logic as units: the retry schedule, the SSRF address rules over generated addresses, Standard
Webhooks signatures, the mail templates, and balance alerts firing once per crossing under concurrent
ledger writers (on the real database)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook

from shared.billing import record_ledger_entry
from shared.notify.alerts import check_balance_alerts
from shared.notify.mail import render
from shared.notify.ssrf import RefusedTarget, address_refusal, check_url, resolve_target
from shared.notify.webhooks import backoff_delay, new_signing_secret, sign_headers


@given(st.integers(1, 200), st.floats(0.01, 100), st.floats(1, 10_000), st.floats(0, 0.99), st.integers(0, 2**32))
def test_backoff_grows_is_capped_and_jittered_within_bounds(retry, base, cap, jitter, seed) -> None:
    delay = backoff_delay(retry, base_s=base, max_s=cap, jitter=jitter, rng=random.Random(seed))
    plain = min(cap, base * 2 ** (retry - 1))
    assert plain * (1 - jitter) - 1e-9 <= delay <= plain * (1 + jitter) + 1e-9
    if retry > 1 and base * 2 ** (retry - 1) <= cap:
        assert backoff_delay(retry, base_s=base, max_s=cap, jitter=0, rng=random.Random()) == 2 * backoff_delay(
            retry - 1, base_s=base, max_s=cap, jitter=0, rng=random.Random())


def test_backoff_refuses_retry_zero() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, base_s=1, max_s=2, jitter=0, rng=random.Random())


_NOT_PUBLIC = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
    "224.0.0.0/4", "240.0.0.0/4", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8")]


@given(st.ip_addresses())
def test_no_private_loopback_link_local_or_multicast_address_passes(address) -> None:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    effective = mapped or address
    refused = address_refusal(address, allow_insecure=False)
    if any(effective in net for net in _NOT_PUBLIC if net.version == effective.version):
        assert refused is not None, address
    if refused is None:
        assert effective.is_global and not effective.is_multicast
    # Even the development setting never admits link-local (metadata) or multicast addresses.
    if effective.is_link_local or effective.is_multicast:
        assert address_refusal(address, allow_insecure=True) is not None


@given(st.text(max_size=300))
def test_check_url_refuses_garbage_cleanly(url: str) -> None:
    try:
        scheme, host, port, path = check_url(url, allow_insecure=False)
    except RefusedTarget as exc:
        assert exc.code in {"invalid_url", "insecure_url"}
    else:
        assert scheme == "https" and host and 0 < port < 65536 and path.startswith("/")


async def test_every_resolved_address_must_pass_and_the_checked_one_is_used() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return {"good.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
                "bad.example": ["93.184.215.14", "192.168.1.1"], "none.example": []}[host]

    target = await resolve_target("https://good.example:8443/a?b=1", allow_insecure=False, resolver=resolver)
    assert target.address == "93.184.215.14" and target.connect_url == "https://93.184.215.14:8443/a?b=1"
    assert target.host_header == "good.example:8443"
    for host, code in (("bad.example", "private_address"), ("none.example", "unresolvable")):
        with pytest.raises(RefusedTarget) as refused:
            await resolve_target(f"https://{host}/", allow_insecure=False, resolver=resolver)
        assert refused.value.code == code


def test_both_signatures_verify_and_either_secret_alone_does() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    body = b'{"type":"key.created","data":{"key_id":1}}'
    headers = sign_headers([new, old], "evt_1", datetime.datetime.now(datetime.UTC), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(body, headers)
    with pytest.raises(Exception):  # noqa: B017
        Webhook(new_signing_secret()).verify(body, headers)
    with pytest.raises(Exception):  # noqa: B017
        Webhook(new).verify(body + b" ", headers)


def test_templates_escape_html_and_keep_header_lines_single() -> None:
    context = {"org_name": "<script>x</script>", "org_code": "c", "balance_micros": 1_500_000,
               "threshold_micros": 2_000_000, "amount_micros": None, "reason": None}
    subject, text, html = render("balance_low", context)
    assert subject == "Low balance: <script>x</script>" and "$1.500000" in text and "$2.000000" in text
    assert "<script>" not in html and "&lt;script&gt;" in html
    with pytest.raises(Exception):  # noqa: B017 (StrictUndefined: a missing field is an error)
        render("payment_receipt", {"org_name": "a", "org_code": "b"})


async def test_concurrent_balance_changes_announce_each_crossing_once(factory, db) -> None:
    org = await factory.org(balance_micros=1_000, low_balance_threshold_micros=500)

    async def debit(amount: int) -> None:
        async with db.acquire() as conn, conn.transaction():
            await record_ledger_entry(conn, org, "adjustment", amount)

    await asyncio.gather(*(debit(-100) for _ in range(9)))  # 1000 -> 100: crosses 500 once
    await debit(1_000)  # 1100: re-armed
    await asyncio.gather(*(debit(-200) for _ in range(6)))  # -> -100: crosses 500 and 0 once each
    async with db.acquire() as conn, conn.transaction():
        assert await check_balance_alerts(conn, [org]) == 0  # nothing new without a new crossing
    events = await db.fetch("select event_type, dedupe_key, payload::text as p from event_outbox where org_id = $1 "
                            "order by id", org)
    assert [(e["event_type"], e["dedupe_key"]) for e in events] == [
        ("balance.low", "crossing-1"), ("balance.low", "crossing-2"), ("balance.depleted", "crossing-1")]
    ledger = await db.fetchval("select sum(amount_micros) from balance_transactions where org_id = $1", org)
    assert ledger == await db.fetchval("select balance_micros from org_balances where org_id = $1", org) == -100

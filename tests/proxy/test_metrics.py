"""The proxy's /metrics over real sockets: a 2-worker proxy, real traffic (answers, refusals, a rate limit,
an unknown model, a failover), scraped and parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import secrets

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Factory, Server, start_proxy
from tests.invariants import OrgExpectation, assert_money_invariants
from tests.proxy.test_billing import priced_tenant
from tests.proxy.test_endpoints import CHAT

TOKEN = "metrics-" + secrets.token_urlsafe(16)
INTERVAL_S = 0.2


@pytest.fixture(scope="module")
def metered_proxy(settings, worker) -> Server:
    server = start_proxy(settings, proxy_workers=2, metrics_token=TOKEN, metrics_interval_s=INTERVAL_S)
    yield server
    server.stop()


def samples(text: str) -> dict[str, list]:
    """name -> [(sample name, labels, value)] of every family, via prometheus_client's parser."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


def value(found: dict, family: str, sample: str, **labels: str) -> float:
    hits = [v for n, lab, v in found.get(family, []) if n == sample and all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, f"{sample}{labels}: {hits} in {found.get(family)}"
    return hits[0]


async def scrape(proxy: Server, token: str = TOKEN) -> dict[str, list]:
    async with httpx.AsyncClient() as http:
        resp = await http.get(proxy.url + "/metrics", headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(resp.text)


async def test_metrics_after_traffic_cover_every_worker(metered_proxy: Server, mock_upstream: Server,
                                                        factory: Factory, db, redis, settings) -> None:
    t = await priced_tenant(factory, metered_proxy, mock_upstream)
    poor = await priced_tenant(factory, metered_proxy, mock_upstream, balance=100)
    limited = await priced_tenant(factory, metered_proxy, mock_upstream, rpm_limit=1)
    hostile_model = "canary-model-" + secrets.token_hex(8)
    # A fresh connection per request, so both workers serve some.
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=20) as http:
        url = metered_proxy.url + "/v1/chat/completions"
        answers = await asyncio.gather(*(http.post(url, headers=t.auth, json={"model": t.model, **CHAT,
                                                                               "max_tokens": 5})
                                         for _ in range(30)))
        assert [r.status_code for r in answers] == [200] * 30
        refused = await http.post(url, headers=poor.auth, json={"model": poor.model, **CHAT, "max_tokens": 100})
        assert refused.status_code == 402
        unknown = await http.post(url, headers=t.auth, json={"model": hostile_model, **CHAT})
        assert unknown.status_code == 404
        first = await http.post(url, headers=limited.auth, json={"model": limited.model, **CHAT, "max_tokens": 5})
        second = await http.post(url, headers=limited.auth, json={"model": limited.model, **CHAT, "max_tokens": 5})
        assert (first.status_code, second.status_code) == (200, 429)
        text = (await http.get(metered_proxy.url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"})).text
    await asyncio.sleep(3 * INTERVAL_S)  # every worker has written a snapshot since
    found = await scrape(metered_proxy)

    assert value(found, "rr_processes", "rr_processes") == 2
    chat = "/v1/chat/completions"
    assert value(found, "rr_requests", "rr_requests_total", endpoint=chat, status="200", model=t.model) == 30
    # The histogram of those 30: cumulative buckets ending in +Inf == count, a sum in seconds.
    buckets = [(float(lab["le"]), v) for n, lab, v in found["rr_request_duration_seconds"]
               if n.endswith("_bucket") and lab["model"] == t.model]
    assert buckets == sorted(buckets) and buckets[-1] == (float("inf"), 30)
    assert value(found, "rr_request_duration_seconds", "rr_request_duration_seconds_count", model=t.model) == 30
    assert 0 < value(found, "rr_request_duration_seconds", "rr_request_duration_seconds_sum", model=t.model) < 30 * 20
    assert value(found, "rr_ttfb_seconds", "rr_ttfb_seconds_count", model=t.model) == 30
    provider = await db.fetchval("select name from providers where id = $1", t.provider_id)
    assert value(found, "rr_upstream_attempts", "rr_upstream_attempts_total", provider=provider, outcome="ok") == 30
    assert value(found, "rr_reservation_refusals", "rr_reservation_refusals_total", reason="insufficient_quota") >= 1
    assert value(found, "rr_rate_limit_hits", "rr_rate_limit_hits_total", limit="requests") >= 1
    # The unknown model is counted without the client's string: a client cannot mint series.
    assert hostile_model not in text and hostile_model not in json.dumps(found)
    assert value(found, "rr_requests", "rr_requests_total", endpoint=chat, status="404", model="") >= 1
    # Billing backlog and flush lag: one series per shard, read from Redis at scrape time.
    shards = {lab["shard"] for n, lab, _ in found["rr_billing_stream_backlog"]}
    assert shards == {str(s) for s in range(settings.billing_shards)}
    assert all(v >= 0 for _, _, v in found["rr_billing_flush_lag_seconds"])
    # Per-route state from the catalogue: closed breaker, healthy probe status.
    route = await db.fetchval("select id from routes where model = $1", t.model)
    assert value(found, "rr_breaker_open", "rr_breaker_open", route=str(route)) == 0
    assert value(found, "rr_route_probe_status", "rr_route_probe_status", route=str(route), status="healthy") == 1
    assert value(found, "rr_route_probe_status", "rr_route_probe_status", route=str(route), status="failing") == 0
    assert value(found, "rr_request_log_rows_rejected", "rr_request_log_rows_rejected_total") == 0
    await assert_money_invariants(db, redis, settings, {t.org_id: OrgExpectation(billed=30),
                                                        poor.org_id: OrgExpectation(),
                                                        limited.org_id: OrgExpectation(billed=1)})


async def test_failover_and_open_breaker_are_counted(metered_proxy: Server, mock_upstream: Server,
                                                     factory: Factory, db) -> None:
    dead = await factory.provider("http://127.0.0.1:9/v1")  # nothing listens on port 9: connect refused
    live = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(dead, priority=10)
    await factory.route(model, live, model, priority=0)
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await factory.publish_config(metered_proxy, key, model)
    # One connection: every request on the same worker, so its breaker for the dead route opens (3 failures).
    async with httpx.AsyncClient(timeout=20) as http:
        for _ in range(4):
            resp = await http.post(metered_proxy.url + "/v1/chat/completions",
                                   headers={"authorization": f"Bearer {key}"},
                                   json={"model": model, **CHAT, "max_tokens": 5})
            assert resp.status_code == 200
    await asyncio.sleep(3 * INTERVAL_S)
    found = await scrape(metered_proxy)
    dead_name = await db.fetchval("select name from providers where id = $1", dead)
    dead_route = await db.fetchval("select id from routes where model = $1 and provider_id = $2", model, dead)
    assert value(found, "rr_upstream_failovers", "rr_upstream_failovers_total", provider=dead_name) == 3
    assert value(found, "rr_upstream_attempts", "rr_upstream_attempts_total", provider=dead_name,
                 outcome="upstream_error") == 3
    assert value(found, "rr_breaker_open", "rr_breaker_open", route=str(dead_route)) == 1  # one worker of two


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}",
                                           f"Bearer {TOKEN}x", "Bearer", f"bearer  {TOKEN[:-1]}"])
async def test_metrics_are_hidden_without_the_token(metered_proxy: Server, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient() as http:
        resp = await http.get(metered_proxy.url + "/metrics", headers=headers)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url" and "rr_" not in resp.text


async def test_metrics_are_off_when_no_token_is_set(proxy: Server, settings) -> None:
    assert not settings.metrics_token
    async with httpx.AsyncClient() as http:
        for auth in ({}, {"authorization": "Bearer"}, {"authorization": f"Bearer {TOKEN}"}):
            resp = await http.get(proxy.url + "/metrics", headers=auth)
            assert resp.status_code == 404


async def test_proxy_logs_are_json_lines(metered_proxy: Server) -> None:
    lines = [line for line in metered_proxy.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
    assert TOKEN not in metered_proxy.log()

"""rr-worker's /metrics over a real socket: the billing backlog and flush lag it reads, the flusher's totals,
the partition check, the gauges other workers report, and the token rule."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.embedded import free_port
from shared.workers.metrics import WorkerMetrics
from tests.conftest import Factory, Server, start_worker, stop_process
from tests.invariants import OrgExpectation, assert_money_invariants
from tests.proxy.test_billing import priced_tenant
from tests.proxy.test_endpoints import CHAT

TOKEN = "worker-metrics-" + secrets.token_hex(8)


async def wait_until_serving(url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await scrape(url)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"rr-worker did not serve {url} within {timeout_s} s")


def parse(text: str) -> dict[str, list]:
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


async def scrape(url: str, token: str | None = TOKEN) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url, headers={"authorization": f"Bearer {token}"} if token else {})


async def test_worker_metrics_show_backlog_flushes_and_partitions(settings, proxy: Server, mock_upstream: Server,
                                                                  factory: Factory, db, redis) -> None:
    port = free_port()
    process = start_worker(settings, metrics_token=TOKEN, worker_metrics_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        await wait_until_serving(url)  # after the worker's imports (numpy, scipy: seconds on a busy machine)
        t = await priced_tenant(factory, proxy, mock_upstream)
        async with httpx.AsyncClient(timeout=20) as http:
            for _ in range(5):
                resp = await http.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                                       json={"model": t.model, **CHAT, "max_tokens": 5})
                assert resp.status_code == 200
        await assert_money_invariants(db, redis, settings, {t.org_id: OrgExpectation(billed=5)})
        found: dict = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the backlog is read every 5 s
            resp = await scrape(url)
            found = parse(resp.text)
            if "rr_billing_stream_backlog" in found and "rr_partition_check_timestamp_seconds" in found:
                break
            await asyncio.sleep(0.2)
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        shards = {lab["shard"] for _, lab, _ in found["rr_billing_stream_backlog"]}
        assert shards == {str(s) for s in range(settings.billing_shards)}
        assert all(v >= 0 for _, _, v in found["rr_billing_stream_backlog"] + found["rr_billing_flush_lag_seconds"])
        (_, _, checked), = found["rr_partition_check_timestamp_seconds"]
        assert abs(checked - time.time()) < 60
        assert "rr_billing_events_flushed" in found and "rr_billing_events_held" in found
        assert "rr_mail_queue_depth" not in found  # never reported: absent, not a made-up 0
        for bad in (None, "wrong-token-0123456789"):
            refused = await scrape(url, bad)
            assert refused.status_code == 404 and "rr_" not in refused.text
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/other",
                                   headers={"authorization": f"Bearer {TOKEN}"})).status_code == 404
    finally:
        stop_process(process)
    log = process.log_path.read_text()
    assert "worker metrics at" in log
    for line in filter(str.strip, log.splitlines()):
        assert {"time", "level", "logger", "message"} <= json.loads(line).keys(), line
    assert TOKEN not in log


def test_a_worker_without_a_token_opens_no_listener(settings) -> None:
    assert not settings.metrics_token and settings.worker_metrics_port
    assert WorkerMetrics(settings).serve() is None


def test_reported_gauges_and_counters_render(settings) -> None:
    metrics = WorkerMetrics(settings)
    metrics.report("rr_webhook_queue_depth", 12)
    metrics.report("rr_mail_queue_depth", 0)
    metrics.counter("rr_webhook_failures_total").inc(("timeout",))
    metrics.counter("rr_webhook_failures_total").inc(("timeout",))
    found = parse(metrics.render().decode())
    assert found["rr_webhook_queue_depth"] == [("rr_webhook_queue_depth", {}, 12.0)]
    assert found["rr_mail_queue_depth"] == [("rr_mail_queue_depth", {}, 0.0)]
    assert ("rr_webhook_failures_total", {"reason": "timeout"}, 2.0) in found["rr_webhook_failures"]
    with pytest.raises(ValueError):
        metrics.report("rr_webhook_failures_total", 1)  # a counter is not set like a gauge

"""Start-up, readiness and graceful shutdown of the proxy process."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from shared.embedded import start_embedded_redis
from tests.conftest import ROOT, Factory, Server, Tenant, settings_env, start_proxy, wait_for_rows
from tests.proxy.test_endpoints import CHAT, configure_mock, mock_requests


async def test_sigterm_finishes_in_flight_requests_and_flushes_records(
    settings, mock_upstream: Server, tenant: Tenant, db
) -> None:
    server = start_proxy(settings, log_flush_interval_ms=60_000, log_batch_size=10_000)  # nothing flushes early
    await configure_mock(mock_upstream, {tenant.model: {"latency_ms": 1500}})
    trace = f"shutdown-{secrets.token_hex(4)}"
    async with httpx.AsyncClient(timeout=20) as http:
        quick = await http.post(server.url + "/v1/chat/completions",
                                headers={**tenant.auth, "x-request-id": trace + "-a"},
                                json={"model": tenant.model, "messages": [{"content": "x"}], "max_tokens": 1})
        assert quick.status_code == 200  # slow (1.5 s), but finished before the signal
        slow = asyncio.create_task(http.post(
            server.url + "/v1/chat/completions", headers={**tenant.auth, "x-request-id": trace + "-b"},
            json={"model": tenant.model, **CHAT}))
        await asyncio.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        resp = await slow
    assert resp.status_code == 200, "an in-flight request was cut off by shutdown"
    code = await asyncio.to_thread(server.process.wait, 20)
    assert code == 0, server.log()[-2000:]
    rows = await wait_for_rows(db, "select client_request_id from request_logs where client_request_id like $1",
                               trace + "%", count=2, timeout=2)
    assert sorted(r["client_request_id"] for r in rows) == [trace + "-a", trace + "-b"]


async def test_readyz_reports_a_lost_redis(settings) -> None:
    redis = start_embedded_redis(Path(tempfile.mkdtemp(prefix="rr-ready-")))
    server = start_proxy(settings, redis_url=redis.url)
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.get(server.url + "/readyz")).status_code == 200
            redis.stop()
            resp = await http.get(server.url + "/readyz")
            assert resp.status_code == 503
            assert resp.json()["checks"] == {"postgres": True, "redis": False}
            assert (await http.get(server.url + "/healthz")).status_code == 200  # still alive
    finally:
        server.stop()
        redis.stop()


async def test_model_requests_get_503_while_redis_is_down_and_recover_when_it_returns(
    settings, factory: Factory, mock_upstream: Server,
) -> None:
    org_id = await factory.org()
    _, api_key = await factory.key(org_id)
    _, unused_key = await factory.key(org_id)
    model = await factory.model(await factory.provider(mock_upstream.url + "/v1"))
    data_dir = Path(tempfile.mkdtemp(prefix="rr-redis-down-"))
    redis = start_embedded_redis(data_dir)
    server = start_proxy(settings, redis_url=redis.url, redis_timeout_s=1)
    auth = {"authorization": f"Bearer {api_key}"}
    body = {"model": model, **CHAT}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            url = server.url + "/v1/chat/completions"
            assert (await http.post(url, headers=auth, json=body)).status_code == 200
            forwarded = len(await mock_requests(mock_upstream))
            redis.stop()
            started = time.monotonic()
            resp = await http.post(url, headers=auth, json=body)
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "billing_unavailable"
            assert time.monotonic() - started < 5
            assert len(await mock_requests(mock_upstream)) == forwarded  # nothing unbilled went upstream
            # Keys are still checked (from PostgreSQL) while Redis is away: a key not cached yet works for
            # what needs no billing.
            models = await http.get(server.url + "/v1/models", headers={"authorization": f"Bearer {unused_key}"})
            assert models.status_code == 200 and model in {m["id"] for m in models.json()["data"]}
            redis = start_embedded_redis(data_dir, port=redis.port)  # back, and empty: balances are rebuilt
            for _ in range(50):
                resp = await http.post(url, headers=auth, json=body)
                if resp.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert resp.status_code == 200, resp.text
    finally:
        server.stop()
        redis.stop()


def _run_proxy_with(env_changes: dict[str, str | None], settings) -> subprocess.CompletedProcess:
    env = settings_env(settings)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-m", "proxy.main"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_missing_or_malformed_setting_stops_startup_with_one_line(settings) -> None:
    cases = {
        "DATABASE_URL": (None, "DATABASE_URL is required"),
        "RR_PROXY_PORT": ("eighty", "RR_PROXY_PORT is malformed"),
        "RR_PROXY_WORKERS": ("0", "RR_PROXY_WORKERS must be greater than zero"),
        "RR_MASTER_KEY": ("c2hvcnQ=", "RR_MASTER_KEY must be base64 of exactly 32 bytes"),
        "RR_KEY_PEPPER": (None, "RR_KEY_PEPPER is required"),
    }
    for var, (value, message) in cases.items():
        started = time.monotonic()
        result = _run_proxy_with({var: value}, settings)
        assert result.returncode == 2, (var, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (var, result.stderr)
        assert time.monotonic() - started < 10

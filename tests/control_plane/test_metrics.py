"""The control plane's /metrics: a 2-worker rr-control-plane, real portal traffic, one scrape parsed by
prometheus_client's parser; the token rule (a portal access token is not the metrics token)."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.control_plane.conftest import Portal, start_control_plane

TOKEN = "cp-metrics-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def metered_control_plane(settings) -> Server:
    server = start_control_plane(settings, control_plane_workers=2, metrics_token=TOKEN, metrics_interval_s=0.2)
    yield server
    server.stop()


async def test_control_plane_metrics_after_traffic(metered_control_plane: Server, settings) -> None:
    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        portal = Portal(metered_control_plane, http, settings)
        owner = await portal.signup(org_name="Metrics")
        for _ in range(6):
            assert (await portal.request("GET", f"/v1/orgs/{owner.org_id}/keys", owner)).status_code == 200
        assert (await portal.request("GET", f"/v1/orgs/{owner.org_id + 10**6}/keys", owner)).status_code == 404
        # A portal access token is not the metrics token.
        assert (await http.get(metered_control_plane.url + "/metrics", headers=owner.auth)).status_code == 404
        assert (await http.get(metered_control_plane.url + "/metrics")).status_code == 404
        await asyncio.sleep(0.8)
        resp = await http.get(metered_control_plane.url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = {f.name: f.samples for f in text_string_to_metric_families(resp.text)}
    route = "/v1/orgs/{org_id}/keys"
    counts = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value for s in found["rr_cp_requests"]}
    assert counts[(route, "GET", "200")] == 6 and counts[(route, "GET", "404")] == 1
    assert counts[("/v1/auth/signup", "POST", "201")] >= 1
    assert not any(f"/{owner.org_id}/" in r for r, _, _ in counts)  # templates, never the filled-in path
    hist = {(s.name, s.labels.get("le")): s.value for s in found["rr_cp_request_duration_seconds"]
            if s.labels["route"] == route}
    assert hist[("rr_cp_request_duration_seconds_count", None)] == 7
    assert hist[("rr_cp_request_duration_seconds_bucket", "+Inf")] == 7
    (processes,) = found["rr_processes"]
    assert processes.value == 2
    log = metered_control_plane.log()
    assert TOKEN not in log and owner.access_token not in log

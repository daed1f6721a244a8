"""Model quality in the control plane: platform admins see a flagged route's status, why (findings with their
evidence, the status history) and its rounds; they ask for a round, override a status with a reason (pinned,
audited) and choose a reference route; an org sees which routes served its requests and their status, and
no other org's."""

from __future__ import annotations

import random

import httpx

from shared.workers.probes import ProbeRunner
from tests.conftest import Factory, Server, wait_for_rows
from tests.control_plane.conftest import Portal
from tests.shared.test_probes import Clock, _configure, _entry_route, _pair, _rounds_until, _settings


async def test_admins_see_why_a_route_is_failing_and_can_override_it(portal: Portal, factory: Factory, db, redis,
                                                                     settings, mock_upstream: Server) -> None:
    s = _settings(settings)
    model, ref_id, bad_id, ref_up, bad_up = await _pair(factory, mock_upstream, "substitute")
    await _configure(mock_upstream, {ref_up: {"persona": "reference"}, bad_up: {"persona": "substitute"}})
    clock = Clock()
    runner = ProbeRunner(s, db, redis, clock=clock, rng=random.Random(7))
    await runner.start()
    try:
        assert await _rounds_until(runner, clock, s, db, [ref_id, bad_id], bad_id, ("failing",)) is not None
        admin = await portal.platform_admin()
        resp = await portal.request("GET", "/v1/admin/quality/routes", admin, params={"model": model})
        assert resp.status_code == 200
        routes = {r["route_id"]: r for r in resp.json()}
        assert routes[bad_id]["probe_status"] == "failing" and not routes[bad_id]["is_reference"]
        assert routes[ref_id]["probe_status"] == "healthy" and routes[ref_id]["is_reference"]
        assert routes[bad_id]["findings_24h"] > 0 and routes[bad_id]["rounds"] >= 2

        detail = (await portal.request("GET", f"/v1/admin/quality/routes/{bad_id}", admin)).json()
        assert detail["history"][0]["to_status"] == "failing" and detail["history"][0]["actor_user_id"] is None
        assert "consecutive evaluations" in detail["history"][0]["reason"]
        finding = next(f for f in detail["findings"] if f["detector"] == "accuracy")
        assert finding["p_value"] < 0.001 and finding["reference_route_id"] == ref_id
        assert finding["evidence"]["against"] == "reference" and finding["evidence"]["reference_pass_rate"] > 0.9
        assert detail["rounds"][0]["probes"] == 20 and detail["rounds"][0]["checked"] == 12

        probes = (await portal.request("GET", f"/v1/admin/quality/routes/{bad_id}/probes", admin,
                                       params={"limit": 40})).json()
        assert len(probes) == 40 and all(len(p["prompt_hash"]) == 64 for p in probes)
        assert "Paris" not in str(probes) and all(p["reported_model"] == bad_up for p in probes)

        # Override: quarantined, pinned, audited; the detectors no longer move it.
        resp = await portal.request("POST", f"/v1/admin/quality/routes/{bad_id}/status", admin,
                                    json={"status": "quarantined", "reason": "provider confirmed a swap"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["probe_status"] == "quarantined" and resp.json()["pinned"]
        audit = await db.fetchrow("""select * from audit_log where action = 'quality.status.override'
                                     and target_id = $1 order by id desc limit 1""", str(bad_id))
        assert audit["actor_user_id"] == admin.user_id and audit["changes"]
        entry, route = await _entry_route(s, db, bad_id)
        report = await runner.run_round(entry, route)
        assert report.status == "quarantined" and not report.changed
        # Lifting the pin: out of quarantine a route starts at failing, for the detectors to bring down.
        resp = await portal.request("POST", f"/v1/admin/quality/routes/{bad_id}/status", admin,
                                    json={"status": "auto", "reason": "swap fixed, watch it"})
        assert resp.json()["probe_status"] == "failing" and not resp.json()["pinned"]
        history = (await portal.request("GET", f"/v1/admin/quality/routes/{bad_id}", admin)).json()["history"]
        assert [h["actor_user_id"] for h in history[:2]] == [admin.user_id, admin.user_id]
        assert history[1]["reason"] == "override: provider confirmed a swap"
    finally:
        await runner.close()

    # A round on demand: due now, audited.
    resp = await portal.request("POST", f"/v1/admin/quality/routes/{ref_id}/rounds", admin)
    assert resp.status_code == 202
    assert await db.fetchval("select next_round_at <= now() from route_quality where route_id = $1", ref_id)
    assert await db.fetchval("select count(*) from audit_log where action = 'quality.round.request' "
                             "and target_id = $1", str(ref_id)) == 1
    # The reference must be a route of the model.
    resp = await portal.request("POST", "/v1/admin/quality/references", admin,
                                json={"model": model, "route_id": 2**40, "reason": "wrong route"})
    assert resp.status_code == 422
    resp = await portal.request("POST", "/v1/admin/quality/references", admin,
                                json={"model": model, "route_id": bad_id, "reason": "try the other one"})
    assert {r["route_id"]: r["is_reference"] for r in resp.json()} == {ref_id: False, bad_id: True}
    spend = (await portal.request("GET", "/v1/admin/quality/spend", admin)).json()
    mine = next(r for r in spend if r["route_id"] == bad_id)
    assert mine["spent_micros"] > 0 and mine["budget_micros"] == s.probe_route_budget_micros
    assert any(r["route_id"] is None and r["budget_micros"] == s.probe_daily_budget_micros for r in spend)


async def test_an_org_sees_the_routes_that_served_it_and_no_one_elses(portal: Portal, factory: Factory, db,
                                                                      proxy: Server, mock_upstream: Server) -> None:
    owner = await portal.signup(org_name="Evidence A")
    other = await portal.signup(org_name="Evidence B")
    viewer = await portal.member(owner, owner.org_id, "viewer")
    admin = await portal.platform_admin()
    resp = await portal.request("POST", f"/v1/admin/orgs/{owner.org_id}/adjustments", admin,
                                json={"amount_micros": 5_000_000, "reason": "evidence test"})
    assert resp.status_code in (200, 201), resp.text
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id)
    route_id = await db.fetchval("select id from routes where model = $1", model)
    _, api_key = await factory.key(owner.org_id)
    await factory.publish_config(proxy, api_key, model)
    ids = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(3):
            resp = await http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"},
                                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200
            ids.append(resp.headers["x-request-id"])
    await wait_for_rows(db, "select 1 from request_logs where request_id = any($1::text[])", ids, count=3)
    resp = await portal.request("GET", f"/v1/orgs/{owner.org_id}/route-evidence", viewer)
    assert resp.status_code == 200, resp.text
    [row] = [r for r in resp.json() if r["route_id"] == route_id]
    assert row["requests"] == 3 and row["route_status"] == "healthy" and row["current_probe_status"] == "healthy"
    assert row["model"] == model and row["upstream_model"] == model
    # Another org sees nothing of it, and cannot ask for this org's evidence.
    resp = await portal.request("GET", f"/v1/orgs/{other.org_id}/route-evidence", other)
    assert resp.status_code == 200 and resp.json() == []
    resp = await portal.request("GET", f"/v1/orgs/{owner.org_id}/route-evidence", other)
    assert resp.status_code == 404

"""Platform admins see the rows the batched writers set aside (`GET /v1/admin/rejected-rows`)."""

from __future__ import annotations

import secrets

from tests.control_plane.conftest import Portal


async def test_admins_list_set_aside_rows_without_their_content(portal: Portal, db) -> None:
    admin = await portal.platform_admin()
    log_id, event_id = f"rl-{secrets.token_hex(6)}", f"ue-{secrets.token_hex(6)}"
    await db.execute("""insert into rejected_rows (kind, request_id, org_id, sqlstate, reason)
                        values ('request_log', $1, 7, '22021', 'CharacterNotInRepertoireError')""", log_id)
    await db.execute("""insert into rejected_rows (kind, request_id, org_id, sqlstate, reason, shard, stream_id,
                                                   payload, cost_micros)
                        values ('usage_event', $1, 7, '22021', 'CharacterNotInRepertoireError', 0,
                                $2, '\\x01'::bytea, 70)""", event_id, f"{secrets.randbelow(10**12)}-0")
    resp = await portal.request("GET", "/v1/admin/rejected-rows", admin, params={"unresolved": "true"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["unresolved"]["request_log"] >= 1 and body["unresolved"]["usage_event"] >= 1
    rows = {r["request_id"]: r for r in body["data"]}
    assert rows[log_id]["kind"] == "request_log" and rows[log_id]["sqlstate"] == "22021"
    assert rows[event_id]["cost_micros"] == 70 and rows[event_id]["transaction_id"] is None
    assert "payload" not in rows[event_id]
    only = await portal.request("GET", "/v1/admin/rejected-rows", admin, params={"kind": "usage_event"})
    assert {r["kind"] for r in only.json()["data"]} == {"usage_event"}
    owner = await portal.signup()
    assert (await portal.request("GET", "/v1/admin/rejected-rows", owner)).status_code == 403

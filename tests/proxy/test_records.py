"""Request metadata: one row per request (failed ones too), written in COPY batches, never a body."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime

import httpx
import pytest

from proxy.records import RequestLogWriter, RequestRecord
from tests.conftest import Server, Tenant, start_proxy, wait_for_rows
from tests.proxy.test_endpoints import CHAT, configure_mock

_ROW_SQL = "select * from request_logs where client_request_id = $1"


async def _row(db, trace: str) -> dict:
    rows = await wait_for_rows(db, _ROW_SQL, trace)
    assert len(rows) == 1, f"expected one request_logs row for {trace}, got {len(rows)}"
    return dict(rows[0])


async def test_successful_request_record_has_every_field(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant, db
) -> None:
    trace = f"t-{secrets.token_hex(6)}"
    resp = await client.post(proxy.url + "/v1/chat/completions",
                             headers={**tenant.auth, "x-request-id": trace, "user-agent": "records-test/1.0"},
                             json={"model": tenant.model, **CHAT, "max_tokens": 4})
    assert resp.status_code == 200
    row = await _row(db, trace)
    # error_code is empty on success; cost_micros is filled by billing (settlement), not by this path yet.
    empty = [k for k, v in row.items() if v is None and k not in ("error_code", "cost_micros")]
    assert empty == [], f"unfilled fields: {empty}"
    assert row["org_id"] == tenant.org_id and row["api_key_id"] == tenant.key_id
    assert row["model"] == tenant.model and row["upstream_model"] == tenant.model
    assert row["reported_model"] == tenant.model
    assert row["path"] == "/v1/chat/completions" and row["method"] == "POST"
    assert row["status_code"] == 200 and row["error_code"] is None
    assert row["prompt_tokens"] == resp.json()["usage"]["prompt_tokens"]
    assert row["completion_tokens"] == resp.json()["usage"]["completion_tokens"] <= 4
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["attempts"] == 1 and row["stream"] is False
    assert str(row["client_ip"]) == "127.0.0.1"
    assert row["user_agent"] == "records-test/1.0"
    assert row["latency_ms"] >= 0 and row["ttfb_ms"] >= 0
    assert len(row["request_id"]) == 24 and row["request_id"] != trace


async def test_streamed_request_records_usage_from_the_hidden_chunk(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant, db
) -> None:
    trace = f"t-{secrets.token_hex(6)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**tenant.auth, "x-request-id": trace},
                             json={"model": tenant.model, **CHAT, "stream": True})
    assert resp.status_code == 200
    row = await _row(db, trace)
    assert row["stream"] is True
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 8  # the mock's default chunk count
    assert row["reported_model"] == tenant.model
    assert row["ttfb_ms"] is not None


async def test_failed_requests_are_recorded_too(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, tenant: Tenant, db
) -> None:
    url = proxy.url + "/v1/chat/completions"
    cases = {
        "unauth": ({}, {"model": tenant.model, **CHAT}, 401, "missing_api_key"),
        "badjson": (tenant.auth, None, 400, "invalid_json"),
        "nomodel": (tenant.auth, {"model": "nope", **CHAT}, 404, "model_not_found"),
        "upstream": (tenant.auth, {"model": tenant.model, **CHAT}, 502, "upstream_error"),
    }
    await configure_mock(mock_upstream, {tenant.model: {"status": 503}})
    traces = {}
    for name, (headers, body, status, _) in cases.items():
        traces[name] = f"t-{name}-{secrets.token_hex(4)}"
        kwargs = {"json": body} if body is not None else {"content": b"{oops"}
        resp = await client.post(url, headers={**headers, "x-request-id": traces[name]}, **kwargs)
        assert resp.status_code == status
    for name, (_, _, status, code) in cases.items():
        row = await _row(db, traces[name])
        assert (row["status_code"], row["error_code"]) == (status, code)
        assert row["latency_ms"] is not None and row["client_ip"] is not None
    assert (await _row(db, traces["unauth"]))["org_id"] is None
    upstream_row = await _row(db, traces["upstream"])
    assert upstream_row["org_id"] == tenant.org_id and upstream_row["attempts"] == 1
    assert upstream_row["provider"] is not None


async def test_rows_are_written_in_batches_not_one_insert_per_request(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant, db
) -> None:
    prefix = f"batch-{secrets.token_hex(4)}"
    await asyncio.gather(*(
        client.post(proxy.url + "/v1/chat/completions", headers={**tenant.auth, "x-request-id": f"{prefix}-{i}"},
                    json={"model": tenant.model, **CHAT})
        for i in range(30)
    ))
    rows = await wait_for_rows(db, "select xmin::text as tx from request_logs where client_request_id like $1",
                               f"{prefix}-%", count=30)
    assert len(rows) == 30
    transactions = {r["tx"] for r in rows}
    # Rows moved by one `insert … select` from the COPY staging table share a transaction id.
    assert len(transactions) < 10, f"{len(transactions)} transactions for 30 rows: not batched"


async def test_trusted_proxy_header_is_honoured_only_when_configured(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant, db, settings
) -> None:
    behind = start_proxy(settings, trusted_proxy_header="X-Forwarded-For")
    try:
        await asyncio.sleep(0)
        headers = {**tenant.auth, "x-forwarded-for": "198.51.100.9, 203.0.113.7"}
        for server, expected in ((behind, "203.0.113.7"), (proxy, "127.0.0.1")):
            trace = f"t-{secrets.token_hex(6)}"
            resp = await client.post(server.url + "/v1/chat/completions", headers={**headers, "x-request-id": trace},
                                     json={"model": tenant.model, **CHAT})
            assert resp.status_code == 200, resp.text
            assert str((await _row(db, trace))["client_ip"]) == expected
    finally:
        behind.stop()


async def test_untrusted_peer_cannot_spoof_its_address(client: httpx.AsyncClient, tenant: Tenant, db,
                                                       settings) -> None:
    # The header is configured, but the peer (127.0.0.1) is not among the trusted proxies.
    strict = start_proxy(settings, trusted_proxy_header="X-Forwarded-For", trusted_proxies="10.0.0.0/8")
    try:
        trace = f"t-{secrets.token_hex(6)}"
        resp = await client.post(strict.url + "/v1/chat/completions",
                                 headers={**tenant.auth, "x-forwarded-for": "203.0.113.7", "x-request-id": trace},
                                 json={"model": tenant.model, **CHAT})
        assert resp.status_code == 200
        assert str((await _row(db, trace))["client_ip"]) == "127.0.0.1"
    finally:
        strict.stop()


async def test_a_missing_month_partition_is_created_and_the_batch_lands(db) -> None:
    """Rows for a month whose partition is missing (the partition manager was late) are not lost."""
    from datetime import UTC, datetime, timedelta

    from proxy.records import RequestLogWriter, RequestRecord

    month = (datetime.now(UTC).replace(day=1) + timedelta(days=70)).replace(day=1)  # two months ahead
    part = f"request_logs_y{month:%Y}m{month:%m}"
    await db.execute(f"drop table if exists {part}")
    writer = RequestLogWriter(db, batch_size=10, interval_s=0.05, buffer_max=100)
    writer.start()
    try:
        rec = RequestRecord(f"r-{secrets.token_hex(6)}", None, "/v1/chat/completions", "POST", "10.1.2.3", "t/1")
        rec.created_at = month + timedelta(hours=1)
        rec.status_code = 200
        writer.add(rec)
        row = (await wait_for_rows(db, "select * from request_logs where request_id = $1", rec.request_id))[0]
        assert str(row["client_ip"]) == "10.1.2.3" and row["created_at"] == rec.created_at
        assert await db.fetchval("select to_regclass($1) is not null", part)
    finally:
        await writer.close()


# --- the writer itself, on the test database: poison rows and late rows -------------------------------------

def _record(model: str, *, at: datetime | None = None) -> RequestRecord:
    rec = RequestRecord(secrets.token_hex(12), None, "/v1/chat/completions", "POST", "127.0.0.1", "writer-test")
    rec.model, rec.status_code = model, 200
    if at is not None:
        rec.created_at = at
    return rec


async def _drain(writer: RequestLogWriter, written: int, rejected: int = 0, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02)):
        if (writer.written, writer.rejected) >= (written, rejected) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert (writer.written, writer.rejected) == (written, rejected)


async def test_writer_sets_aside_a_poison_row_and_keeps_writing(db) -> None:
    """A NUL in `model` made PostgreSQL refuse the COPY; the batch was put back and retried forever, and the
    worker wrote no request log for anyone again. Now the bad row is set aside, the rest written."""
    writer = RequestLogWriter(db, batch_size=50, interval_s=0.02, buffer_max=1000)
    good = [_record(f"good-{i}") for i in range(6)]
    bad = _record("bad\x00model")
    for rec in (*good[:3], bad, *good[3:]):
        writer.add(rec)
    writer.start()
    try:
        await _drain(writer, written=6, rejected=1)
        later = [_record("later") for _ in range(3)]
        for rec in later:
            writer.add(rec)
        await _drain(writer, written=9, rejected=1)
    finally:
        await writer.close()
    ids = [r.request_id for r in (*good, *later)]
    assert await db.fetchval("select count(*) from request_logs where request_id = any($1)", ids) == 9
    assert not await db.fetchval("select count(*) from request_logs where request_id = $1", bad.request_id)
    row = await db.fetchrow("select * from rejected_rows where request_id = $1", bad.request_id)
    assert (row["kind"], row["sqlstate"], row["reason"]) == ("request_log", "22021", "CharacterNotInRepertoireError")
    assert row["payload"] is None  # nothing of the row's content is kept
    assert "model" not in " ".join(str(v) for v in dict(row).values())


@pytest.mark.calendar
async def test_writer_creates_the_partitions_of_late_and_far_ahead_rows(db) -> None:
    """A row of a month long past and one of a month far ahead get their own partitions (just those
    months), instead of a retry loop that only ever created this month and the next two."""
    writer = RequestLogWriter(db, batch_size=50, interval_s=0.02, buffer_max=1000)
    old, ahead = datetime(1996, 2, 29, 12, tzinfo=UTC), datetime(2140, 7, 1, 0, 0, 1, tzinfo=UTC)
    recs = [_record("late", at=old), _record("now"), _record("ahead", at=ahead)]
    for rec in recs:
        writer.add(rec)
    writer.start()
    try:
        await _drain(writer, written=3)
    finally:
        await writer.close()
    rows = await db.fetch("select request_id, created_at, tableoid::regclass::text as part from request_logs "
                          "where request_id = any($1)", [r.request_id for r in recs])
    parts = {r["request_id"]: r["part"] for r in rows}
    assert parts[recs[0].request_id] == "request_logs_y1996m02"
    assert parts[recs[2].request_id] == "request_logs_y2140m07"
    for name in ("request_logs_y1996m01", "request_logs_y1996m03", "request_logs_y2140m06"):
        assert await db.fetchval("select to_regclass($1)", name) is None  # only the months present

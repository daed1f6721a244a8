"""The read replica (RR_DATABASE_READ_URL): the heavy listings read from it, everything else from the primary.

The "replica" is this run's database opened read-only (`default_transaction_read_only=on`, which asyncpg
sends as a server setting from the URL's query), so a listing that wrote would fail rather than pass. Both
pools carry an application_name of their own. To see which pool runs a page's SQL, the test holds an
exclusive lock on the table the page reads while it asks for the page, and looks in pg_stat_activity for
the backend that waits for that lock: its application_name names the pool. (A backend's latest statement
alone would not do: the pool's reset on release, `RESET ALL`, replaces it at once.)
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
import pytest_asyncio

from shared.embedded import free_port
from shared.settings import Settings
from tests.conftest import Server, ensure_partitions
from tests.control_plane.conftest import Portal, start_control_plane
from tests.control_plane.test_usage import insert_request_log

UTC = datetime.UTC
RUN = secrets.token_hex(4)
REPLICA_APP = f"rr-read-replica-test-{RUN}"
PRIMARY_APP = f"rr-primary-test-{RUN}"


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _read_url(settings: Settings) -> str:
    return _with_query(settings.database_url, f"default_transaction_read_only=on&application_name={REPLICA_APP}")


@pytest.fixture(scope="module")
def replica_control_plane(settings: Settings) -> Iterator[Server]:
    server = start_control_plane(settings, database_url=_with_query(settings.database_url,
                                                                    f"application_name={PRIMARY_APP}"),
                                 database_read_url=_read_url(settings))
    yield server
    server.stop()


@pytest_asyncio.fixture
async def replica_portal(replica_control_plane: Server, settings: Settings) -> AsyncIterator[Portal]:
    async with httpx.AsyncClient(timeout=20.0) as http:
        yield Portal(replica_control_plane, http, settings)


async def _waiting_for(db: asyncpg.Pool, table: str, request: asyncio.Task) -> set[str]:
    """The application names of our pools' backends that wait for a lock while running SQL on `table`."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not request.done():
        rows = await db.fetch(
            """select application_name from pg_stat_activity
               where datname = current_database() and application_name = any($1) and wait_event_type = 'Lock'
                 and query ilike '%from ' || $2 || '%'""", [REPLICA_APP, PRIMARY_APP], table)
        if rows:
            return {r["application_name"] for r in rows}
        await asyncio.sleep(0.02)  # waiting for the control plane's request to reach PostgreSQL
    return set()


async def _pool_of(db: asyncpg.Pool, table: str, request) -> tuple[set[str], httpx.Response]:
    """Run `request` (a coroutine asking for a page) while `table` is locked: which pool's backend waited for
    the lock, and the page's answer once the lock is gone."""
    async with db.acquire() as conn:
        async with conn.transaction():
            await conn.execute(f"lock table {table} in access exclusive mode")
            task = asyncio.ensure_future(request)
            waiting = await _waiting_for(db, table, task)
        return waiting, await task


async def _get(portal: Portal, path: str, account, **params) -> httpx.Response:
    return await portal.request("GET", path, account, params=params)


def _ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_the_read_url_opens_read_only_sessions(settings: Settings) -> None:
    """What the other tests rely on: asyncpg passes the URL's unknown query parameters as server settings."""
    conn = await asyncpg.connect(_read_url(settings))
    try:
        assert await conn.fetchval("select current_setting('application_name')") == REPLICA_APP
        for _ in range(2):  # the second time after what the pool runs on release: the URL's settings stay
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("update orgs set name = name where false")
            await conn.execute("reset all")
    finally:
        await conn.close()


async def test_heavy_listings_read_from_the_replica(replica_portal: Portal, db: asyncpg.Pool) -> None:
    owner = await replica_portal.signup()
    admin = await replica_portal.platform_admin()
    org = f"/v1/orgs/{owner.org_id}"
    now = datetime.datetime.now(UTC)
    await ensure_partitions(db, "request_logs", now)
    await ensure_partitions(db, "usage_records", now)
    request_id, _ = await insert_request_log(db, owner.org_id, usage={"prompt_tokens": 30, "completion_tokens": 7},
                                             cost=1234)
    await db.execute("update usage_records set uncharged_micros = 55 where request_id = $1", request_id)

    async def page(path: str, table: str, account=owner, **params) -> dict:
        waiting, resp = await _pool_of(db, table, _get(replica_portal, path, account, **params))
        # Ran on the replica, and not on the primary: a page that used the primary would fail here.
        assert waiting == {REPLICA_APP}, path
        return _ok(resp)

    usage = await page(f"{org}/usage", "usage_records")
    assert [(r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cost_micros"])
            for r in usage["data"]] == [("m-detail", 1, 30, 7, 1234)]
    logs = await page(f"{org}/request-logs", "request_logs")
    assert [r["request_id"] for r in logs["data"]] == [request_id] and logs["data"][0]["cost_micros"] == 1234
    detail = await page(f"{org}/request-logs/{request_id}", "request_logs")
    assert detail["id"] == request_id and detail["billed"] is True
    uncharged = await page("/v1/admin/uncharged-usage", "usage_records", admin, org_id=owner.org_id)
    assert [(r["requests"], r["charged_micros"], r["uncharged_micros"]) for r in uncharged["data"]] == [(1, 1234, 55)]
    org_audit = await page(f"{org}/audit-log/", "audit_log")
    assert org_audit["data"] and all(e["org_id"] == owner.org_id for e in org_audit["data"])
    admin_audit = await page("/v1/admin/audit-log/", "audit_log", admin, org_id=owner.org_id)
    assert [e["id"] for e in admin_audit["data"]] == [e["id"] for e in org_audit["data"]]


async def test_writes_and_what_must_see_them_use_the_primary(replica_portal: Portal, db: asyncpg.Pool) -> None:
    owner = await replica_portal.signup()
    admin = await replica_portal.platform_admin()
    org = f"/v1/orgs/{owner.org_id}"
    created = await replica_portal.request("POST", f"{org}/keys", owner, json={"name": "replica-test"})
    assert created.status_code == 201, created.text  # a write through the read-only pool would be a 500
    key_id = created.json()["api_key"]["id"]
    waiting, resp = await _pool_of(db, "api_keys", _get(replica_portal, f"{org}/keys", owner))
    assert waiting == {PRIMARY_APP} and [k["id"] for k in _ok(resp)] == [key_id]

    for amount in (2_500_000, -400_000):
        resp = await replica_portal.request("POST", f"/v1/admin/orgs/{owner.org_id}/adjustments", admin,
                                            json={"amount_micros": amount, "reason": "replica test"})
        assert resp.status_code == 201, resp.text
    waiting, resp = await _pool_of(db, "org_balances", _get(replica_portal, f"{org}/balance", owner))
    assert waiting == {PRIMARY_APP} and _ok(resp)["balance_micros"] == 2_100_000
    waiting, resp = await _pool_of(db, "balance_transactions", _get(replica_portal, f"{org}/transactions", owner))
    assert waiting == {PRIMARY_APP}
    assert [t["amount_micros"] for t in _ok(resp)["data"]] == [-400_000, 2_500_000]
    # The ledger invariant holds after writes made through a control plane that has a replica.
    row = await db.fetchrow(
        """select b.balance_micros, (select sum(amount_micros) from balance_transactions t where t.org_id = b.org_id)
           as total from org_balances b where b.org_id = $1""", owner.org_id)
    assert row["balance_micros"] == row["total"] == 2_100_000
    # The audit log (the replica) shows the writes: this "replica" has no lag.
    actions = [e["action"] for e in _ok(await _get(replica_portal, f"{org}/audit-log/", owner))["data"]]
    assert actions.count("balance.adjust") == 2 and "api_key.create" in actions


async def test_a_replica_that_is_down_fails_only_the_listings(settings: Settings) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens there
    server = start_control_plane(settings, database_read_url=closed)  # starts: /readyz needs the primary only
    try:
        async with httpx.AsyncClient(timeout=20.0) as http:
            portal = Portal(server, http, settings)
            owner = await portal.signup()
            org = f"/v1/orgs/{owner.org_id}"
            for page in (f"{org}/usage", f"{org}/audit-log/"):
                down = await _get(portal, page, owner)
                assert down.status_code == 503 and down.headers["retry-after"] == "5"
                assert down.json()["error"]["code"] == "service_unavailable"
            assert _ok(await _get(portal, f"{org}/balance", owner))["balance_micros"] == 0
            created = await portal.request("POST", f"{org}/keys", owner, json={"name": "while-replica-down"})
            assert created.status_code == 201, created.text
    finally:
        server.stop()

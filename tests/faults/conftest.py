"""A private stack for the fault suite: its own PostgreSQL and Redis (the shared servers on 5432/6379 serve
colleagues' test runs and must never be stopped or flushed), a proxy with two granian workers, an rr-worker,
the mock upstream and the raw faulty upstream; the processes log into their own log folder (a small tmpfs
when this machine lets us mount one, see `tests.faults.disk`).

Every fault test creates its own org, drives steady load through the proxy, injects its fault, and ends with
`check_ledger`: the money invariants of tests/invariants.py plus the usage records compared with the billed
answers by request id, printed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from shared.db.migrate import migrate
from shared.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    free_port,
    start_embedded_postgres,
    start_embedded_redis,
)
from shared.redis_keys import RedisKeys
from shared.settings import Settings, load_settings
from tests.conftest import ROOT, Factory, Server, settings_env, start_mock_upstream, start_server, stop_process
from tests.faults.disk import LogDisk
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.load import Outcome
from tests.invariants import OrgExpectation, assert_money_invariants

# Short reservation lifetime: a reservation held by a proxy worker killed mid-request is released after
# this, so the suite can check "nothing reserved" a few seconds after a kill instead of an hour.
RESERVATION_TTL_S = 8
MAX_REQUEST_DURATION_S = 5
# Usage recovery (shared/workers/recovery.py): the reservation lifetime plus 2 s (one host, one clock), looked
# for every second, so the FLUSHALL test sees lost events billed within its wait.
RECOVERY_GRACE_S = RESERVATION_TTL_S + 2


@dataclass
class FaultStack:
    tmp: Path
    pg: EmbeddedPostgres
    redis_server: EmbeddedRedis
    settings: Settings
    disk: LogDisk
    proxy: Server | None = None
    worker: subprocess.Popen | None = None
    mock: Server | None = None

    # ---- processes -------------------------------------------------------------------------------------

    def start_proxy(self) -> Server:
        port = free_port()
        env = settings_env(self.settings, proxy_port=port, proxy_workers=2)
        self.proxy = start_server([sys.executable, "-m", "proxy.main"], env, port, "/readyz", "proxy",
                                  log_dir=self.disk.path)
        return self.proxy

    def start_worker(self) -> subprocess.Popen:
        log = self.disk.path / f"worker-{time.monotonic_ns()}.log"
        self.worker = subprocess.Popen([sys.executable, "-m", "shared.workers.main"], env=settings_env(self.settings),
                                       cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while b"worker started" not in log.read_bytes():  # start-up takes seconds on 2 busy cores
            assert self.worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        return self.worker

    def proxy_workers(self) -> list[psutil.Process]:
        assert self.proxy is not None
        return psutil.Process(self.proxy.process.pid).children()

    # ---- Redis -----------------------------------------------------------------------------------------

    def kill_redis(self) -> None:
        """kill -9 the Redis server (its append-only file, fsynced before each reply, stays)."""
        self.redis_server.process.kill()
        self.redis_server.process.wait()
        self.redis_server.stop()

    def start_redis(self) -> None:
        self.redis_server = start_embedded_redis(self.tmp / "redis", port=self.redis_server.port)

    # ---- PostgreSQL ------------------------------------------------------------------------------------

    def stop_postgres(self) -> None:
        self.pg.stop()

    def start_postgres(self) -> None:
        self.pg = start_embedded_postgres(self.tmp / "pg")

    def log_lines(self, request_ids: list[str | None], limit: int = 20) -> list[str]:
        """The proxy's log lines that name one of `request_ids` (a failing assertion shows why)."""
        wanted = [rid for rid in request_ids if rid]
        lines = []
        for path in sorted(self.disk.path.glob("rr-proxy-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if any(rid in line for rid in wanted):
                    lines.append(line)
        return lines[-limit:]

    def print(self, line: str) -> None:
        _FIGURES.append(line)
        print(line)


# Every fault's figures (ledger checked, recovery time, …), printed at the end of the run, pass or fail: the
# output of `make test` shows them, not only a failing test's captured output.
_FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("fault suite figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def fault_stack() -> Iterator[FaultStack]:
    tmp = Path(tempfile.mkdtemp(prefix="rr-faults-"))
    pg = start_embedded_postgres(tmp / "pg")
    redis_server = start_embedded_redis(tmp / "redis")
    db_url = pg.url.replace("/postgres?", "/rr_faults?")
    asyncio.run(_create_db(pg.url, db_url))
    disk = LogDisk(tmp / "logs")
    settings = load_settings(
        {}, database_url=db_url, redis_url=redis_server.url, key_pepper=secrets.token_urlsafe(24),
        master_key=base64.b64encode(secrets.token_bytes(32)).decode(), redis_prefix="rrfault:",
        log_flush_interval_ms=50, key_cache_ttl_s=2.0, breaker_cooldown_s=1.0, breaker_threshold=3,
        upstream_read_timeout_s=2.0, upstream_connect_timeout_s=1.0, redis_timeout_s=3.0, probe_enabled=False,
        reservation_ttl_s=RESERVATION_TTL_S, max_request_duration_s=MAX_REQUEST_DURATION_S,
        flusher_lease_ms=3000, failover_budget_s=6.0, usage_recovery_grace_s=RECOVERY_GRACE_S,
        usage_recovery_interval_s=1.0,
        # Notifications to a receiver and a mail catcher on loopback (hence insecure); short attempt timeouts
        # keep the lease of an attempt a worker died in (2 × timeout + 30 s, shared/workers/notify.py) short.
        notify_interval_s=0.2, webhook_allow_insecure=True, webhook_timeout_s=3.0, smtp_timeout_s=3.0,
        webhook_backoff_base_s=1.0, mail_backoff_base_s=1.0,
    )
    stack = FaultStack(tmp, pg, redis_server, settings, disk)
    try:
        stack.mock = start_mock_upstream("fault-mock")
        stack.start_proxy()
        stack.start_worker()
        yield stack
    finally:
        for proc in (stack.worker,):
            if proc is not None:
                stop_process(proc)
        for server in (stack.proxy, stack.mock):
            if server is not None:
                server.stop()
        stack.redis_server.stop()
        stack.pg.stop()
        disk.close(keep_in=tmp / "kept-logs" if os.environ.get("RR_FAULTS_KEEP") else None)
        if not os.environ.get("RR_FAULTS_KEEP"):  # keep the logs of a failing run: RR_FAULTS_KEEP=1
            shutil.rmtree(tmp, ignore_errors=True)


async def _create_db(admin_url: str, db_url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    await conn.execute("create database rr_faults")
    await conn.close()
    await migrate(db_url)


@pytest_asyncio.fixture
async def fdb(fault_stack: FaultStack) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the stack's database (per test: the PostgreSQL fault restarts the server)."""
    pool = await asyncpg.create_pool(fault_stack.settings.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def fredis(fault_stack: FaultStack) -> AsyncIterator[Redis]:
    client = Redis.from_url(fault_stack.settings.redis_url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def faulty() -> AsyncIterator[FaultyUpstream]:
    upstream = FaultyUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
def ffactory(fdb: asyncpg.Pool, fredis: Redis, fault_stack: FaultStack) -> Factory:
    return Factory(fdb, fredis, RedisKeys(fault_stack.settings.redis_prefix), fault_stack.settings)


async def check_ledger(stack: FaultStack, db: asyncpg.Pool, redis: Redis, org_id: int, outcomes: list[Outcome],
                       name: str, *, recovery_s: float | None = None, timeout: float = 30.0) -> None:
    """The fault's verdict: every billed answer has exactly one usage record and nothing else has one (by
    request id), the ledger sums to the balance, live == PostgreSQL, nothing reserved, no drift; printed."""
    served = {o.request_id for o in outcomes if o.served}
    partial = {o.request_id for o in outcomes if o.partial}
    assert len(served) == sum(o.served for o in outcomes), f"{name}: a request id was served twice"
    await assert_money_invariants(db, redis, stack.settings,
                                  {org_id: OrgExpectation(billed=len(served) + len(partial))}, timeout=timeout)
    rows = await db.fetch("select request_id, cost_micros, estimated from usage_records where org_id = $1", org_id)
    billed = {r["request_id"]: r["cost_micros"] for r in rows if r["request_id"] not in partial}
    assert len(rows) == len({r["request_id"] for r in rows}), f"{name}: duplicated usage records"
    assert all(r["estimated"] for r in rows if r["request_id"] in partial), f"{name}: a cut stream not estimated"
    assert partial <= {r["request_id"] for r in rows}, f"{name}: a stream cut after content was not charged"
    unserved = set(billed) - served
    lost = served - set(billed)
    assert not unserved, f"{name}: {len(unserved)} request(s) billed but never served: {sorted(unserved)[:5]}"
    assert not lost, f"{name}: {len(lost)} billed answer(s) without a usage record: {sorted(lost)[:5]}"
    by_id = {o.request_id: o.cost_micros for o in outcomes if o.served}
    wrong = [rid for rid, cost in billed.items() if cost != by_id[rid]]
    assert not wrong, f"{name}: usage records whose cost differs from the answer's: {wrong[:5]}"
    ledger, balance = await db.fetchrow(
        """select (select coalesce(sum(amount_micros), 0) from balance_transactions where org_id = $1)::bigint,
                  (select balance_micros from org_balances where org_id = $1)""", org_id)
    errors = sum(1 for o in outcomes if not o.served)
    line = (f"[{name}] requests {len(outcomes)}, billed answers {len(served)} (+{len(partial)} cut streams, "
            f"estimated), failed {errors - len(partial)}, "
            f"usage records {len(rows)}, ledger sum {ledger} == balance {balance}")
    if recovery_s is not None:
        line += f", service back {recovery_s:.2f} s after the fault ended"
    stack.print(line)


def recovery_time(outcomes: list[Outcome], fault_end: float) -> float | None:
    """Seconds from the end of the fault to the first billed answer of a request started after it."""
    after = [o.ended for o in outcomes if o.served and o.started >= fault_end]
    return min(after) - fault_end if after else None

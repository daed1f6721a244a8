"""The embedded servers really start, serve, and stop (no mocks: these run the shipped binaries)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis

from shared.embedded import (
    EmbeddedError,
    free_port,
    reachable_postgres,
    reachable_redis,
    start_embedded_postgres,
    start_embedded_redis,
)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_postgres_starts_serves_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "postgres"
    service = start_embedded_postgres(data_dir)
    try:
        assert service.url.startswith("postgresql://")
        assert service.is_running()
        pid = service.pid
        assert pid is not None

        async def query() -> tuple[int, str]:
            conn = await asyncpg.connect(service.url, timeout=5)
            try:
                await conn.execute("create table t (x int); insert into t values (41)")
                return await conn.fetchval("select 1"), await conn.fetchval("select x + 1 from t")
            finally:
                await conn.close()

        assert asyncio.run(query()) == (1, 42)
        assert reachable_postgres(service.url)
    finally:
        service.stop()

    assert not service.is_running()
    assert _gone(pid)
    assert service.socket_dir is not None
    assert not (service.socket_dir / ".s.PGSQL.5432").exists()
    assert not reachable_postgres(service.url, timeout=1.0)
    service.stop()  # idempotent

    # Same folder again: reuses the initialised cluster and keeps its data.
    again = start_embedded_postgres(data_dir)
    try:
        assert again.pid != pid

        async def count() -> int:
            conn = await asyncpg.connect(again.url, timeout=5)
            try:
                return await conn.fetchval("select count(*) from t")
            finally:
                await conn.close()

        assert asyncio.run(count()) == 1
    finally:
        again.stop()
    assert not again.is_running()


def test_redis_starts_serves_and_stops(tmp_path: Path) -> None:
    service = start_embedded_redis(tmp_path / "redis")
    try:
        assert service.url == f"redis://127.0.0.1:{service.port}/0"
        client = redis.Redis.from_url(service.url, socket_timeout=5)
        try:
            assert client.ping() is True
            assert client.set("rr:test", "value") is True
            assert client.get("rr:test") == b"value"
        finally:
            client.close()
        assert reachable_redis(service.url)
        pid = service.pid
        assert pid is not None
    finally:
        service.stop()

    assert not service.is_running()
    assert _gone(pid)
    assert not _port_open(service.port)
    assert not reachable_redis(service.url, timeout=1.0)
    assert not list((tmp_path / "redis").glob("*.rdb"))  # no snapshots: the append-only file is the record
    service.stop()  # idempotent


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_embedded_redis_keeps_its_data_across_a_stop_and_a_crash(tmp_path: Path, how: str) -> None:
    """`make run`'s live balances and unflushed usage events survive a restart, and a kill -9: every write is in
    the append-only file before its reply."""
    service = start_embedded_redis(tmp_path / "redis")
    client = redis.Redis.from_url(service.url)
    client.xadd("rr:{s:0}:billing", {"o": "1", "c": "42"})
    client.hset("rr:{s:0}:bal:1", mapping={"balance": 958, "reserved": 0})
    client.close()
    if how == "killed":
        os.kill(service.pid, signal.SIGKILL)
        service.process.wait(5)
    service.stop()
    again = start_embedded_redis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(again.url)
        assert client.xlen("rr:{s:0}:billing") == 1
        assert client.hget("rr:{s:0}:bal:1", "balance") == b"958"
        client.close()
    finally:
        again.stop()


def test_redis_on_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedError, match="exited"):
            start_embedded_redis(tmp_path / "redis", port=port)


def test_reachability_of_closed_ports_is_false() -> None:
    port = free_port()
    assert not reachable_postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=1.0)
    assert not reachable_redis(f"redis://127.0.0.1:{port}/0", timeout=1.0)


async def test_reachable_postgres_works_inside_a_running_loop(tmp_path: Path) -> None:
    service = start_embedded_postgres(tmp_path / "postgres")
    try:
        assert reachable_postgres(service.url)
    finally:
        service.stop()

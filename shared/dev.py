"""`rr-dev` (behind `make run`): the whole relay on one machine with one command.

Without `DATABASE_URL`/`REDIS_URL` it starts an embedded PostgreSQL and Redis in the data folder
(`RR_DATA_DIR`, default `.data`); without `UPSTREAM_BASE_URL` it starts the local mock upstream. It then
migrates, seeds the demo org and key and a demo platform admin, starts the proxy and the control plane
(and, when no Stripe key is configured, a local Stripe as the platform's Stripe account), prints a working
curl command, the control plane's URL, the admin login and how to top up the demo org, and waits. Ctrl-C or SIGTERM
stops everything it started, newest first; if one of its processes dies, it stops the rest and exits
non-zero.

Secrets the data folder needs across runs (key pepper, master key, the demo key, the demo admin's password)
are generated on the first run into `<data>/dev.env` (mode 0600); values set in the environment take
precedence.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, TypeVar

from shared.embedded import (
    EmbeddedError,
    EmbeddedService,
    free_port,
    reachable_postgres,
    reachable_redis,
    start_embedded_postgres,
    start_embedded_redis,
)
from shared.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from shared.seed import DemoSeed

__all__ = ["ChildProcess", "DevError", "DevStack", "load_dev_secrets", "main", "redact_url"]

DEFAULT_DATA_DIR = ".data"
DEV_ENV_FILE = "dev.env"
DEMO_KEY_VAR = "RR_DEMO_API_KEY"
DEMO_ADMIN_PASSWORD_VAR = "RR_DEMO_ADMIN_PASSWORD"
MOCK_READY_TIMEOUT_S = 15.0
PROXY_READY_TIMEOUT_S = 30.0
PROXY_STOP_GRACE_S = 10.0
CHILD_STOP_GRACE_S = 5.0
POLL_INTERVAL_S = 0.5
# The project root, so children find `proxy` and `bench` whatever the current directory is.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DevError(Exception):
    """A start-up step failed or a process died; the message is what the user needs to see."""


class _Terminated(Exception):
    """SIGTERM or SIGHUP arrived: stop like on Ctrl-C."""


class _Part(Protocol):
    def is_running(self) -> bool: ...
    def stop(self) -> None: ...


_P = TypeVar("_P", bound=_Part)


# --- Processes ----------------------------------------------------------------------------------------


class ChildProcess:
    """A child process: stopped with SIGTERM, then SIGKILL after `grace_s` seconds.

    Output goes to `log_path` if given, else to our own stdout/stderr. It runs in its own process group so
    a terminal's Ctrl-C reaches only rr-dev, which then stops the children in order.
    """

    def __init__(
        self, args: list[str], *, env: MutableMapping[str, str], grace_s: float, log_path: Path | None = None
    ) -> None:
        self.args = args
        self.grace_s = grace_s
        self.log_path = log_path
        with _open_log(log_path) as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                env=dict(env), process_group=0,
            )

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def exit_reason(self) -> str:
        """How it ended (exit code or signal), plus the end of its log file if it has one."""
        code = self.process.returncode
        if code is None:
            return "still running"
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return reason + _log_tail(self.log_path)


@contextlib.contextmanager
def _open_log(path: Path | None) -> Iterator[IO[bytes] | None]:
    if path is None:
        yield None
        return
    with path.open("ab") as log:
        yield log


class DevStack:
    """Everything rr-dev started, in start order; `stop()` ends it newest first (proxy … PostgreSQL)."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, _Part]] = []

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, label: str, part: _P) -> _P:
        """Track `part` (already started) under a human-readable `label`."""
        self._parts.append((label, part))
        return part

    def failure(self) -> str | None:
        """A message naming the first part that is no longer running, or None while all are up."""
        for label, part in self._parts:
            if not part.is_running():
                reason = part.exit_reason() if isinstance(part, ChildProcess) else "process is gone"
                return f"{label} stopped unexpectedly ({reason})"
        return None

    def stop(self) -> None:
        """Stop every part, newest first; a failure to stop one does not keep the others running."""
        while self._parts:
            label, part = self._parts.pop()
            try:
                part.stop()
            except Exception as exc:
                _err(f"could not stop {label}: {exc}")


# --- Secrets ------------------------------------------------------------------------------------------


def load_dev_secrets(path: Path) -> dict[str, str]:
    """Read `dev.env`, generating (and storing, mode 0600) whatever is missing: pepper, master key, demo key."""
    values = _read_env_file(path) if path.exists() else {}
    missing = {
        "RR_KEY_PEPPER": lambda: secrets.token_urlsafe(24),  # 32 url-safe characters
        "RR_MASTER_KEY": lambda: base64.b64encode(secrets.token_bytes(32)).decode(),
        DEMO_KEY_VAR: _new_demo_key,
        DEMO_ADMIN_PASSWORD_VAR: lambda: secrets.token_urlsafe(12),
    }
    changed = False
    for name, generate in missing.items():
        if not values.get(name):
            values[name] = generate()
            changed = True
    if changed:
        _write_env_file(path, values)
    return values


def _new_demo_key() -> str:
    from shared.apikeys import generate_api_key

    return generate_api_key()


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _write_env_file(path: Path, values: dict[str, str]) -> None:
    text = "# rr-dev secrets for this data folder, generated on first run. Keep private.\n" + "".join(
        f"{name}={value}\n" for name, value in values.items()
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --- Steps --------------------------------------------------------------------------------------------


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold `<data>/rr-dev.lock` for our lifetime: a second rr-dev on one folder would stop our servers."""
    lock = (data_dir / "rr-dev.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DevError(f"another rr-dev is already running with the data folder {_show_path(data_dir)}") from None
    return lock


def _start_postgres(stack: DevStack, env: MutableMapping[str, str], data_dir: Path) -> str:
    """Return a description of the PostgreSQL in use; sets env["DATABASE_URL"] when embedded."""
    url = env.get("DATABASE_URL", "")
    if url:
        if not reachable_postgres(url, timeout=5.0):
            raise DevError(f"PostgreSQL at DATABASE_URL ({redact_url(url)}) is not reachable")
        return f"external, {redact_url(url)}"
    pg_dir = data_dir / "postgres"
    _say(f"starting embedded PostgreSQL in {_show_path(pg_dir)} ...")
    service = stack.add("embedded PostgreSQL", start_embedded_postgres(pg_dir))
    env["DATABASE_URL"] = service.url
    return f"embedded, {redact_url(service.url)} (data in {_show_path(pg_dir)})"


def _start_redis(stack: DevStack, env: MutableMapping[str, str], data_dir: Path) -> str:
    """Return a description of the Redis in use; sets env["REDIS_URL"] when embedded."""
    url = env.get("REDIS_URL", "")
    if url:
        if not reachable_redis(url, timeout=5.0):
            raise DevError(f"Redis at REDIS_URL ({redact_url(url)}) is not reachable")
        return f"external, {redact_url(url)}"
    service: EmbeddedService = stack.add("embedded Redis", start_embedded_redis(data_dir / "redis"))
    env["REDIS_URL"] = service.url
    return f"embedded, {service.url} (append-only file in {_show_path(data_dir / 'redis')})"


def _migrate(database_url: str) -> list[str]:
    import asyncpg

    from shared.db.migrate import migrate

    try:
        return asyncio.run(migrate(database_url))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DevError(f"migrating {redact_url(database_url)} failed: {exc}") from exc


def _start_upstream(
    stack: DevStack, env: MutableMapping[str, str], data_dir: Path
) -> tuple[str, str | None, str]:
    """Return (base URL, API key, description); starts the mock upstream unless UPSTREAM_BASE_URL is set."""
    base_url = env.get("UPSTREAM_BASE_URL", "")
    if base_url:
        return base_url, env.get("UPSTREAM_API_KEY") or None, f"external, {redact_url(base_url)}"
    try:
        port = int(env.get("RR_MOCK_PORT") or free_port())
    except ValueError:
        raise DevError("RR_MOCK_PORT must be a port number") from None
    log_path = data_dir / "mock-upstream.log"
    mock = stack.add("mock upstream", ChildProcess(
        # As the reference model, so that the probe runner of rr-worker finds the demo routes healthy.
        [sys.executable, "-m", "bench.mock_upstream", "--port", str(port), "--persona", "reference"],
        env=env, grace_s=CHILD_STOP_GRACE_S, log_path=log_path,
    ))
    _wait_http_ok(mock, "mock upstream", port, "/v1/models", MOCK_READY_TIMEOUT_S)
    base_url = f"http://127.0.0.1:{port}/v1"
    return base_url, None, f"mock at {base_url} (log: {_show_path(log_path)})"


def _seed(settings: Settings, base_url: str, api_key: str | None, demo_key: str) -> DemoSeed:
    import asyncpg

    from shared.seed import seed_demo

    try:
        return asyncio.run(
            seed_demo(settings, upstream_base_url=base_url, upstream_api_key=api_key, demo_api_key=demo_key)
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DevError(f"seeding the demo data failed: {exc}") from exc


LOCAL_STRIPE_KEY = "sk_test_rocketrelay_dev"
DEMO_TOPUP_MICROS = 10_000_000


def _stripe_is_configured(settings: Settings) -> bool:
    """Whether an admin set a Stripe key (then `make run` uses it and starts no local Stripe)."""
    import asyncpg

    async def check() -> bool:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return bool(await conn.fetchval(
                "select 1 from stripe_config where origin = 'admin' and secret_key_id is not null"))
        finally:
            await conn.close()

    return asyncio.run(check())


def _start_local_stripe(stack: DevStack, env: MutableMapping[str, str], settings: Settings,
                        data_dir: Path) -> str | None:
    """Start the local Stripe (localstripe with the test fixture's Checkout Sessions) unless a Stripe key is
    configured, make it the platform's Stripe account and send its webhooks to the control plane; returns
    its URL (None: the configured Stripe is used)."""
    if _stripe_is_configured(settings):
        return None
    import asyncpg

    from shared.crypto import box_from_settings
    from shared.payments.stripe_account import save_stripe_config

    port = free_port()
    local = stack.add("local Stripe", ChildProcess(
        [sys.executable, "-m", "tests.fixtures.local_stripe", "--port", str(port),
         "--store", str(data_dir / "local-stripe.pickle")],
        env=env, grace_s=CHILD_STOP_GRACE_S, log_path=data_dir / "local-stripe.log",
    ))
    _wait_http_ok(local, "local Stripe", port, "/_config/health", MOCK_READY_TIMEOUT_S)
    url = f"http://127.0.0.1:{port}"
    webhook_secret = "whsec_" + secrets.token_hex(16)  # a new one per run: localstripe keeps none

    async def configure() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await save_stripe_config(conn, box_from_settings(settings.master_key_bytes, settings.master_key_id),
                                         secret_key=LOCAL_STRIPE_KEY, webhook_secret=webhook_secret, api_base=url,
                                         origin="dev")
                await conn.execute("""insert into billing_plans (name, price_cents, monthly_allowance_micros)
                                      values ('Starter', 2000, 25000000) on conflict do nothing""")
        finally:
            await conn.close()

    asyncio.run(configure())
    hook = f"http://{_client_host(settings.control_plane_host)}:{settings.control_plane_port}/v1/webhooks/stripe"
    body = urllib.parse.urlencode({"url": hook, "secret": webhook_secret})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("POST", "/_config/webhooks/rocket-relay", body,
                     {"Content-Type": "application/x-www-form-urlencoded"})
        if conn.getresponse().status != 200:
            raise DevError("the local Stripe refused the webhook registration")
    finally:
        conn.close()
    return url


def _check_proxy_port(settings: Settings) -> None:
    host, port = _client_host(settings.proxy_host), settings.proxy_port
    if _port_open(host, port):
        raise DevError(f"port {port} on {host} is already in use; set RR_PROXY_PORT to another port")
    host, port = _client_host(settings.control_plane_host), settings.control_plane_port
    if _port_open(host, port):
        raise DevError(f"port {port} on {host} is already in use; set RR_CONTROL_PLANE_PORT to another port")


def _seed_admin(settings: Settings, password: str, demo_org_id: int) -> str:
    """The demo platform admin (also owner of the demo org); returns its email."""
    import asyncpg

    from control_plane.seed import seed_demo_admin

    try:
        return asyncio.run(seed_demo_admin(settings, password, demo_org_id))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DevError(f"seeding the demo platform admin failed: {exc}") from exc


def _start_control_plane(stack: DevStack, env: MutableMapping[str, str], settings: Settings, data_dir: Path) -> int:
    host, port = _client_host(settings.control_plane_host), settings.control_plane_port
    _say(f"starting the control plane on port {port} ...")
    control_plane = stack.add("control plane", ChildProcess(
        [sys.executable, "-m", "control_plane.main"], env=env, grace_s=CHILD_STOP_GRACE_S,
        log_path=data_dir / "control-plane.log",
    ))
    _wait_http_ok(control_plane, "control plane", port, "/readyz", PROXY_READY_TIMEOUT_S, host=host)
    return port


def _start_proxy(stack: DevStack, env: MutableMapping[str, str], settings: Settings) -> int:
    host, port = _client_host(settings.proxy_host), settings.proxy_port
    _say(f"starting the proxy on port {port} ...")
    proxy = stack.add("proxy", ChildProcess(
        [sys.executable, "-m", "proxy.main"], env=env, grace_s=PROXY_STOP_GRACE_S,
    ))
    _wait_http_ok(proxy, "proxy", port, "/readyz", PROXY_READY_TIMEOUT_S, host=host)
    return port


def _wait_http_ok(
    child: ChildProcess, label: str, port: int, path: str, timeout: float, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not child.is_running():
            output = "" if child.log_path else " (its output is above)"
            raise DevError(f"the {label} exited before it was ready: {child.exit_reason()}{output}")
        if _http_status(host, port, path) == 200:
            return
        if time.monotonic() > deadline:
            raise DevError(f"the {label} did not answer GET {path} with 200 within {timeout:g}s"
                           f"{_log_tail(child.log_path)}")
        time.sleep(0.1)


def _print_banner(*, postgres: str, redis: str, upstream: str, proxy_port: int, seed: DemoSeed,
                  control_plane_port: int, admin_email: str, admin_password: str,
                  local_stripe: str | None = None) -> None:
    base = f"http://127.0.0.1:{proxy_port}"
    key, chat_model = seed.api_key, seed.chat_model
    body = json.dumps(
        {"model": chat_model, "messages": [{"role": "user", "content": "Hello!"}]}, separators=(",", ":")
    )
    lines = [
        "",
        "Rocket Relay is running.",
        f"  PostgreSQL  {postgres}",
        f"  Redis       {redis}",
        f"  Upstream    {upstream}",
        f"  Proxy       {base}/v1",
        f"  Demo org    {seed.org_code}",
        f"  Demo key    {key}",
        f"  Models      {chat_model} (chat), {seed.embedding_model} (embeddings)",
        "",
        f"control plane: http://127.0.0.1:{control_plane_port}",
        f"  Portal      http://127.0.0.1:{control_plane_port}/portal/",
        f"  Admin login {admin_email} / {admin_password}  (platform admin, owner of the demo org)",
        f"  API docs    http://127.0.0.1:{control_plane_port}/docs  (OpenAPI: /openapi.json)",
        "",
        "Try it:",
        f"  curl {base}/v1/chat/completions -H \"Authorization: Bearer {key}\" "
        f"-H \"Content-Type: application/json\" -d '{body}'",
        "",
        *_topup_lines(control_plane_port, seed, admin_email, admin_password, local_stripe),
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)


def _topup_lines(control_plane_port: int, seed: DemoSeed, admin_email: str, admin_password: str,
                 local_stripe: str | None) -> list[str]:
    cp = f"http://127.0.0.1:{control_plane_port}"
    login = json.dumps({"email": admin_email, "password": admin_password}, separators=(",", ":"))
    where = f"the local Stripe at {local_stripe}, test card" if local_stripe else "the configured Stripe account"
    return [
        f"Top up the demo org by card ({where}):",
        f"  TOKEN=$(curl -s {cp}/v1/auth/login -H \"Content-Type: application/json\" -d '{login}' "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')",
        f"  curl -s {cp}/v1/orgs/{seed.org_id}/payments/stripe-checkout -H \"Authorization: Bearer $TOKEN\" "
        f"-H \"Content-Type: application/json\" -d '{{\"amount_micros\":{DEMO_TOPUP_MICROS}}}'",
        "  then open the \"url\" it returns and press Pay"
        + (" (or: curl -X POST <url>/pay)" if local_stripe else "")
        + f"; GET {cp}/v1/orgs/{seed.org_id}/balance shows the credit.",
        "",
    ]


def _watch(stack: DevStack) -> None:
    """Block until a signal arrives (raises) or a process dies (raises DevError)."""
    while True:
        failure = stack.failure()
        if failure:
            raise DevError(f"{failure}; stopping the rest")
        time.sleep(POLL_INTERVAL_S)


# --- Entry point --------------------------------------------------------------------------------------


def run(stack: DevStack, env: dict[str, str], data_dir: Path) -> None:
    """Start everything into `stack`, print the banner and wait; returns only by raising."""
    stored = load_dev_secrets(data_dir / DEV_ENV_FILE)
    for name, value in stored.items():
        if not env.get(name):
            env[name] = value
    demo_key = env.pop(DEMO_KEY_VAR)
    admin_password = env.pop(DEMO_ADMIN_PASSWORD_VAR)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(_PROJECT_ROOT)) if p)
    # Fail on a bad setting or a taken port before starting anything (the URLs are filled in below).
    _check_proxy_port(load_settings({**env, "DATABASE_URL": env.get("DATABASE_URL") or "postgresql://",
                                     "REDIS_URL": env.get("REDIS_URL") or "redis://"}))

    postgres = _start_postgres(stack, env, data_dir)
    redis = _start_redis(stack, env, data_dir)
    settings = load_settings(env)
    applied = _migrate(settings.database_url)
    if applied:
        _say(f"applied {len(applied)} migration(s)")
    base_url, upstream_key, upstream = _start_upstream(stack, env, data_dir)
    seed = _seed(settings, base_url, upstream_key, demo_key)
    stack.add("worker", ChildProcess(
        [sys.executable, "-m", "shared.workers.main"], env=env, grace_s=PROXY_STOP_GRACE_S,
        log_path=data_dir / "worker.log",
    ))
    admin_email = _seed_admin(settings, admin_password, seed.org_id)
    local_stripe = _start_local_stripe(stack, env, settings, data_dir)
    proxy_port = _start_proxy(stack, env, settings)
    control_plane_port = _start_control_plane(stack, env, settings, data_dir)
    _print_banner(postgres=postgres, redis=redis, upstream=upstream, proxy_port=proxy_port, seed=seed,
                  control_plane_port=control_plane_port, admin_email=admin_email, admin_password=admin_password,
                  local_stripe=local_stripe)
    _watch(stack)


def main() -> None:
    """`rr-dev`: run the relay locally until Ctrl-C."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    env = dict(os.environ)
    data_dir = Path(env.get("RR_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    stack = DevStack()
    lock: IO[str] | None = None
    code = 0
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_data_dir(data_dir)  # held until everything is stopped
        run(stack, env, data_dir)
    except (KeyboardInterrupt, _Terminated):
        code = 0
    except SettingsError as exc:
        _err(str(exc))
        code = 2
    except (DevError, EmbeddedError) as exc:
        _err(str(exc))
        code = 1
    finally:
        # A second Ctrl-C must not leave half the stack running.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        if stack:
            _say("stopping ...")
        stack.stop()
        if lock is not None:
            lock.close()
    sys.exit(code)


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


# --- Helpers ------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("", "0.0.0.0", "::") else bind_host


def _port_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_status(host: str, port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _show_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return ""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- last lines of {_show_path(path)} ---\n" + "\n".join(tail) if tail else ""


def _say(message: str) -> None:
    print(f"rr-dev: {message}", flush=True)


def _err(message: str) -> None:
    print(f"rr-dev: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

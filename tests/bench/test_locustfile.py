"""The locust scenarios (`bench/locustfile.py`) run headless for a few seconds against the test suite's own proxy,
with their tenants created through a real control plane, and finish with no unexpected failure after every
scenario ran: streaming and plain chat, embeddings, models, Anthropic messages, bad keys answered 401, a
rate-limited key answered 429 after its limit, an org answered 402 once its balance ran out."""

from __future__ import annotations

import asyncio
import csv
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from control_plane.seed import ensure_platform_admin
from shared.settings import Settings
from tests.conftest import ROOT, Factory, Server
from tests.control_plane.conftest import CONTROL_PLANE_OVERRIDES, start_control_plane

RUN_SECONDS = 10
USERS = 12  # at least one per user class (there are 8)
LIMITED_RPM = 3

# Request names the run must have recorded (each one a scenario or an expected outcome of one).
EXPECTED_NAMES = (
    "chat stream", "chat", "embeddings", "models", "messages", "messages stream",
    "bad key (unknown): 401 invalid_api_key", "bad key (malformed): 401 invalid_api_key",
    "bad key (revoked): 401 api_key_revoked", "bad key (missing): 401 missing_api_key",
    "limited: 200", "limited: 429 rate_limit_exceeded", "drain: 200", "drain: 402 insufficient_quota",
)


@pytest.fixture(scope="module")
def locust_control_plane(settings: Settings) -> Iterator[Server]:
    server = start_control_plane(settings)
    yield server
    server.stop()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


async def test_locust_scenarios_run_without_unexpected_failures(
    settings: Settings, proxy: Server, mock_upstream: Server, worker: subprocess.Popen, factory: Factory, db,
    locust_control_plane: Server, tmp_path: Path,
) -> None:
    # A platform admin to create the tenants with (Argon2 as cheap as the control plane's test settings).
    email, password = f"locust-{secrets.token_hex(4)}@example.com", secrets.token_urlsafe(16)
    cheap = msgspec.structs.replace(settings, password_time_cost=CONTROL_PLANE_OVERRIDES["password_time_cost"],
                                    password_memory_kib=CONTROL_PLANE_OVERRIDES["password_memory_kib"])
    await ensure_platform_admin(cheap, email, password)
    # Models routed to the mock, at 1 µ$ per prompt token and 2 µ$ per completion token.
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    chat_model = await factory.model(provider_id, price=(1_000_000, 2_000_000))
    embedding_model = await factory.model(provider_id, kind="embedding", price=(1_000_000, 0))
    _, probe_key = await factory.key()
    await factory.publish_config(proxy, probe_key, embedding_model)

    env = {name: value for name, value in os.environ.items() if not name.startswith(("RR_LOCUST_", "LOCUST_"))}
    env.update({
        "RR_LOCUST_CONTROL_PLANE": locust_control_plane.url,
        "RR_LOCUST_ADMIN_EMAIL": email,
        "RR_LOCUST_ADMIN_PASSWORD": password,
        "RR_LOCUST_ORGS": "2",
        "RR_LOCUST_KEYS_PER_ORG": "2",
        "RR_LOCUST_LIMITED_KEYS": "1",
        "RR_LOCUST_LIMITED_RPM": str(LIMITED_RPM),
        "RR_LOCUST_DRAIN_ORGS": "1",
        # A short drain request costs ~18 µ$ and reserves ~120 µ$: a handful of answers, then 402.
        "RR_LOCUST_DRAIN_BALANCE_MICROS": "250",
        "RR_LOCUST_CHAT_MODEL": chat_model,
        "RR_LOCUST_EMBEDDING_MODEL": embedding_model,
        "RR_LOCUST_WAIT": "0.05,0.3",
    })
    prefix = tmp_path / "run"
    args = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
            "-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_SECONDS}s", "--stop-timeout", "5",
            "--host", proxy.url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]
    done = await asyncio.to_thread(subprocess.run, args, env=env, cwd=tmp_path, capture_output=True, text=True,
                                   timeout=RUN_SECONDS + 40)
    output = (done.stdout + done.stderr)[-6000:]

    stats = {row["Name"]: row for row in _read_csv(prefix.with_name("run_stats.csv")) if row["Name"] != "Aggregated"}
    failures = _read_csv(prefix.with_name("run_failures.csv"))
    assert not failures, f"unexpected failures: {failures}\n{output}"
    assert done.returncode == 0, output
    assert all(int(row["Failure Count"]) == 0 for row in stats.values()), output
    missing = [name for name in EXPECTED_NAMES if int(stats.get(name, {}).get("Request Count", 0)) == 0]
    assert not missing, f"scenarios that never ran: {missing}\n{output}"
    # The limited key served its whole quota before refusing, within the at most two one-minute windows.
    assert LIMITED_RPM <= int(stats["limited: 200"]["Request Count"]) <= 2 * LIMITED_RPM, output

    # The orgs the run created are suspended afterwards (their keys stop working).
    statuses = await db.fetch("select status, count(*) from orgs where name like 'locust % org %' "
                              "or name like 'locust % limited' or name like 'locust % drain %' group by status")
    assert {r["status"]: r["count"] for r in statuses} == {"suspended": 4}

"""`make run` (`rr-dev`) with its own embedded PostgreSQL and Redis loses no charge: on Ctrl-C the proxy drains,
the worker writes what the billing stream still holds, and only then Redis and PostgreSQL stop; after a crash
(kill -9 of rr-dev and every process it started, Redis included) the next `make run` on the same data folder
finds the unflushed usage events in Redis's append-only file and writes them.

Each test runs the real `python -m shared.dev` with no DATABASE_URL/REDIS_URL, sends billed requests through
the printed proxy URL with the printed demo key, and then reads `usage_records` and the ledger in the
embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
import redis

from shared.embedded import free_port, start_embedded_postgres
from shared.settings import ENV_NAMES
from tests.conftest import ROOT

REQUESTS = 24


@dataclass
class DevRun:
    process: subprocess.Popen
    out: Path
    proxy: str
    key: str
    model: str
    postgres: str
    redis: str

    def text(self) -> str:
        return self.out.read_text(errors="replace")


def _env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES.values()}  # no DATABASE_URL / REDIS_URL
    env.update({ENV_NAMES["proxy_port"]: str(free_port()), ENV_NAMES["control_plane_port"]: str(free_port()),
                ENV_NAMES["password_time_cost"]: "1", ENV_NAMES["password_memory_kib"]: "256",
                "RR_DATA_DIR": str(data), "RR_MOCK_PORT": str(free_port())})
    env.pop("UPSTREAM_BASE_URL", None)
    return env


def _start(data: Path, run: int) -> DevRun:
    out = data / f"out-{run}.txt"
    with out.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "shared.dev"], env=_env(data), cwd=ROOT, stdout=sink,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "Press Ctrl-C" not in out.read_text(errors="replace"):
        assert process.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.2)
    text = out.read_text()

    def field(pattern: str) -> str:
        found = re.search(pattern, text, re.MULTILINE)
        assert found, f"{pattern} not in:\n{text}"
        return found.group(1)

    return DevRun(process, out, proxy=field(r"^  Proxy       (\S+)$"), key=field(r"^  Demo key    (\S+)$"),
                  model=field(r"^  Models      (\S+) \(chat\)"),
                  postgres=field(r"^  PostgreSQL  embedded, (\S+) "), redis=field(r"^  Redis       embedded, (\S+) "))


def _traffic(run: DevRun) -> list[str]:
    """REQUESTS billed chat completions, half of them streamed; the request ids of the 200 answers."""
    ids = []
    with httpx.Client(timeout=20.0, headers={"authorization": f"Bearer {run.key}"}) as http:
        for i in range(REQUESTS):
            body = {"model": run.model, "messages": [{"role": "user", "content": f"hello {i}"}],
                    "stream": i % 2 == 1}
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            answer = http.post(f"{run.proxy}/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            ids.append(answer.headers["x-request-id"])
    return ids


async def _billed(postgres_url: str, ids: list[str]) -> tuple[int, int]:
    """(usage records of `ids`, orgs whose ledger does not sum to their balance)."""
    conn = await asyncpg.connect(postgres_url)
    try:
        records = await conn.fetchval("select count(*) from usage_records where request_id = any($1::text[])", ids)
        off = await conn.fetchval("""select count(*) from org_balances b left join
            (select org_id, sum(amount_micros) s from balance_transactions group by 1) t using (org_id)
            where b.balance_micros <> coalesce(t.s, 0)""")
        return records, off
    finally:
        await conn.close()


def _stop(run: DevRun) -> None:
    if run.process.poll() is None:
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(90) == 0, run.text()


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "data"
    folder.mkdir()
    yield folder
    # Whatever a failing test left running on this folder (the embedded PostgreSQL outlives a crashed rr-dev).
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(tmp_path) in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_ctrl_c_writes_every_charge_before_redis_and_postgres_stop(data: Path) -> None:
    run = _start(data, 1)
    try:
        ids = _traffic(run)
    finally:
        _stop(run)  # right after the last answer: its charge is still on its way through the billing stream
    text = run.text()
    assert "stopping" in text, text
    postgres = start_embedded_postgres(data / "postgres")
    try:
        records, off = asyncio.run(_billed(postgres.url, ids))
    finally:
        postgres.stop()
    assert (records, off) == (REQUESTS, 0), f"{records} usage records for {REQUESTS} answers, {off} ledgers off"


def test_a_crash_of_make_run_loses_no_charge(data: Path) -> None:
    run = _start(data, 1)
    rr_dev = psutil.Process(run.process.pid)
    [worker] = [p for p in rr_dev.children(recursive=True) if "shared.workers.main" in " ".join(p.cmdline())]
    worker.suspend()  # the flusher stops reading: the charges stay in Redis only
    ids = _traffic(run)
    with redis.Redis.from_url(run.redis) as client:
        unflushed = sum(client.xlen(key) for key in client.scan_iter(match="*:billing", _type="stream"))
    assert unflushed >= REQUESTS, f"only {unflushed} usage events in the billing streams"
    for proc in [rr_dev, *rr_dev.children(recursive=True)]:  # the crash: rr-dev, proxy, worker, Redis, …
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    run.process.wait(10)

    again = _start(data, 2)  # same folder: Redis replays its append-only file, the new worker flushes
    try:
        deadline = time.monotonic() + 30
        while (billed := asyncio.run(_billed(again.postgres, ids)))[0] < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.3)
        assert billed == (REQUESTS, 0), f"{billed[0]} usage records for {REQUESTS} answers, {billed[1]} ledgers off"
    finally:
        _stop(again)

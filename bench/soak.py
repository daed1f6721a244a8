"""Soak: is the relay's memory flat over a long run? `python -m bench.soak [--requests 1000000] [--connections 64]`.

Builds the overhead bench's stack (nginx upstream, scratch database, the relay with the full billed path and
the billing flusher), drives the relay with wrk until about `--requests` requests were served, and samples
every `--every` seconds the resident set (VmRSS) of each granian worker, with the number of requests served
so far (from the relay's `request_logs` rows). It prints the samples and the growth between the first sample
after warm-up and the last: flat memory is a growth within ±10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

import asyncpg
from redis import Redis

from bench.overhead import (
    bench_stack,
    create_database,
    group_pids,
    lua_script,
    peak_rss_mib,
    start_relay,
    start_upstream,
)


async def _served(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:  # an estimate that is cheap on a big table; exact enough for a progress column
        return int(await conn.fetchval("select count(*) from request_logs"))
    finally:
        await conn.close()


def soak(requests: int, conns: int, every: float, workers: int, max_minutes: float) -> None:
    with bench_stack(keep_tmp=False) as stack, Redis.from_url(stack.redis_url):
        asyncio.run(create_database(stack))
        start_relay(stack, start_upstream(stack), workers)
        script = stack.tmp / "soak.lua"
        script.write_text(lua_script(stack.headers["relay"]))
        relay = stack.procs["relay"].pid
        wrk = subprocess.Popen(["wrk", "-t1", f"-c{conns}", f"-d{int(max_minutes * 60)}s", "--timeout", "5s",
                                "-s", str(script), stack.targets["relay"]],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        samples: list[tuple[float, int, list[float]]] = []
        print(f"{'seconds':>8} {'requests':>10} {'req/s':>7}  worker RSS MiB", flush=True)
        try:
            while wrk.poll() is None:
                time.sleep(every)
                served = asyncio.run(_served(stack.db_url))
                rss = [mib for pid, mib in peak_rss_mib(relay, "VmRSS").items() if pid != relay]
                elapsed = time.monotonic() - started
                samples.append((elapsed, served, rss))
                print(f"{elapsed:>8.0f} {served:>10,} {served / elapsed:>7,.0f}  "
                      + ", ".join(f"{m:.1f}" for m in rss), flush=True)
                if served >= requests:
                    break
        finally:
            if wrk.poll() is None:
                wrk.terminate()
            out = wrk.communicate(timeout=30)[0]
        errors = [line for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line]
        base = next((s for s in samples if s[1] >= 0.05 * samples[-1][1]), samples[0])  # after warm-up
        first, last = sum(base[2]), sum(samples[-1][2])
        print(f"\nworkers: {len(group_pids(relay)) - 1}; requests served: {samples[-1][1]:,} in "
              f"{samples[-1][0]:.0f} s; wrk: {'; '.join(errors) or 'no errors'}")
        print(f"worker RSS: {first:.1f} MiB at {base[1]:,} requests -> {last:.1f} MiB at {samples[-1][1]:,} "
              f"requests: {100 * (last - first) / first:+.1f} %")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--proxy-workers", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=15.0, help="stop after this long whatever the count")
    a = p.parse_args()
    soak(a.requests, a.connections, a.every, a.proxy_workers, a.max_minutes)


if __name__ == "__main__":
    main()

"""Soak: are the relay's memory and latency flat over a long run?

    python -m bench.soak [--requests 1000000] [--connections 64]          # as fast as wrk goes
    python -m bench.soak --paced --minutes 10 [--rate 0] [--segment 30]   # at a fixed rate, half of peak by default

Builds the overhead bench's stack (nginx upstream, scratch database, the relay with the full billed path and
the billing flusher). Unpaced: drives the relay with wrk until about `--requests` requests were served, and
samples every `--every` seconds the resident set (VmRSS) of each granian worker, with the number of requests
served so far (from the relay's `request_logs` rows); flat memory is a growth within ±10 % between the first
sample after warm-up and the last.

Paced: measures the peak first (10 s of wrk), then drives `--rate` requests per second (0: half of that peak)
for `--minutes`, as back-to-back wrk runs of `--segment` seconds, each giving its latency percentiles, errors
and the workers' resident set. At the end the money is checked: the ledger sums to each balance, one usage
record per answered request (by request id), nothing reserved left in Redis. It prints one line per segment
and the drift of p50/p99/RSS from the first segment after warm-up to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

import asyncpg
from redis import Redis

from bench.overhead import (
    Run,
    bench_stack,
    create_database,
    group_pids,
    lua_script,
    peak_rss_mib,
    run_wrk,
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


async def _money(db_url: str) -> dict[str, int]:
    """The money figures of the run: orgs whose ledger does not sum to their balance, 200 answers, usage
    records, 200 answers without exactly one usage record, usage records of no 200 answer."""
    conn = await asyncpg.connect(db_url)
    try:
        off = await conn.fetchval("""select count(*) from org_balances b left join
            (select org_id, sum(amount_micros) s from balance_transactions group by 1) t using (org_id)
            where b.balance_micros <> coalesce(t.s, 0)""")
        answered = await conn.fetchval("select count(*) from request_logs where status_code = 200")
        usage = await conn.fetchval("select count(*) from usage_records")
        unmatched = await conn.fetchval("""select count(*) from request_logs l left join
            (select request_id, count(*) n from usage_records group by 1) u using (request_id)
            where l.status_code = 200 and coalesce(u.n, 0) <> 1""")
        unserved = await conn.fetchval("""select count(*) from usage_records u where not exists
            (select 1 from request_logs l where l.request_id = u.request_id and l.status_code = 200)""")
        return {"ledger_mismatches": off, "answered": answered, "usage_records": usage, "unmatched": unmatched,
                "unserved": unserved}
    finally:
        await conn.close()


def _reserved(redis: Redis, prefix: str) -> int:
    """Micro-USD still reserved in the live balances (0 once every request settled)."""
    total = 0
    for key in redis.scan_iter(match=f"{prefix}*:bal:*", count=1000):
        total += int(redis.hget(key, "reserved") or 0)
    return total


def paced_soak(minutes: float, rate: int, segment: int, conns: int, workers: int) -> None:
    with bench_stack(keep_tmp=False) as stack, Redis.from_url(stack.redis_url) as redis:
        asyncio.run(create_database(stack))
        start_relay(stack, start_upstream(stack), workers)
        peak = run_wrk(stack, "relay", 64, 10, 1, redis)
        rate = rate or int(peak.rps / 2)
        print(f"peak at 64 connections: {peak.rps:,.0f} req/s; soak at {rate:,} req/s over {conns} connections "
              f"for {minutes:g} min in {segment} s segments", flush=True)
        print(f"{'seconds':>7} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'non-2xx':>7} "
              f"{'sock err':>8} {'RSS MiB':>8} {'relay ms/req':>12}", flush=True)
        segments: list[Run] = []
        started = time.monotonic()
        while time.monotonic() - started < minutes * 60:
            run = run_wrk(stack, "relay", conns, segment, 1, redis, rate=rate)
            segments.append(run)
            print(f"{time.monotonic() - started:>7.0f} {run.rps:>7,.0f} {run.p50:>7.2f} {run.p90:>7.2f} "
                  f"{run.p99:>7.2f} {run.non2xx:>7} {run.socket_errors:>8} {run.rss_mib:>8.1f} "
                  f"{run.server_cpu_ms:>12.3f}", flush=True)
        time.sleep(3)  # the flusher's last batch
        money = asyncio.run(_money(stack.db_url))
        sent = sum(r.requests for r in segments) + peak.requests + 1  # + start_relay's check
        base, last = segments[min(1, len(segments) - 1)], segments[-1]  # the first segment warms up

        def drift(a: float, b: float) -> str:
            return f"{a:.2f} -> {b:.2f} ({100 * (b - a) / a:+.1f} %)" if a else f"{a} -> {b}"

        print(f"\nrequests completed by wrk: {sent:,}; non-2xx: {sum(r.non2xx for r in segments)}; socket errors: "
              f"{sum(r.socket_errors for r in segments)}")
        print(f"p50 ms {drift(base.p50, last.p50)}; p99 ms {drift(base.p99, last.p99)}; "
              f"worker RSS MiB {drift(base.rss_mib, last.rss_mib)}")
        print(f"money: answered {money['answered']:,}, usage records {money['usage_records']:,}, answers without "
              f"exactly one usage record {money['unmatched']}, usage records without a 200 answer "
              f"{money['unserved']}, orgs whose ledger != balance "
              f"{money['ledger_mismatches']}, still reserved in Redis {_reserved(redis, stack.prefix)} µ$")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--proxy-workers", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=15.0, help="stop after this long whatever the count")
    p.add_argument("--paced", action="store_true", help="a fixed rate in segments, with latency and money checks")
    p.add_argument("--minutes", type=float, default=10.0, help="paced: how long")
    p.add_argument("--rate", type=int, default=0, help="paced: requests per second (0: half of the peak)")
    p.add_argument("--segment", type=int, default=30, help="paced: seconds per wrk run")
    a = p.parse_args()
    if a.paced:
        paced_soak(a.minutes, a.rate, a.segment, a.connections, a.proxy_workers)
    else:
        soak(a.requests, a.connections, a.every, a.proxy_workers, a.max_minutes)


if __name__ == "__main__":
    main()

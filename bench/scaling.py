"""Scaling curves: what the relay's cost per request does as workers, keys, logged rows and open streams grow.

    python -m bench.scaling [--only workers,keys,logs,streams] [--duration 10] [--connections 64]
                            [--keys 100,100000] [--log-rows 10000000] [--streams 1000] [--png bench/scaling.png]

On the same private stack as `bench.overhead` (scratch database, Redis prefix, nginx fixed-answer upstream,
the relay with its full billed path), four phases, each with the relay restarted for it:

- workers: relay req/s and CPU per request with 1 and 2 granian workers (`--workers`), under wrk;
- keys: cost per request when wrk rotates over 100 and over 100,000 active keys (`--keys`). The keys are
  made in one COPY into `api_keys`, hashed like `shared.apikeys`. For the largest count, it runs twice:
  first use (every request misses the in-process cache and Redis and reads PostgreSQL), then with the
  Redis key cache filled beforehand (in-process miss, Redis hit: the steady state of many active keys);
- logs: cost per request with an empty `request_logs`, then with `--log-rows` rows spread over the current
  month's partition and the older ones (filled with `insert ... select from generate_series` into a detached
  table per month, then attached: PostgreSQL builds the indexes once);
- streams: RSS of the relay's workers idle, with `--streams` concurrent open streams (the Python mock,
  slow: one chunk a second), and after they closed.

Prints one table per phase and writes a matplotlib PNG. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec
import orjson
from redis import Redis

from bench.overhead import (
    REQUEST,
    TICK,
    Run,
    Stack,
    bench_stack,
    create_database,
    log_tail,
    peak_rss_mib,
    relay_settings,
    run_wrk,
    start_relay,
    start_upstream,
    stop_relay,
)
from bench.streams import STREAM_REQUEST, Connection, start_stream_mock
from shared.apikeys import hash_api_key, load_key_record
from shared.redis_keys import RedisKeys

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("workers", "keys", "logs", "streams")
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass
class Point:
    """One measured point of a curve."""

    phase: str
    label: str
    run: Run | None = None
    pg_cpu_us: float = math.nan  # CPU of the PostgreSQL backends of the bench database, per request
    note: str = ""
    rss: dict[str, float] = field(default_factory=dict)  # streams phase: moment -> workers' RSS MiB


# ---- pure helpers (tested in tests/bench/test_scaling.py) ------------------------------------------------


def bench_key(i: int) -> str:
    """A well-formed API key (`rr-<8 lowercase/digits>_<32 alphanumerics>`) whose prefix encodes i."""
    prefix = "".join(_B36[(i // 36**k) % 36] for k in range(7, -1, -1))
    return f"rr-{prefix}_{secrets.token_hex(16)}"


def month_starts(now: datetime, months: int) -> list[datetime]:
    """The first instants (UTC) of the current month and of the `months - 1` before it, newest first."""
    year, month = now.year, now.month
    starts = []
    for _ in range(months):
        starts.append(datetime(year, month, 1, tzinfo=UTC))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return starts


def split_rows(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal counts that add up to it."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def rotating_keys_lua(keys_file: Path, body: str = REQUEST) -> str:
    """A wrk script that sends the chat request with the next key of `keys_file` (one a line), round robin.

    Each wrk thread starts at its own offset, so threads do not walk the keys in step."""
    return f"""
local body = [==[{body}]==]
local keys = {{}}
local n, i = 0, 0
function init(args)
  for line in io.lines("{keys_file}") do n = n + 1; keys[n] = "Bearer " .. line end
  math.randomseed(os.time() + (tonumber(tostring({{}}):sub(8), 16) or 0))
  i = math.random(n) - 1
end
function request()
  i = i % n + 1
  return wrk.format("POST", nil, {{["Content-Type"] = "application/json", ["Authorization"] = keys[i]}}, body)
end
"""


# ---- database and Redis set-up --------------------------------------------------------------------------


async def create_keys(stack: Stack, count: int) -> list[str]:
    """`count` keys of the demo org, in one COPY, hashed with the relay's pepper like shared.apikeys does."""
    pepper = stack.key_pepper.encode()
    keys = [bench_key(i) for i in range(count)]
    conn = await asyncpg.connect(stack.db_url)
    try:
        org_id = await conn.fetchval("select org_id from api_keys where prefix = $1", stack.api_key[3:11])
        taken = {r[0] for r in await conn.fetch("select prefix from api_keys")}
        keys = [k for k in keys if k[3:11] not in taken]
        await conn.copy_records_to_table(
            "api_keys", columns=["org_id", "name", "prefix", "key_hash"],
            records=[(org_id, "bench", k[3:11], hash_api_key(pepper, k)) for k in keys])
        await conn.execute("analyze api_keys")
    finally:
        await conn.close()
    return keys


async def fill_redis_key_cache(stack: Stack, keys: list[str]) -> None:
    """Write the relay's Redis cache entry (msgpack KeyRecord, as proxy.auth does) for each key."""
    settings = relay_settings(stack)
    names = RedisKeys(settings.redis_prefix, settings.billing_shards)
    pool = await asyncpg.create_pool(stack.db_url, min_size=1, max_size=4)
    try:
        with Redis.from_url(stack.redis_url) as redis:
            for start in range(0, len(keys), 2000):
                batch = [k[3:11] for k in keys[start:start + 2000]]
                records = await asyncio.gather(*(load_key_record(pool, p) for p in batch))
                pipe = redis.pipeline(transaction=False)
                for prefix, record in zip(batch, records, strict=True):
                    if record is not None:
                        pipe.set(names.api_key(prefix), msgspec.msgpack.encode(record),
                                 ex=settings.redis_key_cache_ttl_s)
                pipe.execute()
    finally:
        await pool.close()


async def drop_redis_key_cache(stack: Stack) -> None:
    names = RedisKeys(relay_settings(stack).redis_prefix)
    with Redis.from_url(stack.redis_url) as redis:
        for key in redis.scan_iter(match=names.api_key("*"), count=5000):
            redis.delete(key)


async def truncate_logs(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.db_url)
    try:
        await conn.execute("truncate request_logs")
    finally:
        await conn.close()


async def fill_request_logs(stack: Stack, rows: int, months: int) -> str:
    """`rows` rows spread evenly over the current month and the `months - 1` before it (partitions created as
    needed). Each month is filled in a detached copy of its partition, which is then attached in its place."""
    conn = await asyncpg.connect(stack.db_url)
    started = time.monotonic()
    try:
        await conn.execute("set synchronous_commit = off; set maintenance_work_mem = '512MB'")
        demo_org = await conn.fetchval("select org_id from api_keys where prefix = $1", stack.api_key[3:11])
        now = datetime.now(UTC)
        starts = month_starts(now, months)
        for start, count in zip(starts, split_rows(rows, months), strict=True):
            end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
            span_end = min(end, now)  # rows in the past only
            name = f"request_logs_y{start:%Y}m{start:%m}"
            await conn.execute("create table bench_fill (like request_logs including defaults including constraints)")
            # 1 % of the rows are the demo org's (the relay's own), the rest spread over 1,000 other orgs
            # and 100,000 keys, in time order over the month so far.
            await conn.execute(f"""
                insert into bench_fill (created_at, request_id, org_id, api_key_id, model, provider, upstream_model,
                                        path, method, status_code, stream, latency_ms, ttfb_ms, prompt_tokens,
                                        completion_tokens, total_tokens, attempts, cost_micros)
                select $1::timestamptz + (i - 1) * (($2::timestamptz - $1::timestamptz) / $3::int),
                       'bench-{start:%Y%m}-' || i,
                       case when i % 100 = 0 then $4::bigint else 1000000 + i % 1000 end,
                       1000000 + i % 100000, 'gpt-4o-mini', 'demo-upstream', 'gpt-4o-mini',
                       '/v1/chat/completions', 'POST', case when i % 50 = 0 then 429 else 200 end, i % 3 = 0,
                       40 + i % 900, 15 + i % 300, 10 + i % 500, 1 + i % 200, 11 + i % 500 + i % 200, 1,
                       (i % 700) * 3
                from generate_series(1, $3::int) i""", start, span_end, count, demo_org)
            if await conn.fetchval("select to_regclass($1)", name) is not None:
                # the current month may already have rows (the relay's): keep them
                await conn.execute(f'insert into bench_fill select * from "{name}"')
                await conn.execute(f'alter table request_logs detach partition "{name}"')
                await conn.execute(f'drop table "{name}"')
            await conn.execute(f'alter table bench_fill rename to "{name}"')
            await conn.execute(f"alter table request_logs attach partition \"{name}\" "
                               f"for values from ('{start.isoformat()}') to ('{end.isoformat()}')")
        await conn.execute("vacuum analyze request_logs")
        try:
            await conn.execute("checkpoint")  # now, not in the middle of the next measurement
        except asyncpg.InsufficientPrivilegeError:
            pass
        total = await conn.fetchval("select count(*) from request_logs")
        parts = await conn.fetch("""select c.relname, pg_total_relation_size(c.oid) as bytes
                                    from pg_inherits i join pg_class c on c.oid = i.inhrelid
                                    where i.inhparent = 'request_logs'::regclass order by 1""")
    finally:
        await conn.close()
    sizes = ", ".join(f"{p['relname']} {p['bytes'] / 2**20:,.0f} MiB" for p in parts if p["bytes"] > 8192 * 4)
    return f"{total:,} rows in {time.monotonic() - started:.0f} s; partitions: {sizes}"


async def pg_backend_pids(stack: Stack) -> list[int]:
    conn = await asyncpg.connect(stack.db_url)
    try:
        return [r[0] for r in await conn.fetch(
            "select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()")]
    finally:
        await conn.close()


def pg_backend_cpu(stack: Stack) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to the bench database (the relay's pool)."""
    out = {}
    for pid in asyncio.run(pg_backend_pids(stack)):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


# ---- measurements -------------------------------------------------------------------------------------


def measure(stack: Stack, redis: Redis, args: argparse.Namespace, phase: str, label: str,
            script: Path | None = None, warmup: int | None = None) -> Point:
    """A warm-up, then one wrk run against the relay, with PostgreSQL backend CPU alongside."""
    seconds = args.warmup if warmup is None else warmup
    if seconds > 0:
        run_wrk(stack, "relay", args.connections, seconds, args.threads, redis, script=script)
    pg0 = pg_backend_cpu(stack)
    run = run_wrk(stack, "relay", args.connections, args.duration, args.threads, redis, script=script)
    pg1 = pg_backend_cpu(stack)
    pg_s = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items())
    point = Point(phase, label, run, pg_s * 1e6 / max(run.requests, 1))
    print(f"  {phase:<8} {label:<28} {run.rps:>8,.0f} req/s  CPU {run.server_cpu_ms:.3f} ms/req  "
          f"p50 {run.p50:.2f} ms  p99 {run.p99:.2f} ms  errors {run.non2xx}+{run.socket_errors}  "
          f"other cores {run.other_cores:.2f}", flush=True)
    return point


def relay_problems(stack: Stack) -> list[str]:
    return [line for line in log_tail(stack, "relay", 10**8).splitlines()
            if " ERROR " in line or " WARNING " in line or "Traceback" in line]


def phase_workers(stack: Stack, redis: Redis, args: argparse.Namespace, upstream: str) -> list[Point]:
    points = []
    for workers in args.workers:
        start_relay(stack, upstream, workers)
        points.append(measure(stack, redis, args, "workers", f"{workers} worker{'s' * (workers > 1)}"))
        points[-1].note = f"{len(relay_problems(stack))} relay log warnings"
        stop_relay(stack)
    return points


def phase_keys(stack: Stack, redis: Redis, args: argparse.Namespace, upstream: str) -> list[Point]:
    start_relay(stack, upstream, args.proxy_workers)
    made = time.monotonic()
    keys = asyncio.run(create_keys(stack, max(args.keys)))
    print(f"  keys: {len(keys):,} created with COPY in {time.monotonic() - made:.1f} s", flush=True)
    points = []
    for count in sorted(args.keys):
        keys_file = stack.tmp / f"keys-{count}.txt"
        keys_file.write_text("\n".join(keys[:count]) + "\n")
        script = stack.tmp / f"keys-{count}.lua"
        script.write_text(rotating_keys_lua(keys_file))
        if count == max(args.keys) and count > 1000:
            asyncio.run(drop_redis_key_cache(stack))
            # No warm-up: every request of the run is a key's first use (wrk sends fewer requests than keys).
            point = measure(stack, redis, args, "keys", f"{count:,} keys, first use", script, warmup=0)
            point.note = "in-process and Redis misses: PostgreSQL"
            points.append(point)
            filled = time.monotonic()
            asyncio.run(fill_redis_key_cache(stack, keys[:count]))
            print(f"  keys: Redis key cache filled for {count:,} keys in {time.monotonic() - filled:.1f} s",
                  flush=True)
            time.sleep(relay_settings(stack).key_cache_ttl_s)  # the in-process entries of the first run expire
            point = measure(stack, redis, args, "keys", f"{count:,} keys, Redis-cached", script)
            point.note = "in-process misses, Redis hits"
        else:
            point = measure(stack, redis, args, "keys", f"{count:,} keys", script)
            point.note = "in-process cache hits" if count <= 1000 else ""
        points.append(point)
    points[-1].note += f"; {len(relay_problems(stack))} relay log warnings"
    stop_relay(stack)
    return points


def phase_logs(stack: Stack, redis: Redis, args: argparse.Namespace, upstream: str) -> list[Point]:
    asyncio.run(truncate_logs(stack))
    start_relay(stack, upstream, args.proxy_workers)
    empty = measure(stack, redis, args, "logs", "request_logs empty")
    empty.note = "rows at start: 0"
    stop_relay(stack)
    print(f"  logs: filling request_logs with {args.log_rows:,} rows over {args.log_months} months ...", flush=True)
    empty_note = asyncio.run(fill_request_logs(stack, args.log_rows, args.log_months))
    print(f"  logs: {empty_note}", flush=True)
    start_relay(stack, upstream, args.proxy_workers)
    full = measure(stack, redis, args, "logs", f"request_logs {args.log_rows:,} rows")
    full.note = empty_note.split(";")[0]
    stop_relay(stack)
    return [empty, full]


def workers_rss(stack: Stack) -> float:
    """Sum of the current RSS (VmRSS) of the relay's worker processes (not granian's main process)."""
    main_pid = stack.procs["relay"].pid
    return sum(mib for pid, mib in peak_rss_mib(main_pid, "VmRSS").items() if pid != main_pid)


async def hold_streams(stack: Stack, count: int, ramp: int, limit_s: float) -> tuple[float, int, int, list[str]]:
    """Open `count` streams through the relay; RSS of its workers once all have a first chunk; then read them
    to the end. Returns (RSS MiB with all open, streams opened, streams complete, errors)."""
    body = orjson.dumps(STREAM_REQUEST)
    started = asyncio.Event()
    opened = 0

    def first() -> None:
        nonlocal opened
        opened += 1
        if opened == count:
            started.set()

    conns = [Connection(stack.targets["relay"], stack.headers["relay"]) for _ in range(count)]
    tasks = []
    for i, conn in enumerate(conns):
        tasks.append(asyncio.create_task(conn.stream(body, first, limit_s=limit_s)))
        if (i + 1) % ramp == 0:
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(started.wait(), timeout=60)
    except TimeoutError:
        pass
    await asyncio.sleep(1.0)
    rss = workers_rss(stack)
    results = await asyncio.gather(*tasks)
    for conn in conns:
        await conn.close()
    complete = sum(1 for t in results if not t.error and not math.isnan(t.done_ms))
    return rss, opened, complete, [t.error for t in results if t.error]


def phase_streams(stack: Stack, args: argparse.Namespace) -> list[Point]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * args.streams + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))  # the relay inherits it too
    chunks = max(2, round(args.stream_seconds))  # one chunk a second
    slow = start_stream_mock(stack, chunks, 0.0, 1000.0)
    start_relay(stack, slow, args.proxy_workers)
    idle = workers_rss(stack)
    rss, opened, complete, errors = asyncio.run(hold_streams(stack, args.streams, 100, args.stream_seconds + 60))
    time.sleep(2.0)
    after = workers_rss(stack)
    point = Point("streams", f"{args.streams:,} open streams")
    point.rss = {"idle": idle, "open": rss, "after": after}
    point.note = (f"{opened:,} streams had a first chunk, {complete:,} completed ({chunks} chunks, 1 s apart); "
                  f"{len(errors)} errors" + (f", first: {errors[0]}" if errors else "")
                  + f"; {len(relay_problems(stack))} relay log warnings")
    print(f"  streams  workers RSS idle {idle:.1f} MiB, with {args.streams:,} open {rss:.1f} MiB, "
          f"after {after:.1f} MiB; {point.note}", flush=True)
    stop_relay(stack)
    return [point]


# ---- report -------------------------------------------------------------------------------------------


def table(points: list[Point]) -> list[str]:
    head = ("phase", "point", "req/s", "p50 ms", "p99 ms", "relay CPU ms/req", "Redis CPU µs/req",
            "PostgreSQL CPU µs/req", "errors", "other cores", "note")
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in points:
        if p.run is None:
            continue
        r = p.run
        out.append(f"| {p.phase} | {p.label} | {r.rps:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.server_cpu_ms:.3f} | "
                   f"{r.redis_cpu_us:.0f} | {p.pg_cpu_us:.0f} | {r.non2xx + r.socket_errors} | "
                   f"{r.other_cores:.2f} | {p.note} |")
    for p in points:
        if p.rss:
            per = (p.rss["open"] - p.rss["idle"]) * 1024 / max(int(p.label.split()[0].replace(",", "")), 1)
            out += ["", "| memory | workers RSS MiB | note |", "|---|---|---|",
                    f"| idle | {p.rss['idle']:.1f} | before the streams |",
                    f"| {p.label} | {p.rss['open']:.1f} | +{per:.1f} KiB per open stream; {p.note} |",
                    f"| after | {p.rss['after']:.1f} | 2 s after the last stream ended |"]
    return out


def plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [ph for ph in PHASES if any(p.phase == ph for p in points)]
    cols = min(2, len(phases))
    rows = math.ceil(len(phases) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(phases):]:
        ax.set_visible(False)
    for ax, phase in zip(axes.flat, phases, strict=False):
        pts = [p for p in points if p.phase == phase]
        labels = [p.label.replace(" keys, ", " keys\n").replace("request_logs ", "") for p in pts]
        if phase == "streams":
            p = pts[0]
            names = ["idle", f"{p.label.split()[0]} open", "after"]
            values = [p.rss["idle"], p.rss["open"], p.rss["after"]]
            bars = ax.bar(names, values, color=["#8da0cb", "#fc8d62", "#8da0cb"])
            ax.bar_label(bars, fmt="%.1f MiB")
            ax.set_ylim(0, max(values) * 1.2 if max(values) > 0 else 1)
            ax.set_ylabel("relay workers RSS (MiB)")
            ax.set_title("memory with open streams")
            continue
        cpu = [p.run.server_cpu_ms for p in pts]
        rps = [p.run.rps for p in pts]
        bars = ax.bar(labels, cpu, color="#66c2a5")
        ax.bar_label(bars, labels=[f"{c:.3f} ms\n{r:,.0f} req/s" for c, r in zip(cpu, rps, strict=True)],
                     fontsize=8)
        ax.set_ylabel("relay CPU per request (ms)")
        ax.set_ylim(0, max(cpu) * 1.35 if cpu and max(cpu) > 0 else 1)
        ax.set_title({"workers": "granian workers", "keys": "active keys", "logs": "request_logs size"}[phase])
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases: {','.join(PHASES)}")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load before each run")
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--proxy-workers", type=int, default=1, help="relay workers in the keys, logs, streams phases")
    p.add_argument("--workers", default="1,2", help="worker counts of the workers phase")
    p.add_argument("--keys", default="100,100000", help="active key counts of the keys phase")
    p.add_argument("--log-rows", type=int, default=10_000_000, help="rows put into request_logs")
    p.add_argument("--log-months", type=int, default=3,
                   help="monthly partitions they spread over, this one included (3: within the default 90-day "
                        "retention, so rr-worker's retention pass has nothing to delete)")
    p.add_argument("--streams", type=int, default=1000, help="concurrent open streams of the streams phase")
    p.add_argument("--stream-seconds", type=float, default=20, help="how long each of them lasts")
    p.add_argument("--png", default=str(ROOT / "bench" / "scaling.png"), help="where to write the plot")
    p.add_argument("--note", default="", help="text added to the plot's title (e.g. the commit measured)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, wrk scripts)")
    args = p.parse_args(argv)
    phases = [ph.strip() for ph in args.only.split(",") if ph.strip()]
    if unknown := [ph for ph in phases if ph not in PHASES]:
        raise SystemExit(f"unknown phase(s): {', '.join(unknown)}")
    args.workers = [int(w) for w in args.workers.split(",")]
    args.keys = [int(k) for k in args.keys.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    points: list[Point] = []
    with bench_stack(args.keep_tmp) as stack, Redis.from_url(stack.redis_url) as redis:
        asyncio.run(create_database(stack))
        upstream = start_upstream(stack)
        print(f"upstream: {'nginx' if 'nginx' in stack.procs else 'bench.mock_upstream'}; {args.duration} s per "
              f"run at {args.connections} connections; phases: {', '.join(phases)}", flush=True)
        for phase in PHASES:
            if phase not in phases:
                continue
            if phase == "workers":
                points += phase_workers(stack, redis, args, upstream)
            elif phase == "keys":
                points += phase_keys(stack, redis, args, upstream)
            elif phase == "logs":
                points += phase_logs(stack, redis, args, upstream)
            else:
                points += phase_streams(stack, args)
    print()
    for line in table(points):
        print(line)
    title = (f"Rocket Relay scaling, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; wrk {args.connections} connections, "
             f"{args.duration} s per point; relay workers {args.proxy_workers} unless said"
             + (f"; {args.note}" if args.note else ""))
    plot(points, Path(args.png), title)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; everything the bench started has been stopped and removed")

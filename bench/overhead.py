"""Overhead bench: what does Rocket Relay add over calling the upstream directly, or through one nginx hop?

    python -m bench.overhead [--duration 10] [--connections 8,64] [--proxy-workers 1] [--threads 1]
                             [--peers litellm,portkey] [--rate 1000]

Builds a private stack (scratch database `rr_bench_<random>`, its own Redis prefix, free ports), starts a
fixed-answer upstream (nginx `return 200` if nginx is installed, else `bench.mock_upstream`), an nginx
`proxy_pass` hop in front of it, and the relay routed to it; checks that one relay request answers 200; then
drives each target with `wrk --latency` at each connection count (peak), then at a fixed moderate rate over 8
connections (`--rate`, for added latency without queueing), and prints a table. The billing flusher
(`rr-worker`) runs beside the relay, so usage events go into PostgreSQL during the runs. With `--peers`, LiteLLM's
proxy and Portkey's gateway (installed by `python -m bench.peers setup`) are targets too, routed to the same
upstream and driven with the same load. Everything it started is stopped, and the database and Redis keys are
dropped, on the way out (Ctrl-C included). See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis import Redis

from shared.db.migrate import migrate
from shared.embedded import free_port
from shared.seed import seed_demo
from shared.settings import ENV_NAMES, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
# A realistic non-streaming OpenAI answer (644 bytes), served verbatim by the nginx upstream.
ANSWER = (
    '{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741569952,'
    '"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":'
    '"Hello! How can I assist you today? If you have any questions, feel free to ask.",'
    '"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":'
    '{"prompt_tokens":19,"completion_tokens":25,"total_tokens":44,"prompt_tokens_details":{"cached_tokens":0,'
    '"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    '"system_fingerprint":"fp_06737a9306"}'
)
REQUEST = ('{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
           '{"role":"user","content":"Hello! Can you help me with something?"}],"max_tokens":64}')
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Stack:
    tmp: Path
    admin_url: str
    redis_url: str
    db_name: str = field(default_factory=lambda: f"rr_bench_{secrets.token_hex(4)}")
    prefix: str = field(default_factory=lambda: f"rrbench:{secrets.token_hex(4)}:")
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> process group leader
    targets: dict[str, str] = field(default_factory=dict)  # name -> URL, in table order
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> request headers (auth, routing)
    owner: dict[str, str] = field(default_factory=dict)  # target -> the process (group) serving it
    api_key: str = ""
    # Secrets of the relay's settings, the same for every relay this stack starts (keys stay valid).
    key_pepper: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    master_key: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode())
    db_created: bool = False

    @property
    def db_url(self) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{self.db_name}", parts.query, parts.fragment))


@dataclass
class Run:
    target: str
    conns: int
    requests: int = 0
    rps: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    non2xx: int = 0
    socket_errors: int = 0
    socket_detail: str = ""
    server_cpu_ms: float = 0.0  # CPU of the target's own process group, per request
    redis_cpu_us: float = 0.0  # Redis server CPU per request
    wrk_cpu_pct: float = 0.0  # of one core
    box_cpu_pct: float = 0.0  # of the whole machine
    other_cores: float = 0.0  # CPU of everything else on the box (PostgreSQL included), in cores
    rss_mib: float = 0.0  # resident set of the target's process group after the run
    duration: int = 0
    rate: int = 0  # 0: as fast as wrk goes (peak); else the fixed total request rate of the run
    redis_calls: float = 0.0  # Redis commands (all clients) per request
    evalsha_calls: float = 0.0  # of which script calls
    worker_cpu_ms: float = 0.0  # rr-worker (billing flusher) CPU per request


def spawn(stack: Stack, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Start a child in its own process group (Ctrl-C reaches only us; we stop it), logging to tmp/name.log."""
    with (stack.tmp / f"{name}.log").open("wb") as log:
        stack.procs[name] = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(stack: Stack, name: str, url: str, timeout: float = 30.0) -> None:
    proc, deadline = stack.procs[name], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{log_tail(stack, name)}")
        try:
            if http(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{name} not ready after {timeout:.0f} s:\n{log_tail(stack, name)}")


def log_tail(stack: Stack, name: str, chars: int = 3000) -> str:
    return (stack.tmp / f"{name}.log").read_text(errors="replace")[-chars:]


async def admin_sql(stack: Stack, sql: str) -> None:
    conn = await asyncpg.connect(stack.admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(stack: Stack) -> None:
    await admin_sql(stack, f'create database "{stack.db_name}"')
    stack.db_created = True
    await migrate(stack.db_url)


def start_upstream(stack: Stack) -> str:
    """The fixed-answer upstream (+ nginx hop); returns the upstream base URL the relay is routed to."""
    if shutil.which("nginx") is None:
        port = free_port()
        spawn(stack, "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(port)])
        wait_ready(stack, "mock", f"http://127.0.0.1:{port}/_mock/health")
        stack.targets["direct"] = f"http://127.0.0.1:{port}{CHAT}"
        stack.owner["direct"] = "mock"
        return f"http://127.0.0.1:{port}/v1"
    up, hop = free_port(), free_port()
    (stack.tmp / "nginx.conf").write_text(f"""
worker_processes 1;
pid nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path tmp_body; proxy_temp_path tmp_proxy; fastcgi_temp_path tmp_fcgi;
    uwsgi_temp_path tmp_uwsgi; scgi_temp_path tmp_scgi;
    keepalive_requests 1000000;
    upstream fixed {{ server 127.0.0.1:{up}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{up};
        location = {CHAT} {{ default_type application/json; return 200 '{ANSWER}'; }}
    }}
    server {{
        listen 127.0.0.1:{hop};
        location / {{ proxy_pass http://fixed; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
""")
    spawn(stack, "nginx", ["nginx", "-p", f"{stack.tmp}/", "-e", "stderr", "-c", "nginx.conf", "-g", "daemon off;"])
    stack.targets["direct"] = f"http://127.0.0.1:{up}{CHAT}"
    stack.targets["nginx-hop"] = f"http://127.0.0.1:{hop}{CHAT}"
    stack.owner["direct"] = stack.owner["nginx-hop"] = "nginx"
    wait_ready(stack, "nginx", stack.targets["nginx-hop"])
    return f"http://127.0.0.1:{up}/v1"


def relay_settings(stack: Stack, port: int = 8080, workers: int = 1, metrics: bool = True) -> Settings:
    # Metrics on, as in a deployment (docker-compose.yml sets a token): the workers write their snapshots.
    return load_settings({}, database_url=stack.db_url, redis_url=stack.redis_url, redis_prefix=stack.prefix,
                         key_pepper=stack.key_pepper, proxy_port=port, proxy_workers=workers,
                         master_key=stack.master_key, metrics_token=secrets.token_urlsafe(24) if metrics else "")


async def add_budgets(settings: Settings, org_id: int, api_key: str) -> None:
    """Budgets that never refuse on the demo org and key (calendar and rolling, for the org and the key), so
    `--budgets` measures what they cost the reserve and settle scripts."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        key_id = await conn.fetchval("select id from api_keys where prefix = $1", api_key[3:11])
        for key, period, window in ((None, "day", "calendar"), (None, "month", "rolling"), (key_id, "day", "calendar"),
                                    (key_id, "week", "rolling")):
            await conn.execute("""insert into budgets (org_id, api_key_id, period, window_kind, limit_micros)
                                  values ($1, $2, $3, $4, 1000000000000000) on conflict do nothing""",
                               org_id, key, period, window)
    finally:
        await conn.close()


def start_relay(stack: Stack, upstream_base: str, workers: int, budgets: bool = False, metrics: bool = True) -> None:
    """Seed the demo org/key/routes to the upstream, start `python -m proxy.main`, check one request.

    Called again on the same stack (after `stop_relay`), it keeps the demo key and points the demo provider
    at `upstream_base`."""
    port = free_port()
    settings = relay_settings(stack, port, workers, metrics)
    seed = asyncio.run(seed_demo(settings, upstream_base_url=upstream_base, demo_api_key=stack.api_key or None))
    stack.api_key = seed.api_key
    if budgets:
        asyncio.run(add_budgets(settings, seed.org_id, seed.api_key))
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES.values()}
    env.update({var: str(getattr(settings, name)) for name, var in ENV_NAMES.items()})
    spawn(stack, "relay", [sys.executable, "-m", "proxy.main"], env)
    if "worker" not in stack.procs:  # the billing flusher: the usage stream goes into PostgreSQL meanwhile
        spawn(stack, "worker", [sys.executable, "-m", "shared.workers.main"], env)
    wait_ready(stack, "relay", f"http://127.0.0.1:{port}/readyz")
    stack.targets["relay"] = f"http://127.0.0.1:{port}{CHAT}"
    stack.headers["relay"] = {"Authorization": f"Bearer {stack.api_key}"}
    stack.owner["relay"] = "relay"
    check_target(stack, "relay")


def stop_relay(stack: Stack) -> None:
    if (proc := stack.procs.pop("relay", None)) is not None:
        stop(proc)
    stack.targets.pop("relay", None)


def check_target(stack: Stack, target: str) -> None:
    """One chat request through a target; stop the bench unless it answers 200 with a completion."""
    status, body = http(stack.targets[target], REQUEST.encode(),
                        {**stack.headers.get(target, {}), "Content-Type": "application/json"}, timeout=60)
    if status != 200 or b'"choices"' not in body:
        raise SystemExit(f"{target} check failed: {status} {body[:500]!r}\n"
                         f"{log_tail(stack, stack.owner.get(target, target))}")


def start_peers(stack: Stack, names: list[str], upstream_base: str, workers: int) -> None:
    """Start LiteLLM / Portkey (bench.peers) routed to the same upstream; check one request through each."""
    from bench import peers

    for name in names:
        port = free_port()
        if name == "litellm":
            peer = peers.litellm_peer(stack.tmp, port, upstream_base, "gpt-4o-mini", workers,
                                      f"sk-bench-{secrets.token_hex(8)}")
        else:
            peer = peers.portkey_peer(port, upstream_base)
        spawn(stack, name, peer.args, peer.env)
        wait_ready(stack, name, peer.ready_url, timeout=120)
        stack.targets[name], stack.headers[name], stack.owner[name] = peer.url, peer.headers, name
        check_target(stack, name)


def group_pids(pgid: int) -> list[int]:
    """The processes of a server we started (its process group: main process and workers)."""
    try:
        import psutil
    except ImportError:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
        return pids
    try:
        root = psutil.Process(pgid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pgid: int) -> float:
    """utime+stime, plus reaped children's, of a process group's processes, from /proc/<pid>/stat."""
    total = 0.0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICK  # utime, stime, cutime, cstime
    return total


def peak_rss_mib(pgid: int, field: str = "VmHWM") -> dict[int, float]:
    """VmHWM (peak resident set), or another /proc/<pid>/status size such as VmRSS, of each process of the group."""
    peaks = {}
    for pid in group_pids(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            peaks[pid] = int(re.search(rf"{field}:\s+(\d+) kB", status)[1]) / 1024
        except (OSError, TypeError):
            continue
    return peaks


def box_cpu() -> tuple[int, int]:
    """(busy, total) ticks of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def redis_cpu(client: Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def parse_wrk(text: str, run: Run) -> None:
    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
        return float(match[1]) * UNITS[match[2]] if match else float("nan")

    if (match := re.search(r"(\d+) requests in", text)) is None:
        raise SystemExit(f"could not parse wrk output:\n{text}")
    run.requests = int(match[1])
    run.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1])
    run.p50, run.p90, run.p99 = ms("50"), ms("90"), ms("99")
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        run.non2xx = int(match[1])
    if match := re.search(r"Socket errors:\s+connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        run.socket_errors, run.socket_detail = sum(int(g) for g in match.groups()), match[0]


def lua_script(headers: dict[str, str], body: str = REQUEST, delay_ms: float = 0.0) -> str:
    """The wrk script of a target: POST the chat request with the target's headers; with `delay_ms`, each
    connection waits that long before each request (a fixed rate; wrk's latency excludes the wait)."""
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{body}]==]", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()]
    if delay_ms > 0:
        lines.append(f"function delay() return {delay_ms:g} end")
    return "\n".join(lines) + "\n"


def lua_string(value: str) -> str:
    """A double-quoted Lua string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def redis_command_calls(client: Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in client.info("commandstats").items()}


def run_wrk(stack: Stack, target: str, conns: int, duration: int, threads: int, redis: Redis, *,
            timeout_s: int = 5, script: Path | None = None, rate: int = 0) -> Run:
    """One wrk run against one target, with the CPU used meanwhile by each process group, wrk and Redis.
    `rate` > 0: a fixed total rate of that many requests per second instead of wrk's peak."""
    run = Run(target, conns, duration=duration, rate=rate)
    if script is None:
        script = stack.tmp / f"post-{target}-{rate}.lua"
        script.write_text(lua_script(stack.headers.get(target, {}), delay_ms=1000 * conns / rate if rate else 0))
    args = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{duration}s", "--timeout", f"{timeout_s}s",
            "--latency", "-s", str(script), stack.targets[target]]
    own = stack.procs[stack.owner[target]].pid
    groups = [proc.pid for proc in stack.procs.values()]
    cpu0, box0, redis0 = {g: cpu_seconds(g) for g in groups}, box_cpu(), redis_cpu(redis)
    calls0 = redis_command_calls(redis)
    kids0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + timeout_s + 60)
    elapsed, kids1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk: the one reaped
    cpu1, box1, redis1 = {g: cpu_seconds(g) for g in groups}, box_cpu(), redis_cpu(redis)
    calls1 = redis_command_calls(redis)
    if out.returncode != 0:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    parse_wrk(out.stdout, run)
    done = max(run.requests, 1)
    wrk_s = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    ours_s = sum(cpu1[g] - cpu0[g] for g in groups) + wrk_s + redis1 - redis0
    run.server_cpu_ms = (cpu1[own] - cpu0[own]) * 1000 / done
    run.redis_cpu_us = (redis1 - redis0) * 1_000_000 / done
    delta = {name: calls1[name] - calls0.get(name, 0) for name in calls1}
    delta["cmdstat_info"] = delta.get("cmdstat_info", 0) - 1  # our own INFO
    run.redis_calls = sum(delta.values()) / done
    run.evalsha_calls = delta.get("cmdstat_evalsha", 0) / done
    if "worker" in stack.procs and target == "relay":
        worker = stack.procs["worker"].pid
        run.worker_cpu_ms = (cpu1[worker] - cpu0[worker]) * 1000 / done
    run.wrk_cpu_pct = 100 * wrk_s / elapsed
    run.box_cpu_pct = 100 * (box1[0] - box0[0]) / max(box1[1] - box0[1], 1)
    run.other_cores = ((box1[0] - box0[0]) / TICK - ours_s) / elapsed
    run.rss_mib = sum(peak_rss_mib(own, "VmRSS").values())
    return run


async def request_log_rows(stack: Stack, expected: int, wait_s: float = 15.0) -> list[asyncpg.Record]:
    """Rows per (status, error) once the count reaches `expected` or stops growing for 2 s."""
    conn = await asyncpg.connect(stack.db_url)
    try:
        last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + wait_s
        while time.monotonic() < deadline:
            count = await conn.fetchval("select count(*) from request_logs")
            if count != last:
                last, stable_since = count, time.monotonic()
            if count >= expected or time.monotonic() - stable_since > 2.0:
                break
            await asyncio.sleep(0.25)
        return await conn.fetch("select status_code, error_code, count(*) as n from request_logs "
                                "group by 1, 2 order by 3 desc")
    finally:
        await conn.close()


def report(stack: Stack, runs: list[Run], sent: int, log_rows: list[asyncpg.Record]) -> None:
    print_table(runs)
    print()
    for r in (r for r in runs if r.target == "relay"):
        print(f"relay at {r.conns} connections{f' and {r.rate:,} req/s' if r.rate else ''}: Redis server CPU "
              f"{r.redis_cpu_us:.0f} µs/request; script calls (EVALSHA) per request {r.evalsha_calls:.2f}, Redis "
              f"commands per request {r.redis_calls:.1f} (those inside the scripts and the flusher's included); "
              f"billing flusher CPU {r.worker_cpu_ms:.3f} ms/request"
              + (f"; {r.socket_detail}" if r.socket_errors else ""))
    main_pid = stack.procs["relay"].pid
    peaks = peak_rss_mib(main_pid)
    workers = ", ".join(f"{mib:.1f}" for pid, mib in peaks.items() if pid != main_pid)
    print(f"relay peak RSS: workers {workers} MiB; granian main {peaks.get(main_pid, 0):.1f} MiB")
    by_status = ", ".join(f"{row['status_code']}{'/' + row['error_code'] if row['error_code'] else ''}: {row['n']}"
                          for row in log_rows)
    print(f"request_logs rows written: {sum(row['n'] for row in log_rows)} for {sent} relay requests completed "
          f"by clients (wrk stops with up to `conns` requests in flight per run); by status: {by_status}")
    problems = [line for line in log_tail(stack, "relay", 10**8).splitlines()
                if " ERROR " in line or " WARNING " in line or "Traceback" in line]
    print(f"relay log: {len(problems)} warning/error lines" + "".join(f"\n  {p[:200]}" for p in problems[:10]))
    paced = [r for r in runs if r.rate]
    runs = [r for r in runs if not r.rate]
    by = {(r.target, r.conns): r for r in runs}
    top = max(r.conns for r in runs)
    low = 8 if 8 in {r.conns for r in runs} else min(r.conns for r in runs)
    for line in peer_lines(runs, [t for t in stack.targets if t not in ("direct", "nginx-hop", "relay")]):
        print(line)
    base = "nginx-hop" if "nginx-hop" in stack.targets else "direct"
    relay, direct = by[("relay", low)], by[("direct", low)]
    peak = f"{relay.p50 - direct.p50:.2f} ms p50, {relay.p99 - direct.p99:.2f} ms p99 (at {low} connections, peak)"
    if paced:
        at = {r.target: r for r in paced}
        if "relay" in at and "direct" in at:
            r, d = at["relay"], at["direct"]
            print(f"added latency at peak load: {peak}")
            print(f"relay/{base} throughput: {by[('relay', top)].rps / by[(base, top)].rps:.3f}; added latency "
                  f"p50: {r.p50 - d.p50:.2f} ms, p99: {r.p99 - d.p99:.2f} ms (at {r.conns} connections, "
                  f"{r.rate:,} req/s)")
            return
    print(f"relay/{base} throughput: {by[('relay', top)].rps / by[(base, top)].rps:.3f}; added latency {peak}")


def print_table(runs: list[Run]) -> None:
    head = ("target", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx", "sock err", "server CPU ms/req",
            "RSS MiB", "wrk CPU %", "box CPU %", "other cores")
    print("\n| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|")
    for r in runs:
        conns = f"{r.conns} @ {r.rate:,}/s" if r.rate else str(r.conns)
        print(f"| {r.target} | {conns} | {r.rps:,.0f} | {r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | {r.non2xx} | "
              f"{r.socket_errors} | {r.server_cpu_ms:.3f} | {r.rss_mib:.0f} | {r.wrk_cpu_pct:.0f} | "
              f"{r.box_cpu_pct:.0f} | {r.other_cores:.2f} |")


def peer_lines(runs: list[Run], peers: list[str]) -> list[str]:
    """Relay vs each peer: throughput and CPU per request at every connection count, added latency at 8."""
    by = {(r.target, r.conns): r for r in runs}
    lines = []
    for peer in peers:
        for conns in sorted({r.conns for r in runs}):
            relay, other = by.get(("relay", conns)), by.get((peer, conns))
            if relay is None or other is None:
                continue
            cpu = (f"{other.server_cpu_ms / relay.server_cpu_ms:.1f}" if relay.server_cpu_ms > 0 else "n/a")
            lines.append(f"relay/{peer} at {conns} connections: throughput {ratio(relay.rps, other.rps)}, "
                         f"{peer}/relay CPU per request {cpu}; {peer} p50 {other.p50:.2f} ms, p99 {other.p99:.2f} ms"
                         f", errors {other.non2xx} non-2xx + {other.socket_errors} socket"
                         + (f" ({other.socket_detail})" if other.socket_errors else ""))
    return lines


def ratio(a: float, b: float) -> str:
    return f"{a / b:,.1f}" if b > 0 else "n/a (peer completed no request)"


@contextmanager
def bench_stack(keep_tmp: bool) -> Iterator[Stack]:
    """A Stack whose processes, database, Redis keys and temp dir are removed on exit, whatever happens."""
    stack = Stack(Path(tempfile.mkdtemp(prefix="rr-bench-")),
                  os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres",
                  os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    try:
        yield stack
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        steps = [*(partial(stop, proc) for proc in reversed(stack.procs.values())),
                 partial(asyncio.run, admin_sql(stack, f'drop database if exists "{stack.db_name}" with (force)'))
                 if stack.db_created else None, partial(drop_redis_keys, stack)]
        for step in filter(None, steps):
            try:
                step()
            except Exception as exc:
                print(f"clean-up step failed: {exc!r}", file=sys.stderr)
        if keep_tmp:
            print(f"configs and logs kept in {stack.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(stack.tmp, ignore_errors=True)


def drop_redis_keys(stack: Stack) -> None:
    with Redis.from_url(stack.redis_url) as client:
        for key in client.scan_iter(match=f"{stack.prefix}*", count=1000):
            client.delete(key)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--connections", default="8,64", help="comma-separated connection counts")
    p.add_argument("--proxy-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load per target first")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--peers", default="", help="comma-separated peers to add as targets: litellm,portkey")
    p.add_argument("--peer-duration", type=int, default=30, help="seconds per wrk run against a peer")
    p.add_argument("--peer-timeout", type=int, default=30, help="wrk --timeout (seconds) against a peer")
    p.add_argument("--rate", type=int, default=1000,
                   help="after the peak runs, measure latency at this fixed total rate over 8 connections (0: skip)")
    p.add_argument("--budgets", action="store_true",
                   help="give the demo org and key four budgets (calendar and rolling) that never refuse")
    p.add_argument("--no-metrics", action="store_true",
                   help="run the relay with metrics off (no token), to measure what the metrics cost")
    args = p.parse_args(argv)
    conns = sorted({int(c) for c in args.connections.split(",")})
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    from bench.peers import parse_peers

    peer_names = parse_peers(args.peers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on kill, too
    with bench_stack(args.keep_tmp) as stack, Redis.from_url(stack.redis_url) as redis:
        asyncio.run(create_database(stack))
        upstream_base = start_upstream(stack)
        start_relay(stack, upstream_base, args.proxy_workers, budgets=args.budgets, metrics=not args.no_metrics)
        start_peers(stack, peer_names, upstream_base, args.proxy_workers)
        print(f"upstream: {'nginx' if 'nginx' in stack.procs else 'bench.mock_upstream'}; relay workers: "
              f"{args.proxy_workers}; wrk threads: {args.threads}; {args.duration} s per run"
              + (f" ({args.peer_duration} s, timeout {args.peer_timeout} s for {', '.join(peer_names)})"
                 if peer_names else ""), flush=True)

        def wrk(target: str, c: int, seconds: int | None = None) -> Run:
            """A measured run (seconds None: --duration, or --peer-duration for a peer) or a warm-up."""
            if target in peer_names:
                return run_wrk(stack, target, c, seconds or args.peer_duration, args.threads, redis,
                               timeout_s=args.peer_timeout)
            return run_wrk(stack, target, c, seconds or args.duration, args.threads, redis)

        sent = 1  # the verification request; warm-up requests count too: they write request_logs rows
        for target in stack.targets if args.warmup > 0 else ():
            warm = wrk(target, max(conns), args.warmup)
            sent += warm.requests if target == "relay" else 0
        runs = []
        for c in conns:
            for target in stack.targets:
                runs.append(run := wrk(target, c))
                sent += run.requests if target == "relay" else 0
                print(f"  {target:<10} c={c:<4} {run.rps:>9,.0f} req/s  p50 {run.p50:.2f} ms  p99 {run.p99:.2f} ms"
                      f"  non-2xx {run.non2xx}  socket errors {run.socket_errors}", flush=True)
        for target in ("direct", "nginx-hop", "relay") if args.rate > 0 else ():
            if target in stack.targets:
                runs.append(run := run_wrk(stack, target, 8, args.duration, args.threads, redis, rate=args.rate))
                sent += run.requests if target == "relay" else 0
                print(f"  {target:<10} c=8 at {args.rate:,} req/s: p50 {run.p50:.2f} ms  p90 {run.p90:.2f} ms  "
                      f"p99 {run.p99:.2f} ms  non-2xx {run.non2xx}", flush=True)
        if stack.procs["relay"].poll() is not None:
            print(f"relay exited during the bench:\n{log_tail(stack, 'relay')}")
        report(stack, runs, sent, asyncio.run(request_log_rows(stack, sent)))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; everything the bench started has been stopped and removed")

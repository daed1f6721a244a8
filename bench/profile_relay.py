"""Profile the relay under load: `python -m bench.profile_relay [--duration 15] [--connections 32]`.

Starts the same stack as `bench.overhead` (nginx upstream, scratch database, seeded key, the relay),
drives it with wrk, and samples the relay's worker with py-spy meanwhile. Prints the functions with the
most samples (own time, and inclusive time for the project's functions) and writes the raw collapsed
stacks next to the results (`--out`), for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from redis import Redis

from bench.overhead import bench_stack, create_database, group_pids, run_wrk, start_relay, start_upstream


def profile(duration: int, conns: int, out: Path) -> None:
    import asyncio

    with bench_stack(keep_tmp=False) as stack:
        asyncio.run(create_database(stack))
        start_relay(stack, start_upstream(stack), workers=1)
        relay = stack.procs["relay"]
        workers = [pid for pid in group_pids(relay.pid) if pid != relay.pid]
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                                "--rate", "250", "--duration", str(duration), "--nonblocking", "--gil",
                                "--output", str(out), "--pid", str(workers[0])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        with Redis.from_url(stack.redis_url) as redis:
            run = run_wrk(stack, "relay", conns, duration, 1, redis)
        spy.wait(60)
        print(f"relay at {conns} connections: {run.rps:,.0f} req/s, p50 {run.p50:.2f} ms, "
              f"CPU {run.server_cpu_ms:.3f} ms/request")
    summarize(out)


_PROJECT_FRAME = re.compile(r"(\((?:proxy|shared)/[^:)]+):\d+\)")


def summarize(path: Path, top: int = 25) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        # Per function, not per line; py-spy names the project's files relative to it ("(proxy/app.py:75)").
        for function in {_PROJECT_FRAME.sub(r"\1)", frame) for frame in frames if _PROJECT_FRAME.search(frame)}:
            inclusive[function] += n
    print(f"\n{total} samples; own time:")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print("\ninclusive time of the project's functions:")
    for frame, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.profile_relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("bench/profile-relay.txt"))
    args = p.parse_args()
    profile(args.duration, args.connections, args.out)


if __name__ == "__main__":
    main()

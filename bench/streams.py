"""Streaming overhead: time to first byte and inter-chunk delay, through the relay vs straight to the upstream.

    python -m bench.streams [--streams 100] [--concurrency 4] [--chunks 20] [--ttft-ms 50] [--chunk-delay-ms 20]
                            [--proxy-workers 1] [--peers litellm,portkey]

Builds the same private stack as `bench.overhead` (scratch database, Redis prefix, free ports), but with the
Python mock upstream (`bench.mock_upstream`) streaming `--chunks` content chunks, the first `--ttft-ms` after
the response headers and the others `--chunk-delay-ms` apart. The relay (full billed path) and any peers are
routed to it. A small asyncio HTTP/1.1 client (raw sockets, keep-alive, at low concurrency) then reads
streamed chat completions from each target in interleaved rounds, timing the response headers, every SSE
event and `[DONE]`. wrk cannot time chunks; the client's own cost is the same for every target and cancels
out of the differences printed at the end ("added ... vs direct"). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from bench.overhead import (
    CHAT,
    TICK,
    Stack,
    bench_stack,
    box_cpu,
    cpu_seconds,
    create_database,
    log_tail,
    spawn,
    start_peers,
    start_relay,
    wait_ready,
)
from shared.embedded import free_port

STREAM_REQUEST = orjson.loads(
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
    '{"role":"user","content":"Hello! Can you help me with something?"}],"max_tokens":64,"stream":true}'
)


class StreamError(Exception):
    pass


@dataclass
class StreamTiming:
    """One streamed answer, times in ms from the moment the request was written."""

    status: int = 0
    headers_ms: float = math.nan
    first_event_ms: float = math.nan  # first SSE event of any kind (a role-only delta counts)
    first_content_ms: float = math.nan  # first event carrying non-empty content: time to first token
    content_ms: list[float] = field(default_factory=list)  # arrival of every content event
    done_ms: float = math.nan  # `data: [DONE]`
    error: str = ""

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.content_ms, self.content_ms[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; NaN for no values."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def has_content(event: bytes) -> bool:
    """Does this SSE event carry a non-empty chat/completion text delta?"""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload.startswith(b"{"):
            return False
        try:
            choices = orjson.loads(payload).get("choices") or []
        except orjson.JSONDecodeError:
            return False
        for choice in choices:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                return True
    return False


def split_events(buffer: bytearray) -> list[bytes]:
    """Remove and return the complete SSE events (ended by a blank line) at the start of `buffer`."""
    events = []
    while True:
        cut = min((i for i in (buffer.find(b"\n\n"), buffer.find(b"\r\n\r\n")) if i >= 0), default=-1)
        if cut < 0:
            return events
        end = cut + (4 if buffer[cut:cut + 4] == b"\r\n\r\n" else 2)
        events.append(bytes(buffer[:cut]))
        del buffer[:end]


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs a streamed request and times what comes back."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.headers = headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def stream(self, body: bytes, on_first_event: Callable[[], None] | None = None,
                     limit_s: float = 120.0) -> StreamTiming:
        try:
            return await asyncio.wait_for(self._stream(body, on_first_event), limit_s)
        except (OSError, StreamError, asyncio.IncompleteReadError, TimeoutError) as exc:
            await self.close()
            return StreamTiming(error=f"{type(exc).__name__}: {exc}"[:200])

    async def _stream(self, body: bytes, on_first_event: Callable[[], None] | None) -> StreamTiming:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                "Accept: text/event-stream", f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in self.headers.items())]
        reader, writer = self.reader, self.writer
        assert reader is not None
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        t0 = time.perf_counter()
        timing = StreamTiming()
        raw = await reader.readuntil(b"\r\n\r\n")
        timing.headers_ms = (time.perf_counter() - t0) * 1000
        lines = raw.decode("latin-1").split("\r\n")
        timing.status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        length = int(fields["content-length"]) if "content-length" in fields else None
        keep = fields.get("connection", "").lower() != "close"
        buffer = bytearray()

        def consume(data: bytes) -> None:
            now = (time.perf_counter() - t0) * 1000
            buffer.extend(data)
            for event in split_events(buffer):
                if math.isnan(timing.first_event_ms):
                    timing.first_event_ms = now
                    if on_first_event is not None:
                        on_first_event()
                if b"data: [DONE]" in event or b"data:[DONE]" in event:
                    timing.done_ms = now
                elif has_content(event):
                    if math.isnan(timing.first_content_ms):
                        timing.first_content_ms = now
                    timing.content_ms.append(now)

        if chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                data = await reader.readexactly(size + 2)
                consume(data[:-2])
        elif length is not None:
            consume(await reader.readexactly(length))
        else:
            keep = False
            while data := await reader.read(65536):
                consume(data)
        if not keep:
            await self.close()
        if timing.status != 200:
            timing.error = f"HTTP {timing.status}: {bytes(buffer)[:200]!r}"
        return timing


@dataclass
class TargetResult:
    name: str
    timings: list[StreamTiming] = field(default_factory=list)
    cpu_s: float = 0.0

    @property
    def ok(self) -> list[StreamTiming]:
        return [t for t in self.timings if not t.error]

    def stat(self, attr: str, q: float) -> float:
        return percentile([getattr(t, attr) for t in self.ok], q)

    def gap(self, q: float) -> float:
        return percentile([g for t in self.ok for g in t.gaps], q)


def summary(results: list[TargetResult], chunks: int, chunk_delay_ms: float) -> list[str]:
    """The table and the 'added vs direct' lines."""
    head = ("target", "streams", "errors", "headers p50 ms", "first chunk p50 ms", "first chunk p99 ms",
            "inter-chunk p50 ms", "inter-chunk p99 ms", "bunched gaps", "complete", "server CPU ms/stream")
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        gaps = [g for t in r.ok for g in t.gaps]
        bunched = sum(1 for g in gaps if g < chunk_delay_ms / 2)
        complete = sum(1 for t in r.ok if len(t.content_ms) == chunks and not math.isnan(t.done_ms))
        out.append(f"| {r.name} | {len(r.timings)} | {len(r.timings) - len(r.ok)} | {r.stat('headers_ms', 50):.2f} | "
                   f"{r.stat('first_content_ms', 50):.2f} | {r.stat('first_content_ms', 99):.2f} | {r.gap(50):.2f} | "
                   f"{r.gap(99):.2f} | {bunched}/{len(gaps)} | {complete}/{len(r.ok)} | "
                   f"{r.cpu_s * 1000 / max(len(r.timings), 1):.2f} |")
    out.append("")
    direct = next((r for r in results if r.name == "direct"), None)
    for r in results:
        if r is direct or direct is None:
            continue
        gaps = [g for t in r.ok for g in t.gaps]
        bunched = sum(1 for g in gaps if g < chunk_delay_ms / 2)
        complete = all(len(t.content_ms) == chunks for t in r.ok) and bool(r.ok)
        as_produced = complete and bunched <= max(1, len(gaps) // 100)

        def added(attr: str, q: float, r: TargetResult = r) -> float:
            return r.stat(attr, q) - direct.stat(attr, q)

        out.append(
            f"{r.name}: added TTFB (first chunk) p50 {added('first_content_ms', 50):+.2f} ms, "
            f"p99 {added('first_content_ms', 99):+.2f} ms (headers p50 {added('headers_ms', 50):+.2f} ms); "
            f"added inter-chunk delay p50 {r.gap(50) - direct.gap(50):+.2f} ms, "
            f"p99 {r.gap(99) - direct.gap(99):+.2f} ms; chunks arrive as produced: {'yes' if as_produced else 'NO'} "
            f"({bunched} of {len(gaps)} gaps under {chunk_delay_ms / 2:g} ms; "
            f"{'all' if complete else 'NOT all'} streams had {chunks} content chunks)")
    return out


def start_stream_mock(stack: Stack, chunks: int, ttft_ms: float, chunk_delay_ms: float,
                      latency_ms: float = 0.0) -> str:
    """The Python mock, streaming with the given knobs; returns the base URL the relay and peers use."""
    port = free_port()
    spawn(stack, "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(port), "--chunks", str(chunks),
                          "--ttft-ms", str(ttft_ms), "--chunk-delay-ms", str(chunk_delay_ms),
                          "--latency-ms", str(latency_ms), "--kill-timeout", "1"])
    wait_ready(stack, "mock", f"http://127.0.0.1:{port}/_mock/health")
    stack.targets["direct"], stack.owner["direct"] = f"http://127.0.0.1:{port}{CHAT}", "mock"
    return f"http://127.0.0.1:{port}/v1"


async def measure(stack: Stack, targets: list[str], rounds: int, concurrency: int, warmup_rounds: int,
                  limit_s: float) -> list[TargetResult]:
    """Interleaved rounds: in each, `concurrency` streams at once against each target in turn."""
    body = orjson.dumps(STREAM_REQUEST)
    results = {name: TargetResult(name) for name in targets}
    conns = {name: [Connection(stack.targets[name], stack.headers.get(name, {})) for _ in range(concurrency)]
             for name in targets}
    try:
        for round_no in range(warmup_rounds + rounds):
            for name in targets:
                pgid = stack.procs[stack.owner[name]].pid
                cpu0 = cpu_seconds(pgid)
                batch = await asyncio.gather(*(c.stream(body, limit_s=limit_s) for c in conns[name]))
                if round_no >= warmup_rounds:
                    results[name].timings.extend(batch)
                    results[name].cpu_s += cpu_seconds(pgid) - cpu0
    finally:
        for group in conns.values():
            for c in group:
                await c.close()
    return list(results.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.streams", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=100, help="measured streams per target")
    p.add_argument("--concurrency", type=int, default=4, help="streams open at once against one target")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    p.add_argument("--ttft-ms", type=float, default=50.0, help="mock: delay after the headers, before chunk 1")
    p.add_argument("--chunk-delay-ms", type=float, default=20.0, help="mock: delay between content chunks")
    p.add_argument("--proxy-workers", type=int, default=1)
    p.add_argument("--warmup-rounds", type=int, default=2, help="unrecorded rounds first")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per stream")
    p.add_argument("--peers", default="", help="comma-separated peers to add: litellm,portkey")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    from bench.peers import parse_peers

    peer_names = parse_peers(args.peers)
    if args.chunks < 2 or args.concurrency < 1 or args.streams < 1:
        raise SystemExit("--chunks must be at least 2, --concurrency and --streams at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rounds = math.ceil(args.streams / args.concurrency)
    with bench_stack(args.keep_tmp) as stack:
        asyncio.run(create_database(stack))
        base = start_stream_mock(stack, args.chunks, args.ttft_ms, args.chunk_delay_ms)
        start_relay(stack, base, args.proxy_workers)
        start_peers(stack, peer_names, base, args.proxy_workers)
        targets = list(stack.targets)
        print(f"upstream: bench.mock_upstream, {args.chunks} chunks, first {args.ttft_ms:g} ms after the headers, "
              f"then every {args.chunk_delay_ms:g} ms; relay workers: {args.proxy_workers}; {rounds * args.concurrency}"
              f" streams per target, {args.concurrency} at a time, targets interleaved", flush=True)
        groups = [proc.pid for proc in stack.procs.values()]
        ours0, box0, t0 = sum(map(cpu_seconds, groups)) + sum(os.times()[:2]), box_cpu(), time.monotonic()
        results = asyncio.run(measure(stack, targets, rounds, args.concurrency, args.warmup_rounds,
                                 args.timeout))
        ours1, box1, elapsed = sum(map(cpu_seconds, groups)) + sum(os.times()[:2]), box_cpu(), time.monotonic() - t0
        other = ((box1[0] - box0[0]) / TICK - (ours1 - ours0)) / elapsed
        print(f"\nmachine during the run: {100 * (box1[0] - box0[0]) / max(box1[1] - box0[1], 1):.0f} % busy; "
              f"other cores {other:.2f} (CPU not used by the bench's servers or client, Redis and PostgreSQL "
              f"included; well above 0.2 means the run competed with something else: repeat it)")
        for line in summary(results, args.chunks, args.chunk_delay_ms):
            print(line)
        for r in results:
            errors = [t.error for t in r.timings if t.error]
            if errors:
                print(f"{r.name} errors ({len(errors)}), first: {errors[0]}")
        if stack.procs["relay"].poll() is not None:
            print(f"relay exited during the bench:\n{log_tail(stack, 'relay')}")
        problems = [line for line in log_tail(stack, "relay", 10**8).splitlines()
                    if " ERROR " in line or " WARNING " in line or "Traceback" in line]
        print(f"relay log: {len(problems)} warning/error lines" + "".join(f"\n  {x[:200]}" for x in problems[:10]))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; everything the bench started has been stopped and removed")

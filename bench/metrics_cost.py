"""What the metrics add to one proxy request, in isolation: `ProxyMetrics.request_done` (one counter, two
histogram observations) plus one upstream-attempt count, timed with timeit on a realistic record.

    python -m bench.metrics_cost [--number 200000]
"""

from __future__ import annotations

import argparse
import timeit

from proxy.metrics import ProxyMetrics
from proxy.records import RequestRecord
from shared.metrics.recorder import Recorder


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.metrics_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=200_000)
    args = p.parse_args()
    metrics = ProxyMetrics(Recorder())
    rec = RequestRecord("r", None, "/v1/chat/completions", "POST", "127.0.0.1", "bench")
    rec.model, rec.provider, rec.route_id, rec.status_code, rec.ttfb_ms = "gpt-4o-mini", "openai", 7, 200, 12
    attempts = metrics.attempts

    def per_request() -> None:
        attempts.inc(("openai", "ok"))
        metrics.request_done("/v1/chat/completions", rec)

    best = min(timeit.repeat(per_request, number=args.number, repeat=5)) / args.number
    empty = min(timeit.repeat(lambda: None, number=args.number, repeat=5)) / args.number
    print(f"metrics per request: {(best - empty) * 1e6:.2f} µs (best of 5 × {args.number:,}; call overhead "
          f"of an empty lambda, {empty * 1e6:.2f} µs, subtracted)")


if __name__ == "__main__":
    main()

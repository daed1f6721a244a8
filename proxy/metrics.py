"""The proxy's metrics: what one request adds (a few dict operations at its end, nothing else), the
per-process state read once a second off the request path (breakers, probe status, the request-log buffer),
and the `/metrics` scrape, which any worker serves for all the workers of its server.

Per request: `request_done` (one counter, one or two histogram observations, in plain dicts: no lock, no
syscall), plus one counter per upstream attempt; refusals are counted on the error path only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.errors import ProxyError
from shared.metrics.backlog import read_billing_backlog
from shared.metrics.exposition import render
from shared.metrics.recorder import Recorder
from shared.metrics.snapshots import SnapshotWriter, merged_server

if TYPE_CHECKING:
    from proxy.records import RequestRecord
    from proxy.state import ProxyState

__all__ = ["ProxyMetrics", "proxy_metrics_dir"]

log = logging.getLogger("rocket_relay.metrics")

_REFUSALS = frozenset({"insufficient_quota", "spend_cap_reached", "billing_unavailable"})
_PROBE_STATUSES = ("healthy", "degraded", "failing", "quarantined")


def proxy_metrics_dir(base: str) -> Path:
    """Where the workers of one `rr-proxy` leave their snapshots."""
    return Path(base) / "proxy"


class ProxyMetrics:
    """The counters and histograms of one proxy worker, and its snapshot writer."""

    __slots__ = ("attempts", "duration", "failovers", "rate_limits", "recorder", "refusals", "requests", "ttfb",
                 "writer")

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.requests = recorder.counter("rr_requests_total")
        self.duration = recorder.histogram("rr_request_duration_seconds")
        self.ttfb = recorder.histogram("rr_ttfb_seconds")
        self.attempts = recorder.counter("rr_upstream_attempts_total")
        self.failovers = recorder.counter("rr_upstream_failovers_total")
        self.refusals = recorder.counter("rr_reservation_refusals_total")
        self.rate_limits = recorder.counter("rr_rate_limit_hits_total")
        self.writer: SnapshotWriter | None = None

    def request_done(self, endpoint: str, rec: RequestRecord) -> None:
        """Count one finished request. The model, provider and route are labels only once a route was
        tried, so they come from the catalogue, never from what a client typed."""
        if rec.route_id is None:
            model = provider = route = ""
        else:
            model, provider, route = rec.model, rec.provider, rec.route_id
        self.requests.inc((endpoint, rec.status_code, model, provider, route))
        labels = (endpoint, model, provider)
        self.duration.observe(labels, time.perf_counter() - rec.started)
        if rec.ttfb_ms is not None:
            self.ttfb.observe(labels, rec.ttfb_ms / 1000)

    def refused(self, exc: ProxyError) -> None:
        """Count a rate-limit or reservation refusal (the error path only)."""
        code = exc.code
        if code in _REFUSALS:
            self.refusals.inc((code,))
        elif code == "rate_limit_exceeded":
            self.rate_limits.inc((getattr(exc, "limit", "requests"),))
        elif code == "too_many_unfinished_requests":
            self.rate_limits.inc(("unfinished_requests",))

    def watch(self, state: ProxyState) -> None:
        """Read this worker's state at every snapshot."""

        def reading() -> Iterator[tuple[str, tuple, float]]:
            breakers = state.breakers
            for entry in state.catalogue.models.values():
                for route in entry.routes:
                    yield "rr_breaker_open", (route.id, route.provider), 1 if breakers.is_open(route.id) else 0
                    for status in _PROBE_STATUSES:
                        yield ("rr_route_probe_status", (route.id, entry.name, route.provider, status),
                               1 if route.probe_status == status else 0)
            writer = state.log_writer
            yield "rr_request_log_buffer_rows", (), writer.buffered
            yield "rr_request_log_rows_written_total", (), writer.written
            yield "rr_request_log_rows_rejected_total", (), writer.rejected
            yield "rr_request_log_rows_dropped_total", (), writer.dropped

        self.recorder.readings(reading)

    async def scrape(self, state: ProxyState) -> bytes:
        """The exposition of every worker of this server, plus the billing backlog read now."""
        now = time.time()
        merged = merged_server(self.recorder, self.writer, now, state.settings.metrics_interval_s)
        try:
            backlog = await asyncio.wait_for(read_billing_backlog(state.redis, state.keys, now), 2.0)
        except Exception as exc:  # Redis unreachable: the scrape still shows everything else
            log.warning("billing backlog not read for /metrics (%s)", type(exc).__name__)
        else:
            merged["g"]["rr_billing_stream_backlog"] = {(b.shard,): b.events for b in backlog}
            merged["g"]["rr_billing_flush_lag_seconds"] = {(b.shard,): round(b.oldest_age_s, 3) for b in backlog}
        return render(merged)

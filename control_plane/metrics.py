"""The control plane's metrics: requests by route template, method and status, and their duration, counted by
an ASGI middleware in plain dicts (no lock); `GET /metrics` serves every granian worker of this server from
their snapshots (shared/metrics/), to a scraper holding RR_METRICS_TOKEN only.

Paths no route matches are answered by the router before any middleware runs, so they are not counted
(they would only add a `route=""` series)."""

from __future__ import annotations

import time
from pathlib import Path

from litestar import Controller, Request, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.permissions import require
from shared.metrics.exposition import CONTENT_TYPE, render
from shared.metrics.recorder import Recorder
from shared.metrics.snapshots import SnapshotWriter, merged_server
from shared.settings import Settings

__all__ = ["ControlPlaneMetrics", "MetricsController", "RequestMetrics"]


class ControlPlaneMetrics:
    """The counters of one control-plane worker, and its snapshot writer (when metrics are on)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recorder = Recorder()
        self.requests = self.recorder.counter("rr_cp_requests_total")
        self.duration = self.recorder.histogram("rr_cp_request_duration_seconds")
        self.writer: SnapshotWriter | None = None
        if settings.metrics_token and settings.metrics_dir:
            self.writer = SnapshotWriter(self.recorder, Path(settings.metrics_dir) / "control-plane",
                                         settings.metrics_interval_s)

    def scrape(self) -> bytes:
        return render(merged_server(self.recorder, self.writer, time.time(), self.settings.metrics_interval_s))


class RequestMetrics:
    """ASGI middleware: one count and one duration per request, labelled by the matched route's template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the handler dies before answering

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            metrics: ControlPlaneMetrics = scope["app"].state.cp_metrics
            route, method = scope.get("path_template", ""), scope["method"]
            metrics.requests.inc((route, method, status))
            metrics.duration.observe((route, method), time.perf_counter() - started)


class MetricsController(Controller):
    tags = ("health",)

    @get("/metrics", guards=[require("metrics.read")], include_in_schema=False)
    async def metrics(self, request: Request) -> Response[bytes]:
        """Prometheus metrics of this control-plane server (every worker)."""
        return Response(request.app.state.cp_metrics.scrape(), media_type=CONTENT_TYPE)

"""The metrics of one `rr-worker` process, and the place its workers report to.

Workers report by plain assignments and increments on the event loop (no lock): the flusher's running
totals are read at each scrape, the billing backlog is read from Redis every `BACKLOG_INTERVAL_S` by a task
here, and the other workers set gauges and bump counters through `report` and `counter`:

    metrics.report("rr_webhook_queue_depth", depth)            # the webhook sender, after each poll
    metrics.counter("rr_webhook_failures_total").inc(("timeout",))
    metrics.report("rr_mail_queue_depth", depth)               # the alert mailer
    metrics.counter("rr_mail_failures_total").inc(("smtp_refused",))

(names and labels: shared/metrics/catalogue.py; docs/metrics.md). A gauge never reported is absent from the
scrape rather than a made-up 0. `GET /metrics` is served from a thread on
RR_WORKER_METRICS_HOST:RR_WORKER_METRICS_PORT (stdlib wsgiref, one scrape at a time), to the bearer of
RR_METRICS_TOKEN only; with no token set there is no listener.
"""

from __future__ import annotations

import asyncio
import logging
import socketserver
import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from redis.asyncio import Redis

from shared.metrics.backlog import ShardBacklog, read_billing_backlog
from shared.metrics.catalogue import GAUGE, by_name
from shared.metrics.exposition import CONTENT_TYPE, metrics_allowed, render
from shared.metrics.recorder import Counter, Recorder, merge
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers import sleep_unless_stopped

__all__ = ["BACKLOG_INTERVAL_S", "WorkerMetrics"]

log = logging.getLogger("rocket_relay.worker")
BACKLOG_INTERVAL_S = 5.0
_NOT_FOUND = b'{"error": {"code": "not_found", "message": "No such endpoint."}}'


class WorkerMetrics:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.recorder = Recorder()
        self.backlog: list[ShardBacklog] = []
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._totals: list[tuple[str, object, str]] = []  # (metric, object, attribute) read at each scrape
        self._server: WSGIServer | None = None
        self.recorder.readings(self._reading)

    # ---- what workers call ---------------------------------------------------------------------------------

    def report(self, name: str, value: float, labels: tuple = ()) -> None:
        """Set a gauge (its latest value is what the next scrape shows)."""
        if by_name(name).kind != GAUGE:
            raise ValueError(f"{name} is not a gauge")
        self._gauges[(name, labels)] = value

    def counter(self, name: str) -> Counter:
        return self.recorder.counter(name)

    def total(self, name: str, source: object, attribute: str) -> None:
        """Export `source.attribute`, a running total the source keeps anyway, as the counter `name`."""
        self._totals.append((name, source, attribute))

    # ---- the billing backlog -------------------------------------------------------------------------------

    async def watch_backlog(self, redis: Redis, keys: RedisKeys, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.backlog = await read_billing_backlog(redis, keys)
            except Exception as exc:  # Redis down: the last reading stays, the flusher logs the outage
                log.warning("billing backlog not read (%s)", type(exc).__name__)
            await sleep_unless_stopped(stop, BACKLOG_INTERVAL_S)

    def _reading(self) -> Iterator[tuple[str, tuple, float]]:
        for b in self.backlog:
            yield "rr_billing_stream_backlog", (b.shard,), b.events
            yield "rr_billing_flush_lag_seconds", (b.shard,), round(b.oldest_age_s, 3)
        for (name, labels), value in list(self._gauges.items()):
            yield name, labels, value
        for name, source, attribute in self._totals:
            yield name, (), getattr(source, attribute)

    # ---- serving -------------------------------------------------------------------------------------------

    def render(self) -> bytes:
        now = time.time()
        return render(merge([self.recorder.snapshot(now)], now, stale_after_s=60.0))

    def _wsgi(self, environ: dict, start_response) -> list[bytes]:
        if (environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") != "GET"
                or not metrics_allowed(environ.get("HTTP_AUTHORIZATION"), self._settings.metrics_token)):
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [_NOT_FOUND]
        body = self.render()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [body]

    def serve(self) -> int | None:
        """Start the listener in a daemon thread (only with a token and a port); returns the bound port."""
        s = self._settings
        if not s.metrics_token or not s.worker_metrics_port:
            return None
        self._server = make_server(s.worker_metrics_host, s.worker_metrics_port, self._wsgi,
                                   server_class=_Server, handler_class=_QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(WSGIServer):
    def server_bind(self) -> None:
        # http.server's bind looks its own name up in DNS (socket.getfqdn): seconds of a blocked event loop
        # where DNS does not answer. The name is only used for SERVER_NAME, which nothing here reads.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    timeout = 5  # a scraper that stalls mid-request is cut, so the next scrape is not blocked

    def log_message(self, format: str, *args: object) -> None:  # no access log lines
        pass

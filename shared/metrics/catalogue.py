"""Every metric any Rocket Relay process exports: name, kind, help, labels, buckets, and how the
snapshots of several processes of one server combine. One home for the names; `docs/metrics.md` documents
each one (a test checks that every name here is there).

Labels hold only values from bounded sets: endpoint paths of `proxy/endpoints.py`, status codes, catalogue
model and provider names, route ids, our own error codes. Never a client-chosen string (an unknown model
is recorded as "" — a client cannot grow the series count), never request content.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "COUNTER", "GAUGE", "HISTOGRAM", "LATENCY_BUCKETS", "MetricDef", "by_name"]

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# Seconds. LLM answers take from milliseconds (cached, refused) to minutes (long streams).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # How a gauge of several processes of one server combines: "sum" (each process holds a share) or
    # "max" (each process holds the same picture). Counters and histograms always add up.
    aggregate: str = "sum"

    def __post_init__(self) -> None:
        if self.kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if (self.kind == HISTOGRAM) != bool(self.buckets):
            raise ValueError(f"{self.name}: histograms, and only they, have buckets")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{self.name}: buckets must be strictly increasing")
        if self.kind == COUNTER and not self.name.endswith("_total"):
            raise ValueError(f"{self.name}: a counter's name ends in _total")
        if self.aggregate not in ("sum", "max"):
            raise ValueError(f"{self.name}: aggregate is sum or max")


CATALOGUE: tuple[MetricDef, ...] = (
    # ---- proxy: requests -------------------------------------------------------------------------------------
    MetricDef("rr_requests_total", COUNTER, "Proxy requests answered, by endpoint, status, model, provider and "
              "route id (model/provider/route empty when no route was tried).",
              ("endpoint", "status", "model", "provider", "route")),
    MetricDef("rr_request_duration_seconds", HISTOGRAM, "Proxy request duration, from the request head to the "
              "answer's last byte (streams included).", ("endpoint", "model", "provider"), LATENCY_BUCKETS),
    MetricDef("rr_ttfb_seconds", HISTOGRAM, "Proxy time to the first answer byte sent to the client, for "
              "requests that got one from an upstream.", ("endpoint", "model", "provider"), TTFB_BUCKETS),
    MetricDef("rr_upstream_attempts_total", COUNTER, "Upstream attempts, by provider and outcome (`ok`, or the "
              "relay's error code of the failure).", ("provider", "outcome")),
    MetricDef("rr_upstream_failovers_total", COUNTER, "Attempts that failed and were followed by another route "
              "(or model) for the same request, by the provider failed away from.", ("provider",)),
    MetricDef("rr_reservation_refusals_total", COUNTER, "Requests refused by the balance reservation, by reason "
              "(insufficient_quota, spend_cap_reached, billing_unavailable).", ("reason",)),
    MetricDef("rr_rate_limit_hits_total", COUNTER, "Requests refused by a rate limit, by limit (requests, tokens: "
              "per key or org and minute; unfinished_requests: slow bodies per client address).", ("limit",)),
    # ---- proxy: per-process state ----------------------------------------------------------------------------
    MetricDef("rr_breaker_open", GAUGE, "Proxy worker processes whose circuit breaker for the route is open "
              "(0: closed everywhere).", ("route", "provider")),
    MetricDef("rr_route_probe_status", GAUGE, "1 for the model-quality probe status the route has in the "
              "proxy's catalogue (healthy, degraded, failing, quarantined).",
              ("route", "model", "provider", "status"), aggregate="max"),
    MetricDef("rr_request_log_buffer_rows", GAUGE, "Request-log rows buffered in memory, not yet in PostgreSQL."),
    MetricDef("rr_request_log_rows_written_total", COUNTER, "Request-log rows written to PostgreSQL."),
    MetricDef("rr_request_log_rows_rejected_total", COUNTER, "Request-log rows PostgreSQL refused (poison rows), "
              "set aside in rejected_rows."),
    MetricDef("rr_request_log_rows_dropped_total", COUNTER, "Request-log rows dropped because the buffer was "
              "full while PostgreSQL was unreachable."),
    MetricDef("rr_processes", GAUGE, "Processes of this server whose snapshot is current (granian workers)."),
    # ---- billing stream (read at scrape by the proxy, every few seconds by rr-worker) --------------------------
    MetricDef("rr_billing_stream_backlog", GAUGE, "Usage events in a billing stream not yet written to the "
              "PostgreSQL ledger (undelivered plus delivered-but-unacknowledged).", ("shard",), aggregate="max"),
    MetricDef("rr_billing_flush_lag_seconds", GAUGE, "Age of the oldest usage event of a billing stream not yet "
              "in the ledger (0 when none waits).", ("shard",), aggregate="max"),
    # ---- rr-worker ------------------------------------------------------------------------------------------
    MetricDef("rr_billing_events_flushed_total", COUNTER, "Usage events the billing flusher wrote to the ledger."),
    MetricDef("rr_billing_events_held_total", COUNTER, "Usage events PostgreSQL refused (poison events), held for "
              "repair in rejected_rows with their ledger effect."),
    MetricDef("rr_usage_records_recovered_total", COUNTER, "Billed answers whose usage event Redis lost, billed "
              "from the request log by the usage recovery (usage records marked recovered)."),
    MetricDef("rr_partition_check_timestamp_seconds", GAUGE, "Unix time of the partition manager's last "
              "successful check (partitions of this month and the next two exist)."),
    MetricDef("rr_mail_queue_depth", GAUGE, "Alert mails waiting to be sent (set by the alert mailer)."),
    MetricDef("rr_mail_sent_total", COUNTER, "Alert mails sent."),
    MetricDef("rr_mail_failures_total", COUNTER, "Alert mail attempts that failed, by reason.", ("reason",)),
    MetricDef("rr_webhook_queue_depth", GAUGE, "Webhook deliveries waiting (set by the webhook sender)."),
    MetricDef("rr_webhook_deliveries_total", COUNTER, "Webhook deliveries accepted by the receiver (2xx)."),
    MetricDef("rr_webhook_failures_total", COUNTER, "Webhook delivery attempts that failed, by reason.",
              ("reason",)),
    # ---- control plane --------------------------------------------------------------------------------------
    MetricDef("rr_cp_requests_total", COUNTER, "Control-plane requests, by route template, method and status.",
              ("route", "method", "status")),
    MetricDef("rr_cp_request_duration_seconds", HISTOGRAM, "Control-plane request duration.",
              ("route", "method"), CP_BUCKETS),
)

_BY_NAME = {m.name: m for m in CATALOGUE}
if len(_BY_NAME) != len(CATALOGUE):
    raise RuntimeError("duplicate metric name in the catalogue")


def by_name(name: str) -> MetricDef:
    """The definition of `name` (KeyError for a metric nobody declared)."""
    return _BY_NAME[name]

"""A merged snapshot in Prometheus' text format, through prometheus_client's own exposition (a custom
collector), and the bearer-token check every `/metrics` endpoint applies."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from shared.metrics.catalogue import CATALOGUE, COUNTER, GAUGE

__all__ = ["CONTENT_TYPE", "metrics_allowed", "render"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus version reads


def _text(labels: tuple) -> list[str]:
    return ["" if v is None else str(v) for v in labels]


class _SnapshotCollector(Collector):
    def __init__(self, merged: dict) -> None:
        self._merged = merged

    def collect(self) -> Iterator[Metric]:
        m = self._merged
        for d in CATALOGUE:
            if d.kind == COUNTER:
                values = m["c"].get(d.name)
                if values is None:
                    continue
                family = CounterMetricFamily(d.name, d.help, labels=d.labels)
                for labels, value in sorted(values.items(), key=lambda kv: _text(kv[0])):
                    family.add_metric(_text(labels), value)
            elif d.kind == GAUGE:
                values = m["g"].get(d.name)
                if values is None:
                    continue
                family = GaugeMetricFamily(d.name, d.help, labels=d.labels)
                for labels, value in sorted(values.items(), key=lambda kv: _text(kv[0])):
                    family.add_metric(_text(labels), value)
            else:
                values = m["h"].get(d.name)
                if values is None:
                    continue
                family = HistogramMetricFamily(d.name, d.help, labels=d.labels)
                bounds = [*(repr(float(b)) for b in d.buckets), "+Inf"]
                for labels, slots in sorted(values.items(), key=lambda kv: _text(kv[0])):
                    if len(slots) != len(bounds) + 1:
                        continue  # a snapshot of other buckets (another code version)
                    cumulative, running = [], 0
                    for bound, count in zip(bounds, slots[:-1], strict=True):
                        running += count
                        cumulative.append((bound, running))
                    family.add_metric(_text(labels), cumulative, slots[-1])
            yield family


def render(merged: dict) -> bytes:
    """The text exposition of a merged snapshot (`shared.metrics.recorder.merge`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(merged))
    return generate_latest(registry)


def metrics_allowed(authorization: str | None, token: str) -> bool:
    """Whether a scrape with this Authorization header may read metrics: only with `Bearer <token>`, and
    never while no token is configured (metrics are off by default). Constant-time compare."""
    if not token or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

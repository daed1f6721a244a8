"""Lock-free metric storage for one process, and the snapshots that combine processes.

A `Recorder` keeps counters and histograms in plain dicts keyed by label tuples: each process serves its
requests on one event loop, so an increment is one dict operation, with no lock and no syscall
(prometheus_client's own Counter takes a threading lock on every `inc`). Gauges are not kept: they are read
from their sources when a snapshot is taken (`readings` callables), off the request path; so are counters
that another object already keeps as a running total (rows written, events flushed).

A snapshot is plain data (msgpack-able): `{"pid", "at", "c", "h", "g"}` with `[labels, value]` pairs.
`merge` adds the counters and histograms of every snapshot (a worker that died keeps its counts, so sums never
go backwards) and combines the gauges of current snapshots only (`MetricDef.aggregate`).
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

from shared.metrics.catalogue import COUNTER, GAUGE, HISTOGRAM, by_name

__all__ = ["MAX_SERIES", "OVERFLOW", "Counter", "Histogram", "Reading", "Recorder", "merge"]

# Past this many label sets a metric records new ones under OVERFLOW: a bug that put an unbounded value in
# a label costs one series, not the process's memory.
MAX_SERIES = 10_000
OVERFLOW = "_overflow"

# Yields (metric name, labels, value) of gauges, and of counters another object keeps as a running total.
Reading = Callable[[], Iterable[tuple[str, tuple, float]]]


class Counter:
    """Counts per label tuple. `inc` is the hot-path call."""

    __slots__ = ("_width", "name", "values")

    def __init__(self, name: str) -> None:
        self.name = name
        self._width = len(by_name(name).labels)
        self.values: dict[tuple, float] = {}

    def inc(self, labels: tuple = (), amount: float = 1) -> None:
        values = self.values
        try:
            values[labels] += amount
        except KeyError:
            if len(values) >= MAX_SERIES:
                labels = (OVERFLOW,) * self._width
            values[labels] = values.get(labels, 0) + amount


class Histogram:
    """Pre-bucketed observations per label tuple: `[count per bucket…, count above the last, sum]`."""

    __slots__ = ("_bounds", "_width", "name", "values")

    def __init__(self, name: str) -> None:
        definition = by_name(name)
        self.name = name
        self._bounds = definition.buckets
        self._width = len(definition.labels)
        self.values: dict[tuple, list] = {}

    def observe(self, labels: tuple, value: float) -> None:
        slots = self.values.get(labels)
        if slots is None:
            if len(self.values) >= MAX_SERIES:
                labels = (OVERFLOW,) * self._width
            slots = self.values.get(labels)
            if slots is None:
                slots = self.values[labels] = [0] * (len(self._bounds) + 1) + [0.0]
        slots[bisect_left(self._bounds, value)] += 1  # `le` buckets: a value on a bound counts in it
        slots[-1] += value


class Recorder:
    """The metrics of one process: its counters and histograms, and the sources of its gauges."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.histograms: dict[str, Histogram] = {}
        self._readings: list[Reading] = []

    def counter(self, name: str) -> Counter:
        if by_name(name).kind != COUNTER:
            raise ValueError(f"{name} is not a counter")
        return self.counters.setdefault(name, Counter(name))

    def histogram(self, name: str) -> Histogram:
        if by_name(name).kind != HISTOGRAM:
            raise ValueError(f"{name} is not a histogram")
        return self.histograms.setdefault(name, Histogram(name))

    def readings(self, reading: Reading) -> None:
        """Register a source of gauge (and running-total counter) values, called at every snapshot."""
        self._readings.append(reading)

    def snapshot(self, now: float | None = None) -> dict:
        # list(...) copies under the GIL in one C call: a reader in another thread sees a consistent dict.
        counters = {c.name: [[list(k), v] for k, v in list(c.values.items())] for c in self.counters.values()}
        gauges: dict[str, list] = {}
        for reading in self._readings:
            for name, labels, value in reading():
                kind = by_name(name).kind
                if kind == HISTOGRAM:
                    raise ValueError(f"{name} is a histogram: observe it")
                (gauges if kind == GAUGE else counters).setdefault(name, []).append([list(labels), value])
        return {
            "pid": os.getpid(),
            "at": time.time() if now is None else now,
            "c": counters,
            "h": {h.name: [[list(k), list(v)] for k, v in list(h.values.items())] for h in self.histograms.values()},
            "g": gauges,
        }


def merge(snapshots: Iterable[dict], now: float, stale_after_s: float) -> dict:
    """One snapshot of a server from its processes' snapshots. Gauges come from the snapshots taken within
    `stale_after_s` of `now` (a dead process's gauges are gone; its counts stay); `g["rr_processes"]` counts
    those."""
    counters: dict[str, dict[tuple, float]] = {}
    histograms: dict[str, dict[tuple, list]] = {}
    gauges: dict[str, dict[tuple, float]] = {}
    live = 0
    for snap in snapshots:
        for name, pairs in snap.get("c", {}).items():
            into = counters.setdefault(name, {})
            for labels, value in pairs:
                key = tuple(labels)
                into[key] = into.get(key, 0) + value
        for name, pairs in snap.get("h", {}).items():
            into_h = histograms.setdefault(name, {})
            for labels, slots in pairs:
                key = tuple(labels)
                have = into_h.get(key)
                if have is None:
                    into_h[key] = list(slots)
                elif len(have) == len(slots):  # else: buckets of another code version; not comparable
                    into_h[key] = [a + b for a, b in zip(have, slots, strict=True)]
        if now - snap.get("at", 0) > stale_after_s:
            continue
        live += 1
        for name, pairs in snap.get("g", {}).items():
            into_g = gauges.setdefault(name, {})
            use_max = by_name(name).aggregate == "max"
            for labels, value in pairs:
                key = tuple(labels)
                have = into_g.get(key)
                into_g[key] = value if have is None else (max(have, value) if use_max else have + value)
    gauges["rr_processes"] = {(): live}
    return {"c": counters, "h": histograms, "g": gauges}

"""The metric pieces as units: the lock-free recorder, merging the snapshots of several processes, the text
exposition (parsed back by prometheus_client), the snapshot directory, the token check, and the billing
backlog reader against a real Redis."""

from __future__ import annotations

import math
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics.backlog import read_billing_backlog
from shared.metrics.catalogue import CATALOGUE, LATENCY_BUCKETS, MetricDef
from shared.metrics.exposition import metrics_allowed, render
from shared.metrics.recorder import MAX_SERIES, OVERFLOW, Recorder, merge
from shared.metrics.snapshots import SnapshotWriter, prepare_run_dir, read_snapshots
from shared.redis_keys import RedisKeys

ROOT = Path(__file__).resolve().parents[2]
durations = st.floats(min_value=0, max_value=1000, allow_nan=False)
labels = st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]), st.sampled_from(["a", "b", ""]),
                   st.sampled_from(["p", ""]))


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(labels, durations), max_size=30), min_size=1, max_size=4))
def test_merged_histograms_are_the_observations_of_every_process(processes) -> None:
    snaps = []
    for observations in processes:
        rec = Recorder()
        hist = rec.histogram("rr_request_duration_seconds")
        for lab, d in observations:
            hist.observe(lab, d)
        snaps.append(rec.snapshot(now=100.0))
    merged = merge(snaps, now=100.0, stale_after_s=5)
    everything = [o for p in processes for o in p]
    parsed = families(render(merged)).get("rr_request_duration_seconds")
    for lab in {lab for lab, _ in everything}:
        mine = [d for lb, d in everything if lb == lab]
        got = {(s.name, s.labels.get("le")): s.value for s in parsed.samples
               if (s.labels["endpoint"], s.labels["model"], s.labels["provider"]) == lab}
        assert got[("rr_request_duration_seconds_count", None)] == len(mine)
        assert math.isclose(got[("rr_request_duration_seconds_sum", None)], sum(mine), rel_tol=1e-9, abs_tol=1e-9)
        for bound in LATENCY_BUCKETS:  # `le`: a value equal to a bound is in that bucket
            assert got[("rr_request_duration_seconds_bucket", repr(float(bound)))] == sum(d <= bound for d in mine)
        assert got[("rr_request_duration_seconds_bucket", "+Inf")] == len(mine)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["requests", "tokens", "unfinished_requests"]),
                                st.integers(0, 10**9)), min_size=1, max_size=5))
def test_counters_add_up_across_processes_including_dead_ones(processes) -> None:
    snaps = []
    for i, counts in enumerate(processes):
        rec = Recorder()
        c = rec.counter("rr_rate_limit_hits_total")
        for limit, n in counts.items():
            c.inc((limit,), n)
        snaps.append(rec.snapshot(now=100.0 - 1000 * i))  # all but the first are long dead
    merged = merge(snaps, now=100.0, stale_after_s=5)
    for limit in {k for p in processes for k in p}:
        assert merged["c"]["rr_rate_limit_hits_total"][(limit,)] == sum(p.get(limit, 0) for p in processes)
    assert merged["g"]["rr_processes"] == {(): 1}


def test_gauges_of_dead_processes_are_dropped_and_combined_by_their_rule() -> None:
    def proc(at: float, open_: int, depth: int, backlog: int) -> dict:
        rec = Recorder()
        rec.readings(lambda: [("rr_breaker_open", (7, "p"), open_), ("rr_request_log_buffer_rows", (), depth),
                              ("rr_billing_stream_backlog", (0,), backlog)])
        return rec.snapshot(now=at)

    merged = merge([proc(100, 1, 10, 5), proc(99, 1, 20, 7), proc(10, 1, 1000, 900)], now=100, stale_after_s=5)
    assert merged["g"]["rr_breaker_open"] == {(7, "p"): 2}  # sum: two live workers have it open
    assert merged["g"]["rr_request_log_buffer_rows"] == {(): 30}
    assert merged["g"]["rr_billing_stream_backlog"] == {(0,): 7}  # max: the same picture, read twice
    assert merged["g"]["rr_processes"] == {(): 2}


def test_a_label_set_flood_costs_one_overflow_series() -> None:
    rec = Recorder()
    c = rec.counter("rr_reservation_refusals_total")
    h = rec.histogram("rr_ttfb_seconds")
    for i in range(MAX_SERIES + 500):
        c.inc((f"r{i}",))
        h.observe((f"e{i}", "", ""), 0.1)
    assert len(c.values) == MAX_SERIES + 1 and c.values[(OVERFLOW,)] == 500
    assert len(h.values) == MAX_SERIES + 1 and h.values[(OVERFLOW,) * 3][-2] == 0  # nothing above the last bound
    assert sum(h.values[(OVERFLOW,) * 3][:-1]) == 500


def test_kinds_are_enforced() -> None:
    rec = Recorder()
    with pytest.raises(ValueError):
        rec.counter("rr_request_duration_seconds")
    with pytest.raises(ValueError):
        rec.histogram("rr_requests_total")
    with pytest.raises(KeyError):
        rec.counter("rr_undeclared_total")
    rec.readings(lambda: [("rr_ttfb_seconds", (), 1.0)])
    with pytest.raises(ValueError):
        rec.snapshot()
    with pytest.raises(ValueError):
        MetricDef("rr_x", "counter", "no _total")
    with pytest.raises(ValueError):
        MetricDef("rr_x_seconds", "histogram", "unsorted", buckets=(2.0, 1.0))


def test_every_metric_renders_and_parses_back() -> None:
    rec = Recorder()
    readings = []
    for d in CATALOGUE:
        lab = tuple(f"v-{name}" for name in d.labels)
        if d.kind == "counter":
            rec.counter(d.name).inc(lab, 3)
        elif d.kind == "histogram":
            rec.histogram(d.name).observe(lab, 0.3)
        else:
            readings.append((d.name, lab, 2.5))
    rec.readings(lambda: readings)
    parsed = families(render(merge([rec.snapshot()], now=rec.snapshot()["at"], stale_after_s=5)))
    for d in CATALOGUE:
        name = d.name.removesuffix("_total")
        assert name in parsed, d.name
        assert parsed[name].type == d.kind and parsed[name].documentation == d.help


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [d.name for d in CATALOGUE if f"`{d.name}`" not in doc]
    assert not missing, f"document these in docs/metrics.md: {missing}"


def test_snapshot_files_round_trip_and_junk_is_skipped(tmp_path: Path) -> None:
    directory = prepare_run_dir(tmp_path / "proxy")
    rec = Recorder()
    rec.counter("rr_upstream_failovers_total").inc(("p",), 2)
    SnapshotWriter(rec, directory, 1.0).write()
    (directory / "junk.snapshot").write_bytes(b"\x00not msgpack")
    (directory / "list.snapshot").write_bytes(b"\x91\x01")  # msgpack, but not a snapshot
    snaps = read_snapshots(directory)
    assert len(snaps) == 1 and snaps[0]["c"]["rr_upstream_failovers_total"] == [[["p"], 2]]
    assert prepare_run_dir(directory) == directory and not list(directory.iterdir())  # a new run starts empty


@given(st.one_of(st.none(), st.text(max_size=80)))
def test_only_the_exact_bearer_token_is_allowed(header: str | None) -> None:
    token = "t0ken-0123456789abcdef"
    assert metrics_allowed(header, token) == (header is not None and header.partition(" ")[0].lower() == "bearer"
                                              and header.partition(" ")[2].strip() == token)
    assert not metrics_allowed(header, "")  # no token configured: nobody
    assert metrics_allowed(f"Bearer {token}", token) and metrics_allowed(f"bearer {token}", token)


async def test_billing_backlog_counts_undelivered_and_pending_events(redis, settings) -> None:
    keys = RedisKeys(f"{settings.redis_prefix}bl{secrets.token_hex(3)}:", 3)
    s0, s1 = keys.stream(0), keys.stream(1)
    # Shard 0: no consumer group yet (no flusher ever ran): every entry waits, the oldest since 1,000 s.
    await redis.xadd(s0, {"d": b"x"}, id="1000000-0")
    await redis.xadd(s0, {"d": b"x"}, id="1001000-0")
    # Shard 1: 5 entries; the group read 3 (pending, unacknowledged), acknowledged 1 of them.
    for i in range(5):
        await redis.xadd(s1, {"d": b"x"}, id=f"{2000000 + i * 1000}-0")
    await redis.xgroup_create(s1, RedisKeys.BILLING_GROUP, id="0")
    read = await redis.xreadgroup(RedisKeys.BILLING_GROUP, "c", {s1: ">"}, count=3)
    await redis.xack(s1, RedisKeys.BILLING_GROUP, read[0][1][0][0])
    try:
        got = await read_billing_backlog(redis, keys, now=3000.0)
        assert [tuple(b) for b in got] == [(0, 2, 2000.0), (1, 4, 999.0), (2, 0, 0.0)]
        # All acknowledged (the flusher caught up): nothing waits, even though the entries stay in the stream.
        rest = await redis.xreadgroup(RedisKeys.BILLING_GROUP, "c", {s1: ">"})
        await redis.xack(s1, RedisKeys.BILLING_GROUP, *(e[0] for e in read[0][1][1:]), *(e[0] for e in rest[0][1]))
        got = await read_billing_backlog(redis, keys, now=3000.0)
        assert tuple(got[1]) == (1, 0, 0.0) and await redis.xlen(s1) == 5
    finally:
        await redis.delete(s0, s1)

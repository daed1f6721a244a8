"""Pure helpers of the benches (bench.overhead, .peers, .streams, .scaling): no servers, no timing."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from bench.overhead import Run, lua_script, lua_string, peer_lines
from bench.peers import litellm_config, parse_peers
from bench.scaling import bench_key, month_starts, rotating_keys_lua, split_rows
from bench.streams import StreamTiming, has_content, percentile, split_events, summary
from shared.apikeys import parse_api_key


def test_lua_strings_are_quoted_and_escaped() -> None:
    assert lua_string('Bearer a"b\\c') == '"Bearer a\\"b\\\\c"'
    script = lua_script({"Authorization": "Bearer rr-x", "x-portkey-custom-host": "http://127.0.0.1:1/v1"})
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Authorization"] = "Bearer rr-x"' in script
    assert "[[" not in script.replace("[==[", "")  # no accidental long-string opener after a table name


def test_peer_lines_compare_relay_with_each_peer() -> None:
    runs = [Run("relay", 8, rps=2000.0, server_cpu_ms=0.5), Run("litellm", 8, rps=40.0, server_cpu_ms=25.0,
                                                                 p50=200.0, p99=400.0)]
    (line,) = peer_lines(runs, ["litellm"])
    assert line.startswith("relay/litellm at 8 connections: throughput 50.0, litellm/relay CPU per request 50.0")
    no_answers = peer_lines([Run("relay", 8, rps=10.0, server_cpu_ms=0.5), Run("portkey", 8)], ["portkey"])[0]
    assert "throughput n/a (peer completed no request)" in no_answers


def test_parse_peers() -> None:
    assert parse_peers("") == []
    assert parse_peers(" Portkey,litellm,portkey ") == ["portkey", "litellm"]
    with pytest.raises(SystemExit):
        parse_peers("litellm,nginx")


def test_litellm_config_has_one_model_and_nothing_switched_on() -> None:
    config = json.loads(litellm_config("gpt-4o-mini", "http://127.0.0.1:9/v1", "sk-m"))
    (model,) = config["model_list"]
    assert model["model_name"] == "gpt-4o-mini"
    assert model["litellm_params"]["api_base"] == "http://127.0.0.1:9/v1"
    assert config["litellm_settings"]["callbacks"] == [] and config["litellm_settings"]["telemetry"] is False
    assert config["general_settings"]["master_key"] == "sk-m"
    assert "database_url" not in config["general_settings"]


def test_percentile_interpolates_and_ignores_nan() -> None:
    assert percentile([3.0, 1.0, 2.0, math.nan], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_split_events_keeps_the_incomplete_tail() -> None:
    buffer = bytearray(b'data: {"a":1}\n\ndata: [DONE]\r\n\r\ndata: {"b"')
    assert split_events(buffer) == [b'data: {"a":1}', b"data: [DONE]"]
    assert buffer == bytearray(b'data: {"b"')


def test_has_content_only_for_non_empty_text_deltas() -> None:
    assert has_content(b'data: {"choices":[{"index":0,"delta":{"content":"tok1 "}}]}')
    assert not has_content(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    assert not has_content(b'data: {"choices":[],"usage":{"total_tokens":3}}')
    assert not has_content(b"data: [DONE]")
    assert has_content(b'data: {"choices":[{"index":0,"text":"x"}]}')


def test_summary_reports_added_delays_and_bunching() -> None:
    from bench.streams import TargetResult

    def timing(first: float, gap: float) -> StreamTiming:
        return StreamTiming(status=200, headers_ms=1.0, first_content_ms=first,
                            content_ms=[first + gap * i for i in range(3)], done_ms=first + 3 * gap)

    direct = TargetResult("direct", [timing(50.0, 20.0)] * 4)
    relay = TargetResult("relay", [timing(51.0, 20.0)] * 4)
    buffered = TargetResult("buffering", [timing(90.0, 0.0)] * 4)
    lines = summary([direct, relay, buffered], chunks=3, chunk_delay_ms=20.0)
    relay_line = next(line for line in lines if line.startswith("relay:"))
    assert "added TTFB (first chunk) p50 +1.00 ms" in relay_line and "as produced: yes" in relay_line
    assert "as produced: NO" in next(line for line in lines if line.startswith("buffering:"))


def test_bench_keys_are_well_formed_and_distinct() -> None:
    keys = [bench_key(i) for i in range(2000)] + [bench_key(36**8 - 1)]
    assert all(parse_api_key(k) is not None for k in keys)
    assert len({k[3:11] for k in keys}) == len(keys)


def test_month_starts_cross_the_year() -> None:
    starts = month_starts(datetime(2027, 2, 14, 9, 30, tzinfo=UTC), 4)
    assert [(d.year, d.month, d.day) for d in starts] == [(2027, 2, 1), (2027, 1, 1), (2026, 12, 1), (2026, 11, 1)]


def test_split_rows_adds_up() -> None:
    assert split_rows(10, 4) == [3, 3, 2, 2]
    assert sum(split_rows(10_000_000, 3)) == 10_000_000


def test_rotating_keys_script_reads_the_keys_file(tmp_path) -> None:
    script = rotating_keys_lua(tmp_path / "keys.txt")
    assert f'io.lines("{tmp_path / "keys.txt"}")' in script
    assert "function request()" in script and '"Bearer " .. line' in script

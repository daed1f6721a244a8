"""Unit tests for proxy.translate: OpenAI Chat Completions ↔ Anthropic Messages, requests, responses, streams."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    TranslationError,
    anthropic_error_to_openai,
    anthropic_status_to_openai,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_error_to_anthropic,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [
        {"type": "text", "text": "Weather in Paris and Oslo? Also, what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "4C rain"},
    {"role": "assistant", "content": "Paris 18C, Oslo 4C. The image is a cat."},
    {"role": "user", "content": "Thanks"},
]


# ---- requests -----------------------------------------------------------------------------------------------

def test_openai_request_to_anthropic_full_conversation() -> None:
    body = {"model": "gpt-x", "messages": CONVERSATION, "max_tokens": 300, "temperature": 0.2, "top_p": 0.9,
            "stop": "END", "stream": True, "tools": [WEATHER_TOOL], "tool_choice": "auto", "user": "u-42"}
    out = openai_to_anthropic_request(body, "claude-up")
    assert out == {
        "model": "claude-up",
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Oslo? Also, what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Oslo"}},
            ]},
            {"role": "user", "content": [  # both tool results merged into one user turn
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "4C rain"},
            ]},
            {"role": "assistant", "content": "Paris 18C, Oslo 4C. The image is a cat."},
            {"role": "user", "content": "Thanks"},
        ],
        "max_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": WEATHER_TOOL["function"]["parameters"]}],
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "u-42"},
    }


def test_openai_request_merges_system_developer_and_user_after_tool_result() -> None:
    body = {"messages": [
        {"role": "system", "content": "A"},
        {"role": "developer", "content": [{"type": "text", "text": "B"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "and?"},
    ]}
    out = openai_to_anthropic_request(body, "m")
    assert out["system"] == [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]
    assert out["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c", "content": [{"type": "text", "text": "ok"}]},
            {"type": "text", "text": "and?"},
        ]},
    ]


@pytest.mark.parametrize(("extra", "max_tokens"), [
    ({}, 4096),
    ({"max_tokens": 10}, 10),
    ({"max_completion_tokens": 20, "max_tokens": 10}, 20),
])
def test_openai_request_max_tokens(extra: dict, max_tokens: int) -> None:
    out = openai_to_anthropic_request({"messages": [{"role": "user", "content": "x"}], **extra}, "m")
    assert out["max_tokens"] == max_tokens
    assert openai_to_anthropic_request({"messages": [], **extra}, "m", default_max_tokens=7)["max_tokens"] == (
        max_tokens if extra else 7)


@pytest.mark.parametrize(("stop", "expected"), [("X", ["X"]), (["a", "b"], ["a", "b"]), (None, None)])
def test_openai_request_stop_sequences(stop: Any, expected: list | None) -> None:
    out = openai_to_anthropic_request({"messages": [], "stop": stop}, "m")
    assert out.get("stop_sequences") == expected


def test_openai_request_temperature_clamped_to_anthropic_range() -> None:
    assert openai_to_anthropic_request({"messages": [], "temperature": 1.7}, "m")["temperature"] == 1.0
    assert openai_to_anthropic_request({"messages": [], "temperature": 0}, "m")["temperature"] == 0


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    (None, None, None),
])
def test_openai_tool_choice(choice: Any, parallel: Any, expected: dict | None) -> None:
    body = {"messages": [], "tools": [WEATHER_TOOL], "tool_choice": choice, "parallel_tool_calls": parallel}
    assert openai_to_anthropic_request(body, "m").get("tool_choice") == expected


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [], "n": 2},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
    {"messages": [], "tools": [{"type": "web_search"}]},
])
def test_openai_request_untranslatable(body: dict) -> None:
    with pytest.raises(TranslationError):
        openai_to_anthropic_request(body, "m")


def test_anthropic_request_to_openai() -> None:
    body = {
        "model": "claude-x", "max_tokens": 100, "temperature": 0.5, "top_k": 5, "stream": True,
        "system": [{"type": "text", "text": "Be nice."}, {"type": "text", "text": "Be brief.",
                                                          "cache_control": {"type": "ephemeral"}}],
        "stop_sequences": ["###"], "metadata": {"user_id": "u-7"},
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": WEATHER_TOOL["function"]["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                    {"type": "text", "text": "hot"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/map.png"}},
                ]},
                {"type": "text", "text": "So?"},
            ]},
        ],
    }
    out = anthropic_to_openai_request(body, "gpt-up")
    assert out == {
        "model": "gpt-up",
        "messages": [
            {"role": "system", "content": "Be nice.\n\nBe brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
            ]},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "hot"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
                {"type": "text", "text": "So?"},
            ]},
        ],
        "max_tokens": 100,
        "temperature": 0.5,
        "stop": ["###"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "user": "u-7",
    }


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_anthropic_tool_choice(choice: dict, expected: Any) -> None:
    body = {"messages": [], "tools": [{"name": "get_weather", "input_schema": {}}], "tool_choice": choice}
    assert anthropic_to_openai_request(body, "m")["tool_choice"] == expected


def test_anthropic_request_plain_strings_and_no_stream() -> None:
    out = anthropic_to_openai_request({"system": "S", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "m")
    assert out == {"model": "m", "max_tokens": 5, "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}]}


def test_anthropic_request_max_completion_tokens_field() -> None:
    out = anthropic_to_openai_request({"max_tokens": 9, "messages": []}, "m", max_tokens_field="max_completion_tokens")
    assert out["max_completion_tokens"] == 9 and "max_tokens" not in out


def test_anthropic_request_untranslatable() -> None:
    with pytest.raises(TranslationError):
        anthropic_to_openai_request({"messages": [], "tools": [{"type": "web_search_20250305", "name": "w"}]}, "m")
    with pytest.raises(TranslationError):
        anthropic_to_openai_request({"messages": [{"role": "user", "content": [{"type": "server_tool_use"}]}]}, "m")


def _normalise(messages: list[dict]) -> list[dict]:
    """Compare tool-call arguments as JSON values, not as strings (spacing may differ)."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": orjson.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        out.append(m)
    return out


def test_round_trip_openai_anthropic_openai_preserves_conversation() -> None:
    body = {"messages": CONVERSATION, "tools": [WEATHER_TOOL], "tool_choice": "required", "stop": ["x", "y"],
            "max_tokens": 50, "user": "u"}
    back = anthropic_to_openai_request(openai_to_anthropic_request(body, "claude"), "gpt")
    assert _normalise(back["messages"]) == _normalise(CONVERSATION)
    assert back["tools"] == [WEATHER_TOOL]
    assert (back["tool_choice"], back["stop"], back["max_tokens"], back["user"]) == ("required", ["x", "y"], 50, "u")


# ---- non-stream responses -----------------------------------------------------------------------------------

ANTHROPIC_MESSAGE = {
    "id": "msg_01AbC", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [
        {"type": "text", "text": "Let me "}, {"type": "text", "text": "look."},
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Lyon", "days": [1, 2]}},
    ],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 30,
              "cache_creation_input_tokens": 5},
}


def test_anthropic_response_to_openai() -> None:
    out = anthropic_to_openai_response(ANTHROPIC_MESSAGE, "my-model")
    assert out["id"] == "chatcmpl-01AbC" and out["object"] == "chat.completion" and out["model"] == "my-model"
    assert isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "Let me look."
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "toolu_9" and call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Lyon", "days": [1, 2]}
    assert out["usage"] == {"prompt_tokens": 135, "completion_tokens": 20, "total_tokens": 155,
                            "prompt_tokens_details": {"cached_tokens": 30}}


@pytest.mark.parametrize(("stop_reason", "finish_reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
    (None, "stop"),
])
def test_anthropic_stop_reasons(stop_reason: str | None, finish_reason: str) -> None:
    resp = {"id": "msg_1", "content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason,
            "usage": {"input_tokens": 1, "output_tokens": 1}}
    out = anthropic_to_openai_response(resp, "m")
    assert out["choices"][0]["finish_reason"] == finish_reason
    assert "tool_calls" not in out["choices"][0]["message"]


def test_openai_response_to_anthropic() -> None:
    resp = {"id": "chatcmpl-XYZ", "object": "chat.completion", "model": "gpt-4o", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Sure.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "not json"}}]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57,
                  "prompt_tokens_details": {"cached_tokens": 40}}}
    assert openai_to_anthropic_response(resp, "claude-ish") == {
        "id": "msg_XYZ", "type": "message", "role": "assistant", "model": "claude-ish",
        "content": [{"type": "text", "text": "Sure."},
                    {"type": "tool_use", "id": "call_a", "name": "f", "input": {"a": 1}},
                    {"type": "tool_use", "id": "call_b", "name": "g", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 40},
    }


@pytest.mark.parametrize(("finish_reason", "stop_reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"),
    ("content_filter", "refusal"), (None, "end_turn"),
])
def test_openai_finish_reasons(finish_reason: str | None, stop_reason: str) -> None:
    resp = {"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "x"},
                                             "finish_reason": finish_reason}]}
    assert openai_to_anthropic_response(resp, "m")["stop_reason"] == stop_reason


def test_response_round_trip() -> None:
    back = openai_to_anthropic_response(anthropic_to_openai_response(ANTHROPIC_MESSAGE, "m"), "m")
    assert back["content"] == [{"type": "text", "text": "Let me look."}, ANTHROPIC_MESSAGE["content"][2]]
    assert back["stop_reason"] == "tool_use" and back["id"] == "msg_01AbC"


# ---- streams ------------------------------------------------------------------------------------------------

def _anthropic_sse(*events: dict) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


ANTHROPIC_STREAM = _anthropic_sse(
    {"type": "message_start", "message": {
        "id": "msg_S1", "type": "message", "role": "assistant", "model": "claude-upstream-1", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Héllo \"wörld\"\n"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "— checking 🌦"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ty": "Pa'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"tz":'}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '"CET"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 42}},
    {"type": "message_stop"},
)


def _feed_all(make: Any, data: bytes, size: int) -> tuple[bytes, Any]:
    stream = make()
    out = b"".join(stream.feed(data[i:i + size]) for i in range(0, len(data), size)) + stream.finish()
    return out, stream


def _assert_split_invariant(make: Any, data: bytes) -> bytes:
    """Output is the same however the upstream bytes are cut: into 1..N-byte pieces, or in two anywhere."""
    whole, _ = _feed_all(make, data, len(data))
    for size in range(1, len(data) + 1):
        assert _feed_all(make, data, size)[0] == whole, size
    for cut in range(len(data)):
        stream = make()
        assert stream.feed(data[:cut]) + stream.feed(data[cut:]) + stream.finish() == whole, cut
    return whole


def _openai_events(out: bytes) -> list[Any]:
    assert out.endswith(b"\n\n")
    events = []
    for raw in out[:-2].split(b"\n\n"):
        assert raw.startswith(b"data: ") and b"\n" not in raw
        events.append("[DONE]" if raw == b"data: [DONE]" else orjson.loads(raw[6:]))
    return events


def _anthropic_events(out: bytes) -> list[dict]:
    events = []
    for raw in out[:-2].split(b"\n\n"):
        name, data = raw.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        events.append(event)
    return events


def _collect_openai(events: list[Any]) -> tuple[str, dict[int, dict], str | None]:
    text, calls, finish = "", {}, None
    for ev in events:
        if ev == "[DONE]" or not ev["choices"]:
            continue
        choice = ev["choices"][0]
        delta = choice["delta"]
        text += delta.get("content") or ""
        for tc in delta.get("tool_calls") or ():
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                call["id"], call["name"] = tc["id"], tc["function"]["name"]
            call["arguments"] += tc["function"].get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return text, calls, finish


def test_anthropic_stream_to_openai_any_split() -> None:
    out = _assert_split_invariant(lambda: AnthropicToOpenAIStream("my-model", include_usage=True, created=1),
                                  ANTHROPIC_STREAM)
    events = _openai_events(out)
    assert events[-1] == "[DONE]"
    first = events[0]
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-S1" and first["model"] == "my-model"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert all(ev["id"] == "chatcmpl-S1" for ev in events[:-1])
    text, calls, finish = _collect_openai(events)
    assert text == "Héllo \"wörld\"\n— checking 🌦"
    assert finish == "tool_calls"
    assert calls[0]["id"] == "toolu_A" and calls[0]["name"] == "get_weather"
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Paris"}  # fragments reassemble into valid JSON
    assert calls[1]["id"] == "toolu_B" and orjson.loads(calls[1]["arguments"]) == {"tz": "CET"}
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 25, "completion_tokens": 42, "total_tokens": 67}
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_stream_usage_and_model_without_usage_chunk() -> None:
    stream = AnthropicToOpenAIStream("my-model", include_usage=False)
    events = _openai_events(stream.feed(ANTHROPIC_STREAM) + stream.finish())
    assert all(ev == "[DONE]" or ev["choices"] for ev in events)  # no usage chunk
    assert stream.done
    assert stream.model == "claude-upstream-1"
    assert stream.usage is not None
    assert (stream.usage["prompt_tokens"], stream.usage["completion_tokens"]) == (25, 42)


def test_anthropic_stream_crlf_and_cut_short() -> None:
    data = ANTHROPIC_STREAM.replace(b"\n", b"\r\n")
    lf = AnthropicToOpenAIStream("m", include_usage=False, created=1)
    expected = lf.feed(ANTHROPIC_STREAM) + lf.finish()
    make = lambda: AnthropicToOpenAIStream("m", include_usage=False, created=1)  # noqa: E731
    assert _assert_split_invariant(make, data) == expected
    # Cut before message_delta: no finish chunk, no [DONE], not done.
    cut = ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"event: message_delta")]
    stream = AnthropicToOpenAIStream("m", include_usage=True, created=1)
    out = stream.feed(cut) + stream.finish()
    assert b"[DONE]" not in out and b'"finish_reason":"' not in out and not stream.done


def test_anthropic_stream_error_event() -> None:
    data = ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"event: content_block_stop")] + _anthropic_sse(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_secret"})
    out = _assert_split_invariant(lambda: AnthropicToOpenAIStream("m", include_usage=True, created=1), data)
    events = _openai_events(out)
    assert events[-1] == {"error": {"message": "Overloaded", "type": "server_error", "param": None,
                                    "code": "overloaded"}}
    assert b"req_secret" not in out and b"[DONE]" not in out


def _openai_sse(*chunks: Any) -> bytes:
    out = b""
    for c in chunks:
        out += b"data: " + (c if isinstance(c, bytes) else orjson.dumps(c)) + b"\n\n"
    return out


def _oa_chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-Q7", "object": "chat.completion.chunk", "created": 1, "model": "gpt-upstream-2",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}


OPENAI_STREAM = _openai_sse(
    _oa_chunk({"role": "assistant", "content": ""}),
    _oa_chunk({"content": "Bonjour "}),
    _oa_chunk({"content": "à \"tous\" ✓"}),
    _oa_chunk({"tool_calls": [{"index": 0, "id": "call_X", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
    _oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city'}}]}),
    _oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '": "Nice"}'}}]}),
    _oa_chunk({"tool_calls": [{"index": 1, "id": "call_Y", "type": "function",
                               "function": {"name": "get_time", "arguments": '{"tz"'}}]}),
    _oa_chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "UTC"}'}}]}),
    _oa_chunk({}, "tool_calls"),
    {"id": "chatcmpl-Q7", "object": "chat.completion.chunk", "created": 1, "model": "gpt-upstream-2", "choices": [],
     "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}},
    b"[DONE]",
)


def test_openai_stream_to_anthropic_any_split() -> None:
    out = _assert_split_invariant(lambda: OpenAIToAnthropicStream("claude-facade"), OPENAI_STREAM)
    events = _anthropic_events(out)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    start = events[0]["message"]
    assert start["id"] == "msg_Q7" and start["model"] == "claude-facade" and start["role"] == "assistant"
    blocks: dict[int, dict] = {}
    for e in events:
        if e["type"] == "content_block_start":
            blocks[e["index"]] = {**e["content_block"], "text": "", "json": ""}
        elif e["type"] == "content_block_delta":
            d = e["delta"]
            blocks[e["index"]]["text" if d["type"] == "text_delta" else "json"] += d.get("text") or d.get(
                "partial_json")
    assert blocks[0]["type"] == "text" and blocks[0]["text"] == "Bonjour à \"tous\" ✓"
    assert (blocks[1]["type"], blocks[1]["id"], blocks[1]["name"]) == ("tool_use", "call_X", "get_weather")
    assert orjson.loads(blocks[1]["json"]) == {"city": "Nice"}
    assert (blocks[2]["id"], blocks[2]["name"]) == ("call_Y", "get_time")
    assert orjson.loads(blocks[2]["json"]) == {"tz": "UTC"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 31, "output_tokens": 12}


def test_openai_stream_usage_model_and_missing_done() -> None:
    data = OPENAI_STREAM[:OPENAI_STREAM.index(b"data: [DONE]")]
    stream = OpenAIToAnthropicStream("m")
    out = stream.feed(data)
    assert b"message_stop" not in out  # waits for [DONE]: a usage chunk may still come
    out += stream.finish()
    assert out.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n') and stream.done
    assert stream.model == "gpt-upstream-2"
    assert stream.usage is not None
    assert (stream.usage["prompt_tokens"], stream.usage["completion_tokens"]) == (31, 12)


def test_openai_stream_error_event() -> None:
    data = OPENAI_STREAM[:OPENAI_STREAM.index(b"data: ", 200)] + _openai_sse(
        {"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded", "org": "o-1"}})
    out = _assert_split_invariant(lambda: OpenAIToAnthropicStream("m"), data)
    assert _anthropic_events(out)[-1] == {"type": "error", "error": {"type": "rate_limit_error",
                                                                    "message": "Rate limit reached"}}
    assert b"o-1" not in out and b"message_stop" not in out


def test_stream_round_trip_anthropic_openai_anthropic() -> None:
    to_openai = AnthropicToOpenAIStream("m", include_usage=True, created=1)
    back = OpenAIToAnthropicStream("m")
    out = back.feed(to_openai.feed(ANTHROPIC_STREAM) + to_openai.finish()) + back.finish()
    original = [e for e in _anthropic_events(ANTHROPIC_STREAM) if e["type"] != "ping"]
    events = _anthropic_events(out)

    def shape(evs: list[dict]) -> list[tuple]:
        return [(e["type"], e.get("index"), e.get("delta", {}).get("text", e.get("delta", {}).get("partial_json")))
                for e in evs if e["type"] not in ("message_start", "message_delta")]

    assert shape(events) == [s for s in shape(original) if s[2] != ""]  # empty fragments are not forwarded
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["output_tokens"] == 42
    assert back.usage is not None and back.usage["prompt_tokens"] == 25


# ---- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind", "openai_type", "code"), [
    (400, "invalid_request_error", "invalid_request_error", None),
    (401, "authentication_error", "invalid_request_error", "invalid_api_key"),
    (403, "permission_error", "invalid_request_error", "permission_denied"),
    (404, "not_found_error", "invalid_request_error", "not_found"),
    (413, "request_too_large", "invalid_request_error", "request_too_large"),
    (429, "rate_limit_error", "requests", "rate_limit_exceeded"),
    (500, "api_error", "server_error", None),
    (529, "overloaded_error", "server_error", "overloaded"),
])
def test_anthropic_error_to_openai(status: int, kind: str, openai_type: str, code: str | None) -> None:
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "upstream says no"},
                         "request_id": "req_011secret"})
    out = orjson.loads(anthropic_error_to_openai(status, body))
    assert out == {"error": {"message": "upstream says no", "type": openai_type, "param": None, "code": code}}
    # Without a parsable body the type comes from the status, and the message is generic.
    fallback = orjson.loads(anthropic_error_to_openai(status, b"<html>secret stack trace</html>"))
    assert (fallback["error"]["type"], fallback["error"]["code"]) == (openai_type, code)
    assert "secret" not in fallback["error"]["message"] and str(status) in fallback["error"]["message"]


@pytest.mark.parametrize(("status", "error", "kind"), [
    (400, {"type": "invalid_request_error", "code": None}, "invalid_request_error"),
    (401, {"type": "invalid_request_error", "code": "invalid_api_key"}, "authentication_error"),
    (403, {"type": "invalid_request_error", "code": "unsupported_country_region_territory"}, "permission_error"),
    (404, {"type": "invalid_request_error", "code": "model_not_found"}, "not_found_error"),
    (413, {"type": "invalid_request_error"}, "request_too_large"),
    (429, {"type": "requests", "code": "rate_limit_exceeded"}, "rate_limit_error"),
    (429, {"type": "insufficient_quota", "code": "insufficient_quota"}, "billing_error"),
    (500, {"type": "server_error"}, "api_error"),
    (503, {"type": "server_error"}, "overloaded_error"),
    (504, {}, "timeout_error"),
    (418, {}, "invalid_request_error"),
])
def test_openai_error_to_anthropic(status: int, error: dict, kind: str) -> None:
    body = orjson.dumps({"error": {"message": "nope", "param": "secret_param", **error}})
    out = orjson.loads(openai_error_to_anthropic(status, body))
    assert out == {"type": "error", "error": {"type": kind, "message": "nope"}}


def test_error_edge_cases() -> None:
    assert orjson.loads(openai_error_to_anthropic(502, b""))["error"]["type"] == "api_error"
    assert orjson.loads(openai_error_to_anthropic(400, b'{"error": "plain string"}'))["error"]["message"] == (
        "plain string")
    assert anthropic_status_to_openai(529) == 503 and anthropic_status_to_openai(429) == 429

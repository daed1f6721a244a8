"""Unit tests: the Responses API ⇄ Chat Completions, and thinking ⇄ OpenAI reasoning fields (proxy.translate)."""

from __future__ import annotations

import orjson
import pytest

from proxy.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    TranslationError,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)
from proxy.translate.responses import ChatToResponsesStream, chat_to_responses_response, responses_to_chat_request
from tests.proxy.test_translate import _anthropic_sse, _assert_split_invariant


def test_responses_request_to_chat() -> None:
    body = {"model": "x", "instructions": "Be terse.", "max_output_tokens": 64, "temperature": 0.3,
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Weather?"},
                    {"type": "input_image", "image_url": "https://e.com/a.png", "detail": "low"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
                {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "4C"},
                {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "20C"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Oslo 4C, Rome 20C."}]},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True},
                      {"type": "web_search"}],
            "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
            "reasoning": {"effort": "high", "summary": "auto"}, "store": False, "stream": True}
    out = responses_to_chat_request(body, "up")
    assert out["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather?"},
            {"type": "image_url", "image_url": {"url": "https://e.com/a.png", "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4C"},
        {"role": "tool", "tool_call_id": "c2", "content": "20C"},
        {"role": "assistant", "content": "Oslo 4C, Rome 20C."},
    ]
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                              "parameters": {"type": "object"}, "strict": True}}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object"}, "strict": True}}
    assert (out["max_completion_tokens"], out["reasoning_effort"], out["parallel_tool_calls"]) == (64, "high", False)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert "store" not in out and "text" not in out


@pytest.mark.parametrize("body", [
    {"input": "x", "previous_response_id": "resp_1"},
    {"input": [{"type": "item_reference", "id": "msg_1"}]},
    {"input": [{"role": "wizard", "content": "x"}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
])
def test_responses_request_untranslatable(body: dict) -> None:
    with pytest.raises(TranslationError):
        responses_to_chat_request(body, "m")


def test_chat_answer_to_response_with_reasoning_tool_and_usage() -> None:
    answer = {"id": "chatcmpl-9", "created": 5, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "reasoning_content": "hmm",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}}],
              "usage": {"prompt_tokens": 10, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4},
                        "completion_tokens_details": {"reasoning_tokens": 3}}}
    out = chat_to_responses_response(answer, "my-model")
    assert out["object"] == "response" and out["status"] == "completed" and out["model"] == "my-model"
    assert [i["type"] for i in out["output"]] == ["reasoning", "message", "function_call"]
    assert out["output"][0]["summary"] == [{"type": "summary_text", "text": "hmm"}]
    assert out["output"][1]["content"][0]["text"] == "Checking."
    assert out["output"][2]["call_id"] == "c1" and out["output"][2]["arguments"] == '{"a":1}'
    assert out["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 7,
                            "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 17}
    cut = chat_to_responses_response({"choices": [{"finish_reason": "length", "message": {"content": "x"}}]}, "m")
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}


def _chat_sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


CHAT_STREAM = _chat_sse(
    {"id": "c", "model": "up", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"id": "c", "choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]},
    {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"id": "c", "choices": [{"index": 0, "delta": {"content": "lo"}}]},
    {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}}]},
    {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]},
    {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}},
)


def _responses_events(out: bytes) -> list[dict]:
    events = []
    for raw in out.strip().split(b"\n\n"):
        name, data = raw.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        events.append(event)
    return events


def test_chat_stream_to_responses_events_any_split() -> None:
    out = _assert_split_invariant(lambda: ChatToResponsesStream("my-model", response_id="resp_1", created=1),
                                  CHAT_STREAM)
    events = _responses_events(out)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello"
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta") == "think"
    assert "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta") == '{"a":1}'
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["usage"]["input_tokens"] == 5 and final["usage"]["output_tokens"] == 6
    stream = ChatToResponsesStream("m")
    stream.pricer = lambda usage: 42
    done = _responses_events(stream.feed(CHAT_STREAM) + stream.finish())
    assert done[-1]["response"]["usage"]["cost_micros"] == 42 and stream.upstream_usage["prompt_tokens"] == 5


# ---- thinking ⇄ OpenAI reasoning fields ---------------------------------------------------------------------------

THINKING = [{"type": "thinking", "thinking": "Let me see.", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "opaque"}, {"type": "text", "text": "Hi"}]


def test_anthropic_thinking_round_trips_through_an_openai_client() -> None:
    answer = anthropic_to_openai_response({"id": "msg_1", "content": THINKING, "stop_reason": "end_turn",
                                           "usage": {"input_tokens": 1, "output_tokens": 2}}, "m")
    message = answer["choices"][0]["message"]
    assert message["content"] == "Hi" and message["reasoning_content"] == "Let me see."
    assert message["reasoning_details"] == [
        {"type": "reasoning.text", "text": "Let me see.", "signature": "sig-1", "format": "anthropic-claude-v1"},
        {"type": "reasoning.encrypted", "data": "opaque", "format": "anthropic-claude-v1"}]
    # The client sends the assistant turn back: the blocks, signatures included, go back to Anthropic.
    request = openai_to_anthropic_request({"messages": [{"role": "user", "content": "a"}, message,
                                                        {"role": "user", "content": "b"}]}, "claude")
    assert request["messages"][1]["content"] == THINKING
    back = openai_to_anthropic_response(answer, "m")
    assert back["content"] == THINKING


def test_reasoning_effort_and_thinking_budgets() -> None:
    out = openai_to_anthropic_request({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "medium",
                                       "max_tokens": 10_000, "temperature": 0.2}, "claude")
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 4096} and "temperature" not in out
    small = openai_to_anthropic_request({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high",
                                         "max_tokens": 100}, "claude")
    assert "thinking" not in small  # a budget must be at least 1,024 tokens and below max_tokens
    back = anthropic_to_openai_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                                        "thinking": {"type": "enabled", "budget_tokens": 5000}}, "gpt")
    assert back["reasoning_effort"] == "medium"
    adaptive = anthropic_to_openai_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                                            "thinking": {"type": "adaptive"}}, "gpt")
    assert "reasoning_effort" not in adaptive


def test_claude_codes_shape_translates_to_openai() -> None:
    body = {"model": "m", "max_tokens": 32000, "thinking": {"type": "adaptive"},
            "context_management": {"edits": []}, "output_config": {"effort": "high"},
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "system", "content": "Reminder."},
                         {"role": "user", "content": [{"type": "text", "text": "hi",
                                                       "cache_control": {"type": "ephemeral"}}]},
                         {"role": "assistant", "content": THINKING}],
            "tools": [{"name": "Bash", "input_schema": {"type": "object"}}]}
    out = anthropic_to_openai_request(body, "gpt")
    assert [m["role"] for m in out["messages"]] == ["system", "system", "user", "assistant"]
    assert out["messages"][1]["content"] == "Reminder." and out["messages"][3] == {"role": "assistant",
                                                                                   "content": "Hi"}
    assert "context_management" not in out and "output_config" not in out and "thinking" not in out


def test_thinking_streams_both_ways() -> None:
    anthropic = _anthropic_sse(
        {"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 3}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s1"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "d"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
        {"type": "message_stop"})
    out = _assert_split_invariant(lambda: AnthropicToOpenAIStream("m", True, created=1), anthropic)
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in out.split(b"\n\n")
              if e.startswith(b"data: {") and b'"choices":[{' in e]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "hmm"
    details = [x for d in deltas for x in d.get("reasoning_details") or ()]
    assert [x.get("signature") or x.get("data") for x in details] == ["s1", "d"]
    chat = _chat_sse({"id": "c", "choices": [{"index": 0, "delta": {"reasoning_content": "why"}}]},
                     {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]})
    translated = _assert_split_invariant(lambda: OpenAIToAnthropicStream("m"), chat)
    assert b'"type":"thinking_delta","thinking":"why"' in translated
    assert translated.index(b"thinking_delta") < translated.index(b"text_delta")

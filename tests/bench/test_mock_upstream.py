"""Tests of the mock upstream provider, served by a real granian subprocess on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PROMPT = "hello world, this is a test"  # 27 characters -> 7 prompt tokens
EIGHT = "".join(f"tok{i} " for i in range(1, 9))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MockProcess:
    """A mock upstream subprocess; ``url`` is its base URL."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix="mock-upstream-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        with self.log_path.open("wb") as log:
            cmd = [a.replace("{port}", str(self.port)) for a in args]
            self.process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                            stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mock exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/_mock/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mock not ready in {timeout} s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


def start_mock(args: list[str], env: dict[str, str] | None = None) -> MockProcess:
    mock = MockProcess(args, env)
    mock.wait_ready()
    return mock


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockProcess]:
    mock = start_mock([sys.executable, "-m", "bench.mock_upstream", "--port", "{port}"])
    yield mock
    mock.stop()


@pytest.fixture
def mock(mock_server: MockProcess) -> Iterator[httpx.Client]:
    """An HTTP client on the shared mock, which starts from its default config and no recorded requests."""
    with httpx.Client(base_url=mock_server.url, timeout=10.0) as client:
        assert client.post("/_mock/reset").status_code == 200
        yield client


def configure(client: httpx.Client, **config: Any) -> None:
    response = client.post("/_mock/config", json=config)
    assert response.status_code == 200, response.text


def chat_body(model: str = "gpt-test", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) for each SSE event of a complete body."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append((name, "\n".join(data)))
    return events


def stream_text(client: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> str:
    with client.stream("POST", path, json=body, **kw) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return response.read().decode()


def openai_chunks(text: str) -> tuple[list[dict[str, Any]], bool]:
    """Parsed ``data:`` JSON chunks of an OpenAI stream and whether it ended with ``[DONE]``."""
    datas = [data for _, data in sse_events(text)]
    done = bool(datas) and datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas if d != "[DONE]"], done


# ---- OpenAI chat completions -------------------------------------------------------------------------


def test_chat_non_stream_shape_and_usage(mock: httpx.Client) -> None:
    response = mock.post(CHAT, json=chat_body("my-model"))
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "my-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": EIGHT, "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}
    other = mock.post(CHAT, json=chat_body("my-model")).json()
    assert other["id"] != body["id"]


def test_prompt_tokens_count_all_message_contents(mock: httpx.Client) -> None:
    messages = [{"role": "system", "content": "x" * 40},
                {"role": "user", "content": [{"type": "text", "text": "y" * 41}]}]
    body = mock.post(CHAT, json={"model": "m", "messages": messages}).json()
    assert body["usage"]["prompt_tokens"] == 21  # ceil(81 / 4)


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_respected(mock: httpx.Client, key: str) -> None:
    body = mock.post(CHAT, json=chat_body(**{key: 3})).json()
    assert body["choices"][0]["message"]["content"] == "tok1 tok2 tok3 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    text = stream_text(mock, CHAT, chat_body(stream=True, stream_options={"include_usage": True}, **{key: 2}))
    chunks, done = openai_chunks(text)
    assert done
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "tok1 tok2 "
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_max_tokens_above_chunks_is_a_normal_stop(mock: httpx.Client) -> None:
    body = mock.post(CHAT, json=chat_body(max_tokens=100)).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 8


def test_stream_without_usage(mock: httpx.Client) -> None:
    chunks, done = openai_chunks(stream_text(mock, CHAT, chat_body("s-model", stream=True)))
    assert done
    assert len(chunks) == 10  # role + 8 pieces + finish
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "s-model" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == EIGHT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


def test_stream_with_include_usage(mock: httpx.Client) -> None:
    text = stream_text(mock, CHAT, chat_body(stream=True, stream_options={"include_usage": True}))
    chunks, done = openai_chunks(text)
    assert done
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_omit_usage_suppresses_usage_chunk(mock: httpx.Client) -> None:
    configure(mock, omit_usage=True)
    text = stream_text(mock, CHAT, chat_body(stream=True, stream_options={"include_usage": True}))
    chunks, done = openai_chunks(text)
    assert done
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert "usage" not in mock.post(CHAT, json=chat_body()).json()
    assert "usage" not in mock.post(MESSAGES, json=chat_body(max_tokens=5)).json()


def test_stream_arrives_in_several_reads_with_chunk_delay(mock: httpx.Client) -> None:
    configure(mock, chunk_delay_ms=30, chunks=4)
    reads = []
    started = time.monotonic()
    with mock.stream("POST", CHAT, json=chat_body(stream=True)) as response:
        reads.extend(response.iter_raw())
    elapsed = time.monotonic() - started
    assert len(reads) >= 3
    assert elapsed >= 0.09  # 3 gaps of 30 ms
    chunks, done = openai_chunks(b"".join(reads).decode())
    assert done and len(chunks) == 6


# ---- delays -----------------------------------------------------------------------------------------


def test_latency_delays_non_stream_answer(mock: httpx.Client) -> None:
    configure(mock, latency_ms=300)
    started = time.monotonic()
    assert mock.post(CHAT, json=chat_body()).status_code == 200
    assert time.monotonic() - started >= 0.29


def test_ttft_delays_first_chunk_after_headers(mock: httpx.Client) -> None:
    configure(mock, latency_ms=100, ttft_ms=300)
    started = time.monotonic()
    with mock.stream("POST", CHAT, json=chat_body(stream=True)) as response:
        headers_at = time.monotonic() - started
        parts = response.iter_raw()
        first = next(parts)
        first_at = time.monotonic() - started
        rest = b"".join(parts)
    assert headers_at >= 0.09
    assert first_at - headers_at >= 0.25 and first_at >= 0.39
    assert first.startswith(b"data: ")
    assert (first + rest).endswith(b"data: [DONE]\n\n")


def test_hang_never_answers(mock: httpx.Client) -> None:
    configure(mock, models={"hung": {"hang": True}})
    with pytest.raises(httpx.ReadTimeout):
        mock.post(CHAT, json=chat_body("hung"), timeout=0.5)
    assert mock.post(CHAT, json=chat_body("fine"), timeout=5).status_code == 200


# ---- errors and failures ----------------------------------------------------------------------------


def test_status_override_per_model(mock: httpx.Client) -> None:
    configure(mock, models={"broken": {"status": 503}})
    response = mock.post(CHAT, json=chat_body("broken"))
    assert response.status_code == 503
    assert response.json() == {"error": {"message": "mock error", "type": "server_error", "code": None}}
    assert mock.post(CHAT, json=chat_body("healthy")).status_code == 200
    anthropic = mock.post(MESSAGES, json=chat_body("broken", max_tokens=10))
    assert anthropic.status_code == 503
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "api_error"


def test_model_override_beats_runtime_config(mock: httpx.Client) -> None:
    configure(mock, status=429, models={"vip": {"status": None, "chunks": 2}})
    assert mock.post(CHAT, json=chat_body("other")).status_code == 429
    body = mock.post(CHAT, json=chat_body("vip")).json()
    assert body["usage"]["completion_tokens"] == 2


def test_error_rate(mock: httpx.Client) -> None:
    configure(mock, error_rate=1.0, error_status=502)
    assert mock.post(CHAT, json=chat_body()).status_code == 502
    configure(mock, error_rate=0.0, error_status=502)
    assert mock.post(CHAT, json=chat_body()).status_code == 200


@pytest.mark.parametrize("delay", [0, 20])
def test_fail_after_chunks_breaks_stream(mock: httpx.Client, delay: int) -> None:
    configure(mock, fail_after_chunks=2, chunk_delay_ms=delay)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with mock.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert response.status_code == 200
            for part in response.iter_raw():
                received += part
    assert b"[DONE]" not in received
    chunks = [json.loads(d) for _, d in sse_events(received.decode())]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "tok1 tok2 "
    assert mock.post(CHAT, json=chat_body()).status_code == 200


def test_http_errors(mock: httpx.Client) -> None:
    missing = mock.get("/v1/nope")
    assert missing.status_code == 404 and "error" in missing.json()
    assert mock.get(CHAT).status_code == 405
    assert mock.post("/v1/models").status_code == 405
    bad = mock.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert mock.post(CHAT, json={"messages": []}).status_code == 400  # no model
    assert mock.post(CHAT, json=chat_body(max_tokens="3")).status_code == 400


def test_invalid_config_rejected(mock: httpx.Client) -> None:
    assert mock.post("/_mock/config", json={"latency": 5}).status_code == 400
    assert mock.post("/_mock/config", json={"chunks": "8"}).status_code == 400
    assert mock.post("/_mock/config", json={"models": {"m": {"hang": 1}}}).status_code == 400
    configure(mock, chunks=3, models={"m": {"latency_ms": 1}})
    assert mock.get("/_mock/config").json() == {"chunks": 3, "models": {"m": {"latency_ms": 1}}}
    mock.post("/_mock/reset")
    assert mock.get("/_mock/config").json() == {}


def test_require_api_key(mock: httpx.Client) -> None:
    configure(mock, require_api_key="sk-good")
    for headers in ({}, {"authorization": "Bearer sk-bad"}):
        response = mock.post(CHAT, json=chat_body(), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert mock.post(CHAT, json=chat_body(), headers={"authorization": "Bearer sk-good"}).status_code == 200
    anthropic = mock.post(MESSAGES, json=chat_body(max_tokens=5), headers={"x-api-key": "sk-bad"})
    assert anthropic.status_code == 401
    assert anthropic.json() == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "Incorrect API key provided."}}
    assert mock.post(MESSAGES, json=chat_body(max_tokens=5), headers={"x-api-key": "sk-good"}).status_code == 200


# ---- recording --------------------------------------------------------------------------------------


def test_request_recording(mock: httpx.Client) -> None:
    mock.post(CHAT, json=chat_body("rec-model", max_tokens=4), headers={"authorization": "Bearer sk-abc"})
    stream_text(mock, MESSAGES, chat_body("claude-x", stream=True, max_tokens=9),
                headers={"x-api-key": "ant-key", "anthropic-version": "2023-06-01"})
    records = mock.get("/_mock/requests").json()
    assert len(records) == 2
    first, second = records
    assert first["method"] == "POST" and first["path"] == CHAT
    assert first["authorization"] == "Bearer sk-abc"
    assert first["model"] == "rec-model" and first["max_tokens"] == 4 and first["stream"] is None
    assert abs(first["time"] - time.time()) < 60
    assert second["x_api_key"] == "ant-key" and second["anthropic_version"] == "2023-06-01"
    assert second["stream"] is True and second["authorization"] is None
    mock.post("/_mock/reset")
    assert mock.get("/_mock/requests").json() == []


# ---- other OpenAI endpoints -------------------------------------------------------------------------


def test_embeddings(mock: httpx.Client) -> None:
    body = mock.post("/v1/embeddings", json={"model": "emb", "input": ["a" * 8, "b" * 9, "c"]}).json()
    assert body["object"] == "list" and body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(len(d["embedding"]) == 8 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 2 + 3 + 1, "total_tokens": 6}
    single = mock.post("/v1/embeddings", json={"model": "emb", "input": "hello"}).json()
    assert len(single["data"]) == 1
    b64 = mock.post("/v1/embeddings", json={"model": "emb", "input": "x", "encoding_format": "base64"}).json()
    assert isinstance(b64["data"][0]["embedding"], str)
    assert mock.post("/v1/embeddings", json={"model": "emb", "input": []}).status_code == 400


def test_completions(mock: httpx.Client) -> None:
    body = mock.post("/v1/completions", json={"model": "davinci", "prompt": "abcdefgh", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "tok1 tok2 tok3 tok4 tok5 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    text = stream_text(mock, "/v1/completions", {"model": "davinci", "prompt": "abcd", "stream": True,
                                                 "stream_options": {"include_usage": True}})
    chunks, done = openai_chunks(text)
    assert done
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == EIGHT
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_models(mock: httpx.Client) -> None:
    configure(mock, models={"custom-upstream": {}})
    body = mock.get("/v1/models").json()
    assert body["object"] == "list"
    assert "custom-upstream" in {m["id"] for m in body["data"]}


# ---- Anthropic messages -----------------------------------------------------------------------------


def test_messages_non_stream(mock: httpx.Client) -> None:
    payload = {"model": "claude-y", "max_tokens": 100, "system": "abcd",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "efghijkl"}]}]}
    body = mock.post(MESSAGES, json=payload).json()
    assert body["id"].startswith("msg_")
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "claude-y"
    assert body["content"] == [{"type": "text", "text": EIGHT}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 8}
    cut = mock.post(MESSAGES, json={**payload, "max_tokens": 2}).json()
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["output_tokens"] == 2


def test_messages_stream_event_sequence(mock: httpx.Client) -> None:
    text = stream_text(mock, MESSAGES, chat_body("claude-z", stream=True, max_tokens=3))
    events = sse_events(text)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    datas = [json.loads(data) for _, data in events]
    assert all(d["type"] == name for d, name in zip(datas, names, strict=True))
    message = datas[0]["message"]
    assert message["model"] == "claude-z" and message["id"].startswith("msg_")
    assert message["usage"]["input_tokens"] == 7
    assert "".join(d["delta"]["text"] for d in datas[3:6]) == "tok1 tok2 tok3 "
    assert datas[7]["delta"]["stop_reason"] == "max_tokens" and datas[7]["usage"] == {"output_tokens": 3}


def test_messages_stream_fail_after_chunks(mock: httpx.Client) -> None:
    configure(mock, models={"claude-flaky": {"fail_after_chunks": 1}})
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with mock.stream("POST", MESSAGES, json=chat_body("claude-flaky", stream=True, max_tokens=9)) as r:
            for part in r.iter_raw():
                received += part
    names = [name for name, _ in sse_events(received.decode())]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta"]


# ---- launching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("launch", ["main", "granian"])
def test_default_config_from_cli_and_env(launch: str) -> None:
    if launch == "main":
        args = [sys.executable, "-m", "bench.mock_upstream", "--port", "{port}", "--workers", "2",
                "--chunks", "3", "--config", '{"models": {"slow": {"status": 418}}}']
        env = None
    else:
        args = [sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--port", "{port}",
                "bench.mock_upstream:app"]
        env = {"MOCK_UPSTREAM_CONFIG": '{"chunks": 3, "models": {"slow": {"status": 418}}}'}
    server = start_mock(args, env)
    try:
        for _ in range(4):  # with two workers, each one must have the defaults
            body = httpx.post(server.url + CHAT, json=chat_body()).json()
            assert body["usage"]["completion_tokens"] == 3
        assert httpx.post(server.url + CHAT, json=chat_body("slow")).status_code == 418
    finally:
        server.stop()


# ---- personas (simulated models for the quality probes) -----------------------------------------------


def _ask(mock: httpx.Client, model: str, text: str, path: str = CHAT, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 32, **extra}
    response = mock.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_persona_reference_answers_probe_prompts_and_others_as_usual(mock: httpx.Client) -> None:
    configure(mock, models={"ref": {"persona": "reference"}})
    answer = _ask(mock, "ref", "What is the capital of Japan? Reply with one word.")
    assert answer["choices"][0]["message"]["content"] == "Tokyo" and answer["model"] == "ref"
    assert answer["usage"]["completion_tokens"] == 2  # ~4 characters per token
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = _ask(mock, "ref", "What is the weather in Oslo in celsius? Use the get_weather tool.", tools=[tool])
    assert call["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(call["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Oslo", "unit": "celsius"}
    anthropic = _ask(mock, "ref", "Compute 12 * 11. Reply with the number only.", path=MESSAGES)
    assert anthropic["content"] == [{"type": "text", "text": "132"}]
    assert _ask(mock, "ref", PROMPT)["choices"][0]["message"]["content"] == EIGHT  # not a probe prompt
    assert _ask(mock, "other", "Compute 12 * 11. Reply with the number only.")["choices"][0]["message"][
        "content"] == EIGHT  # no persona for this model


def test_persona_substitute_and_broken_tools(mock: httpx.Client) -> None:
    configure(mock, models={"sub": {"persona": "substitute"}, "tools": {"persona": "broken_tools",
                                                                      "tool_break_rate": 1.0}})
    answers = [_ask(mock, "sub", "Compute 40 + 2. Reply with the number only.")["choices"][0]["message"]["content"]
               for _ in range(40)]
    assert "42" in answers and set(answers) != {"42"}  # wrong now and then
    assert _ask(mock, "sub", "Compute 40 + 2. Reply with the number only.")["model"] == "sub"  # same name
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    for _ in range(5):
        call = _ask(mock, "tools", "What is the weather in Lima in fahrenheit? Use the get_weather tool.",
                    tools=[tool])["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        assert call != json.dumps({"city": "Lima", "unit": "fahrenheit"})


def test_persona_config_is_checked(mock: httpx.Client) -> None:
    assert mock.post("/_mock/config", json={"persona": "gpt-5"}).status_code == 400
    assert mock.post("/_mock/config", json={"tool_break_rate": 1.5}).status_code == 400
    configure(mock, persona="reference", tool_break_rate=0.5)


# ---- OpenAI Responses API, Anthropic count_tokens, thinking ---------------------------------------------

RESPONSES = "/v1/responses"


def test_responses_non_stream_usage_and_stored(mock: httpx.Client) -> None:
    body = {"model": "resp-model", "input": PROMPT, "max_output_tokens": 3, "reasoning": {"effort": "low"},
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k"}
    answer = mock.post(RESPONSES, json=body).json()
    assert answer["object"] == "response" and answer["status"] == "incomplete"
    assert answer["output"][0]["content"][0]["text"] == "tok1 tok2 tok3 "
    assert answer["usage"]["input_tokens"] == 7 and answer["usage"]["output_tokens"] == 3
    stored = mock.get(f"{RESPONSES}/{answer['id']}").json()
    assert stored["id"] == answer["id"]
    assert mock.delete(f"{RESPONSES}/{answer['id']}").json()["deleted"] is True
    assert mock.get(f"{RESPONSES}/{answer['id']}").status_code == 404
    unstored = mock.post(RESPONSES, json={**body, "store": False}).json()
    assert mock.get(f"{RESPONSES}/{unstored['id']}").status_code == 404
    posts = [r for r in mock.get("/_mock/requests").json() if r["method"] == "POST"]
    assert posts[-1]["store"] is False


def test_responses_stream_events_and_tool_call(mock: httpx.Client) -> None:
    text = stream_text(mock, RESPONSES, {"model": "resp-s", "input": [{"role": "user", "content": PROMPT}],
                                         "stream": True})
    events = [(name, json.loads(data)) for name, data in sse_events(text)]
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-1] == "response.completed" and names.count("response.output_text.delta") == 8
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 8
    configure(mock, models={"resp-tool": {"tool_call": "get_weather", "thinking": True, "reasoning_tokens": 2}})
    answer = mock.post(RESPONSES, json={"model": "resp-tool", "input": "x"}).json()
    assert [item["type"] for item in answer["output"]] == ["reasoning", "function_call"]
    assert answer["output"][1]["arguments"] == '{"city": "Paris"}'
    assert answer["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    text = stream_text(mock, RESPONSES, {"model": "resp-tool", "input": "x", "stream": True})
    deltas = [json.loads(d)["delta"] for n, d in sse_events(text) if n == "response.function_call_arguments.delta"]
    assert "".join(deltas) == '{"city": "Paris"}'


def test_count_tokens_and_headers_recorded(mock: httpx.Client) -> None:
    response = mock.post(MESSAGES + "/count_tokens", json={"model": "claude-c", "messages": [
        {"role": "user", "content": PROMPT}]}, headers={"anthropic-beta": "a-1,b-2"})
    assert response.json() == {"input_tokens": 7}
    record = mock.get("/_mock/requests").json()[-1]
    assert record["anthropic_beta"] == "a-1,b-2" and "anthropic-beta" in record["headers"]


def test_thinking_blocks_in_messages_and_chat(mock: httpx.Client) -> None:
    configure(mock, models={"think": {"thinking": True}})
    answer = mock.post(MESSAGES, json=chat_body("think", max_tokens=2)).json()
    assert [b["type"] for b in answer["content"]] == ["thinking", "redacted_thinking", "text"]
    assert answer["content"][0]["signature"]
    text = stream_text(mock, MESSAGES, chat_body("think", max_tokens=2, stream=True))
    deltas = [json.loads(d)["delta"]["type"] for n, d in sse_events(text) if n == "content_block_delta"]
    assert deltas == ["thinking_delta", "signature_delta", "text_delta", "text_delta"]
    chat = mock.post(CHAT, json=chat_body("think")).json()
    assert chat["choices"][0]["message"]["reasoning_content"]
    # what a client sends back is recorded: its thinking signatures
    mock.post(MESSAGES, json={"model": "think", "max_tokens": 5, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": answer["content"]},
        {"role": "user", "content": "b"}]})
    assert mock.get("/_mock/requests").json()[-1]["thinking_signatures"] == ["sig-mock-0123456789",
                                                                            "redacted-mock-data"]

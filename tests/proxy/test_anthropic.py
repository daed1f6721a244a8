"""The Anthropic Messages API, passed through and translated both ways, over real sockets."""

from __future__ import annotations

import secrets

import httpx
import orjson
import pytest

from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_billing import PRICE, wait_usage
from tests.proxy.test_endpoints import CHAT, configure_mock, mock_requests

MESSAGES = {"max_tokens": 50, "messages": [{"role": "user", "content": "Say hello"}]}
TOOLS_OPENAI = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object", "properties": {
                                                      "city": {"type": "string"}}}}}]
TOOLS_ANTHROPIC = [{"name": "get_weather", "description": "Weather in a city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


async def model_on(factory: Factory, proxy: Server, mock: Server, api_format: str) -> tuple[str, str, int]:
    provider_id = await factory.provider(mock.url + "/v1", api_format=api_format)
    model = await factory.model(provider_id, upstream_model=f"up-{secrets.token_hex(3)}", price=PRICE)
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await factory.publish_config(proxy, key, model)
    return model, key, org_id


def events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) pairs of an Anthropic stream."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        out.append((lines.get("event", ""), orjson.loads(lines["data"])))
    return out


def openai_chunks(text: str) -> list[dict]:
    data = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [orjson.loads(d) for d in data[:-1]]


async def test_messages_pass_through_to_anthropic_providers(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    model, key, org_id = await model_on(factory, proxy, mock_upstream, "anthropic")
    auth = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    resp = await client.post(proxy.url + "/v1/messages", headers=auth, json={"model": model, **MESSAGES})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["type"] == "message" and body["content"][0]["type"] == "text"
    seen = [r for r in await mock_requests(mock_upstream) if r["path"] == "/v1/messages"]
    assert seen[-1]["model"].startswith("up-") and seen[-1]["anthropic_version"] == "2023-06-01"

    streamed = await client.post(proxy.url + "/v1/messages", headers=auth,
                                 json={"model": model, **MESSAGES, "stream": True})
    names = [name for name, _ in events(streamed.text)]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "content_block_delta" in names

    records = await wait_usage(db, org_id, 2)
    assert {(r["prompt_tokens"] > 0, r["completion_tokens"]) for r in records} == {(True, 8)}
    assert all(r["cost_micros"] > 0 for r in records)


async def test_openai_client_served_by_anthropic_provider(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    model, key, org_id = await model_on(factory, proxy, mock_upstream, "anthropic")
    auth = {"authorization": f"Bearer {key}"}
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=auth,
                             json={"model": model, **CHAT, "max_tokens": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"][0]["finish_reason"] == "length"  # Anthropic's max_tokens
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["prompt_tokens"] > 0
    seen = [r for r in await mock_requests(mock_upstream) if r["path"] == "/v1/messages"][-1]
    assert seen["max_tokens"] == 5 and seen["authorization"] is None

    streamed = await client.post(proxy.url + "/v1/chat/completions", headers=auth,
                                 json={"model": model, **CHAT, "stream": True,
                                       "stream_options": {"include_usage": True}})
    chunks = openai_chunks(streamed.text)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(f"tok{i} " for i in range(1, 9))
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    records = await wait_usage(db, org_id, 2)
    assert sorted(r["completion_tokens"] for r in records) == [5, 8]


async def test_anthropic_client_served_by_openai_provider(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    model, key, org_id = await model_on(factory, proxy, mock_upstream, "openai")
    auth = {"x-api-key": key}
    resp = await client.post(proxy.url + "/v1/messages", headers=auth,
                             json={"model": model, **MESSAGES, "system": "Be brief."})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["type"] == "message" and body["stop_reason"] == "end_turn"
    assert body["usage"]["output_tokens"] == 8
    streamed = await client.post(proxy.url + "/v1/messages", headers=auth,
                                 json={"model": model, **MESSAGES, "stream": True})
    evs = events(streamed.text)
    assert evs[0][0] == "message_start" and evs[-1][0] == "message_stop"
    delta = next(data for name, data in evs if name == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 8
    records = await wait_usage(db, org_id, 2)
    assert [r["completion_tokens"] for r in records] == [8, 8]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_translate_both_ways(stream: bool, client: httpx.AsyncClient, proxy: Server,
                                              mock_upstream: Server, factory: Factory) -> None:
    anthropic_model, key, _ = await model_on(factory, proxy, mock_upstream, "anthropic")
    openai_model, key2, _ = await model_on(factory, proxy, mock_upstream, "openai")
    # The mock answers every upstream model of these two routes with a tool call.
    up_a = await factory.db.fetchval("select upstream_model from routes where model = $1", anthropic_model)
    up_o = await factory.db.fetchval("select upstream_model from routes where model = $1", openai_model)
    await configure_mock(mock_upstream, {up_a: {"tool_call": "get_weather"}, up_o: {"tool_call": "get_weather"}})

    # OpenAI client -> Anthropic provider
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": anthropic_model, **CHAT, "tools": TOOLS_OPENAI, "stream": stream})
    assert resp.status_code == 200, resp.text
    if stream:
        chunks = openai_chunks(resp.text)
        calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
        assert calls[0]["function"]["name"] == "get_weather"
        arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        message = resp.json()["choices"][0]["message"]
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
        arguments = message["tool_calls"][0]["function"]["arguments"]
        finish = resp.json()["choices"][0]["finish_reason"]
    assert orjson.loads(arguments) == {"city": "Paris"} and finish == "tool_calls"

    # Anthropic client -> OpenAI provider
    resp = await client.post(proxy.url + "/v1/messages", headers={"x-api-key": key2},
                             json={"model": openai_model, **MESSAGES, "tools": TOOLS_ANTHROPIC, "stream": stream})
    assert resp.status_code == 200, resp.text
    if stream:
        evs = events(resp.text)
        start = next(d for n, d in evs if n == "content_block_start" and d["content_block"]["type"] == "tool_use")
        assert start["content_block"]["name"] == "get_weather"
        partial = "".join(d["delta"]["partial_json"] for n, d in evs
                          if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
        assert orjson.loads(partial) == {"city": "Paris"}
        stop = next(d for n, d in evs if n == "message_delta")["delta"]["stop_reason"]
    else:
        block = resp.json()["content"][0]
        assert (block["type"], block["name"], block["input"]) == ("tool_use", "get_weather", {"city": "Paris"})
        stop = resp.json()["stop_reason"]
    assert stop == "tool_use"


async def test_errors_keep_the_clients_format(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                              factory: Factory) -> None:
    model, key, _ = await model_on(factory, proxy, mock_upstream, "anthropic")
    up = await factory.db.fetchval("select upstream_model from routes where model = $1", model)
    await configure_mock(mock_upstream, {up: {"status": 400}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": model, **CHAT})
    assert resp.status_code == 400
    # OpenAI-shaped, with the upstream's message and its type mapped (the mock says api_error).
    assert resp.json()["error"]["message"] == "mock error" and resp.json()["error"]["type"] == "server_error"
    # Our own errors on /v1/messages are Anthropic-shaped.
    unauth = await client.post(proxy.url + "/v1/messages", json={"model": model, **MESSAGES})
    assert unauth.status_code == 401
    assert unauth.json()["type"] == "error" and unauth.json()["error"]["type"] == "authentication_error"
    missing = await client.post(proxy.url + "/v1/messages", headers={"x-api-key": key},
                                json={"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.json()["error"]["message"]


async def test_anthropic_provider_cannot_serve_embeddings(client: httpx.AsyncClient, proxy: Server,
                                                           mock_upstream: Server, factory: Factory, db) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1", api_format="anthropic")
    model = await factory.model(provider_id, kind="completion")
    _, key = await factory.key()
    await factory.publish_config(proxy, key, model)
    trace = f"an-{secrets.token_hex(3)}"
    resp = await client.post(proxy.url + "/v1/completions", headers={"authorization": f"Bearer {key}",
                                                                     "x-request-id": trace},
                             json={"model": model, "prompt": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_supported"
    (row,) = await wait_for_rows(db, "select * from request_logs where client_request_id = $1", trace)
    assert row["status_code"] == 400

"""The OpenAI Responses API (`/v1/responses`): passed through to providers that serve it, translated to Chat
Completions and to Anthropic Messages for the others; billed exactly like chat. Over real sockets."""

from __future__ import annotations

import secrets

import httpx
import orjson
import pytest

from tests.conftest import Factory, Server
from tests.proxy.test_billing import PRICE, wait_usage
from tests.proxy.test_endpoints import configure_mock, mock_requests

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


async def responses_model(factory: Factory, proxy: Server, mock: Server, wire: str) -> tuple[str, str, int, str]:
    """(model, key, org id, upstream model) on a provider speaking `wire`: openai-responses, openai, anthropic."""
    api_format = "anthropic" if wire == "anthropic" else "openai"
    provider_id = await factory.provider(mock.url + "/v1", api_format=api_format,
                                         responses_api=wire == "openai-responses")
    upstream = f"up-{secrets.token_hex(3)}"
    model = await factory.model(provider_id, upstream_model=upstream, price=PRICE)
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await factory.publish_config(proxy, key, model)
    return model, key, org_id, upstream


def stream_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        out.append((lines.get("event", ""), orjson.loads(lines["data"])))
    return out


def exact_cost(prompt: int, completion: int) -> int:
    return prompt * PRICE[0] // 1_000_000 + completion * PRICE[1] // 1_000_000


@pytest.mark.parametrize("wire", ["openai-responses", "openai", "anthropic"])
async def test_responses_text_stream_and_billing(wire: str, client: httpx.AsyncClient, proxy: Server,
                                                 mock_upstream: Server, worker, factory: Factory, db) -> None:
    model, key, org_id, upstream = await responses_model(factory, proxy, mock_upstream, wire)
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": model, "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}], "max_output_tokens": 5}
    resp = await client.post(proxy.url + "/v1/responses", headers=auth, json=body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["object"] == "response" and answer["status"] == "incomplete"  # cut at 5 of 8 pieces
    message = next(item for item in answer["output"] if item["type"] == "message")
    assert message["content"][0]["text"] == "tok1 tok2 tok3 tok4 tok5 "
    usage = answer["usage"]
    assert usage["output_tokens"] == 5 and usage["input_tokens"] > 0
    assert usage["cost_micros"] == exact_cost(usage["input_tokens"], 5) == int(resp.headers["x-rr-cost-micros"])

    streamed = await client.post(proxy.url + "/v1/responses", headers=auth,
                                 json={**body, "stream": True, "max_output_tokens": None})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = stream_events(streamed.text)
    names = [name for name, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert [data["type"] for _, data in events] == names
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == "".join(f"tok{i} " for i in range(1, 9))
    final = events[-1][1]["response"]["usage"]
    assert final["output_tokens"] == 8 and final["cost_micros"] == exact_cost(final["input_tokens"], 8)

    seen = [r for r in await mock_requests(mock_upstream) if r["model"] == upstream]
    expected_path = {"openai-responses": "/v1/responses", "openai": "/v1/chat/completions",
                     "anthropic": "/v1/messages"}[wire]
    assert {r["path"] for r in seen} == {expected_path}
    if wire == "openai-responses":
        assert all(r["store"] is False for r in seen)  # the relay's credential: nothing stored upstream
        assert seen[-1]["max_output_tokens"] == 4096  # the cap reserved for, forwarded
    elif wire == "openai":
        assert seen[-1]["max_completion_tokens"] == 4096 and seen[-1]["stream_options"] == {"include_usage": True}
        assert seen[0]["messages"] == ["system", "user"]
    records = await wait_usage(db, org_id, 2)
    assert sorted(r["completion_tokens"] for r in records) == [5, 8]
    assert {r["cost_micros"] for r in records} == {usage["cost_micros"], final["cost_micros"]}


@pytest.mark.parametrize("wire", ["openai-responses", "openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_responses_function_call(wire: str, stream: bool, client: httpx.AsyncClient, proxy: Server,
                                       mock_upstream: Server, factory: Factory) -> None:
    model, key, _, upstream = await responses_model(factory, proxy, mock_upstream, wire)
    await configure_mock(mock_upstream, {upstream: {"tool_call": "get_weather"}})
    resp = await client.post(proxy.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
                             json={"model": model, "input": "Weather in Paris?", "tools": [TOOL],
                                   "tool_choice": "auto", "stream": stream})
    assert resp.status_code == 200, resp.text
    if stream:
        events = stream_events(resp.text)
        done = [d["item"] for n, d in events if n == "response.output_item.done"]
        args = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
        assert orjson.loads(args) == {"city": "Paris"}
        output = events[-1][1]["response"]["output"]
    else:
        output = resp.json()["output"]
        done = output
    call = next(item for item in done if item["type"] == "function_call")
    assert call["name"] == "get_weather" and orjson.loads(call["arguments"]) == {"city": "Paris"}
    assert call["call_id"]
    assert any(item["type"] == "function_call" for item in output)


async def test_a_tool_result_turn_translates(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                             factory: Factory) -> None:
    model, key, _, upstream = await responses_model(factory, proxy, mock_upstream, "anthropic")
    resp = await client.post(proxy.url + "/v1/responses", headers={"authorization": f"Bearer {key}"}, json={
        "model": model, "tools": [TOOL], "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        ], "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        "reasoning": {"effort": "low", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "store": False, "prompt_cache_key": "abc"})
    assert resp.status_code == 200, resp.text
    seen = [r for r in await mock_requests(mock_upstream) if r["model"] == upstream][-1]
    assert seen["messages"] == ["user", "assistant", "user"]  # tool_use, then its tool_result


async def test_stateful_fields_and_stored_responses_need_byok(client: httpx.AsyncClient, proxy: Server,
                                                              mock_upstream: Server, factory: Factory) -> None:
    model, key, _, _ = await responses_model(factory, proxy, mock_upstream, "openai-responses")
    auth = {"authorization": f"Bearer {key}"}
    resp = await client.post(proxy.url + "/v1/responses", headers=auth,
                             json={"model": model, "input": "x", "previous_response_id": "resp_123"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "stored_responses_unavailable"
    got = await client.get(proxy.url + "/v1/responses/resp_123", headers=auth)
    assert got.status_code == 404 and got.json()["error"]["code"] == "stored_responses_unavailable"
    deleted = await client.delete(proxy.url + "/v1/responses/resp_123", headers=auth)
    assert deleted.status_code == 404
    put = await client.put(proxy.url + "/v1/responses/resp_123", headers=auth)
    assert put.status_code == 405 and put.headers["allow"] == "GET, DELETE"
    background = await client.post(proxy.url + "/v1/responses", headers=auth,
                                   json={"model": model, "input": "x", "background": True})
    assert background.status_code == 400 and background.json()["error"]["param"] == "background"


async def test_stored_responses_pass_through_with_byok(client: httpx.AsyncClient, proxy: Server,
                                                       mock_upstream: Server, factory: Factory, db) -> None:
    from shared.crypto import box_from_settings, store_secret

    model, key, org_id, _ = await responses_model(factory, proxy, mock_upstream, "openai-responses")
    provider_id = await db.fetchval("select provider_id from routes where model = $1", model)
    box = box_from_settings(factory.settings.master_key_bytes, factory.settings.master_key_id)
    secret_id = await store_secret(db, box, "byok_credential", "sk-org-own")
    await db.execute("insert into org_provider_credentials (org_id, provider_id, secret_id) values ($1, $2, $3)",
                     org_id, provider_id, secret_id)
    await factory.redis.publish(factory.keys.events_channel, f"byok:{org_id}")
    auth = {"authorization": f"Bearer {key}"}
    for _ in range(50):
        created = (await client.post(proxy.url + "/v1/responses", headers=auth, json={"model": model,
                                                                                       "input": "x"})).json()
        if (await client.get(proxy.url + f"/v1/responses/{created['id']}", headers=auth)).status_code == 200:
            break
    got = await client.get(proxy.url + f"/v1/responses/{created['id']}", headers=auth)
    assert got.status_code == 200 and got.json()["id"] == created["id"]
    seen = [r for r in await mock_requests(mock_upstream) if r["method"] == "GET"]
    assert seen[-1]["authorization"] == "Bearer sk-org-own"
    assert (await client.delete(proxy.url + f"/v1/responses/{created['id']}", headers=auth)).json()["deleted"]
    assert (await client.get(proxy.url + f"/v1/responses/{created['id']}", headers=auth)).status_code == 404

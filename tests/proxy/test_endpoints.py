"""Each model endpoint answers through the proxy, as OpenAI would, over real sockets."""

from __future__ import annotations

import time

import httpx
import orjson

from tests.conftest import Factory, Server, Tenant

CHAT = {"messages": [{"role": "user", "content": "Say hello"}]}


async def configure_mock(mock: Server, models: dict) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(mock.url + "/_mock/config", json={"models": models})).raise_for_status()


async def mock_requests(mock: Server) -> list[dict]:
    async with httpx.AsyncClient() as http:
        return (await http.get(mock.url + "/_mock/requests")).json()


def sse_events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


async def test_chat_completion(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT, "max_tokens": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 5
    assert body["usage"]["prompt_tokens"] > 0
    assert len(resp.headers["x-request-id"]) >= 16


async def test_client_request_id_is_echoed_and_bad_one_replaced(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant
) -> None:
    url = proxy.url + "/v1/chat/completions"
    good = await client.post(url, headers={**tenant.auth, "x-request-id": "my-trace.123"},
                             json={"model": tenant.model, **CHAT})
    assert good.headers["x-request-id"] == "my-trace.123"
    bad = await client.post(url, headers={**tenant.auth, "x-request-id": "has spaces <script>"},
                            json={"model": tenant.model, **CHAT})
    assert bad.headers["x-request-id"] != "has spaces <script>"
    assert bad.headers["x-request-id"].isalnum()


async def test_x_api_key_header_is_accepted(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"x-api-key": tenant.api_key},
                             json={"model": tenant.model, **CHAT})
    assert resp.status_code == 200, resp.text


async def test_upstream_sees_its_model_name_and_our_credential(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db
) -> None:
    from shared.crypto import box_from_settings, store_secret

    box = box_from_settings(factory.settings.master_key_bytes, factory.settings.master_key_id)
    secret_id = await store_secret(db, box, "provider_credential", "sk-supplier-abc123")
    provider_id = await factory.provider(mock_upstream.url + "/v1", credential_secret_id=secret_id)
    model = await factory.model(provider_id, upstream_model="upstream-name-x")
    _, api_key = await factory.key()
    await factory.publish_config(proxy, api_key, model)

    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"},
                             json={"model": model, **CHAT})
    assert resp.status_code == 200, resp.text
    seen = [r for r in await mock_requests(mock_upstream) if r["model"] == "upstream-name-x"]
    assert seen and seen[-1]["authorization"] == "Bearer sk-supplier-abc123"
    assert api_key not in str(seen)  # the client's relay key never travels upstream


async def test_streaming_chat_passes_chunks_and_hides_injected_usage(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, tenant: Tenant
) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c.get("usage") is None for c in chunks), "the usage chunk we asked for leaked to the client"
    # ...but we did ask the upstream for it, to meter the stream
    seen = [r for r in await mock_requests(mock_upstream) if r["model"] == tenant.model]
    assert seen[-1]["stream_options"] == {"include_usage": True}


async def test_streaming_chat_keeps_usage_when_client_asks(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant
) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT, "stream": True,
                                   "stream_options": {"include_usage": True}})
    chunks = [orjson.loads(e) for e in sse_events(resp.text)[:-1]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] > 0


async def test_first_chunk_arrives_before_upstream_finishes(
    proxy: Server, mock_upstream: Server, tenant: Tenant
) -> None:
    await configure_mock(mock_upstream, {tenant.model: {"chunks": 5, "chunk_delay_ms": 300, "ttft_ms": 50}})
    arrivals = []
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=20) as http, http.stream(
        "POST", proxy.url + "/v1/chat/completions", headers=tenant.auth,
        json={"model": tenant.model, **CHAT, "stream": True},
    ) as resp:
        assert resp.status_code == 200
        async for chunk in resp.aiter_raw():
            if b"data:" in chunk:
                arrivals.append(time.perf_counter() - started)
    total = arrivals[-1]
    assert total >= 1.2, "the mock should take about 1.5 s to stream five chunks"
    assert arrivals[0] < 0.6, f"first chunk only reached the client after {arrivals[0]:.2f} s"
    assert len(arrivals) >= 4, "chunks were coalesced instead of forwarded as they arrived"


async def test_completions_plain_and_streaming(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    url = proxy.url + "/v1/completions"
    plain = await client.post(url, headers=tenant.auth, json={"model": tenant.model, "prompt": "Once upon"})
    assert plain.status_code == 200, plain.text
    assert plain.json()["object"] == "text_completion"
    streamed = await client.post(url, headers=tenant.auth,
                                 json={"model": tenant.model, "prompt": ["a", "b"], "stream": True})
    assert streamed.status_code == 200
    assert sse_events(streamed.text)[-1] == "[DONE]"


async def test_embeddings(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id, kind="embedding")
    _, api_key = await factory.key()
    await factory.publish_config(proxy, api_key, model)
    auth = {"authorization": f"Bearer {api_key}"}
    resp = await client.post(proxy.url + "/v1/embeddings", headers=auth, json={"model": model, "input": ["a", "b"]})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 2
    # An embedding model is not a chat model.
    wrong = await client.post(proxy.url + "/v1/chat/completions", headers=auth, json={"model": model, **CHAT})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "model_not_supported"


async def test_answer_larger_than_a_megabyte_is_relayed_whole(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    """Past the upstream client's back-pressure mark (1 MiB), a non-streamed answer still arrives whole."""
    model = await factory.model(await factory.provider(mock_upstream.url + "/v1"), kind="embedding")
    _, api_key = await factory.key()
    await factory.publish_config(proxy, api_key, model)
    inputs = [f"item {i}" for i in range(30_000)]
    resp = await client.post(proxy.url + "/v1/embeddings", headers={"authorization": f"Bearer {api_key}"},
                             json={"model": model, "input": inputs}, timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    assert len(resp.content) > 2 * 1024 * 1024
    assert [d["index"] for d in resp.json()["data"]] == list(range(30_000))


async def test_models_lists_only_what_the_key_may_use(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory
) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    allowed = await factory.model(provider_id)
    hidden = await factory.model(provider_id)
    _, open_key = await factory.key()
    _, narrow_key = await factory.key(allowed_models=[allowed])
    await factory.publish_config(proxy, open_key, hidden)

    def ids(resp: httpx.Response) -> set[str]:
        assert resp.status_code == 200
        assert resp.json()["object"] == "list"
        return {m["id"] for m in resp.json()["data"]}

    assert {allowed, hidden} <= ids(await client.get(proxy.url + "/v1/models",
                                                     headers={"authorization": f"Bearer {open_key}"}))
    narrow = ids(await client.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {narrow_key}"}))
    assert narrow == {allowed}
    # ...and the hidden model is refused exactly like a model that doesn't exist.
    refused = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {narrow_key}"},
                                json={"model": hidden, **CHAT})
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"


async def test_health_and_readiness(client: httpx.AsyncClient, proxy: Server, tenant: Tenant,
                                    factory: Factory) -> None:
    assert (await client.get(proxy.url + "/healthz")).json() == {"status": "ok"}
    ready = await client.get(proxy.url + "/readyz")
    assert ready.status_code == 200
    before = ready.json()
    assert before["checks"] == {"postgres": True, "redis": True}
    assert 0 < before["catalogue_loaded_at"] <= before["time"]
    await factory.publish_config(proxy, tenant.api_key, tenant.model)  # a reload after the call, by its clock
    after = (await client.get(proxy.url + "/readyz")).json()
    assert after["catalogue_loaded_at"] >= before["time"] > before["catalogue_loaded_at"]

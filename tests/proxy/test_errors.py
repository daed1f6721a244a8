"""Every failure a client can meet gets an OpenAI-style error body with the right status."""

from __future__ import annotations

import httpx
import pytest

from shared.embedded import free_port
from tests.conftest import Factory, Server, Tenant
from tests.proxy.test_endpoints import CHAT, configure_mock


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers.get("x-request-id")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer not-a-relay-key"}, "invalid_api_key"),
        ({"authorization": "Basic abc"}, "missing_api_key"),
        ({"authorization": "Bearer rr-abcdefgh_" + "x" * 32}, "invalid_api_key"),
    ],
)
async def test_bad_keys_get_401(client: httpx.AsyncClient, proxy: Server, tenant: Tenant,
                                headers: dict, code: str) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=headers, json={"model": tenant.model, **CHAT})
    assert_error(resp, 401, code)


async def test_right_prefix_wrong_secret_is_401(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    forged = tenant.api_key[:-4] + ("AAAA" if not tenant.api_key.endswith("AAAA") else "BBBB")
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {forged}"},
                             json={"model": tenant.model, **CHAT})
    assert_error(resp, 401, "invalid_api_key")


async def test_unknown_model_is_404(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": "no-such-model", **CHAT})
    assert_error(resp, 404, "model_not_found", "model")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "x", "messages": [', None),
        (b"not json at all", None),
        (b'["an", "array"]', None),
        (b'{"model": 42, "messages": [{}]}', "model"),
        (b'{"model": "m", "messages": "hello"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m"}', None),
        (b'{"model": "m", "messages": [{}], "stream": "yes"}', "stream"),
        (b'{"model": "m", "messages": [{}], "max_tokens": -1}', "max_tokens"),
        (b'{"model": "m", "messages": [{}], "max_tokens": "10"}', "max_tokens"),
    ],
)
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, proxy: Server, tenant: Tenant,
                                        body: bytes, param: str | None) -> None:
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth, content=body)
    error = assert_error(resp, 400, param=param)
    assert error["type"] == "invalid_request_error"


async def test_body_over_limit_is_413(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    big = {"model": tenant.model, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth, json=big)
    assert_error(resp, 413, "request_too_large")


async def test_body_over_limit_without_content_length_is_413(
    client: httpx.AsyncClient, proxy: Server, tenant: Tenant
) -> None:
    async def chunked():
        for _ in range(20):
            yield b"x" * 100_000

    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth, content=chunked())
    assert_error(resp, 413, "request_too_large")


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    resp = await client.get(proxy.url + "/v1/chat/completions", headers=tenant.auth)
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["allow"] == "POST"
    resp = await client.delete(proxy.url + "/v1/models", headers=tenant.auth)
    assert_error(resp, 405)
    assert resp.headers["allow"] == "GET"


async def test_unknown_path_is_404(client: httpx.AsyncClient, proxy: Server, tenant: Tenant) -> None:
    assert_error(await client.post(proxy.url + "/v1/nope", headers=tenant.auth), 404, "unknown_url")


async def test_upstream_5xx_is_502(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                   tenant: Tenant) -> None:
    await configure_mock(mock_upstream, {tenant.model: {"status": 500}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT})
    error = assert_error(resp, 502, "upstream_error")
    assert "mock error" not in error["message"]  # the upstream's own message is not relayed


async def test_upstream_refusing_connections_is_502(client: httpx.AsyncClient, proxy: Server,
                                                    factory: Factory) -> None:
    provider_id = await factory.provider(f"http://127.0.0.1:{free_port()}/v1")
    model = await factory.model(provider_id)
    _, key = await factory.key()
    await factory.publish_config(proxy, key, model)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": model, **CHAT})
    assert_error(resp, 502, "upstream_error")


async def test_upstream_timeout_is_504(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                       factory: Factory) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1", read_timeout_ms=500)
    model = await factory.model(provider_id)
    _, key = await factory.key()
    await factory.publish_config(proxy, key, model)
    await configure_mock(mock_upstream, {model: {"hang": True}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": model, **CHAT})
    assert_error(resp, 504, "upstream_timeout")


async def test_upstream_rejecting_our_credential_is_502_without_details(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, tenant: Tenant
) -> None:
    await configure_mock(mock_upstream, {tenant.model: {"status": 401}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT})
    assert_error(resp, 502, "upstream_auth_failed")


async def test_upstream_400_passes_through(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                           tenant: Tenant) -> None:
    await configure_mock(mock_upstream, {tenant.model: {"status": 400}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "mock error"


async def test_upstream_stream_breaking_midway_ends_with_sse_error(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, tenant: Tenant
) -> None:
    await configure_mock(mock_upstream, {tenant.model: {"chunks": 6, "fail_after_chunks": 2}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                             json={"model": tenant.model, **CHAT, "stream": True})
    assert resp.status_code == 200  # the status was sent with the first bytes
    events = [e for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert '"error"' in events[-1]
    assert "[DONE]" not in resp.text

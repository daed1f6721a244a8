"""Client routing controls (`models` fallbacks, `provider` preferences, the longer-context fallback) and the
client headers forwarded upstream (an allow-list, validated). Over real sockets, plus the pure rules."""

from __future__ import annotations

import secrets

import httpx
import msgspec

from proxy.endpoints import ProviderPreferences
from proxy.health import CircuitBreakers, RouteStats
from proxy.routing import Attempt, Route, apply_preferences
from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_endpoints import CHAT, configure_mock, mock_requests


async def _models(factory: Factory, proxy: Server, mock: Server, *prices: tuple[int, int]) -> tuple[list[str], str,
                                                                                                    int]:
    names = []
    for price in prices:
        provider_id = await factory.provider(mock.url + "/v1")
        names.append(await factory.model(provider_id, upstream_model=f"up-{secrets.token_hex(3)}", price=price))
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    for name in names:
        await factory.publish_config(proxy, key, name)
    return names, key, org_id


async def _upstream_of(db, model: str) -> str:
    return await db.fetchval("select upstream_model from routes where model = $1", model)


async def test_models_fall_back_and_bill_the_fallbacks_price(client: httpx.AsyncClient, proxy: Server,
                                                             mock_upstream: Server, worker, factory: Factory,
                                                             db) -> None:
    (a, b), key, org_id = await _models(factory, proxy, mock_upstream, (1_000_000, 2_000_000),
                                        (30_000_000, 60_000_000))
    await configure_mock(mock_upstream, {await _upstream_of(db, a): {"status": 500}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": a, "models": [a, b], **CHAT, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert usage["cost_micros"] == -(-(usage["prompt_tokens"] * 30_000_000 + 4 * 60_000_000) // 1_000_000)
    record = (await wait_for_rows(db, "select model, cost_micros, price_id from usage_records where org_id = $1",
                                  org_id))[0]
    assert record["model"] == b and record["cost_micros"] == usage["cost_micros"]
    assert record["price_id"] == await db.fetchval("select id from model_prices where model = $1", b)


async def test_routing_fields_never_reach_the_upstream(client: httpx.AsyncClient, proxy: Server,
                                                       mock_upstream: Server, factory: Factory, db) -> None:
    (a,), key, _ = await _models(factory, proxy, mock_upstream, (1_000_000, 2_000_000))
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": a, "models": [a], "provider": {"sort": "latency"}, **CHAT})
    assert resp.status_code == 200, resp.text
    seen = (await mock_requests(mock_upstream))[-1]
    assert seen["model"] == await _upstream_of(db, a) and {"models", "provider"}.isdisjoint(seen["body_keys"])
    unknown = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                json={"model": a, "provider": {"favourite": "x"}, **CHAT})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "provider"
    nobody = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                               json={"model": a, "provider": {"only": ["nobody"]}, **CHAT})
    assert nobody.status_code == 400 and nobody.json()["error"]["code"] == "no_matching_provider"
    bad_name = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                 json={"model": a, "models": ["x\u0000"], **CHAT})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "models"
    unknown_model = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                      json={"model": a, "models": ["no-such-model"], **CHAT})
    assert unknown_model.status_code == 404


async def test_a_context_length_error_falls_back_to_the_next_model(client: httpx.AsyncClient, proxy: Server,
                                                                   mock_upstream: Server, factory: Factory,
                                                                   db) -> None:
    (small, large), key, _ = await _models(factory, proxy, mock_upstream, (1_000_000, 2_000_000),
                                           (2_000_000, 4_000_000))
    await configure_mock(mock_upstream, {await _upstream_of(db, small): {"status": 400}})
    # The mock's forced 400 is not a context error: no fallback, the client sees it.
    plain = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": small, "models": [large], **CHAT})
    assert plain.status_code == 400
    # A real context-length error (the mock's `context_limit`): the next model, named by the client, serves.
    await configure_mock(mock_upstream, {await _upstream_of(db, small): {"context_limit": 1}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": small, "models": [large], **CHAT, "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["cost_micros"] == -(-(resp.json()["usage"]["prompt_tokens"] * 2_000_000
                                                      + 3 * 4_000_000) // 1_000_000)
    alone = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": small, **CHAT})
    assert alone.status_code == 400 and "context length" in alone.json()["error"]["message"]


def test_provider_preferences_order_only_ignore_and_sort() -> None:
    def route(i: int, provider: str) -> Route:
        return Route(id=i, model="m", provider_id=i, provider=provider, api_format="openai", base_url="http://x",
                     upstream_model="m", credential=None, connect_timeout_s=1, read_timeout_s=1, priority=0,
                     weight=1, status="active")

    attempts = [Attempt(route(i, name), None, False) for i, name in enumerate(["a", "b", "c", "d"])]
    stats = RouteStats()
    names = lambda kept: [a.route.provider for a in kept]  # noqa: E731
    prefs = msgspec.convert
    assert names(apply_preferences(attempts, prefs({"order": ["c", "a"]}, ProviderPreferences), stats)) == [
        "c", "a", "b", "d"]
    assert names(apply_preferences(attempts, prefs({"order": ["c"], "allow_fallbacks": False},
                                                   ProviderPreferences), stats)) == ["c"]
    assert names(apply_preferences(attempts, prefs({"only": ["b", "d"]}, ProviderPreferences), stats)) == ["b", "d"]
    assert names(apply_preferences(attempts, prefs({"ignore": ["a"]}, ProviderPreferences), stats)) == [
        "b", "c", "d"]
    stats.observe(2, 0.5, 100, 1.0)
    stats.observe(1, 0.1, 10, 1.0)
    assert names(apply_preferences(attempts, prefs({"sort": "latency"}, ProviderPreferences), stats)) == [
        "b", "c", "a", "d"]
    assert names(apply_preferences(attempts, prefs({"sort": "throughput"}, ProviderPreferences), stats)) == [
        "c", "b", "a", "d"]
    assert CircuitBreakers(threshold=1, cooldown_s=1).allows(1, 0.0)


async def test_allow_listed_headers_are_forwarded_checked_and_nothing_else(client: httpx.AsyncClient,
                                                                           proxy: Server, mock_upstream: Server,
                                                                           factory: Factory) -> None:
    from tests.proxy.test_anthropic import MESSAGES, model_on

    model, key, _ = await model_on(factory, proxy, mock_upstream, "anthropic")
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "a-2025-01-01, b-2",
               "x-secret-header": "s", "connection": "keep-alive, x-secret-header", "keep-alive": "timeout=5",
               "te": "trailers", "openai-beta": "responses=v1", "cookie": "c=1"}
    resp = await client.post(proxy.url + "/v1/messages?beta=true", headers=headers,
                             json={"model": model, **MESSAGES})
    assert resp.status_code == 200, resp.text
    seen = (await mock_requests(mock_upstream))[-1]
    assert seen["anthropic_beta"] == "a-2025-01-01, b-2" and seen["anthropic_version"] == "2023-06-01"
    assert seen["openai_beta"] is None  # OpenAI's header goes to OpenAI-format providers only
    assert set(seen["headers"]) <= {"host", "content-length", "content-type", "accept-encoding", "anthropic-version",
                                    "anthropic-beta", "x-api-key"}
    for bad in ({"anthropic-beta": "a\u00e9".encode("latin-1")}, {"anthropic-beta": "a b"},
                {"anthropic-version": "latest"}, {"anthropic-beta": "x" * 200}):
        refused = await client.post(proxy.url + "/v1/messages", headers={"x-api-key": key, **bad},
                                    json={"model": model, **MESSAGES})
        assert refused.status_code == 400, bad
        assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "invalid_request_error"
    # Towards an OpenAI-format provider: OpenAI-Beta goes, the Anthropic ones do not.
    openai_model, openai_key, _ = await model_on(factory, proxy, mock_upstream, "openai")
    resp = await client.post(proxy.url + "/v1/chat/completions", json={"model": openai_model, **CHAT},
                             headers={"authorization": f"Bearer {openai_key}", "openai-beta": "assistants=v2",
                                      "anthropic-beta": "x-1"})
    assert resp.status_code == 200
    seen = (await mock_requests(mock_upstream))[-1]
    assert seen["openai_beta"] == "assistants=v2" and seen["anthropic_beta"] is None
    # The answer carries none of the upstream's headers but its content type.
    assert "server" not in resp.headers or resp.headers["server"] != "granian-mock"

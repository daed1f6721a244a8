"""Failover across routes, circuit breakers, weighted selection and BYOK, over real sockets."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter

import httpx
import pytest

from shared.crypto import box_from_settings, store_secret
from shared.embedded import free_port
from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_billing import wait_usage
from tests.proxy.test_endpoints import CHAT, configure_mock, mock_requests


class TwoRoutes:
    """A model with route A (priority 10) and route B (priority 0), on the shared mock by default."""

    def __init__(self, model: str, key: str, org_id: int, a: str, b: str, route_a: int, route_b: int) -> None:
        self.model, self.key, self.org_id = model, key, org_id
        self.a, self.b = a, b  # upstream model names, to tell the routes apart in the mock's records
        self.route_a, self.route_b = route_a, route_b

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}


async def two_routes(factory: Factory, proxy: Server, mock: Server, *, a_url: str | None = None,
                     a_timeout_ms: int | None = None, same_priority: bool = False,
                     weights: tuple[int, int] = (100, 100)) -> TwoRoutes:
    tag = secrets.token_hex(3)
    extra = {"read_timeout_ms": a_timeout_ms} if a_timeout_ms else {}
    provider_a = await factory.provider(a_url or mock.url + "/v1", **extra)
    provider_b = await factory.provider(mock.url + "/v1")
    model = await factory.model(provider_a, upstream_model=f"a-{tag}", priority=0 if same_priority else 10,
                                weight=weights[0])
    route_a = await factory.db.fetchval("select id from routes where model = $1", model)
    route_b = await factory.route(model, provider_b, f"b-{tag}", priority=0, weight=weights[1])
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await factory.publish_config(proxy, key, model)
    return TwoRoutes(model, key, org_id, f"a-{tag}", f"b-{tag}", route_a, route_b)


async def seen(mock: Server, upstream_model: str) -> int:
    return sum(1 for r in await mock_requests(mock) if r["model"] == upstream_model)


async def _record(db, trace: str) -> dict:
    (row,) = await wait_for_rows(db, "select * from request_logs where client_request_id = $1", trace)
    return dict(row)


@pytest.mark.parametrize("failure", ["status_500", "timeout", "refused", "status_429"])
async def test_failover_to_the_next_route(failure: str, client: httpx.AsyncClient, proxy: Server,
                                          mock_upstream: Server, worker, factory: Factory, db) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    r = await two_routes(factory, proxy, mock_upstream, a_url=closed if failure == "refused" else None,
                         a_timeout_ms=400 if failure == "timeout" else None)
    behaviour = {"status_500": {"status": 500}, "timeout": {"hang": True}, "status_429": {"status": 429}}
    if failure in behaviour:
        await configure_mock(mock_upstream, {r.a: behaviour[failure]})
    trace = f"fo-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**r.auth, "x-request-id": trace},
                             json={"model": r.model, **CHAT})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == r.b  # one normal answer, from B
    record = await _record(db, trace)
    assert (record["attempts"], record["route_id"], record["upstream_model"]) == (2, r.route_b, r.b)
    assert record["reported_model"] == r.b
    (usage,) = await wait_usage(db, r.org_id, 1)  # charged once: B's answer only
    assert usage["route_id"] == r.route_b


async def test_failover_works_for_streams_before_the_first_byte(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    r = await two_routes(factory, proxy, mock_upstream)
    await configure_mock(mock_upstream, {r.a: {"status": 503}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=r.auth,
                             json={"model": r.model, **CHAT, "stream": True})
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
    assert f'"model":"{r.b}"' in resp.text


async def test_all_routes_failing_is_502_after_bounded_attempts(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db,
) -> None:
    r = await two_routes(factory, proxy, mock_upstream)
    await configure_mock(mock_upstream, {r.a: {"status": 500}, r.b: {"status": 502}})
    trace = f"fo-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**r.auth, "x-request-id": trace},
                             json={"model": r.model, **CHAT})
    assert resp.status_code == 502
    assert (await _record(db, trace))["attempts"] == 2


async def test_circuit_breaker_opens_and_closes_after_recovery(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db,
) -> None:
    r = await two_routes(factory, proxy, mock_upstream)  # test settings: threshold 3, cool-down 1 s
    await configure_mock(mock_upstream, {r.a: {"status": 500}})
    url = proxy.url + "/v1/chat/completions"
    for _ in range(3):
        assert (await client.post(url, headers=r.auth, json={"model": r.model, **CHAT})).status_code == 200
    assert await seen(mock_upstream, r.a) == 3
    # Open: A is skipped, so requests go straight to B.
    for _ in range(5):
        trace = f"cb-{secrets.token_hex(4)}"
        resp = await client.post(url, headers={**r.auth, "x-request-id": trace}, json={"model": r.model, **CHAT})
        assert resp.status_code == 200
        assert (await _record(db, trace))["attempts"] == 1
    assert await seen(mock_upstream, r.a) == 3
    # A recovers; after the cool-down one probe goes to A, succeeds, and A takes the traffic again.
    await configure_mock(mock_upstream, {})
    await asyncio.sleep(1.1)
    for _ in range(4):
        resp = await client.post(url, headers=r.auth, json={"model": r.model, **CHAT})
        assert resp.json()["model"] == r.a
    assert await seen(mock_upstream, r.a) == 3 + 4


async def test_single_route_with_open_breaker_fails_fast_with_503(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id)
    _, key = await factory.key()
    await factory.publish_config(proxy, key, model)
    await configure_mock(mock_upstream, {model: {"status": 500}})
    auth = {"authorization": f"Bearer {key}"}
    statuses = [(await client.post(proxy.url + "/v1/chat/completions", headers=auth,
                                   json={"model": model, **CHAT})).status_code for _ in range(5)]
    assert statuses == [502, 502, 502, 503, 503]
    assert await seen(mock_upstream, model) == 3


async def test_weighted_selection_follows_the_weights(proxy: Server, mock_upstream: Server, factory: Factory) -> None:
    r = await two_routes(factory, proxy, mock_upstream, same_priority=True, weights=(70, 30))
    await configure_mock(mock_upstream, {})
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as http:
        counts: Counter[str] = Counter()
        for _ in range(20):
            batch = await asyncio.gather(*(http.post(proxy.url + "/v1/chat/completions", headers=r.auth,
                                                     json={"model": r.model, **CHAT}) for _ in range(100)))
            counts.update(resp.json()["model"] for resp in batch)
    assert counts[r.a] + counts[r.b] == 2000
    share = counts[r.a] / 2000
    assert abs(share - 0.70) < 0.04, counts


async def test_degraded_routes_are_used_only_after_active_ones(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    r = await two_routes(factory, proxy, mock_upstream, same_priority=True, weights=(1000, 1))
    await factory.db.execute("update routes set status = 'degraded' where id = $1", r.route_a)
    await factory.publish_config(proxy, r.key, r.model)
    models = {(await client.post(proxy.url + "/v1/chat/completions", headers=r.auth,
                                 json={"model": r.model, **CHAT})).json()["model"] for _ in range(10)}
    assert models == {r.b}


async def _byok_setup(factory: Factory, proxy: Server, mock: Server, db, settings, *, fee: int):
    """An org with its own key for provider A; our supplier key on both providers."""
    box = box_from_settings(settings.master_key_bytes, settings.master_key_id)
    ours = await store_secret(db, box, "provider_credential", "sk-ours-SUPPLIER-0001", hint="0001")
    r = await two_routes(factory, proxy, mock)
    provider_a = await db.fetchval("select provider_id from routes where id = $1", r.route_a)
    await db.execute("update providers set credential_secret_id = $1 where id in "
                     "(select provider_id from routes where model = $2)", ours, r.model)  # our key on A and B
    theirs = await store_secret(db, box, "byok_credential", "sk-org-OWN-KEY-9999", org_id=r.org_id, hint="9999")
    await db.execute("insert into org_provider_credentials (org_id, provider_id, secret_id) values ($1, $2, $3)",
                     r.org_id, provider_a, theirs)
    await db.execute(
        """update model_prices set byok_input_micros_per_mtok = 0, byok_output_micros_per_mtok = 0,
                                   byok_request_micros = $2 where model = $1""", r.model, fee)
    await factory.publish_config(proxy, r.key, r.model)
    return r


async def test_byok_request_uses_the_orgs_key_and_its_price_rule(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db, settings,
) -> None:
    r = await _byok_setup(factory, proxy, mock_upstream, db, settings, fee=1_500)
    trace = f"byok-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**r.auth, "x-request-id": trace},
                             json={"model": r.model, **CHAT})
    assert resp.status_code == 200
    seen_auth = [x["authorization"] for x in await mock_requests(mock_upstream) if x["model"] == r.a]
    assert seen_auth == ["Bearer sk-org-OWN-KEY-9999"]
    (usage,) = await wait_usage(db, r.org_id, 1)
    assert usage["byok"] is True and usage["cost_micros"] == 1_500  # the platform fee, not token prices
    assert (await _record(db, trace))["byok"] is True


async def test_rejected_byok_key_is_named_and_never_replaced_by_ours(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db, settings,
) -> None:
    r = await _byok_setup(factory, proxy, mock_upstream, db, settings, fee=0)
    await configure_mock(mock_upstream, {r.a: {"status": 401}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=r.auth, json={"model": r.model, **CHAT})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "byok_credential_rejected" and "BYOK" in error["message"]
    assert "sk-" not in resp.text and "9999" not in resp.text and "SUPPLIER" not in resp.text
    assert await seen(mock_upstream, r.b) == 0  # no silent fallback to our credential on route B
    for secret in ("sk-org-OWN-KEY-9999", "sk-ours-SUPPLIER-0001"):
        assert secret not in proxy.log()  # nor in any log line


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("failure", ["break_after_headers", "stall_after_headers"])
async def test_failover_after_the_headers_until_the_client_has_a_byte(
    failure: str, stream: bool, client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker,
    factory: Factory, db,
) -> None:
    """200 and headers, then the body breaks (or stalls past the read timeout): nothing reached the client
    yet, so the request fails over; a non-streamed answer until its body is whole, a stream until its first
    bytes. Only the answering route is charged."""
    r = await two_routes(factory, proxy, mock_upstream, a_timeout_ms=400)
    await configure_mock(mock_upstream, {r.a: {failure: True}})
    trace = f"fo-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**r.auth, "x-request-id": trace},
                             json={"model": r.model, **CHAT, "stream": stream})
    assert resp.status_code == 200, resp.text
    if stream:
        assert resp.text.rstrip().endswith("data: [DONE]") and f'"model":"{r.b}"' in resp.text
    else:
        assert resp.json()["model"] == r.b
    record = await _record(db, trace)
    assert (record["attempts"], record["route_id"], record["status_code"]) == (2, r.route_b, 200)
    (usage,) = await wait_usage(db, r.org_id, 1)
    assert usage["route_id"] == r.route_b
    assert await seen(mock_upstream, r.a) == 1


async def test_failures_after_the_headers_count_against_the_routes_breaker(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db, settings,
) -> None:
    r = await two_routes(factory, proxy, mock_upstream)
    await configure_mock(mock_upstream, {r.a: {"break_after_headers": True}})
    for _ in range(settings.breaker_threshold):
        resp = await client.post(proxy.url + "/v1/chat/completions", headers=r.auth, json={"model": r.model, **CHAT})
        assert resp.status_code == 200 and resp.json()["model"] == r.b
    # The breaker of A is open now (it was counted a success before): the next request goes straight to B.
    trace = f"fo-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**r.auth, "x-request-id": trace},
                             json={"model": r.model, **CHAT})
    assert resp.status_code == 200
    assert (await _record(db, trace))["attempts"] == 1
    assert await seen(mock_upstream, r.a) == settings.breaker_threshold

"""A stored value never becomes part of an upstream request head, whoever stored it: credentials holding CR/LF,
control or non-ASCII characters are refused when sent (the control plane refuses them when stored, see
tests/control_plane/test_catalogue.py; these rows are written straight into PostgreSQL, as an old row or a
hand-made one would be), and tenants sharing one upstream pool only ever get their own answers."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import orjson

from shared.crypto import box_from_settings, store_secret
from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_endpoints import CHAT, mock_requests


def smuggling_credential(marker: str) -> str:
    """A credential that, written raw into a header, ends the request early and appends a second one."""
    body = orjson.dumps({"model": marker, "messages": [{"role": "user", "content": "smuggled"}]}).decode()
    return ("sk-x\r\ncontent-length: 0\r\n\r\nPOST /v1/chat/completions HTTP/1.1\r\nhost: upstream\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}")


async def _tenant_on(factory: Factory, proxy: Server, provider_id: int, *, byok: str | None = None,
                     settings=None) -> tuple[int, str, str, str]:
    """(org id, api key, model, upstream model) on the given provider, optionally with a raw BYOK credential."""
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    upstream = f"up-{secrets.token_hex(4)}"
    model = await factory.model(provider_id, upstream_model=upstream)
    if byok is not None:
        box = box_from_settings(settings.master_key_bytes, settings.master_key_id)
        secret = await store_secret(factory.db, box, "byok_credential", byok, org_id=org_id, hint="…")
        await factory.db.execute(
            "insert into org_provider_credentials (org_id, provider_id, secret_id) values ($1, $2, $3)",
            org_id, provider_id, secret)
    await factory.publish_config(proxy, key, model)
    return org_id, key, model, upstream


async def test_a_smuggling_byok_credential_is_never_sent_and_tenants_get_only_their_own_answers(
    proxy: Server, mock_upstream: Server, factory: Factory, settings, db,
) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1")  # one origin: one shared connection pool
    marker = f"smuggled-{secrets.token_hex(4)}"
    _, attacker_key, attacker_model, _ = await _tenant_on(factory, proxy, provider_id,
                                                          byok=smuggling_credential(marker), settings=settings)
    victim_org, victim_key, victim_model, victim_upstream = await _tenant_on(factory, proxy, provider_id)

    async def call(key: str, model: str) -> httpx.Response:
        return await http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                               json={"model": model, **CHAT})

    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=64)) as http:
        calls = [call(attacker_key, attacker_model) if i % 2 else call(victim_key, victim_model) for i in range(120)]
        answers = await asyncio.gather(*calls)
    attacker, victim = answers[1::2], answers[0::2]
    assert {r.status_code for r in attacker} == {400}
    assert {r.json()["error"]["code"] for r in attacker} == {"byok_credential_unusable"}
    assert all(r.status_code == 200 and r.json()["model"] == victim_upstream for r in victim)
    seen = await mock_requests(mock_upstream)
    assert not [r for r in seen if r["model"] == marker or "sk-x" in (r["authorization"] or "")]
    assert len([r for r in seen if r["model"] == victim_upstream]) == 60
    logged = await wait_for_rows(db, """select * from request_logs where org_id = $1 and status_code = 200
                                        and path = '/v1/chat/completions'""", victim_org, count=60)
    assert len(logged) == 60


async def test_a_non_ascii_byok_credential_is_a_400_not_a_500(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, settings,
) -> None:
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    for credential in ("sk-ключ-0123456789", "sk-\x00-0123456789", "sk-tab\there"):
        _, key, model, _ = await _tenant_on(factory, proxy, provider_id, byok=credential, settings=settings)
        resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                 json={"model": model, **CHAT})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "byok_credential_unusable"
        assert credential not in resp.text


async def test_an_unsendable_platform_credential_fails_over_to_the_next_route(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, settings, db,
) -> None:
    box = box_from_settings(settings.master_key_bytes, settings.master_key_id)
    bad = await store_secret(db, box, "provider_credential", smuggling_credential("never"), hint="…")
    broken = await factory.provider(mock_upstream.url + "/v1", credential_secret_id=bad)
    clean = await factory.provider(mock_upstream.url + "/v1")
    tag = secrets.token_hex(3)
    model = await factory.model(broken, upstream_model=f"a-{tag}", priority=10)
    await factory.route(model, clean, f"b-{tag}", priority=0)
    org_id = await factory.org()
    _, key = await factory.key(org_id)
    await factory.publish_config(proxy, key, model)
    trace = f"cred-{tag}"
    resp = await client.post(proxy.url + "/v1/chat/completions",
                             headers={"authorization": f"Bearer {key}", "x-request-id": trace},
                             json={"model": model, **CHAT})
    assert resp.status_code == 200 and resp.json()["model"] == f"b-{tag}"
    (row,) = await wait_for_rows(db, "select * from request_logs where client_request_id = $1", trace)
    assert row["attempts"] == 2
    assert not [r for r in await mock_requests(mock_upstream) if r["model"] in ("never", f"a-{tag}")]

"""Prices that match the providers' invoices, end to end: the mock upstream answers with each provider's real
usage shapes (cached tokens, cache writes of both durations, reasoning, a long-context tier, a service tier),
and every request is charged the hand-computed figure, carried on the answer and in the ledger."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import orjson
import pytest

from proxy.dialects.base import answer_with_cost as with_cost
from proxy.estimate import IMAGE_TOKENS
from shared import tokenizer
from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_billing import pg_money, wait_usage
from tests.proxy.test_endpoints import configure_mock, sse_events

OPENAI_USAGE = {"prompt_tokens": 100_000, "completion_tokens": 1_000, "total_tokens": 101_000,
                "prompt_tokens_details": {"cached_tokens": 90_000},
                "completion_tokens_details": {"reasoning_tokens": 600}}
LONG_USAGE = {"prompt_tokens": 250_000, "completion_tokens": 100, "total_tokens": 250_100,
              "prompt_tokens_details": {"cached_tokens": 50_000}}
ANTHROPIC_USAGE = {"input_tokens": 1_000, "cache_read_input_tokens": 50_000, "cache_creation_input_tokens": 12_000,
                   "cache_creation": {"ephemeral_5m_input_tokens": 10_000, "ephemeral_1h_input_tokens": 2_000},
                   "output_tokens": 2_000}


async def priced_model(factory: Factory, proxy: Server, mock: Server, key: str, *, api_format: str = "openai") -> str:
    """A model whose price version has components and tiers (µ$ per Mtok):
    OpenAI-like: $2.50 input, $1.25 cached, $10 output (reasoning defaults to output); from 200k prompt
    tokens $5 / $2.50 / $15; the flex tier at $1.25 / $0.625 / $5. Anthropic-like: $3 input, $0.30 cache
    reads, $3.75 5-minute and $6 1-hour cache writes, $15 output."""
    provider_id = await factory.provider(mock.url + "/v1", api_format=api_format)
    if api_format == "anthropic":
        model = await factory.model(provider_id, price=(3_000_000, 15_000_000))
        await factory.db.execute(
            """update model_prices set cached_input_micros_per_mtok = 300000, cache_write_5m_micros_per_mtok = 3750000,
                                       cache_write_1h_micros_per_mtok = 6000000 where model = $1""", model)
    else:
        model = await factory.model(provider_id, price=(2_500_000, 10_000_000))
        await factory.db.execute("update model_prices set cached_input_micros_per_mtok = 1250000 where model = $1",
                                 model)
        await factory.db.execute(
            """insert into model_prices (model, input_micros_per_mtok, output_micros_per_mtok,
                                         cached_input_micros_per_mtok, effective_from, service_tier, min_prompt_tokens)
               values ($1, 5000000, 15000000, 2500000, '2000-01-01', 'default', 200000),
                      ($1, 1250000, 5000000, 625000, '2000-01-01', 'flex', 0)""", model)
    await factory.publish_config(proxy, key, model)
    return model


def big_chat(model: str, tokens: int, **extra: object) -> bytes:
    """A body at least `tokens` bytes long: the reservation (every byte a token) covers the usage reported."""
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "x" * tokens}],
                         "max_tokens": 2_000, **extra})


def _usage_cost(resp_usage: dict) -> tuple[int, str]:
    return resp_usage["cost_micros"], resp_usage["cost"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_openai_cached_and_reasoning_tokens_are_billed_as_the_provider_bills_them(
    stream: bool, client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    org_id = await factory.org(balance_micros=10_000_000)
    _, key = await factory.key(org_id)
    model = await priced_model(factory, proxy, mock_upstream, key)
    await configure_mock(mock_upstream, {model: {"usage": OPENAI_USAGE}})
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    resp = await client.post(proxy.url + "/v1/chat/completions", content=big_chat(model, 100_000, **extra),
                             headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    # 10,000 × $2.50 + 90,000 × $1.25 + 1,000 × $10 (600 of them reasoning) per Mtok = 147,500 µ$
    expected = 147_500
    if stream:
        usage = orjson.loads([e for e in sse_events(resp.text) if '"usage":{' in e][-1])["usage"]
    else:
        usage = resp.json()["usage"]
        assert resp.headers["x-rr-cost-micros"] == str(expected)
    assert _usage_cost(usage) == (expected, "0.147500")
    (record,) = await wait_usage(db, org_id, 1)
    assert (record["cost_micros"], record["uncharged_micros"]) == (expected, 0)  # the hold covered it
    tokens = (record["prompt_tokens"], record["cached_input_tokens"], record["reasoning_tokens"])
    assert tokens == (100_000, 90_000, 600)
    await asyncio.sleep(0.1)
    assert await pg_money(db, org_id) == (10_000_000 - expected, 10_000_000 - expected)


async def test_long_context_and_service_tiers_take_their_own_rows(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    org_id = await factory.org(balance_micros=50_000_000)
    _, key = await factory.key(org_id)
    model = await priced_model(factory, proxy, mock_upstream, key)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    await configure_mock(mock_upstream, {model: {"usage": LONG_USAGE}})
    long_resp = await client.post(proxy.url + "/v1/chat/completions", content=big_chat(model, 250_000),
                                  headers=headers)
    # Above 200k: 200,000 × $5 + 50,000 × $2.50 + 100 × $15 = 1,126,500 µ$
    assert long_resp.json()["usage"]["cost_micros"] == 1_126_500
    await configure_mock(mock_upstream, {model: {"usage": {"prompt_tokens": 1_000, "completion_tokens": 1_000},
                                                 "service_tier": "flex"}})
    flex = await client.post(proxy.url + "/v1/chat/completions", content=big_chat(model, 1_000), headers=headers)
    assert flex.json()["usage"]["cost_micros"] == 6_250  # 1,000 × $1.25 + 1,000 × $5
    records = sorted(await wait_usage(db, org_id, 2), key=lambda r: r["cost_micros"])
    assert [(r["cost_micros"], r["service_tier"], r["uncharged_micros"]) for r in records] == [
        (6_250, "flex", 0), (1_126_500, None, 0)]  # the reservation covered both: nothing uncharged
    assert {r["price_id"] for r in records} == set(await db.fetchval(
        """select array_agg(id) from model_prices where model = $1 and
           ((service_tier = 'flex') or (min_prompt_tokens = 200000))""", model))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_cache_reads_and_both_cache_writes(
    stream: bool, client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    org_id = await factory.org(balance_micros=10_000_000)
    _, key = await factory.key(org_id)
    model = await priced_model(factory, proxy, mock_upstream, key, api_format="anthropic")
    await configure_mock(mock_upstream, {model: {"usage": ANTHROPIC_USAGE}})
    body = orjson.dumps({"model": model, "max_tokens": 3_000, "stream": stream,
                         "messages": [{"role": "user", "content": "x" * 63_000}]})
    resp = await client.post(proxy.url + "/v1/messages", content=body,
                             headers={"x-api-key": key, "content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    # 1,000 × $3 + 50,000 × $0.30 + 10,000 × $3.75 + 2,000 × $6 + 2,000 × $15 = 97,500 µ$ (not 195,000 at 1×)
    expected = 97_500
    if stream:
        datas = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
        usage = orjson.loads([d for d in datas if '"message_delta"' in d][-1])["usage"]
    else:
        usage = resp.json()["usage"]
    assert _usage_cost(usage) == (expected, "0.097500")
    (record,) = await wait_usage(db, org_id, 1)
    assert (record["cost_micros"], record["uncharged_micros"]) == (expected, 0)
    assert (record["cached_input_tokens"], record["cache_write_5m_tokens"], record["cache_write_1h_tokens"],
            record["prompt_tokens"], record["completion_tokens"]) == (50_000, 10_000, 2_000, 63_000, 2_000)


async def test_anthropic_usage_translated_to_an_openai_client_is_billed_the_same(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    org_id = await factory.org(balance_micros=10_000_000)
    _, key = await factory.key(org_id)
    model = await priced_model(factory, proxy, mock_upstream, key, api_format="anthropic")
    await configure_mock(mock_upstream, {model: {"usage": ANTHROPIC_USAGE}})
    resp = await client.post(proxy.url + "/v1/chat/completions", content=big_chat(model, 63_000),
                             headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    usage = resp.json()["usage"]
    assert (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]) == (63_000, 50_000)
    assert usage["cost_micros"] == 97_500
    (record,) = await wait_usage(db, org_id, 1)
    assert record["cost_micros"] == 97_500


async def test_a_generation_record_is_its_own_orgs_only(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    org_id = await factory.org(balance_micros=10_000_000)
    _, key = await factory.key(org_id)
    _, other_key = await factory.key(await factory.org())
    model = await priced_model(factory, proxy, mock_upstream, key)
    await configure_mock(mock_upstream, {model: {"usage": OPENAI_USAGE}})
    trace = f"gen-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", content=big_chat(model, 100_000),
                             headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                                      "x-request-id": trace})
    assert resp.headers["x-request-id"] == trace
    generation_id = resp.headers["x-rr-request-id"]
    await wait_usage(db, org_id, 1)
    await wait_for_rows(db, "select 1 from request_logs where request_id = $1", generation_id)
    own = await client.get(proxy.url + f"/v1/generations/{generation_id}", headers={"authorization": f"Bearer {key}"})
    assert own.status_code == 200, own.text
    body = own.json()
    assert (body["id"], body["model"], body["cost_micros"], body["cost"]) == (generation_id, model, 147_500, "0.147500")
    assert body["tokens"]["cached_input"] == 90_000 and body["tokens"]["reasoning"] == 600
    assert body["billed"] is True and body["estimated"] is False and body["latency_ms"] >= 0
    for who, gid in ((other_key, generation_id), (key, "0" * 24), (key, "not-an-id"), (key, generation_id[:-1] + "x")):
        resp = await client.get(proxy.url + f"/v1/generations/{gid}", headers={"authorization": f"Bearer {who}"})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "generation_not_found", (who, gid)
    assert (await client.get(proxy.url + f"/v1/generations/{generation_id}")).status_code == 401


async def test_a_cut_stream_is_estimated_with_the_models_tokenizer_and_marked(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    """No usage came (the stream broke after 3 chunks): prompt and output are counted with tiktoken's o200k
    table for a gpt-4o model, an image counts its documented allowance, not its base64 bytes."""
    org_id = await factory.org(balance_micros=10_000_000)
    _, key = await factory.key(org_id)
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id, upstream_model="gpt-4o-mini", price=(1_000_000, 1_000_000))
    await factory.publish_config(proxy, key, model)
    await configure_mock(mock_upstream, {"gpt-4o-mini": {"chunks": 10, "fail_after_chunks": 3}})
    image = "data:image/png;base64," + "A" * 40_000
    text = "Describe this picture of a lighthouse in three words."
    body = {"model": model, "stream": True, "max_tokens": 50, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": text},
                                     {"type": "image_url", "image_url": {"url": image}}]}]}
    trace = f"cut-{secrets.token_hex(4)}"
    resp = await client.post(proxy.url + "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}", "x-request-id": trace})
    assert '"error"' in resp.text  # the stream broke after its first bytes: no failover, an error event
    received = "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or "" for e in sse_events(resp.text)
                       if '"choices":[{' in e)
    assert received.startswith("tok1 ")
    tokenizer.warm("o200k_base")
    prompt = tokenizer.count("You are terse.\n" + text, "gpt-4o-mini")[0] + 3 + 3 + 3 + IMAGE_TOKENS
    output = tokenizer.count(received, "gpt-4o-mini")[0]
    (record,) = await wait_usage(db, org_id, 1)
    assert (record["prompt_tokens"], record["completion_tokens"], record["estimated"]) == (prompt, output, True)
    assert record["prompt_tokens"] < 1_000  # bytes / 4 would have been over 10,000
    (log,) = await wait_for_rows(db, "select estimated from request_logs where client_request_id = $1", trace)
    assert log["estimated"] is True


@pytest.mark.parametrize("answer", [
    b'{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}',  # spliced in place
    b'{"id": "x", "usage": {"prompt_tokens": 1}}',  # spaced: parsed and re-encoded
    b'{"id":"x","usage":{}}',  # empty usage: parsed
    b'{"a":{"usage":{"n":1}},"usage":{"prompt_tokens":1}}',  # two usage keys: parsed, the top-level one gets it
])
def test_the_cost_goes_into_the_top_level_usage_whatever_the_answers_formatting(answer: bytes) -> None:
    out = orjson.loads(with_cost(answer, None, 1_234))
    assert (out["usage"]["cost_micros"], out["usage"]["cost"]) == (1_234, "0.001234")
    assert {k: v for k, v in out["usage"].items() if not k.startswith("cost")} == orjson.loads(answer)["usage"]
    assert orjson.loads(with_cost(b'{"id":"x"}', None, 5)) == {"id": "x"}  # no usage: unchanged

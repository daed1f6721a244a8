"""The official `openai` and `anthropic` SDKs against the relay (real proxy, real mock upstream): the Responses
API, count_tokens, beta headers, thinking blocks; and the org is charged exactly what the answers say."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import Factory, Server
from tests.proxy.test_billing import wait_usage
from tests.proxy.test_endpoints import configure_mock, mock_requests
from tests.proxy.test_responses import TOOL, exact_cost, responses_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("wire", ["openai-responses", "openai", "anthropic"])
async def test_openai_sdk_responses_create_and_stream(wire: str, proxy: Server, mock_upstream: Server, worker,
                                                      factory: Factory, db) -> None:
    model, key, org_id, upstream = await responses_model(factory, proxy, mock_upstream, wire)
    client = openai.AsyncOpenAI(api_key=key, base_url=proxy.url + "/v1", max_retries=0)
    created = await client.responses.create(model=model, input="Say hello", instructions="Be brief.")
    assert created.output_text == "".join(f"tok{i} " for i in range(1, 9))
    assert created.usage is not None and created.usage.output_tokens == 8
    costs = [exact_cost(created.usage.input_tokens, 8)]

    async with client.responses.stream(model=model, input="Say hello") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == created.output_text
    assert final.usage is not None and final.usage.output_tokens == 8
    costs.append(exact_cost(final.usage.input_tokens, 8))

    await configure_mock(mock_upstream, {upstream: {"tool_call": "get_weather"}})
    called = await client.responses.create(model=model, input="Weather in Paris?", tools=[TOOL])
    call = next(item for item in called.output if item.type == "function_call")
    assert call.name == "get_weather" and call.arguments.replace(" ", "") == '{"city":"Paris"}'
    assert called.usage is not None
    costs.append(exact_cost(called.usage.input_tokens, called.usage.output_tokens))
    async with client.responses.stream(model=model, input="Weather in Paris?", tools=[TOOL]) as stream:
        streamed = await stream.get_final_response()
    call = next(item for item in streamed.output if item.type == "function_call")
    assert call.name == "get_weather" and streamed.usage is not None
    costs.append(exact_cost(streamed.usage.input_tokens, streamed.usage.output_tokens))

    records = await wait_usage(db, org_id, 4)
    assert sorted(r["cost_micros"] for r in records) == sorted(costs)
    charged = await db.fetchval("select -sum(amount_micros) from balance_transactions where org_id = $1 "
                                "and kind = 'usage'", org_id)
    assert charged == sum(costs)  # usage records and their ledger rows are written in one transaction


async def test_anthropic_sdk_count_tokens_betas_and_thinking(proxy: Server, mock_upstream: Server,
                                                             factory: Factory) -> None:
    from tests.proxy.test_anthropic import model_on

    model, key, _ = await model_on(factory, proxy, mock_upstream, "anthropic")
    client = anthropic.AsyncAnthropic(api_key=key, base_url=proxy.url, max_retries=0)
    messages = [{"role": "user", "content": "Say hello"}]
    counted = await client.messages.count_tokens(model=model, messages=messages, system="Be brief.")
    assert counted.input_tokens > 0
    seen = (await mock_requests(mock_upstream))[-1]
    assert seen["path"] == "/v1/messages/count_tokens" and seen["model"].startswith("up-")

    betas = ["interleaved-thinking-2025-05-14", "context-management-2025-06-27"]
    upstream = seen["model"]
    await configure_mock(mock_upstream, {upstream: {"thinking": True}})
    answer = await client.beta.messages.create(model=model, max_tokens=100, messages=messages, betas=betas,
                                               thinking={"type": "enabled", "budget_tokens": 1024})
    seen = (await mock_requests(mock_upstream))[-1]
    assert seen["anthropic_beta"] == ",".join(betas)
    kinds = [block.type for block in answer.content]
    assert kinds == ["thinking", "redacted_thinking", "text"]
    assert answer.content[0].signature == "sig-mock-0123456789"
    # The thinking blocks, signatures included, go back upstream unchanged with the next turn.
    again = await client.beta.messages.create(model=model, max_tokens=100, betas=betas, messages=[
        *messages, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in answer.content]},
        {"role": "user", "content": "And again"}])
    assert again.content[-1].type == "text"
    seen = (await mock_requests(mock_upstream))[-1]
    assert seen["thinking_signatures"] == ["sig-mock-0123456789", "redacted-mock-data"]


async def test_anthropic_sdk_count_tokens_is_estimated_for_openai_providers(proxy: Server, mock_upstream: Server,
                                                                            factory: Factory) -> None:
    from tests.proxy.test_anthropic import model_on

    model, key, _ = await model_on(factory, proxy, mock_upstream, "openai")
    client = anthropic.AsyncAnthropic(api_key=key, base_url=proxy.url, max_retries=0)
    before = len(await mock_requests(mock_upstream))
    text = "word " * 400
    counted = await client.messages.count_tokens(model=model, messages=[{"role": "user", "content": text}])
    # 2,000 characters at 4 per token (not an OpenAI model name), plus the framing of one message
    assert counted.input_tokens == 500 + 6
    assert len(await mock_requests(mock_upstream)) == before  # nothing sent upstream, nothing billed

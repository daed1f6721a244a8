"""Hostile request bodies get a 4xx in the client's error shape, whatever route the request takes: never a 500.

The body is decoded once at the edge (msgspec) and re-parsed (orjson) only when a route needs it rewritten
(another upstream model name, usage asked for, another wire format), so each case is sent both ways.
"""

from __future__ import annotations

import secrets

import httpx
import pytest

from proxy.endpoints import endpoint_for
from proxy.translate import TranslationError
from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_errors import assert_error

DEEP = 2000  # deeper than either decoder allows
CHAT_PATH = "/v1/chat/completions"


async def _model(factory: Factory, proxy: Server, mock: Server, *, rewrite: bool,
                 api_format: str = "openai") -> tuple[str, dict[str, str]]:
    """A model whose route passes the client's bytes through (`rewrite=False`) or renames the model."""
    provider_id = await factory.provider(mock.url + "/v1", api_format=api_format)
    model = await factory.model(provider_id, upstream_model=f"up-{secrets.token_hex(3)}" if rewrite else None)
    _, key = await factory.key()
    await factory.publish_config(proxy, key, model)
    return model, {"authorization": f"Bearer {key}", "content-type": "application/json"}


def _chat(model: str, content: bytes, extra: bytes = b"") -> bytes:
    return b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": ' + content + b"}]" \
        + extra + b"}"


@pytest.mark.parametrize("rewrite", [False, True])
@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"[" * DEEP + b"]" * DEEP, "invalid_json"),  # msgspec: RecursionError
        (b'"caf\xc3"', "invalid_json"),  # a truncated UTF-8 sequence inside a string
        (b'"\xff\xfe"', "invalid_json"),  # bytes that are never UTF-8
        (b'"\\ud800"', "invalid_json"),  # a lone surrogate, escaped
        (b'"\\udc00 x"', "invalid_json"),
    ],
)
async def test_bodies_no_decoder_can_hold_are_400(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                                  factory: Factory, rewrite: bool, content: bytes,
                                                  code: str) -> None:
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=rewrite)
    resp = await client.post(proxy.url + CHAT_PATH, headers=headers, content=_chat(model, content))
    error = assert_error(resp, 400, code)
    assert error["type"] == "invalid_request_error"


async def test_a_number_no_double_holds_is_400_where_the_body_is_rewritten(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory
) -> None:
    # Valid JSON grammar, which msgspec skips inside `Raw` and a pass-through forwards for the upstream to
    # judge; orjson cannot parse it, so a route that rewrites the body refuses it itself.
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=True)
    resp = await client.post(proxy.url + CHAT_PATH, headers=headers, content=_chat(model, b'"x", "n_": 1e400'))
    assert_error(resp, 400, "invalid_json")


@pytest.mark.parametrize("stream", [False, True])
async def test_nesting_the_edge_accepts_survives_every_rewrite(client: httpx.AsyncClient, proxy: Server,
                                                               mock_upstream: Server, factory: Factory,
                                                               stream: bool) -> None:
    # 300 levels: within msgspec's and orjson's decoding limits but past orjson's encoding limit (254), so a
    # route that renames the model (or asks a stream for usage) used to fail re-encoding it with a 500.
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=True)
    deep = b"[" * 300 + b"]" * 300
    extra = b', "stream": true' if stream else b""
    resp = await client.post(proxy.url + CHAT_PATH, headers=headers,
                             content=_chat(model, b'"hi", "extra": ' + deep, extra))
    assert resp.status_code == 200, resp.text


async def test_deep_json_on_messages_is_400_in_anthropics_shape(client: httpx.AsyncClient, proxy: Server,
                                                                mock_upstream: Server, factory: Factory) -> None:
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=True)
    body = (b'{"model": "' + model.encode() + b'", "max_tokens": 5, "messages": [{"role": "user", "content": '
            + b"[" * DEEP + b"]" * DEEP + b"}]}")
    resp = await client.post(proxy.url + "/v1/messages", headers=headers, content=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] == "error"
    assert resp.json()["error"]["type"] == "invalid_request_error"


async def test_deep_json_translated_for_another_format_is_not_a_500(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory
) -> None:
    # An OpenAI request served by an Anthropic provider: the tool schema is copied into the translation.
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=True, api_format="anthropic")
    schema = b'{"type": "object", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    tools = b', "tools": [{"type": "function", "function": {"name": "f", "parameters": ' + schema + b"}}]"
    resp = await client.post(proxy.url + CHAT_PATH, headers=headers, content=_chat(model, b'"hi"', tools))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "model",
    ["a\u0000b", "line\nbreak", "tab\there", "del\u007f", "c1\u0085", "x" * 257, ""],
)
async def test_model_names_that_cannot_be_recorded_are_400(client: httpx.AsyncClient, proxy: Server,
                                                           mock_upstream: Server, factory: Factory,
                                                           model: str) -> None:
    _, headers = await _model(factory, proxy, mock_upstream, rewrite=False)
    resp = await client.post(proxy.url + CHAT_PATH, headers=headers,
                             json={"model": model, "messages": [{"role": "user", "content": "x"}]})
    error = assert_error(resp, 400, param="model")
    assert model not in error["message"] or not model  # a hostile name is not echoed back


async def test_nul_in_model_on_messages_is_400(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                               factory: Factory) -> None:
    _, headers = await _model(factory, proxy, mock_upstream, rewrite=False)
    resp = await client.post(proxy.url + "/v1/messages", headers=headers,
                             json={"model": "m\u0000", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "extra",
    [{"messages": [5]}, {"messages": [{"role": "user", "content": [5]}]}, {"stop": 5}, {"tools": 5},
     {"tools": [5]}, {"messages": [{"role": "assistant", "tool_calls": [5]}]}],
)
async def test_openai_bodies_of_the_wrong_shape_for_translation_are_400(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, extra: dict
) -> None:
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=True, api_format="anthropic")
    resp = await client.post(proxy.url + CHAT_PATH, headers=headers,
                             json={"model": model, "messages": [{"role": "user", "content": "x"}], **extra})
    assert_error(resp, 400)


@pytest.mark.parametrize(
    "extra",
    [{"messages": [5]}, {"system": 5}, {"system": [5]}, {"stop_sequences": 5}, {"tools": [5]},
     {"messages": [{"role": "user", "content": [5]}]}],
)
async def test_anthropic_bodies_of_the_wrong_shape_for_translation_are_400(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, extra: dict
) -> None:
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=True, api_format="openai")
    resp = await client.post(proxy.url + "/v1/messages", headers=headers,
                             json={"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                                   **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "upstream", "answer"),
    [("/v1/chat/completions", "anthropic", b'{"content": [{"type": "text", "text": 5}]}'),
     ("/v1/messages", "openai", b'{"choices": 5}'),
     ("/v1/messages", "openai", b'{"choices": [{"message": 5}]}')],
)
def test_upstream_answers_of_the_wrong_shape_are_translation_errors(path: str, upstream: str,
                                                                    answer: bytes) -> None:
    # A TranslationError becomes 502 in the relay; anything else was a 500.
    with pytest.raises(TranslationError):
        endpoint_for(path).dialect_for_format(upstream).answer(200, answer, "m")


async def test_a_path_postgresql_cannot_store_does_not_stop_request_logs(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db
) -> None:
    # Every request is recorded, unknown paths too; `%00` decodes to a NUL that no text column can hold,
    # and a batch holding it used to fail (and be retried) forever, stopping the log of everyone after it.
    for path in ("/v1/%00", "/v1/a%0Ab", "/" + "x" * 5000, "/v1/%ff%fe"):
        resp = await client.post(proxy.url + path)
        assert resp.status_code == 404
    model, headers = await _model(factory, proxy, mock_upstream, rewrite=False)
    trace = f"after-{secrets.token_hex(3)}"
    resp = await client.post(proxy.url + CHAT_PATH, headers={**headers, "x-request-id": trace},
                             json={"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 200
    rows = await wait_for_rows(db, "select path from request_logs where client_request_id = $1", trace)
    assert [r["path"] for r in rows] == [CHAT_PATH]

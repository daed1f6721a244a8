"""The bound of a request before it is forwarded (`proxy.bounds`): pure rules, no servers."""

from __future__ import annotations

import base64

import msgspec
import pytest

from proxy.bounds import request_bound
from proxy.endpoints import ChatBody, CompletionBody, EmbeddingBody, MessagesBody, endpoint_for
from proxy.errors import InvalidRequest
from shared.settings import load_settings

SETTINGS = load_settings({}, database_url="postgresql://unused", redis_url="redis://unused", key_pepper="x" * 24,
                         default_max_output_tokens=4096, max_output_tokens=100_000,
                         max_choices=8, reserve_tokens_per_image=3000, master_key=base64.b64encode(bytes(32)).decode())
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]'


def bound(path: str, body: bytes):
    kind = {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody, "/v1/embeddings": EmbeddingBody,
            "/v1/messages": MessagesBody}[path]
    return request_bound(endpoint_for(path), msgspec.json.decode(body, type=kind), body, SETTINGS)


def test_a_chat_request_without_a_cap_reserves_and_forwards_the_default() -> None:
    body = CHAT + b"}"
    b = bound("/v1/chat/completions", body)
    assert (b.prompt_tokens, b.output_tokens, b.forward) == (len(body), 4096, ("max_completion_tokens", 4096))


def test_completions_forward_openais_own_default_of_16() -> None:
    body = b'{"model":"m","prompt":"hi"}'
    assert bound("/v1/completions", body).forward == ("max_tokens", 16)


@pytest.mark.parametrize(("fields", "output"), [
    (b',"max_tokens":100', 100),
    (b',"max_completion_tokens":50', 50),
    (b',"max_tokens":100,"max_completion_tokens":300', 300),  # both set: the larger bounds either reading
    (b',"max_completion_tokens":300,"max_tokens":100', 300),
    (b',"max_tokens":10,"n":8', 80),
    (b',"n":2', 8192),
])
def test_chat_output_is_the_cap_times_n_and_nothing_is_forwarded_when_a_cap_is_set(fields: bytes,
                                                                                  output: int) -> None:
    b = bound("/v1/chat/completions", CHAT + fields + b"}")
    assert b.output_tokens == output
    assert b.forward is (None if b"max_" in fields else b.forward)


def test_completions_reserve_for_best_of_candidates() -> None:
    b = bound("/v1/completions", b'{"model":"m","prompt":"x","max_tokens":10,"n":2,"best_of":5}')
    assert b.output_tokens == 50
    b = bound("/v1/completions", b'{"model":"m","prompt":"x","max_tokens":10,"n":3,"best_of":1}')
    assert b.output_tokens == 30


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", CHAT + b',"n":9}', "n"),
    ("/v1/completions", b'{"model":"m","prompt":"x","best_of":9}', "best_of"),
    ("/v1/completions", b'{"model":"m","prompt":"x","n":9,"best_of":2}', "n"),
    ("/v1/chat/completions", CHAT + b',"max_tokens":100001}', "max_tokens"),
    ("/v1/chat/completions", CHAT + b',"max_completion_tokens":100001}', "max_completion_tokens"),
    ("/v1/messages", b'{"model":"m","max_tokens":100001,"messages":[{"role":"user","content":"x"}]}', "max_tokens"),
])
def test_what_cannot_be_bounded_is_refused_naming_the_field(path: str, body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        bound(path, body)
    assert caught.value.param == param and caught.value.status == 400


def test_image_references_add_their_allowance_to_the_prompt_bound() -> None:
    url = b'{"type":"image_url","image_url":{"url":"https://x/a.png"}}'
    body = b'{"model":"m","messages":[{"role":"user","content":[' + url + b"," + url + b"]}]}"
    assert bound("/v1/chat/completions", body).prompt_tokens == len(body) + 2 * 2 * 3000  # "image_url" twice each
    anthropic = (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image",'
                 b'"source":{"type":"url","url":"https://x/a.png"}}]}]}')
    assert bound("/v1/messages", anthropic).prompt_tokens == len(anthropic) + 3000
    text = b'{"model":"m","messages":[{"role":"user","content":"draw an image"}]}'
    assert bound("/v1/chat/completions", text).prompt_tokens == len(text)
    # The count errs high, never low, on text that quotes the word: a larger hold, never a smaller one.
    quoted = b'{"model":"m","messages":[{"role":"user","content":"an \\"image\\""}]}'
    assert bound("/v1/chat/completions", quoted).prompt_tokens == len(quoted) + 3000


def test_embeddings_have_no_output() -> None:
    b = bound("/v1/embeddings", b'{"model":"m","input":["a","b"]}')
    assert (b.output_tokens, b.forward) == (0, None)

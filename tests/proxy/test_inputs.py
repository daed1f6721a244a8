"""The body bounds of `proxy.inputs` as units: what each JSON step refuses, and names that can be recorded."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from proxy import inputs
from proxy.errors import InvalidRequest


class Body(msgspec.Struct):
    model: str
    messages: list[msgspec.Raw]


DECODER = msgspec.json.Decoder(Body)


def _body(content: bytes) -> bytes:
    return b'{"model": "m", "messages": [' + content + b"]}"


@pytest.mark.parametrize("content", [b"[" * 5000 + b"]" * 5000, b'"\xff"', b'"\xe2\x82"', b'"\\ud800"'])
def test_decode_refuses_what_no_later_step_can_hold(content: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        inputs.decode(DECODER, _body(content))
    assert caught.value.status == 400 and caught.value.code == "invalid_json"


def test_decode_accepts_utf8_and_names_the_param_of_a_wrong_type() -> None:
    assert inputs.decode(DECODER, _body('"café ☕"'.encode())).model == "m"
    with pytest.raises(InvalidRequest) as caught:
        inputs.decode(DECODER, b'{"model": 5, "messages": []}')
    assert caught.value.param == "model"


def test_dumps_goes_as_deep_as_the_edge_decodes() -> None:
    deep = orjson.loads(b"[" * 600 + b"]" * 600)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(deep)  # the limit this falls back from
    assert inputs.dumps(deep) == b"[" * 600 + b"]" * 600
    assert inputs.dumps({"model": "x"}) == b'{"model":"x"}'


def test_loads_refuses_numbers_no_double_holds() -> None:
    with pytest.raises(InvalidRequest):
        inputs.loads(b'{"a": 1e400}')


@pytest.mark.parametrize("name", ["", "a\x00", "a\nb", "a\rb", "\x1b[31m", "a\x7f", "a\x85", "a\u200bb",
                                  "a\u2028b", "\u202eevil", "x" * (inputs.MAX_NAME_LENGTH + 1)])
def test_check_name_refuses_what_cannot_be_recorded_or_echoed(name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        inputs.check_name("model", name)
    assert caught.value.param == "model"
    assert name not in caught.value.message or not name


@pytest.mark.parametrize("name", ["gpt-4o-mini", "claude-3-5-sonnet-20241022", "org/model:tag v2", "modèle-é",
                                  "x" * inputs.MAX_NAME_LENGTH])
def test_check_name_accepts_model_names(name: str) -> None:
    inputs.check_name("model", name)


@pytest.mark.parametrize(("value", "recorded"), [
    ("/v1/chat/completions", "/v1/chat/completions"), ("/v1/\x00", "/v1/\ufffd"), ("/v1/\udcff", "/v1/\ufffd"),
    ("/a\nb\x85", "/a\ufffdb\ufffd"), ("x" * 1000, "x" * inputs.MAX_NAME_LENGTH),
])
def test_recordable_values_can_be_stored_as_text(value: str, recorded: str) -> None:
    assert inputs.recordable(value) == recorded
    assert recorded.encode("utf-8")  # no lone surrogate left

"""Hostile request bodies and headers get a 4xx in the control plane's error shape, never a 500 or a hang."""

from __future__ import annotations

import asyncio
import secrets
import time

import orjson
import pytest

from tests.control_plane.conftest import PASSWORD, Portal

DEEP = 5000


def _signup(extra: bytes = b"") -> bytes:
    email = f"u-{secrets.token_hex(5)}@example.com".encode()
    return b'{"email": "' + email + b'", "password": "' + PASSWORD.encode() + b'", "org_name": "Acme"' + extra + b"}"


@pytest.mark.parametrize(
    "body",
    [
        _signup(b', "x": ' + b"[" * DEEP + b"]" * DEEP),  # deeper than the decoder allows
        b"[" * DEEP + b"]" * DEEP,
        b'{"email": ' + b"{" * 3000,
        _signup(b', "x": "\xff\xfe"'),  # not UTF-8
        _signup(b', "x": "\\ud800"'),  # a lone surrogate, escaped
        b'{"email": "a\\u0000@example.com", "password": "' + PASSWORD.encode() + b'", "org_name": "A"}',
        b'{"email": "a@example.com", "password": "' + PASSWORD.encode() + b'", "org_name": "A\\u0000"}',
        b"",
        b"null",
        b"[]",
        b'"a string"',
        b"12345678901234567890123456789012345678901234567890",
        b'{"email": 1e400, "password": "x", "org_name": "A"}',
        b'{"email": ["a"], "password": {"b": 1}, "org_name": 5}',
    ],
)
async def test_hostile_signup_bodies_are_4xx_in_the_error_shape(portal: Portal, body: bytes) -> None:
    resp = await portal.request("POST", "/v1/auth/signup", content=body,
                                headers={"content-type": "application/json"})
    assert resp.status_code in (400, 422), resp.text
    assert set(resp.json()) == {"error"} and set(resp.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"email": "a@example.com", "password": "' + b"[" * DEEP + b'"}',
        b'{"email": "a@example.com", "password": "x", "y": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"email": "a\\u0000@example.com", "password": "wrong password 1"}',
        b'{"email": "a@example.com", "password": "wrong\\u0000password"}',
    ],
)
async def test_hostile_login_bodies_are_4xx(portal: Portal, body: bytes) -> None:
    resp = await portal.request("POST", "/v1/auth/login", content=body, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert set(resp.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "garbage"])
async def test_signup_without_a_json_content_type_is_not_a_500(portal: Portal, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = await portal.request("POST", "/v1/auth/signup", content=_signup(), headers=headers)
    assert resp.status_code < 500, resp.text


async def test_a_body_that_never_completes_is_cut_with_408(settings) -> None:
    from tests.control_plane.conftest import start_control_plane

    server = start_control_plane(settings, body_read_timeout_s=1.0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/auth/signup HTTP/1.1\r\nhost: cp\r\ncontent-type: application/json\r\n"
                     b"content-length: 500\r\n\r\n{\"email\": ")
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert time.monotonic() - started < 5
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = orjson.loads(await reader.readexactly(length))
        assert body["error"]["code"] == "request_timeout"
        writer.close()
    finally:
        server.stop()

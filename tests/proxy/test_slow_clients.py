"""Clients that never finish their body: cut at the body deadline (408), and bounded per client address (429).

Over raw sockets against a real granian proxy, with a short deadline set through the settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest_asyncio

from tests.conftest import Factory, Server, start_proxy

DEADLINE_S = 1.0
PER_CLIENT = 3


@pytest_asyncio.fixture
async def slow_proxy(factory: Factory, mock_upstream: Server) -> AsyncIterator[tuple[Server, str, str]]:
    """(proxy, api key, model): the model exists before the proxy starts, so it is in its catalogue."""
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id)
    _, key = await factory.key()
    server = start_proxy(factory.settings, body_read_timeout_s=DEADLINE_S, header_read_timeout_s=DEADLINE_S,
                         max_unfinished_requests_per_client=PER_CLIENT, trusted_proxy_header="X-Forwarded-For")
    yield server, key, model
    server.stop()


async def _open(port: int, key: str, ip: str, body: bytes, declared: int
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {key}\r\n"
                 f"content-type: application/json\r\ncontent-length: {declared}\r\nx-forwarded-for: {ip}\r\n"
                 "\r\n".encode() + body)
    await writer.drain()
    return reader, writer


async def _response(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict[str, str], bytes]:
    async def read() -> tuple[int, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return status, headers, await reader.readexactly(int(headers["content-length"]))

    return await asyncio.wait_for(read(), timeout)


def _error_code(body: bytes) -> str:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param"}
    return error["code"]


async def test_a_body_that_never_completes_is_cut_with_408(slow_proxy: tuple[Server, str, str]) -> None:
    server, key, model = slow_proxy
    started = time.monotonic()
    reader, writer = await _open(server.port, key, "10.1.0.1", b'{"model": "' + model.encode(), declared=500)
    status, headers, body = await _response(reader, timeout=DEADLINE_S + 5)
    assert status == 408 and _error_code(body) == "request_timeout"
    assert DEADLINE_S * 0.9 <= time.monotonic() - started < DEADLINE_S + 3
    assert headers.get("x-request-id")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed
    writer.close()


async def test_a_body_trickling_in_is_cut_at_the_deadline_too(slow_proxy: tuple[Server, str, str]) -> None:
    # One byte at a time, each well within any idle timeout: the deadline is for the whole body.
    server, key, _ = slow_proxy
    reader, writer = await _open(server.port, key, "10.1.0.2", b"{", declared=500)
    started = time.monotonic()
    response = asyncio.ensure_future(_response(reader, timeout=DEADLINE_S + 5))
    while not response.done() and time.monotonic() - started < DEADLINE_S + 5:
        writer.write(b" ")
        await writer.drain()
        await asyncio.wait([response], timeout=DEADLINE_S / 5)
    status, _, body = await response
    assert status == 408 and _error_code(body) == "request_timeout"
    writer.close()


async def test_unfinished_requests_are_bounded_per_client_address(slow_proxy: tuple[Server, str, str]) -> None:
    server, key, model = slow_proxy
    # A burst of whole requests from one address is many reads at once, none slow: all served.
    full = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    burst = [await _open(server.port, key, "10.2.0.1", full, declared=len(full)) for _ in range(4 * PER_CLIENT)]
    assert [(await _response(r, timeout=10))[0] for r, _ in burst] == [200] * (4 * PER_CLIENT)
    for _, writer in burst:
        writer.close()
    hanging = [await _open(server.port, key, "10.2.0.1", b"{", declared=500) for _ in range(PER_CLIENT)]
    # Reads count against their address once they have lasted a sweep interval (DEADLINE_S / 4): wait two.
    await asyncio.sleep(DEADLINE_S / 2 + 0.1)
    started = time.monotonic()
    reader, writer = await _open(server.port, key, "10.2.0.1", b"{", declared=500)
    status, headers, body = await _response(reader, timeout=DEADLINE_S)  # refused at once, not at the deadline
    assert status == 429 and _error_code(body) == "too_many_unfinished_requests"
    assert headers["retry-after"] == "1" and time.monotonic() - started < DEADLINE_S
    writer.close()
    # Another address is not affected, and a whole body from it is served.
    reader, writer = await _open(server.port, key, "10.2.0.2", full, declared=len(full))
    status, _, _ = await _response(reader, timeout=10)
    assert status == 200
    writer.close()
    # The slow ones are cut at their deadline, and their slots are given back.
    for hung_reader, hung_writer in hanging:
        assert (await _response(hung_reader, timeout=DEADLINE_S + 5))[0] == 408
        hung_writer.close()
    reader, writer = await _open(server.port, key, "10.2.0.1", full, declared=len(full))
    assert (await _response(reader, timeout=10))[0] == 200
    writer.close()


async def test_a_client_that_disconnects_mid_body_gives_its_slot_back(slow_proxy: tuple[Server, str, str]) -> None:
    server, key, model = slow_proxy
    for _ in range(PER_CLIENT + 2):
        _, writer = await _open(server.port, key, "10.3.0.1", b"{", declared=500)
        await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.2)
    full = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await _open(server.port, key, "10.3.0.1", full, declared=len(full))
    assert (await _response(reader, timeout=10))[0] == 200
    writer.close()


async def test_a_request_head_that_never_completes_is_cut(slow_proxy: tuple[Server, str, str]) -> None:
    """Slowloris before the app: granian drops a connection whose head is unfinished after the header timeout."""
    proxy, key, _ = slow_proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {key}\r\n".encode())
    await writer.drain()
    started = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), DEADLINE_S + 5)  # b"" or an error answer, then the close
    assert time.monotonic() - started < DEADLINE_S + 5
    assert rest == b"" or rest.startswith(b"HTTP/1.1 4")
    writer.close()

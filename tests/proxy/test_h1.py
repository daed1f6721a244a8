"""The upstream HTTP/1.1 client against real sockets: small asyncio servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.h1 import ConnectFailed, H1Pool, UnsafeRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Upstream:
    """A TCP server counting its connections and the requests it has read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


async def _post(pool: H1Pool, url: str, body: bytes = b'{"x":1}', read_timeout_s: float = 5.0):
    return await pool.post(url, "/v1/chat/completions", b"content-type: application/json\r\n", body,
                           connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


async def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request() -> None:
    async def handler(reader, writer):
        while True:
            await up.read_request(reader)
            writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        for _ in range(5):
            resp = await _post(pool, up.url + "/base/", b'{"a":"b"}')
            assert (resp.status, resp.headers["content-type"], await resp.read()) == (200, "application/json", b"{}")
        assert up.connections == 1
        first = up.requests[0]
        assert first.startswith(b"POST /base/v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nhost: 127.0.0.1:" in first and first.endswith(b'\r\n\r\n{"a":"b"}')
        await pool.close()


async def test_a_keep_alive_connection_closed_by_the_upstream_is_retried_once_on_a_new_one() -> None:
    async def handler(reader, writer):
        connection = up.connections
        await up.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if connection == 1:  # the idle-close race: the next request arrives as the upstream hangs up
            await reader.read(1)
            writer.transport.abort()
            return
        while True:
            await up.read_request(reader)
            writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        assert (await _post(pool, up.url)).status == 200
        resp = await _post(pool, up.url)
        assert (resp.status, await resp.read()) == (200, b"{}")
        assert up.connections == 2
        await pool.close()


async def test_a_broken_fresh_connection_is_not_retried() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        writer.transport.abort()

    async with Upstream(handler) as up:
        pool = H1Pool()
        with pytest.raises(ConnectionError):
            await _post(pool, up.url)
        assert up.connections == 1  # a POST that may have reached the upstream is never sent twice
        await pool.close()


async def test_chunked_stream_arrives_chunk_by_chunk_before_the_answer_ends() -> None:
    release = asyncio.Event()

    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata:1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")

    async with Upstream(handler) as up:
        pool = H1Pool()
        resp = await _post(pool, up.url)
        chunks = resp.chunks()
        assert await asyncio.wait_for(chunks.__anext__(), 2) == b"data:1"  # while the upstream still holds the rest
        release.set()
        assert [c async for c in chunks] == [b"data:2"]
        await pool.close()


async def test_body_delimited_by_close_is_read_whole() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with Upstream(handler) as up:
        pool = H1Pool()
        assert await (await _post(pool, up.url)).read() == b"all of it"
        await pool.close()


async def test_silence_past_the_read_timeout_is_a_timeout_and_the_connection_is_dropped() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        if len(up.requests) == 1:
            await asyncio.sleep(5)  # never answers the first request
        writer.write(OK)
        while True:
            await up.read_request(reader)
            writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await _post(pool, up.url, read_timeout_s=0.3)
        assert 0.25 < loop.time() - started < 1.5
        assert (await _post(pool, up.url)).status == 200
        assert up.connections == 2
        await pool.close()


async def test_a_slow_but_steady_stream_is_not_a_timeout() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    async with Upstream(handler) as up:
        pool = H1Pool()
        resp = await _post(pool, up.url, read_timeout_s=0.3)  # the whole answer takes 0.6 s
        assert b"".join([c async for c in resp.chunks()]) == b"xxxxxx"
        await pool.close()


async def test_stream_cut_mid_body_is_a_connection_error_after_the_bytes_that_came() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with Upstream(handler) as up:
        pool = H1Pool()
        resp = await _post(pool, up.url)
        got = []
        with pytest.raises(ConnectionError):
            async for chunk in resp.chunks():
                got.append(chunk)
        assert got == [b"abc"]
        await pool.close()


async def test_large_answer_read_slowly_is_complete_and_in_order() -> None:
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB, beyond the buffer's high-water mark

    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 65536):
            writer.write(payload[i:i + 65536])
            await writer.drain()

    async with Upstream(handler) as up:
        pool = H1Pool()
        resp = await _post(pool, up.url)
        parts = []

        async def read_slowly() -> None:
            async for chunk in resp.chunks():
                parts.append(chunk)
                await asyncio.sleep(0)  # a reader slower than the socket

        await asyncio.wait_for(read_slowly(), 10)
        assert b"".join(parts) == payload
        await pool.close()


async def test_malformed_answer_is_a_connection_error() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(b"SMTP/9 hello\r\n\r\n")

    async with Upstream(handler) as up:
        pool = H1Pool()
        with pytest.raises(ConnectionError):
            await _post(pool, up.url)
        await pool.close()


async def test_refused_connection_is_connect_failed() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    pool = H1Pool()
    with pytest.raises(ConnectFailed):
        await _post(pool, f"http://127.0.0.1:{port}")


async def test_connection_cap_makes_callers_wait_instead_of_failing() -> None:
    async def handler(reader, writer):
        while True:
            await up.read_request(reader)
            await asyncio.sleep(0.02)
            writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool(max_connections=2)

        async def one() -> bytes:
            return await (await _post(pool, up.url)).read()

        assert await asyncio.gather(*(one() for _ in range(10))) == [b"{}"] * 10
        assert up.connections == 2
        await pool.close()


async def test_waiting_for_a_connection_slot_is_bounded_by_the_connect_timeout() -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        await asyncio.sleep(5)  # holds the only connection

    async with Upstream(handler) as up:
        pool = H1Pool(max_connections=1)
        busy = asyncio.ensure_future(_post(pool, up.url))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await pool.post(up.url, "/x", b"", b"{}", connect_timeout_s=0.2, read_timeout_s=5)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        await pool.close()


async def test_cancelled_caller_closes_its_connection_and_others_are_unaffected() -> None:
    async def handler(reader, writer):
        while True:
            body = await up.read_request(reader)
            if body == b"slow":
                await asyncio.sleep(10)
            writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        slow = asyncio.ensure_future(_post(pool, up.url, b"slow"))
        await asyncio.sleep(0.1)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert pool._open == 0  # the abandoned connection is closed, not pooled
        assert await (await _post(pool, up.url)).read() == b"{}"
        await pool.close()


def _certificates(tmp: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("upstream")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def test_https_upstream_is_verified_against_the_trust_store(tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                                  if line.startswith(b"content-length")))
                await reader.readexactly(length)
                writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        trusting = H1Pool(tls=ssl.create_default_context(cafile=str(ca)))
        for _ in range(2):  # the second request reuses the TLS connection
            assert await (await _post(trusting, url)).read() == b"{}"
        assert trusting._open == 1
        await trusting.close()
        default = H1Pool()  # the system trust store does not know the test CA: refused, never sent in clear
        with pytest.raises(ConnectFailed):
            await _post(default, url)
        await default.close()
    finally:
        server.close()


async def test_large_answers_read_whole_back_to_back_on_one_connection() -> None:
    """Answers past the back-pressure mark, read with read() (no chunk loop): the buffer must not stall
    the socket, and the connection must be reusable afterwards."""
    payload = bytes(range(256)) * 8 * 1024  # 2 MiB

    async def handler(reader, writer):
        while True:
            await up.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
            await writer.drain()

    async with Upstream(handler) as up:
        pool = H1Pool()
        for _ in range(3):
            resp = await _post(pool, up.url, read_timeout_s=3)
            assert await asyncio.wait_for(resp.read(), 5) == payload
        assert up.connections == 1
        await pool.close()


# --- framing: a shared pool must never let one request's bytes or answer leak into another's ------------


@pytest.mark.parametrize("headers", [
    b"authorization: Bearer sk-x\r\n\r\nPOST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n",  # a smuggled request
    b"authorization: Bearer sk-x\r\nx-injected: 1\r\n\r\n",  # an added header line (and an early end)
    b"authorization: Bearer sk-x\nx-injected: 1\r\n",  # a bare LF
    b"authorization: Bearer sk-\x00x\r\n",  # a control byte
    "authorization: Bearer sk-é\r\n".encode(),  # non-ASCII
    b"authorization: Bearer sk-x",  # a line without its CRLF
])
async def test_a_request_head_that_could_frame_more_than_one_request_is_never_sent(headers: bytes) -> None:
    async def handler(reader, writer):
        await up.read_request(reader)
        writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        with pytest.raises(UnsafeRequest):
            await pool.post(up.url, "/v1/chat/completions", headers, b"{}", connect_timeout_s=2.0,
                            read_timeout_s=2.0)
        with pytest.raises(UnsafeRequest):
            await pool.post(up.url, "/v1/chat/completions HTTP/1.1\r\nx: y", b"", b"{}", connect_timeout_s=2.0,
                            read_timeout_s=2.0)
        with pytest.raises(UnsafeRequest):
            await pool.post(up.url + "/v1\r\nx: y", "/chat", b"", b"{}", connect_timeout_s=2.0, read_timeout_s=2.0)
        await asyncio.sleep(0.05)
        assert up.connections == 0  # refused before any connection was opened
        await pool.close()


async def test_a_second_answer_to_one_request_closes_the_connection() -> None:
    """An upstream answering twice (e.g. to a smuggled request) must not hand the extra answer to the next
    caller on that connection: the connection is closed and the next request gets a fresh one."""
    other = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n\"other\""

    async def handler(reader, writer):
        connection = up.connections
        while True:
            await up.read_request(reader)
            writer.write(OK + (other if connection == 1 else b""))

    async with Upstream(handler) as up:
        pool = H1Pool()
        first = await _post(pool, up.url)
        assert (first.status, await first.read()) == (200, b"{}")
        second = await _post(pool, up.url)
        assert (second.status, await second.read()) == (200, b"{}")  # its own answer, not "other"
        assert up.connections == 2
        await pool.close()


async def test_bytes_arriving_on_an_idle_connection_close_it() -> None:
    late = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n\"late\""

    async def handler(reader, writer):
        connection = up.connections
        await up.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if connection == 1:
            await asyncio.sleep(0.05)
            writer.write(late)  # an answer nobody asked for, while the connection sits in the pool
            await writer.drain()
        while True:
            await up.read_request(reader)
            writer.write(OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        assert await (await _post(pool, up.url)).read() == b"{}"
        await asyncio.sleep(0.2)
        resp = await _post(pool, up.url)
        assert await resp.read() == b"{}"
        assert up.connections == 2
        await pool.close()


async def test_an_interim_answer_is_skipped_and_the_real_one_read() -> None:
    async def handler(reader, writer):
        while True:
            await up.read_request(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\n\r\n" + OK)

    async with Upstream(handler) as up:
        pool = H1Pool()
        for _ in range(2):
            resp = await _post(pool, up.url)
            assert (resp.status, "link" in resp.headers, await resp.read()) == (200, False, b"{}")
        assert up.connections == 1
        await pool.close()

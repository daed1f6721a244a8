"""The pooled HTTP client that talks to upstream providers.

`UpstreamClient.send` returns once the upstream's status line and headers are in, so the caller can still
fail over to another route before anything reaches the client. Failures are classified here, in one place:
connection errors, timeouts, 429 and 5xx are retryable on another route; 401/403 mean our (or the org's)
credential was refused; other 4xx are the client's request and pass through.

The transport is `proxy.h1` (keep-alive pools on asyncio protocols, httptools parsing); `bench/RESULTS.md`
has the comparison with aiohttp and pyreqwest that chose it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.h1 import ConnectFailed, H1Pool, H1Response, UnsafeRequest, is_header_value
from proxy.routing import Route

__all__ = ["UnusableCredential", "UpstreamClient", "UpstreamResponse", "anthropic_headers", "openai_headers"]

_JSON = "application/json"
ANTHROPIC_VERSION = "2023-06-01"
# The constant header lines of each format, encoded once; only the credential line is built per request, and
# the client's forwarded headers when it sent any (checked by `proxy.exchange`, and by `proxy.h1` again).
_OPENAI_HEADERS = b"content-type: application/json\r\naccept-encoding: identity\r\n"
_ANTHROPIC_HEADERS = _OPENAI_HEADERS + f"anthropic-version: {ANTHROPIC_VERSION}\r\n".encode()


def openai_headers(beta: str | None) -> bytes:
    """The header lines of an OpenAI-format request, with the client's `OpenAI-Beta` if it sent one."""
    return _OPENAI_HEADERS if beta is None else _OPENAI_HEADERS + b"openai-beta: " + beta.encode("ascii") + b"\r\n"


def anthropic_headers(version: str | None, beta: str | None) -> bytes:
    """The header lines of an Anthropic request: the client's `anthropic-version` (else ours) and
    `anthropic-beta`."""
    if version is None and beta is None:
        return _ANTHROPIC_HEADERS
    head = _OPENAI_HEADERS + b"anthropic-version: " + (version or ANTHROPIC_VERSION).encode("ascii") + b"\r\n"
    return head + b"anthropic-beta: " + beta.encode("ascii") + b"\r\n" if beta else head


class UnusableCredential(UpstreamError):
    """The route's credential cannot be put in a header (control characters, non-ASCII): never sent."""

    code = "upstream_credential_unusable"


class UpstreamResponse:
    """An upstream answer whose headers have arrived and whose body is still to be read."""

    __slots__ = ("_resp", "content_type", "status")

    def __init__(self, resp: H1Response) -> None:
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("content-type", _JSON)

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except TimeoutError:
            raise UpstreamTimeout("The upstream provider timed out.") from None
        except ConnectionError:
            raise UpstreamError("The upstream provider broke the connection.") from None
        finally:
            self._resp.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (no re-buffering); raises UpstreamError if the stream breaks."""
        try:
            async for chunk in self._resp.chunks():
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout("The upstream provider stopped sending.") from None
        except ConnectionError:
            raise UpstreamError("The upstream provider broke the stream.") from None

    def close(self) -> None:
        # An unfinished body leaves the connection unusable for reuse: it is closed, not pooled.
        self._resp.close()


class UpstreamClient:
    """One connection pool per process; created on lifespan start-up, closed on shutdown."""

    def __init__(self, *, pool_size: int, max_connect_timeout_s: float, max_read_timeout_s: float) -> None:
        self._pool_size = pool_size
        self._max_connect = max_connect_timeout_s
        self._max_read = max_read_timeout_s
        self._pool: H1Pool | None = None

    async def start(self) -> None:
        self._pool = H1Pool(max_connections=self._pool_size)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def send(self, route: Route, path: str, body: bytes, credential: str | None, headers: bytes | None = None,
                   *, method: bytes = b"POST") -> UpstreamResponse:
        """Send `body` to the route's provider (POST unless `method` says otherwise) with the header lines
        `headers` (default: the format's constant ones); raise UpstreamError on a failure worth surfacing."""
        assert self._pool is not None, "UpstreamClient.start() was not called"
        if credential and not is_header_value(credential):
            # Stored values are checked when saved; this holds for rows written before that, or by hand.
            raise UnusableCredential(f"The credential for {route.provider} holds characters that cannot be sent "
                                     "in an HTTP header.")
        if route.api_format == "anthropic":
            if headers is None:
                headers = _ANTHROPIC_HEADERS
            if credential:
                headers += b"x-api-key: " + credential.encode("ascii") + b"\r\n"
        else:
            if headers is None:
                headers = _OPENAI_HEADERS
            if credential:
                headers += b"authorization: Bearer " + credential.encode("ascii") + b"\r\n"
        try:
            resp = await self._pool.post(route.base_url, path, headers, body, method=method,
                                         connect_timeout_s=min(route.connect_timeout_s, self._max_connect),
                                         read_timeout_s=min(route.read_timeout_s, self._max_read))
        except TimeoutError:
            raise UpstreamTimeout(f"The upstream provider {route.provider} timed out.") from None
        except ConnectFailed:
            raise UpstreamError(f"Could not connect to the upstream provider {route.provider}.") from None
        except ConnectionError:
            raise UpstreamError(f"The upstream provider {route.provider} broke the connection.") from None
        except UnsafeRequest:
            raise UpstreamError(f"The route to {route.provider} has an upstream URL or path that cannot be sent.",
                                code="upstream_misconfigured") from None
        except ValueError:
            raise UpstreamError(f"The route to {route.provider} has an unusable upstream URL.",
                                code="upstream_misconfigured") from None
        status = resp.status
        if status < 400 or status in (400, 404, 409, 413, 422):
            return UpstreamResponse(resp)
        resp.close()
        if status in (401, 403):
            raise UpstreamError(f"The upstream provider {route.provider} refused the relay's credential.",
                                retryable=True, code="upstream_auth_failed", upstream_status=status)
        if status == 429:
            raise UpstreamError(f"The upstream provider {route.provider} is rate limiting requests.",
                                status=429, code="upstream_rate_limited", upstream_status=status)
        raise UpstreamError(f"The upstream provider {route.provider} failed with status {status}.",
                            upstream_status=status)

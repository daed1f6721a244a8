"""The pooled HTTP client that talks to upstream providers.

`UpstreamClient.send` returns once the upstream's status line and headers are in, so the caller can still
fail over to another route before anything reaches the client. Failures are classified here, in one place:
connection errors, timeouts, 429 and 5xx are retryable on another route; 401/403 mean our (or the org's)
credential was refused; other 4xx are the client's request and pass through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.routing import Route

__all__ = ["UpstreamClient", "UpstreamResponse"]

_JSON = "application/json"
_ANTHROPIC_VERSION = "2023-06-01"


class UpstreamResponse:
    """An upstream answer whose headers have arrived and whose body is still to be read."""

    __slots__ = ("_resp", "content_type", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("content-type", _JSON)

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("The upstream provider timed out.") from None
        except aiohttp.ClientError:
            raise UpstreamError("The upstream provider broke the connection.") from None
        finally:
            self._resp.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (no re-buffering); raises UpstreamError if the stream breaks."""
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("The upstream provider stopped sending.") from None
        except aiohttp.ClientError:
            raise UpstreamError("The upstream provider broke the stream.") from None

    def close(self) -> None:
        # close(), not release(): an unfinished body leaves the connection unusable for reuse.
        self._resp.close()


class UpstreamClient:
    """One pooled aiohttp session per process; created on lifespan start-up, closed on shutdown."""

    def __init__(self, *, pool_size: int, max_connect_timeout_s: float, max_read_timeout_s: float) -> None:
        self._pool_size = pool_size
        self._max_connect = max_connect_timeout_s
        self._max_read = max_read_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _timeout(self, route: Route) -> aiohttp.ClientTimeout:
        key = (min(route.connect_timeout_s, self._max_connect), min(route.read_timeout_s, self._max_read))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=key[0], connect=key[0], sock_read=key[1]
            )
        return timeout

    async def send(self, route: Route, path: str, body: bytes, credential: str | None) -> UpstreamResponse:
        """POST `body` to the route's provider; raise UpstreamError on a failure worth surfacing."""
        assert self._session is not None, "UpstreamClient.start() was not called"
        if route.api_format == "anthropic":
            headers = {"content-type": _JSON, "accept-encoding": "identity", "anthropic-version": _ANTHROPIC_VERSION}
            if credential:
                headers["x-api-key"] = credential
        else:
            headers = {"content-type": _JSON, "accept-encoding": "identity"}
            if credential:
                headers["authorization"] = f"Bearer {credential}"
        try:
            resp = await self._session.post(route.base_url + path, data=body, headers=headers,
                                            timeout=self._timeout(route), allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(f"The upstream provider {route.provider} timed out.") from None
        except aiohttp.ClientConnectorError:
            raise UpstreamError(f"Could not connect to the upstream provider {route.provider}.") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError):
            raise UpstreamError(f"The upstream provider {route.provider} broke the connection.") from None
        status = resp.status
        if status < 400 or status in (400, 404, 409, 413, 422):
            return UpstreamResponse(resp)
        resp.close()
        if status in (401, 403):
            raise UpstreamError(f"The upstream provider {route.provider} refused the relay's credential.",
                                retryable=True, code="upstream_auth_failed")
        if status == 429:
            raise UpstreamError(f"The upstream provider {route.provider} is rate limiting requests.",
                                status=429, code="upstream_rate_limited")
        raise UpstreamError(f"The upstream provider {route.provider} failed with status {status}.")

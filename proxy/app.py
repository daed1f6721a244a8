"""The proxy's ASGI application: lifespan, dispatch on (method, path), and the one place errors become
responses and every request becomes a metadata record.

Pools, clients and background tasks are created on lifespan start-up and hang off `ProxyState`; nothing is
done at import time. A request's journey continues in `proxy.relay`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from proxy.endpoints import match
from proxy.errors import OPENAI_ERRORS, MethodNotAllowed, NotFound, ProxyError
from proxy.exchange import Exchange
from proxy.http import Receive, RequestHeaders, Scope, Send, send_response
from proxy.inputs import recordable
from proxy.records import RequestRecord
from proxy.state import ProxyState, start_state
from shared.generations import new_request_id
from shared.metrics.exposition import CONTENT_TYPE, metrics_allowed
from shared.settings import Settings, load_settings

__all__ = ["ProxyApp", "ProxyState", "create_app"]

log = logging.getLogger("rocket_relay.proxy")


class ProxyApp:
    """ASGI entry point. `state` exists between lifespan start-up and shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: ProxyState | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/healthz":
            return await send_response(send, 200, b'{"status":"ok"}', [])
        if path == "/readyz":
            return await self._ready(send)
        state = self.state
        assert state is not None, "lifespan start-up has not run"
        if path == "/metrics":
            return await self._metrics(state, scope, send)
        headers = RequestHeaders(scope["headers"], state.client_address.header)
        request_id = new_request_id()
        found = match(path)
        # Any path is recorded, unknown ones too (404): those only once made safe to store; a path's `{id}`
        # is not (paths are metadata; ids of other requests are not).
        rec = RequestRecord(request_id, headers.request_id, found[0].path if found else recordable(path),
                            scope["method"], state.client_address.resolve(scope, headers.forwarded),
                            headers.user_agent)
        out_headers = [(b"x-request-id", (headers.request_id or request_id).encode())]
        if headers.request_id:  # the client's own id is echoed; ours (for /v1/generations) goes beside it
            out_headers.append((b"x-rr-request-id", request_id.encode()))
        errors = found[0].client if found else OPENAI_ERRORS
        try:
            if found is None:
                raise NotFound(f"Unknown path {path}.", code="unknown_url")
            endpoint, param = found
            if scope["method"] not in endpoint.methods:
                allow = endpoint.allow
                raise MethodNotAllowed(f"Use {allow.decode()} for {path}.", headers=[(b"allow", allow)])
            await endpoint.handler(Exchange(state, endpoint, scope, receive, send, headers, rec, out_headers, param))
        except ProxyError as exc:
            rec.status_code = exc.status
            rec.error_code = exc.code
            state.metrics.refused(exc)
            await send_response(send, exc.status, errors.json(exc), [*out_headers, *exc.headers])
        except Exception:
            log.exception("unhandled error in request %s", request_id, extra={"request_id": request_id})
            rec.status_code = 500
            rec.error_code = "internal_error"
            err = ProxyError("The relay failed to handle this request.")
            try:
                await send_response(send, 500, errors.json(err), out_headers)
            except Exception:  # the response had already started
                pass
        finally:
            state.metrics.request_done(found[0].path if found else "unmatched", rec)
            state.log_writer.add(rec)

    async def _metrics(self, state: ProxyState, scope: Scope, send: Send) -> None:
        """The metrics of every worker of this server, to a scraper holding RR_METRICS_TOKEN; to anyone else
        (and to everyone while no token is set) the 404 of an unknown path, so nobody learns it exists."""
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if scope["method"] != "GET" or not metrics_allowed(authorization.decode("latin-1"),
                                                            state.settings.metrics_token):
            err = NotFound(f"Unknown path {scope['path']}.", code="unknown_url")
            return await send_response(send, 404, OPENAI_ERRORS.json(err), [])
        body = await state.metrics.scrape(state)
        await send_response(send, 200, body, [], CONTENT_TYPE.encode())

    async def _ready(self, send: Send) -> None:
        state = self.state
        checks = {"postgres": False, "redis": False}
        if state is not None:
            try:
                checks["postgres"] = await asyncio.wait_for(state.pool.fetchval("select true"), 2.0)
            except Exception:
                pass
            try:
                checks["redis"] = bool(await asyncio.wait_for(state.redis.ping(), 2.0))
            except Exception:
                pass
        ok = all(checks.values())
        # When this worker last read the catalogue, by its own clock (`time`): an operator sees a stale one,
        # a test waits for one read after its change.
        loaded_at = state.catalogue.loaded_at if state is not None else None
        body = orjson.dumps({"status": "ready" if ok else "unavailable", "checks": checks,
                             "catalogue_loaded_at": loaded_at, "time": time.time()})
        await send_response(send, 200 if ok else 503, body, [])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.state = await start_state(self.settings)
                except Exception as exc:
                    log.exception("proxy start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": type(exc).__name__})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.state is not None:
                    await self.state.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app() -> ProxyApp:
    """Factory for granian (`--factory`): each worker builds its app from the environment."""
    return ProxyApp(load_settings())

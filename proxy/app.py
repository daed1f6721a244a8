"""The proxy's ASGI application: lifespan, dispatch on (method, path), and the one place errors become
responses and every request becomes a metadata record.

Pools, clients and background tasks are created on lifespan start-up and hang off `ProxyState`; nothing is
done at import time. A request's journey continues in `proxy.relay`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import orjson
from redis.asyncio import Redis

from proxy.auth import Authenticator
from proxy.billing import Biller
from proxy.byok import ByokCredentials
from proxy.errors import MethodNotAllowed, NotFound, ProxyError, error_body
from proxy.events import EventListener
from proxy.health import CircuitBreakers
from proxy.http import BodyReader, ClientAddress, Receive, RequestHeaders, Scope, Send, send_response
from proxy.inputs import recordable
from proxy.records import RequestLogWriter, RequestRecord
from proxy.relay import is_model_path, relay
from proxy.routing import Catalogue, load_catalogue
from proxy.translate import openai_error_to_anthropic
from proxy.upstream import UpstreamClient
from shared.crypto import box_from_settings
from shared.generations import fetch_generation, new_request_id
from shared.redis_client import connect_redis
from shared.redis_keys import RedisKeys
from shared.redis_pipeline import PipelinedRedis
from shared.settings import Settings, load_settings

__all__ = ["ProxyApp", "ProxyState", "create_app"]

log = logging.getLogger("rocket_relay.proxy")

_ALLOWED = {path: b"POST" for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                        "/v1/messages")}
_ALLOWED["/v1/models"] = b"GET"
GENERATIONS = "/v1/generations/"


class ProxyState:
    """Everything a request needs, built once per worker process on start-up."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self.box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)
        self.fast_redis = PipelinedRedis(settings.redis_url, connections=settings.redis_pipeline_connections,
                                         timeout_s=settings.redis_timeout_s)
        self.auth = Authenticator(
            pool, self.fast_redis, self.keys, settings.key_pepper.encode(), ttl_s=settings.key_cache_ttl_s,
            negative_ttl_s=settings.key_negative_cache_ttl_s, redis_ttl_s=settings.redis_key_cache_ttl_s,
        )
        self.catalogue = Catalogue({})
        self.biller = Biller(settings, pool, redis, self.fast_redis, self.keys)
        self.breakers = CircuitBreakers(threshold=settings.breaker_threshold, cooldown_s=settings.breaker_cooldown_s)
        self.byok = ByokCredentials(pool, self.box, ttl_s=60.0)
        self.upstream = UpstreamClient(pool_size=settings.upstream_pool_size,
                                       max_connect_timeout_s=settings.upstream_connect_timeout_s,
                                       max_read_timeout_s=settings.upstream_read_timeout_s)
        self.log_writer = RequestLogWriter(pool, batch_size=settings.log_batch_size,
                                           interval_s=settings.log_flush_interval_ms / 1000,
                                           buffer_max=settings.log_buffer_max)
        self.client_address = ClientAddress(settings.trusted_proxy_header, settings.trusted_proxies)
        self.bodies = BodyReader(settings.max_body_bytes, settings.body_read_timeout_s,
                                 settings.max_unfinished_requests_per_client)
        self.events = EventListener(redis, self.keys, self.auth, self.byok, self.reload_catalogue,
                                    refresh_interval_s=settings.config_refresh_interval_s)

    async def reload_catalogue(self) -> None:
        self.catalogue = await load_catalogue(self.pool, self.box)

    async def start(self) -> None:
        await self.reload_catalogue()
        await self.upstream.start()
        self.bodies.start()
        self.log_writer.start()
        self.events.start()

    async def close(self) -> None:
        await self.events.close()
        await self.bodies.close()
        await self.biller.close()
        await self.log_writer.close()
        await self.upstream.close()
        await self.fast_redis.aclose()
        await self.redis.aclose()
        await self.pool.close()


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
        headers = RequestHeaders(scope["headers"], state.client_address.header)
        request_id = new_request_id()
        # Any path is recorded, unknown ones too (404): those only once made safe to store.
        rec = RequestRecord(request_id, headers.request_id, path if path in _ALLOWED else recordable(path),
                            scope["method"], state.client_address.resolve(scope, headers.forwarded),
                            headers.user_agent)
        out_headers = [(b"x-request-id", (headers.request_id or request_id).encode())]
        if headers.request_id:  # the client's own id is echoed; ours (for /v1/generations) goes beside it
            out_headers.append((b"x-rr-request-id", request_id.encode()))
        try:
            if path.startswith(GENERATIONS) and scope["method"] == "GET":
                return await self._generation(state, headers, rec, send, out_headers, path[len(GENERATIONS):])
            allowed = _ALLOWED.get(path)
            if allowed is None:
                raise NotFound(f"Unknown path {path}.", code="unknown_url")
            if scope["method"].encode() != allowed:
                raise MethodNotAllowed(f"Use {allowed.decode()} for {path}.",
                                       headers=[(b"allow", allowed)])
            if is_model_path(path):
                await relay(state, path, scope, receive, send, headers, rec, out_headers)
            else:
                await self._models(state, headers, rec, send, out_headers)
        except ProxyError as exc:
            rec.status_code = exc.status
            rec.error_code = exc.code
            body = error_body(exc)
            if path == "/v1/messages":  # Anthropic clients expect Anthropic's error shape
                body = openai_error_to_anthropic(exc.status, body)
            await send_response(send, exc.status, body, [*out_headers, *exc.headers])
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            rec.status_code = 500
            rec.error_code = "internal_error"
            err = ProxyError("The relay failed to handle this request.")
            try:
                await send_response(send, 500, error_body(err), out_headers)
            except Exception:  # the response had already started
                pass
        finally:
            state.log_writer.add(rec)

    async def _models(self, state: ProxyState, headers: RequestHeaders, rec: RequestRecord, send: Send,
                      out_headers: list[tuple[bytes, bytes]]) -> None:
        key = await state.auth.authenticate(headers.api_key)
        rec.org_id, rec.api_key_id = key.org_id, key.key_id
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": m.owned_by}
                for m in state.catalogue.visible_models(key)]
        rec.status_code = 200
        await send_response(send, 200, orjson.dumps({"object": "list", "data": data}), out_headers)

    async def _generation(self, state: ProxyState, headers: RequestHeaders, rec: RequestRecord, send: Send,
                          out_headers: list[tuple[bytes, bytes]], request_id: str) -> None:
        key = await state.auth.authenticate(headers.api_key)
        rec.org_id, rec.api_key_id = key.org_id, key.key_id
        rec.path = GENERATIONS + "{id}"  # not the id itself: paths are metadata, ids of other requests are not
        record = await fetch_generation(state.pool, key.org_id, request_id)
        if record is None:
            raise NotFound("No such generation (records appear a moment after the answer).",
                           code="generation_not_found")
        del record["price_id"]
        rec.status_code = 200
        await send_response(send, 200, orjson.dumps(record), out_headers)

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
        body = orjson.dumps({"status": "ready" if ok else "unavailable", "checks": checks})
        await send_response(send, 200 if ok else 503, body, [])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.state = await _start_state(self.settings)
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


async def _start_state(settings: Settings) -> ProxyState:
    started = time.perf_counter()
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4, command_timeout=30)
    redis = connect_redis(settings.redis_url)
    state = ProxyState(settings, pool, redis)
    await state.start()
    log.info("proxy worker ready in %.0f ms", (time.perf_counter() - started) * 1000)
    return state


def create_app() -> ProxyApp:
    """Factory for granian (`--factory`): each worker builds its app from the environment."""
    return ProxyApp(load_settings())

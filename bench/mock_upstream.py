"""Mock upstream LLM provider (OpenAI- and Anthropic-compatible) for tests and benchmarks.

A raw ASGI app served by granian::

    python -m bench.mock_upstream --host 127.0.0.1 --port 9100 --workers 1 [--chunks 8 ...]
    MOCK_UPSTREAM_CONFIG='{"chunks": 8}' granian --interface asgi --loop uvloop bench.mock_upstream:app

(granian waits for in-flight requests on shutdown: ``main()`` passes ``--kill-timeout`` seconds, default 2,
as granian's workers_kill_timeout so that hanging requests cannot block a stop.)

API: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``, ``GET /v1/models``,
OpenAI's Responses API (``POST /v1/responses``, streamed with its typed events, and ``GET|DELETE
/v1/responses/{id}`` for the responses it stored: those not sent with ``store: false``), Anthropic's
``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.  Fields it does not use are ignored, as real
providers' clients send many (Claude Code's ``thinking``, ``context_management``, ``output_config``; Codex's
``reasoning``, ``include``, ``prompt_cache_key`` ...).  Control: ``GET /_mock/health``, ``GET|POST /_mock/config``,
``POST /_mock/reset``, ``GET /_mock/requests`` (the last 1000 API requests, oldest first).

Knobs, at three levels, later overriding earlier:
  1. defaults: env ``MOCK_UPSTREAM_CONFIG`` (a JSON object); ``main()`` builds it from that env var,
     ``--config JSON`` and the knob flags (``--latency-ms 50`` ...), in that order;
  2. runtime: ``POST /_mock/config`` with a JSON object replaces the runtime layer, whose top-level keys
     override the defaults (a runtime ``models`` replaces the default one); ``POST /_mock/reset`` drops it
     and clears the recorded requests; ``GET /_mock/config`` returns the merged config;
  3. per model: ``"models": {"<model>": {<fields>}}`` applies to requests whose body ``model`` matches.

  latency_ms        delay before the response headers (so of the whole answer when not streaming)
  ttft_ms           further delay, after the headers, before the first stream chunk
  chunk_delay_ms    delay between stream content chunks
  chunks            content pieces to generate ("tok1 ", "tok2 ", ...; one piece = one token), default 8
  status            answer this HTTP status with an error body (OpenAI-style, Anthropic-style on /v1/messages)
  error_rate        0..1 probability of answering ``error_status`` (default 500) instead
  fail_after_chunks stream: break the connection after this many content chunks (no [DONE] / message_stop)
  hang              never answer; wait until the client goes away (timeout tests)
  omit_usage        no usage anywhere: no usage chunk even if asked, no ``usage`` key in JSON answers
  require_api_key   if set, ``Authorization: Bearer <k>`` or ``x-api-key: <k>`` must match it, else 401
  tool_call         chat and messages: answer with a call of this tool name, arguments {"city": "Paris"}
                    (finish_reason "tool_calls" / stop_reason "tool_use"; streamed as two argument fragments)
  ignore_max_tokens generate ``chunks`` pieces whatever ``max_tokens`` says (an upstream ignoring the cap)
  break_after_headers  send 200 and the headers, then half of a JSON answer (or no stream event), then
                    break the connection
  stall_after_headers  send 200 and the headers, then nothing until the client goes away
  usage             a usage object sent as it is instead of the computed one (JSON answers, the OpenAI usage
                    chunk, Anthropic message_start / message_delta): a provider's real shapes, e.g. cached
                    tokens, cache writes, reasoning tokens
  service_tier      an OpenAI answer's ``service_tier`` (Anthropic: put it inside ``usage``)
  persona           "reference" | "substitute" | "broken_tools": non-stream chat and messages answers to the
                    probe suite's prompts come from a simulated model (``bench/mock_model.py``): right or
                    wrong answers, answer distributions and tokenizer of that model, under the requested
                    model name; other prompts get the usual pieces
  tool_break_rate   0..1, persona "broken_tools": share of tool calls that break the tool's schema (0.3)
  thinking          messages: a thinking block (with a signature) before the answer, and a redacted one
                    (streamed as thinking_delta / signature_delta); chat: ``reasoning_content``; responses:
                    a reasoning item with a summary
  context_limit     answer 400 with the provider's context-length error (OpenAI: code
                    ``context_length_exceeded``; Anthropic: "prompt is too long") when the prompt has more tokens
  reasoning_tokens  chat and responses: this many of the completion tokens are reported as reasoning tokens

Usage numbers: prompt tokens = ceil(characters / 4), at least 1, over all message / prompt / input
texts; completion tokens = pieces generated = min(chunks, max_tokens), times ``max(n, best_of)`` as
OpenAI bills them (the JSON answer has ``n`` choices; a stream carries choice 0); when ``max_tokens`` cuts the
answer, finish_reason is "length" (Anthropic stop_reason "max_tokens").  Runtime config and recorded
requests are per worker process: with ``--workers > 1`` configure through the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from bench.mock_model import PERSONAS, Reply, respond

CONFIG_ENV = "MOCK_UPSTREAM_CONFIG"
MAX_RECORDED = 1000
PERSONA_SEED = 20261201
HANG_SECONDS = 3600.0
EMBEDDING_DIM = 8
DEFAULT_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-3-5-haiku-latest")
RECORD_KEYS = ("time", "method", "path", "authorization", "x_api_key", "anthropic_version", "model",
               "stream", "stream_options", "max_tokens", "max_completion_tokens", "anthropic_beta", "openai_beta",
               "headers", "query", "max_output_tokens", "store", "messages", "thinking_signatures", "body_keys")
THINKING_TEXT = "Let me think about this."
THINKING_SIGNATURE = "sig-mock-0123456789"
REDACTED_DATA = "redacted-mock-data"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
OK = b'{"ok":true}'
DONE = b"data: [DONE]\n\n"
TOOL_ARGUMENTS = '{"city": "Paris"}'  # what a `tool_call` answer passes to the tool
FORCED_OPENAI = b'{"error":{"message":"mock error","type":"server_error","code":null}}'
FORCED_ANTHROPIC = b'{"type":"error","error":{"type":"api_error","message":"mock error"}}'
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                         405: "invalid_request_error", 429: "rate_limit_error", 529: "overloaded_error"}
ANTHROPIC_START = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
                   b'"content_block":{"type":"text","text":""}}\n\n'
                   b'event: ping\ndata: {"type":"ping"}\n\n')
ANTHROPIC_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
ANTHROPIC_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


class ConfigError(ValueError):
    """Invalid mock configuration."""


class MockStreamAbort(Exception):
    """Raised on purpose after a partial stream, so that the server breaks the connection."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Effective knobs for one request (see the module docstring)."""

    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    chunks: int = 8
    status: int | None = None
    error_rate: float = 0.0
    error_status: int = 500
    fail_after_chunks: int | None = None
    hang: bool = False
    omit_usage: bool = False
    require_api_key: str | None = None
    tool_call: str | None = None
    ignore_max_tokens: bool = False
    break_after_headers: bool = False
    stall_after_headers: bool = False
    usage: dict | None = None
    service_tier: str | None = None
    persona: str | None = None
    tool_break_rate: float = 0.3
    thinking: bool = False
    reasoning_tokens: int = 0
    context_limit: int | None = None
    linger_ms: float = 0  # a stream stays open this long after its last event before it ends


_NUM, _INT, _OPT_INT, _BOOL = (int, float), (int,), (int, type(None)), (bool,)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "latency_ms": _NUM, "ttft_ms": _NUM, "chunk_delay_ms": _NUM, "chunks": _INT, "status": _OPT_INT,
    "error_rate": _NUM, "error_status": _INT, "fail_after_chunks": _OPT_INT, "hang": _BOOL,
    "omit_usage": _BOOL, "require_api_key": (str, type(None)), "tool_call": (str, type(None)),
    "ignore_max_tokens": _BOOL, "break_after_headers": _BOOL, "stall_after_headers": _BOOL,
    "usage": (dict, type(None)), "service_tier": (str, type(None)),
    "persona": (str, type(None)), "tool_break_rate": _NUM, "thinking": _BOOL, "reasoning_tokens": _INT,
    "context_limit": _OPT_INT, "linger_ms": _NUM,
}


def _check_fields(cfg: Any, where: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a JSON object")
    for key, value in cfg.items():
        types = FIELD_TYPES.get(key)
        if types is None:
            raise ConfigError(f"{where}: unknown field {key!r}")
        if not isinstance(value, types) or (isinstance(value, bool) and types is not _BOOL):
            raise ConfigError(f"{where}: bad value for {key!r}: {value!r}")
        if types is not _BOOL and isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{where}: {key!r} must be >= 0")
    for key in ("error_rate", "tool_break_rate"):
        if cfg.get(key, 0) > 1:
            raise ConfigError(f"{where}: {key!r} must be within 0..1")
    if cfg.get("persona") is not None and cfg["persona"] not in PERSONAS:
        raise ConfigError(f"{where}: 'persona' must be one of {', '.join(PERSONAS)}")
    for key in ("status", "error_status"):
        if cfg.get(key) is not None and not 100 <= cfg[key] <= 599:
            raise ConfigError(f"{where}: {key!r} must be an HTTP status")
    if cfg.get("chunks", 0) > 100_000:
        raise ConfigError(f"{where}: 'chunks' must be <= 100000")
    return dict(cfg)


def validate_config(cfg: Any) -> dict[str, Any]:
    """Validate a whole config (knob fields plus optional ``models``); return a copy."""
    if not isinstance(cfg, dict):
        raise ConfigError("config must be a JSON object")
    out = _check_fields({k: v for k, v in cfg.items() if k != "models"}, "config")
    if "models" in cfg:
        if not isinstance(cfg["models"], dict):
            raise ConfigError("'models' must map model names to knob objects")
        out["models"] = {name: _check_fields(sub, f"models[{name!r}]") for name, sub in cfg["models"].items()}
    return out


def count_chars(value: Any) -> int:
    """Characters of text in strings, content parts and messages (a token id counts as 4)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(count_chars(v) for v in value)
    if isinstance(value, dict):
        return count_chars(value.get("content")) + count_chars(value.get("text"))
    if isinstance(value, int) and not isinstance(value, bool):
        return 4
    return 0


def estimate_tokens(*values: Any) -> int:
    """~1 token per 4 characters of text found in ``values``, at least 1."""
    return max(1, -(-sum(count_chars(v) for v in values) // 4))


def openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def sse_event(name: bytes, obj: Any) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def embedding_inputs(value: Any) -> list[Any] | None:
    """An embeddings ``input`` as a list of items (strings or token lists); None if invalid."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, str | list) for v in value):
            return value
    return None


def choice_counts(body: dict[str, Any]) -> tuple[int, int]:
    """(choices returned, candidates generated and billed): ``n`` and ``max(n, best_of)``, 1 when unset."""
    def count(key: str) -> int:
        value = body.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1024 else 1
    n = count("n")
    return n, max(n, count("best_of"))


def parse_max_tokens(body: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The first ``max_tokens``-like key present; ValueError if it is not a non-negative integer."""
    for key in keys:
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"'{key}' must be a non-negative integer")
            return value
    return None


class Pieces:
    """Pre-encoded content pieces ("tok1 ", ...) and their Anthropic delta events, grown on demand."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.json: list[bytes] = []
        self.anthropic: list[bytes] = []

    def ensure(self, n: int) -> None:
        for i in range(len(self.texts), n):
            self.texts.append(f"tok{i + 1} ")
            self.json.append(orjson.dumps(self.texts[-1]))
            self.anthropic.append(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                                  b'"delta":{"type":"text_delta","text":' + self.json[-1] + b"}}\n\n")


@dataclass(slots=True)
class StreamPlan:
    """A whole stream body: ``head`` (sent with the first piece), one event per piece, ``tail``."""

    head: bytes
    pieces: list[bytes]
    tail: bytes


class Pacer:
    """Sleeps that end early when the client disconnects (the watcher starts on first use)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watch: asyncio.Future[None] | None = None

    async def _wait_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def sleep(self, ms: float) -> bool:
        """Sleep ``ms`` milliseconds; False if the client went away."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._wait_disconnect())
        await asyncio.wait((self._watch,), timeout=ms / 1000.0)
        return not self._watch.done()

    @property
    def disconnected(self) -> bool:
        return self._watch is not None and self._watch.done() and not self._watch.cancelled()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


@dataclass(slots=True)
class Call:
    """One authenticated API request with its effective settings."""

    body: dict[str, Any]
    model: str | None
    settings: Settings
    anthropic: bool
    send: Send
    pacer: Pacer


async def send_bytes(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any) -> None:
    await send_bytes(send, status, orjson.dumps(obj))


async def send_error(send: Send, status: int, message: str, *, anthropic: bool = False,
                     code: str | None = None) -> None:
    """OpenAI-style ``{"error": {...}}`` or Anthropic-style ``{"type": "error", ...}`` error answer."""
    if anthropic:
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        await send_json(send, status, {"type": "error", "error": {"type": kind, "message": message}})
    else:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        await send_json(send, status, {"error": error})


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


def _roles(messages: Any) -> list[str] | None:
    """The roles of a request's messages (recorded: tests check what a translation sent)."""
    if not isinstance(messages, list):
        return None
    return [m.get("role") if isinstance(m, dict) else None for m in messages]


def _signatures(messages: Any) -> list[str]:
    """The thinking-block signatures (and redacted data) in a request's messages: what a client sent back."""
    found: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "thinking" and block.get("signature"):
                found.append(block["signature"])
            elif isinstance(block, dict) and block.get("type") == "redacted_thinking" and block.get("data"):
                found.append(block["data"])
    return found


class MockUpstream:
    """The ASGI application: config layers, pre-encoded pieces and recorded requests."""

    def __init__(self) -> None:
        self.defaults: dict[str, Any] | None = None  # read from the env at startup / first request
        self.runtime: dict[str, Any] = {}
        self.requests: deque[tuple[Any, ...]] = deque(maxlen=MAX_RECORDED)
        # Requests whose client went away before the answer was complete: (time, model).
        self.disconnects: deque[tuple[float, str | None]] = deque(maxlen=MAX_RECORDED)
        self.pieces = Pieces()
        # The simulated models' randomness (persona answers): seeded, and re-seeded by /_mock/reset, so a test
        # that resets the mock gets the same answers to the same requests every run.
        self.rng = random.Random(PERSONA_SEED)
        self.effective: dict[str, Any] = {}
        self._settings: dict[str | None, Settings] = {}
        self._routes: dict[str, tuple[str, Callable[[Call], Awaitable[None]]]] = {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/completions": ("POST", self.completions),
            "/v1/embeddings": ("POST", self.embeddings),
            "/v1/messages": ("POST", self.messages),
            "/v1/messages/count_tokens": ("POST", self.count_tokens),
            "/v1/responses": ("POST", self.responses),
            "/v1/models": ("GET", self.list_models),
        }
        self.stored: dict[str, dict[str, Any]] = {}  # responses kept for GET/DELETE /v1/responses/{id}

    # ---- configuration ----------------------------------------------------------------------------

    def load_defaults(self) -> None:
        raw = os.environ.get(CONFIG_ENV, "").strip()
        try:
            self.defaults = validate_config(orjson.loads(raw) if raw else {})
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{CONFIG_ENV} is not valid JSON: {exc}") from exc
        self._refresh()

    def _refresh(self) -> None:
        self.effective = {**(self.defaults or {}), **self.runtime}
        self._settings.clear()

    def settings_for(self, model: str | None) -> Settings:
        settings = self._settings.get(model)
        if settings is None:
            fields = {k: v for k, v in self.effective.items() if k != "models"}
            fields.update(self.effective.get("models", {}).get(model, {}))
            if len(self._settings) > 4096:
                self._settings.clear()
            settings = self._settings[model] = Settings(**fields)
        return settings

    # ---- ASGI entry -------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.defaults is None:
                self.load_defaults()
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.load_defaults()
                except ConfigError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle_http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        raw = await read_body(receive)
        if path.startswith("/_mock/"):
            await self.handle_control(method, path, raw, send)
            return
        auth = api_key = version = beta = openai_beta = None
        names = []
        for name, value in scope["headers"]:
            names.append(name.decode("latin-1"))
            if name == b"authorization":
                auth = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"anthropic-version":
                version = value.decode("latin-1")
            elif name == b"anthropic-beta":
                beta = value.decode("latin-1")
            elif name == b"openai-beta":
                openai_beta = value.decode("latin-1")
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        get = body.get if isinstance(body, dict) else {}.get
        model = get("model")
        self.requests.append((time.time(), method, path, auth, api_key, version, model, get("stream"),
                              get("stream_options"), get("max_tokens"), get("max_completion_tokens"), beta,
                              openai_beta, names, scope.get("query_string", b"").decode("latin-1"),
                              get("max_output_tokens"), get("store"), _roles(get("messages")),
                              _signatures(get("messages")), sorted(body) if isinstance(body, dict) else None))
        anthropic = path.startswith("/v1/messages")
        if path.startswith("/v1/responses/") and method in ("GET", "DELETE"):
            return await self.stored_response(method, path[len("/v1/responses/"):], send)
        route = self._routes.get(path)
        if route is None:
            return await send_error(send, 404, f"Unknown request URL: {method} {path}", anthropic=anthropic,
                                    code="unknown_url")
        if method != route[0]:
            return await send_error(send, 405, f"Method {method} not allowed for {path}", anthropic=anthropic)
        if method == "POST" and not isinstance(body, dict):
            return await send_error(send, 400, "We could not parse the JSON body of your request.",
                                    anthropic=anthropic)
        model = model if isinstance(model, str) else None
        settings = self.settings_for(model)
        key = settings.require_api_key
        if key is not None and auth != f"Bearer {key}" and api_key != key:
            return await send_error(send, 401, "Incorrect API key provided.", anthropic=anthropic,
                                    code="invalid_api_key")
        pacer = Pacer(receive)
        try:
            await route[1](Call(body or {}, model, settings, anthropic, send, pacer))
        finally:
            if pacer.disconnected:
                self.disconnects.append((time.time(), model))
            pacer.close()

    async def handle_control(self, method: str, path: str, raw: bytes, send: Send) -> None:
        """The ``/_mock/*`` endpoints (not recorded, never delayed)."""
        match method, path:
            case "GET", "/_mock/health":
                await send_bytes(send, 200, OK)
            case "GET", "/_mock/config":
                await send_json(send, 200, self.effective)
            case "POST", "/_mock/config":
                try:
                    self.runtime = validate_config(orjson.loads(raw or b"{}"))
                except (orjson.JSONDecodeError, ConfigError) as exc:
                    return await send_error(send, 400, f"invalid mock config: {exc}")
                self._refresh()
                await send_json(send, 200, self.effective)
            case "POST", "/_mock/reset":
                self.runtime = {}
                self._refresh()
                self.rng.seed(PERSONA_SEED)
                self.requests.clear()
                self.disconnects.clear()
                await send_bytes(send, 200, OK)
            case "GET", "/_mock/requests":
                await send_json(send, 200, [dict(zip(RECORD_KEYS, r, strict=True)) for r in self.requests])
            case "GET", "/_mock/disconnects":
                await send_json(send, 200, [{"time": t, "model": m} for t, m in self.disconnects])
            case _, "/_mock/health" | "/_mock/config" | "/_mock/reset" | "/_mock/requests" | "/_mock/disconnects":
                await send_error(send, 405, f"Method {method} not allowed for {path}")
            case _:
                await send_error(send, 404, f"Unknown request URL: {method} {path}", code="unknown_url")

    # ---- shared request flow ----------------------------------------------------------------------

    async def preflight(self, call: Call) -> bool:
        """Apply hang / latency / forced errors; True if the handler should answer normally."""
        s = call.settings
        if s.hang:
            await call.pacer.sleep(HANG_SECONDS * 1000)
            return False
        if s.latency_ms > 0 and not await call.pacer.sleep(s.latency_ms):
            return False
        status = s.status
        if status is None and s.error_rate > 0 and random.random() < s.error_rate:
            status = s.error_status
        if status is not None:
            await send_bytes(call.send, status, FORCED_ANTHROPIC if call.anthropic else FORCED_OPENAI)
            return False
        return True

    async def generate(self, call: Call, max_keys: tuple[str, ...],
                       build_json: Callable[[Call, int, bool], dict[str, Any]],
                       build_stream: Callable[[Call, int, bool], StreamPlan]) -> None:
        """Validate, apply the preflight knobs, then answer with ``n`` pieces as JSON or as a stream."""
        try:
            if call.model is None:
                raise ValueError("you must provide a 'model' string parameter")
            limit = parse_max_tokens(call.body, max_keys)
        except ValueError as exc:
            return await send_error(call.send, 400, str(exc), anthropic=call.anthropic)
        context = call.settings.context_limit
        if context is not None:
            body = call.body
            prompt = estimate_tokens(body.get("system"), body.get("messages"), body.get("prompt"),
                                     body.get("instructions"), body.get("input"))
            if prompt > context:
                if call.anthropic:
                    return await send_error(call.send, 400, f"prompt is too long: {prompt} tokens > {context} "
                                            "maximum", anthropic=True)
                return await send_error(call.send, 400, f"This model's maximum context length is {context} tokens. "
                                        f"However, your messages resulted in {prompt} tokens.",
                                        code="context_length_exceeded")
        chunks = call.settings.chunks
        n = chunks if limit is None or call.settings.ignore_max_tokens else min(chunks, limit)
        self.pieces.ensure(n)
        if not await self.preflight(call):
            return
        if call.settings.break_after_headers or call.settings.stall_after_headers:
            return await self.fail_after_headers(call)
        if call.body.get("stream") is True:
            await self.stream(call, build_stream(call, n, n < chunks))
        else:
            await send_json(call.send, 200, build_json(call, n, n < chunks))

    async def fail_after_headers(self, call: Call) -> None:
        """200 and headers, then a broken or stalled body: failures a client cannot see in the status."""
        streaming = call.body.get("stream") is True
        body = b"" if streaming else b'{"id":"chatcmpl-broken","choices":[{"index":0,'
        headers = SSE_HEADERS if streaming else [*JSON_HEADERS, (b"content-length", b"%d" % (len(body) * 2))]
        await call.send({"type": "http.response.start", "status": 200, "headers": headers})
        await call.send({"type": "http.response.body", "body": body, "more_body": True})
        if call.settings.stall_after_headers:
            await call.pacer.sleep(HANG_SECONDS * 1000)
            return
        raise MockStreamAbort("mock answer broken after its headers (break_after_headers)")

    async def stream(self, call: Call, plan: StreamPlan) -> None:
        """Send a stream plan, honouring ttft_ms / chunk_delay_ms / fail_after_chunks."""
        s, send, pacer = call.settings, call.send, call.pacer
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        fail_after = s.fail_after_chunks
        if s.ttft_ms <= 0 and s.chunk_delay_ms <= 0 and fail_after is None and s.linger_ms <= 0:  # one write
            await send({"type": "http.response.body", "body": b"".join((plan.head, *plan.pieces, plan.tail))})
            return
        if s.ttft_ms > 0 and not await pacer.sleep(s.ttft_ms):
            return
        pieces = plan.pieces if fail_after is None else plan.pieces[:fail_after]
        await send({"type": "http.response.body", "body": b"".join((plan.head, *pieces[:1])), "more_body": True})
        for piece in pieces[1:]:
            if s.chunk_delay_ms > 0 and not await pacer.sleep(s.chunk_delay_ms):
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if fail_after is not None:
            raise MockStreamAbort(f"mock stream aborted after {len(pieces)} chunks (fail_after_chunks)")
        if s.linger_ms > 0:  # the last event out, the connection still open (as some providers do)
            await send({"type": "http.response.body", "body": plan.tail, "more_body": True})
            await pacer.sleep(s.linger_ms)
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.body", "body": plan.tail})

    # ---- OpenAI chat completions and legacy completions -------------------------------------------

    async def chat_completions(self, call: Call) -> None:
        await self.generate(call, ("max_completion_tokens", "max_tokens"), self.chat_json,
                            partial(self.openai_stream, chat=True))

    async def completions(self, call: Call) -> None:
        await self.generate(call, ("max_tokens",), self.completion_json, partial(self.openai_stream, chat=False))

    def chat_json(self, call: Call, n: int, cut: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.pieces.texts[:n]), "refusal": None}
        reason = "length" if cut else "stop"
        if call.settings.tool_call:
            message["content"] = None
            message["tool_calls"] = [{"id": "call_mock1", "type": "function", "function": {
                "name": call.settings.tool_call, "arguments": TOOL_ARGUMENTS}}]
            reason = "tool_calls"
        if call.settings.thinking:
            message["reasoning_content"] = THINKING_TEXT
        usage = openai_usage(estimate_tokens(call.body.get("messages")), n * choice_counts(call.body)[1])
        if call.settings.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": min(call.settings.reasoning_tokens,
                                                                          usage["completion_tokens"])}
        if (reply := self.persona_reply(call)) is not None:
            message = {"role": "assistant", "content": reply.text, "refusal": None}
            reason = "stop"
            if reply.tool_call:
                message["tool_calls"] = [{"id": "call_mock1", "type": "function", "function": {
                    "name": reply.tool_call[0], "arguments": reply.tool_call[1]}}]
                reason = "tool_calls"
            usage = openai_usage(reply.prompt_tokens, reply.completion_tokens)
        out: dict[str, Any] = {
            "id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": call.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": reason}
                        for i in range(choice_counts(call.body)[0])],
        }
        if not call.settings.omit_usage:
            out["usage"] = call.settings.usage or usage
        if call.settings.service_tier:
            out["service_tier"] = call.settings.service_tier
        return out

    def persona_reply(self, call: Call) -> Reply | None:
        """The simulated model's answer, when the `persona` knob is set and the prompt is a probe's."""
        persona = call.settings.persona
        if persona is None:
            return None
        return respond(persona, call.body, self.rng, tool_break_rate=call.settings.tool_break_rate)

    def completion_json(self, call: Call, n: int, cut: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": call.model,
            "choices": [{"text": "".join(self.pieces.texts[:n]), "index": i, "logprobs": None,
                         "finish_reason": "length" if cut else "stop"} for i in range(choice_counts(call.body)[0])],
        }
        if not call.settings.omit_usage:
            out["usage"] = call.settings.usage or openai_usage(estimate_tokens(call.body.get("prompt")),
                                                               n * choice_counts(call.body)[1])
        return out

    def openai_stream(self, call: Call, n: int, cut: bool, *, chat: bool) -> StreamPlan:
        """``data: {...}`` chunks built from byte fragments; usage chunk and ``[DONE]`` in the tail."""
        options = call.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        include_usage = include_usage and not call.settings.omit_usage
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        prefix = (b'data: {"id":"' + new_id("chatcmpl-" if chat else "cmpl-").encode() + b'","object":"' + obj
                  + b'","created":' + str(int(time.time())).encode() + b',"model":' + orjson.dumps(call.model))
        end = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        reason = b'"length"' if cut else b'"stop"'
        if chat:
            p = prefix + b',"system_fingerprint":"fp_mock","choices":[{"index":0,"delta":'
            head = (p + b'{"role":"assistant","content":"","refusal":null},"logprobs":null,'
                    b'"finish_reason":null}]' + end)
            if call.settings.thinking:
                head += (p + b'{"reasoning_content":' + orjson.dumps(THINKING_TEXT)
                         + b'},"logprobs":null,"finish_reason":null}]' + end)
            pieces = [p + b'{"content":' + j + b'},"logprobs":null,"finish_reason":null}]' + end
                      for j in self.pieces.json[:n]]
            if call.settings.tool_call:
                first = {"tool_calls": [{"index": 0, "id": "call_mock1", "type": "function", "function": {
                    "name": call.settings.tool_call, "arguments": TOOL_ARGUMENTS[:9]}}]}
                rest = {"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGUMENTS[9:]}}]}
                pieces = [p + orjson.dumps(d) + b',"logprobs":null,"finish_reason":null}]' + end for d in (first, rest)]
                reason = b'"tool_calls"'
            tail = [p + b'{},"logprobs":null,"finish_reason":' + reason + b"}]" + end]
        else:
            p = prefix + b',"choices":[{"index":0,"logprobs":null,"text":'
            head = b""
            pieces = [p + j + b',"finish_reason":null}]' + end for j in self.pieces.json[:n]]
            tail = [p + b'"","finish_reason":' + reason + b"}]" + end]
        if include_usage:
            prompt = estimate_tokens(call.body.get("messages" if chat else "prompt"))
            computed = openai_usage(prompt, n * choice_counts(call.body)[1])
            if call.settings.reasoning_tokens:
                computed["completion_tokens_details"] = {"reasoning_tokens": min(call.settings.reasoning_tokens,
                                                                                 computed["completion_tokens"])}
            usage = orjson.dumps(call.settings.usage or computed)
            tier = call.settings.service_tier
            tier = b',"service_tier":' + orjson.dumps(tier) if tier else b""
            tail.append(prefix + tier + b',"choices":[],"usage":' + usage + b"}\n\n")
        tail.append(DONE)
        return StreamPlan(head, pieces, b"".join(tail))

    # ---- Anthropic messages -----------------------------------------------------------------------

    async def messages(self, call: Call) -> None:
        await self.generate(call, ("max_tokens",), self.messages_json, self.messages_stream)

    def messages_json(self, call: Call, n: int, cut: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": new_id("msg_"), "type": "message", "role": "assistant", "model": call.model,
            "content": [{"type": "text", "text": "".join(self.pieces.texts[:n])}],
            "stop_reason": "max_tokens" if cut else "end_turn", "stop_sequence": None,
        }
        if call.settings.tool_call:
            out["content"] = [{"type": "tool_use", "id": "toolu_mock1", "name": call.settings.tool_call,
                               "input": orjson.loads(TOOL_ARGUMENTS)}]
            out["stop_reason"] = "tool_use"
        if call.settings.thinking:
            out["content"] = [{"type": "thinking", "thinking": THINKING_TEXT, "signature": THINKING_SIGNATURE},
                              {"type": "redacted_thinking", "data": REDACTED_DATA}, *out["content"]]
        usage = {"input_tokens": estimate_tokens(call.body.get("system"), call.body.get("messages")),
                 "output_tokens": n}
        if (reply := self.persona_reply(call)) is not None:
            out["content"], out["stop_reason"] = [{"type": "text", "text": reply.text or ""}], "end_turn"
            if reply.tool_call:
                try:
                    arguments = orjson.loads(reply.tool_call[1])
                except orjson.JSONDecodeError:
                    arguments = {"_raw": reply.tool_call[1]}  # Anthropic sends an object; keep it broken
                out["content"] = [{"type": "tool_use", "id": "toolu_mock1", "name": reply.tool_call[0],
                                   "input": arguments}]
                out["stop_reason"] = "tool_use"
            usage = {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens}
        if not call.settings.omit_usage:
            out["usage"] = call.settings.usage or usage
        return out

    def messages_stream(self, call: Call, n: int, cut: bool) -> StreamPlan:
        message: dict[str, Any] = {"id": new_id("msg_"), "type": "message", "role": "assistant",
                                   "model": call.model, "content": [], "stop_reason": None, "stop_sequence": None}
        delta: dict[str, Any] = {"type": "message_delta", "delta": {
            "stop_reason": "max_tokens" if cut else "end_turn", "stop_sequence": None}}
        if not call.settings.omit_usage:
            input_tokens = estimate_tokens(call.body.get("system"), call.body.get("messages"))
            message["usage"] = {"input_tokens": input_tokens, "output_tokens": 1}
            delta["usage"] = {"output_tokens": n}
            if call.settings.usage:  # as Anthropic streams it: input side first, cumulative output at the end
                given = call.settings.usage
                message["usage"] = {**{k: v for k, v in given.items() if k != "output_tokens"}, "output_tokens": 1}
                delta["usage"] = {"output_tokens": given.get("output_tokens", n)}
        head = sse_event(b"message_start", {"type": "message_start", "message": message}) + ANTHROPIC_START
        pieces = self.pieces.anthropic[:n]
        if call.settings.tool_call:
            delta["delta"]["stop_reason"] = "tool_use"
            head = sse_event(b"message_start", {"type": "message_start", "message": message}) + sse_event(
                b"content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": "toolu_mock1", "name": call.settings.tool_call, "input": {}}})
            parts = (TOOL_ARGUMENTS[:9], TOOL_ARGUMENTS[9:])
            pieces = [sse_event(b"content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": part}}) for part in parts]
        tail = ANTHROPIC_BLOCK_STOP + sse_event(b"message_delta", delta) + ANTHROPIC_STOP
        if call.settings.thinking:  # thinking (index 0) and a redacted block (1) first; the answer moves to 2
            start = sse_event(b"message_start", {"type": "message_start", "message": message})
            thinking = (
                sse_event(b"content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "thinking", "thinking": "", "signature": ""}})
                + sse_event(b"content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "thinking_delta", "thinking": THINKING_TEXT}})
                + sse_event(b"content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "signature_delta", "signature": THINKING_SIGNATURE}})
                + sse_event(b"content_block_stop", {"type": "content_block_stop", "index": 0})
                + sse_event(b"content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                    "type": "redacted_thinking", "data": REDACTED_DATA}})
                + sse_event(b"content_block_stop", {"type": "content_block_stop", "index": 1}))
            head = start + thinking + head[len(start):].replace(b'"index":0', b'"index":2')
            pieces = [piece.replace(b'"index":0', b'"index":2') for piece in pieces]
            tail = tail.replace(b'"index":0', b'"index":2')
        return StreamPlan(head, pieces, tail)

    async def count_tokens(self, call: Call) -> None:
        if call.model is None or not isinstance(call.body.get("messages"), list):
            return await send_error(call.send, 400, "'model' and 'messages' are required", anthropic=True)
        if not await self.preflight(call):
            return
        tokens = estimate_tokens(call.body.get("system"), call.body.get("messages"), call.body.get("tools"))
        await send_json(call.send, 200, {"input_tokens": tokens})

    # ---- OpenAI Responses API ---------------------------------------------------------------------

    async def responses(self, call: Call) -> None:
        await self.generate(call, ("max_output_tokens",), self.responses_json, self.responses_stream)

    def responses_usage(self, call: Call, n: int) -> dict[str, Any]:
        prompt = estimate_tokens(call.body.get("instructions"), call.body.get("input"))
        reasoning = min(call.settings.reasoning_tokens, n)
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
                "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": prompt + n}

    def responses_output(self, call: Call, n: int) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = []
        if call.settings.thinking:
            output.append({"id": new_id("rs_"), "type": "reasoning",
                           "summary": [{"type": "summary_text", "text": THINKING_TEXT}]})
        if call.settings.tool_call:
            output.append({"id": new_id("fc_"), "type": "function_call", "status": "completed",
                           "call_id": "call_mock1", "name": call.settings.tool_call, "arguments": TOOL_ARGUMENTS})
        else:
            output.append({"id": new_id("msg_"), "type": "message", "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": "".join(self.pieces.texts[:n]),
                                        "annotations": []}]})
        return output

    def responses_object(self, call: Call, n: int, cut: bool, output: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": new_id("resp_"), "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed", "model": call.model, "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "error": None,
            "usage": None if call.settings.omit_usage else (call.settings.usage or self.responses_usage(call, n)),
        }
        if call.settings.service_tier:
            out["service_tier"] = call.settings.service_tier
        if call.body.get("store") is not False:
            if len(self.stored) > MAX_RECORDED:
                self.stored.clear()
            self.stored[out["id"]] = out
        return out

    def responses_json(self, call: Call, n: int, cut: bool) -> dict[str, Any]:
        return self.responses_object(call, n, cut, self.responses_output(call, n))

    def responses_stream(self, call: Call, n: int, cut: bool) -> StreamPlan:
        seq = iter(range(1_000_000))

        def ev(kind: str, **fields: Any) -> bytes:
            return sse_event(kind.encode(), {"type": kind, "sequence_number": next(seq), **fields})

        output = self.responses_output(call, n)
        final = self.responses_object(call, n, cut, output)
        start = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        head = ev("response.created", response=start) + ev("response.in_progress", response=start)
        pieces: list[bytes] = []
        tail: list[bytes] = []
        for index, item in enumerate(output):
            where = {"item_id": item["id"], "output_index": index}
            if item["type"] == "reasoning":
                head += ev("response.output_item.added", output_index=index, item={**item, "summary": []})
                head += ev("response.reasoning_summary_text.delta", **where, summary_index=0, delta=THINKING_TEXT)
                head += ev("response.output_item.done", output_index=index, item=item)
            elif item["type"] == "function_call":
                head += ev("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                pieces = [ev("response.function_call_arguments.delta", **where, delta=part)
                          for part in (TOOL_ARGUMENTS[:9], TOOL_ARGUMENTS[9:])]
                tail.append(ev("response.function_call_arguments.done", **where, arguments=TOOL_ARGUMENTS))
                tail.append(ev("response.output_item.done", output_index=index, item=item))
            else:
                part = item["content"][0]
                head += ev("response.output_item.added", output_index=index, item={**item, "content": [],
                                                                                    "status": "in_progress"})
                head += ev("response.content_part.added", **where, content_index=0, part={**part, "text": ""})
                pieces = [ev("response.output_text.delta", **where, content_index=0, delta=text)
                          for text in self.pieces.texts[:n]]
                tail.append(ev("response.output_text.done", **where, content_index=0, text=part["text"]))
                tail.append(ev("response.content_part.done", **where, content_index=0, part=part))
                tail.append(ev("response.output_item.done", output_index=index, item=item))
        kind = "response.incomplete" if cut else "response.completed"
        tail.append(ev(kind, response=final))
        return StreamPlan(head, pieces, b"".join(tail))

    async def stored_response(self, method: str, response_id: str, send: Send) -> None:
        stored = self.stored.get(response_id)
        if stored is None:
            return await send_error(send, 404, f"No response found with id '{response_id}'.")
        if method == "DELETE":
            del self.stored[response_id]
            return await send_json(send, 200, {"id": response_id, "object": "response.deleted", "deleted": True})
        await send_json(send, 200, stored)

    # ---- embeddings and models --------------------------------------------------------------------

    async def embeddings(self, call: Call) -> None:
        inputs = embedding_inputs(call.body.get("input"))
        if call.model is None or inputs is None:
            return await send_error(call.send, 400, "'model' and a non-empty 'input' (string or list) are required")
        if not await self.preflight(call):
            return
        vector = EMBEDDING_B64 if call.body.get("encoding_format") == "base64" else EMBEDDING_FLOATS
        out: dict[str, Any] = {
            "object": "list", "model": call.model,
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))],
        }
        if not call.settings.omit_usage:
            tokens = sum(estimate_tokens(item) for item in inputs)
            out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        await send_json(call.send, 200, out)

    async def list_models(self, call: Call) -> None:
        if not await self.preflight(call):
            return
        names = sorted({*DEFAULT_MODEL_IDS, *self.effective.get("models", {})})
        data = [{"id": name, "object": "model", "created": 1700000000, "owned_by": "mock"} for name in names]
        await send_json(call.send, 200, {"object": "list", "data": data})


_EMBEDDING = [round(0.125 * (i + 1) - 0.5, 3) for i in range(EMBEDDING_DIM)]
EMBEDDING_FLOATS = orjson.Fragment(orjson.dumps(_EMBEDDING))
EMBEDDING_B64 = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *_EMBEDDING)).decode()

app = MockUpstream()


# ---- CLI ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mock_upstream", description="Mock OpenAI/Anthropic upstream on granian.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--kill-timeout", type=int, default=2,
                   help="seconds granian waits for in-flight (e.g. hanging) requests on shutdown")
    p.add_argument("--config", help="JSON object of default knobs (may include 'models')")
    for name, types in FIELD_TYPES.items():
        flag = "--" + name.replace("_", "-")
        if types is _BOOL:
            p.add_argument(flag, dest=name, action="store_true", default=None)
        else:
            p.add_argument(flag, dest=name, type=float if types is _NUM else types[0])
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """Env ``MOCK_UPSTREAM_CONFIG``, overridden by ``--config``, overridden by the knob flags."""
    cfg: dict[str, Any] = {}
    try:
        for raw in (os.environ.get(CONFIG_ENV, "").strip(), args.config):
            cfg.update(validate_config(orjson.loads(raw)) if raw else {})
        cfg.update({name: getattr(args, name) for name in FIELD_TYPES if getattr(args, name) is not None})
        return validate_config(cfg)
    except (orjson.JSONDecodeError, ConfigError) as exc:
        raise SystemExit(f"invalid mock config: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    """Serve the mock with granian; the config built from env and flags becomes every worker's defaults."""
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    args = parse_args(argv)
    os.environ[CONFIG_ENV] = orjson.dumps(build_config(args)).decode()
    Granian(target="bench.mock_upstream:app", address=args.host, port=args.port, interface=Interfaces.ASGI,
            loop=Loops.uvloop, workers=args.workers, log_level=LogLevels(args.log_level),
            workers_kill_timeout=args.kill_timeout).serve()


if __name__ == "__main__":
    main()

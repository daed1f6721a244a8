"""Load-testing scenarios for a running Rocket Relay deployment (`make run`, docker-compose, or any other).

    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8080

At the start of a test (`test_start`), `bench/locust_setup.py` creates the tenants of this run through the
control plane's platform admin API: ordinary orgs with big balances and several keys, an org whose keys have
a low requests-per-minute limit, small orgs that run dry, and one revoked key. At the end (`test_stop`) it
suspends those orgs. Set `RR_LOCUST_TENANTS` to a file written by `python bench/locust_setup.py --out FILE`
to reuse tenants instead (needed to share them between distributed workers; otherwise each locust process
creates its own).

Scenarios (user classes), with their weight (share of the simulated users) and expected outcomes:

    ChatStreamUser   30  POST /v1/chat/completions, streamed, read to `[DONE]`  200 (`chat stream`)
    ChatUser         20  POST /v1/chat/completions                              200 (`chat`)
    EmbeddingsUser   10  POST /v1/embeddings, 1-4 inputs                        200 (`embeddings`)
    ModelsUser        5  GET /v1/models                                         200 (`models`)
    AnthropicUser    10  POST /v1/messages (`x-api-key`), half of it streamed   200 (`messages`, `messages stream`)
    BadKeyUser        5  chat with an unknown, malformed, revoked or no key     401 (`bad key (<kind>): 401 <code>`)
    RateLimitedUser   5  chat with keys limited to RR_LOCUST_LIMITED_RPM        200 up to the limit, then 429
    DrainingOrgUser   5  chat on orgs with a tiny balance                       200 until it runs out, then 402

Prompts vary in size (a sentence to ~4 KB); `max_tokens` is RR_LOCUST_MAX_TOKENS or unset. Every answer is
checked: chat content and usage, SSE framing, `[DONE]` / `message_stop`, no usage chunk for a client that did
not ask for one, one embedding per input, the chat model listed, `x-request-id` on every response,
`retry-after` on 429, no more successes per minute than a limited key allows. Expected errors are successes
under their own request name (`limited: 429 rate_limit_exceeded`, `drain: 402 insufficient_quota`, ...);
anything else is a failure whose message starts with the status and the error code (`503
billing_unavailable: ...`, `200 stream ended without [DONE]`, `0 ConnectionRefusedError: ...`), so locust's
error report lists the failures by type. Locust exits 1 when anything failed, 2 when the set-up failed.

Environment variables (all optional; the defaults fit `make run`):

    --host / LOCUST_HOST             the proxy, e.g. http://127.0.0.1:8080
    RR_LOCUST_CONTROL_PLANE          control plane used for set-up (http://127.0.0.1:8090)
    RR_LOCUST_ADMIN_EMAIL            a platform admin (admin@rocket-relay.localhost, `make run`'s)
    RR_LOCUST_ADMIN_PASSWORD         its password (default: RR_DEMO_ADMIN_PASSWORD in <RR_DATA_DIR or .data>/dev.env)
    RR_LOCUST_TENANTS                a tenants file (bench/locust_setup.py --out) to use instead of creating tenants
    RR_LOCUST_KEEP_TENANTS           1: do not suspend the created orgs at the end (0)
    RR_LOCUST_ORGS                   ordinary orgs (10)
    RR_LOCUST_KEYS_PER_ORG           keys per ordinary org (3)
    RR_LOCUST_BALANCE_MICROS         balance of the ordinary and rate-limited orgs (100000000 = 100 USD)
    RR_LOCUST_LIMITED_KEYS           rate-limited keys (3)
    RR_LOCUST_LIMITED_RPM            their requests-per-minute limit (5)
    RR_LOCUST_DRAIN_ORGS             orgs that run dry (3)
    RR_LOCUST_DRAIN_BALANCE_MICROS   their balance (300 µ$: a few dozen small requests at gpt-4o-mini's price)
    RR_LOCUST_CHAT_MODEL             chat model (gpt-4o-mini)
    RR_LOCUST_EMBEDDING_MODEL        embeddings model (text-embedding-3-small)
    RR_LOCUST_MESSAGES_MODEL         model for Anthropic /v1/messages (the chat model)
    RR_LOCUST_MAX_TOKENS             `max_tokens` of the requests that set one (16)
    RR_LOCUST_WAIT                   seconds a user waits between requests, "min,max" (0.1,1.0);
                                     rate-limited and draining users wait half as long
    RR_LOCUST_TIMEOUT                connect and read timeout of one request, seconds (30)
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import string
import threading
import time
from collections import Counter
from collections.abc import Callable

import locust_setup  # beside this file: locust puts the locustfile's folder on sys.path
from locust import FastHttpUser, between, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner

log = logging.getLogger("rr_locust")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _wait_range() -> tuple[float, float]:
    raw = _env("RR_LOCUST_WAIT", "0.1,1.0")
    try:
        low, _, high = raw.partition(",")
        low_s, high_s = float(low), float(high or low)
    except ValueError:
        raise SystemExit(f"RR_LOCUST_WAIT must be 'min,max' seconds, not {raw!r}") from None
    return low_s, max(low_s, high_s)


CHAT_MODEL = _env("RR_LOCUST_CHAT_MODEL", "gpt-4o-mini")
EMBEDDING_MODEL = _env("RR_LOCUST_EMBEDDING_MODEL", "text-embedding-3-small")
MESSAGES_MODEL = _env("RR_LOCUST_MESSAGES_MODEL", CHAT_MODEL)
MAX_TOKENS = int(_env("RR_LOCUST_MAX_TOKENS", "16"))
TIMEOUT_S = float(_env("RR_LOCUST_TIMEOUT", "30"))
WAIT = _wait_range()
TENANTS_FILE = os.environ.get("RR_LOCUST_TENANTS", "").strip()
KEEP_TENANTS = _env("RR_LOCUST_KEEP_TENANTS", "0") not in ("0", "false", "no")

# --- Tenants ------------------------------------------------------------------------------------------

TENANTS: locust_setup.Tenants | None = None
_CREATED_HERE = False  # created by this process's test_start (so suspended by its test_stop)


@events.test_start.add_listener
def _create_tenants(environment, **_kwargs) -> None:
    global TENANTS, _CREATED_HERE
    if isinstance(environment.runner, MasterRunner) or TENANTS is not None:
        return  # the master runs no users; a restarted test (web UI) keeps its tenants
    try:
        if TENANTS_FILE:
            TENANTS = locust_setup.load_tenants(TENANTS_FILE)
            log.info("locust setup: tenants of run %s from %s", TENANTS.run, TENANTS_FILE)
        else:
            TENANTS = locust_setup.create_tenants(locust_setup.SetupConfig.from_env(), log=log.info)
            _CREATED_HERE = True
    except (locust_setup.SetupError, OSError, ValueError) as exc:
        log.error("locust setup failed: %s", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.greenlet.spawn(environment.runner.quit)


@events.test_stop.add_listener
def _suspend_tenants(environment, **_kwargs) -> None:
    global TENANTS, _CREATED_HERE
    if not _CREATED_HERE or TENANTS is None or KEEP_TENANTS:
        return
    tenants, TENANTS, _CREATED_HERE = TENANTS, None, False
    try:
        count = locust_setup.suspend_tenants(tenants, locust_setup.SetupConfig.from_env())
        log.info("locust setup: suspended the %d orgs of run %s", count, tenants.run)
    except locust_setup.SetupError as exc:
        log.warning("could not suspend the orgs of run %s: %s", tenants.run, exc)


def _tenants() -> locust_setup.Tenants:
    if TENANTS is None:
        raise StopUser  # the set-up failed (logged above) and the runner is quitting
    return TENANTS


# --- Request bodies -----------------------------------------------------------------------------------

_WORDS = ("relay", "rocket", "latency", "token", "stream", "budget", "invoice", "summary", "python", "model",
          "answer", "question", "billing", "limit", "cache", "route", "provider", "request", "window", "quota")


def _prompt() -> str:
    """Mostly a sentence, sometimes a paragraph, rarely ~4 KB (a pasted document)."""
    size = random.choices((8, 80, 700), weights=(70, 25, 5))[0]
    return " ".join(random.choice(_WORDS) for _ in range(size))


def _max_tokens() -> dict:
    return {"max_tokens": MAX_TOKENS} if random.random() < 0.8 else {}


def _chat_body(*, stream: bool = False, include_usage: bool = False, short: bool = False) -> dict:
    messages = [{"role": "user", "content": "Say hi." if short else _prompt()}]
    if not short and random.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a terse assistant."})
    body: dict = {"model": CHAT_MODEL, "messages": messages, **({"max_tokens": MAX_TOKENS} if short else _max_tokens())}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


# --- Judging answers ----------------------------------------------------------------------------------


def _error_of(resp) -> tuple[str, str]:
    """(code, message) of an error answer, OpenAI-shaped or Anthropic-shaped."""
    try:
        body = json.loads(resp.content or b"")
    except (ValueError, TypeError):
        return "non-json", ""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "no-error-object", ""
    code = err.get("code") or err.get("type") or "no-code"
    return str(code), str(err.get("message") or "")[:100]


def _judge(resp, scenario: str, *, ok: Callable[[], str | None] | None = None,
           expected: dict[int, str] | None = None, started: float | None = None,
           ok_name: str | None = None) -> int:
    """Mark `resp` (a catch_response context) a success or a failure; return its status.

    200 is run through `ok` (returns a problem or None). A status in `expected` with the expected error code
    is a success named `<scenario>: <status> <code>`. Anything else fails with "<status> <code>: <message>".
    For streams, `started` makes the recorded time cover the whole stream, not just the headers.
    """
    status = resp.status_code
    if status == 0:
        error = getattr(resp, "error", None)
        resp.failure(f"0 {type(error).__name__ if error else 'no response'}: {error}")
        return status
    if not resp.headers or not resp.headers.get("x-request-id"):
        resp.failure(f"{status} no x-request-id header")
        return status
    if status == 200:
        try:
            problem = ok() if ok else None
        except Exception as exc:  # a broken stream, a body that is not what the API promises
            problem = f"unreadable answer: {type(exc).__name__}: {exc}"
        if started is not None:
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        if problem:
            resp.failure(f"200 {problem}")
        else:
            if ok_name:
                resp.request_meta["name"] = ok_name
            resp.success()
        return status
    code, message = _error_of(resp)
    if expected and expected.get(status) == code:
        problem = None
        if status == 429 and not resp.headers.get("retry-after"):
            problem = "429 without retry-after"
        if problem:
            resp.failure(problem)
        else:
            resp.request_meta["name"] = f"{scenario}: {status} {code}"
            resp.success()
        return status
    resp.failure(f"{status} {code}: {message}")
    return status


def _sse_events(resp) -> list[tuple[str | None, bytes]]:
    """Read the whole SSE body; (event name or None, data payload) per event, in order."""
    buf = bytearray()
    for chunk in resp.iter_content(chunk_size=8192, decode_content=False):
        buf += chunk if isinstance(chunk, bytes) else chunk.encode()
    resp.request_meta["response_length"] = len(buf)
    out = []
    for block in bytes(buf).replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        out.append((name, b"\n".join(data)))
    return out


def _check_chat(resp) -> str | None:
    body = resp.json()
    choice = (body.get("choices") or [{}])[0]
    if not (choice.get("message") or {}).get("content"):
        return "chat answer without content"
    usage = body.get("usage") or {}
    if not usage.get("total_tokens"):
        return "chat answer without usage"
    return None


def _check_chat_stream(resp, include_usage: bool) -> str | None:
    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
        return f"stream with content-type {resp.headers.get('content-type')}"
    items = _sse_events(resp)
    if not items or items[-1][1] != b"[DONE]":
        return "stream ended without [DONE]"
    text, usage_chunks = [], 0
    for _, data in items[:-1]:
        chunk = json.loads(data)
        if "error" in chunk:
            return f"stream error event {(chunk['error'] or {}).get('code')}"
        if chunk.get("usage"):
            usage_chunks += 1
        for choice in chunk.get("choices") or ():
            text.append((choice.get("delta") or {}).get("content") or "")
    if not "".join(text):
        return "stream without content"
    if include_usage and usage_chunks != 1:
        return f"stream with {usage_chunks} usage chunks (asked for one)"
    if not include_usage and usage_chunks:
        return "usage chunk sent to a client that did not ask for it"
    return None


def _check_messages(resp) -> str | None:
    body = resp.json()
    if body.get("type") != "message" or not (body.get("content") or [{}])[0].get("text"):
        return "messages answer without text"
    if not (body.get("usage") or {}).get("output_tokens"):
        return "messages answer without usage"
    return None


def _check_messages_stream(resp) -> str | None:
    items = _sse_events(resp)
    names = [name for name, _ in items]
    if not names or names[-1] != "message_stop":
        return "messages stream ended without message_stop"
    if names[0] != "message_start":
        return f"messages stream started with {names[0]}"
    if "error" in names:
        return "messages stream error event"
    text = "".join((json.loads(data).get("delta") or {}).get("text") or ""
                   for name, data in items if name == "content_block_delta")
    return None if text else "messages stream without text"


def _check_embeddings(resp, count: int) -> str | None:
    data = resp.json().get("data") or []
    if len(data) != count or not all(isinstance(d.get("embedding"), list) and d["embedding"] for d in data):
        return f"{len(data)} embeddings for {count} inputs"
    return None


# --- Users --------------------------------------------------------------------------------------------


class _RelayUser(FastHttpUser):
    abstract = True
    wait_time = between(*WAIT)
    network_timeout = TIMEOUT_S
    connection_timeout = TIMEOUT_S

    def on_start(self) -> None:
        self.key = random.choice(_tenants().keys)  # one client app, one key

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.key}"}


class ChatStreamUser(_RelayUser):
    weight = 30

    @task
    def chat_stream(self) -> None:
        include_usage = random.random() < 0.5
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=_chat_body(stream=True, include_usage=include_usage),
                              headers=self.auth(), name="chat stream", stream=True, catch_response=True) as resp:
            _judge(resp, "chat stream", ok=lambda: _check_chat_stream(resp, include_usage), started=started)


class ChatUser(_RelayUser):
    weight = 20

    @task
    def chat(self) -> None:
        with self.client.post("/v1/chat/completions", json=_chat_body(), headers=self.auth(), name="chat",
                              catch_response=True) as resp:
            _judge(resp, "chat", ok=lambda: _check_chat(resp))


class EmbeddingsUser(_RelayUser):
    weight = 10

    @task
    def embeddings(self) -> None:
        inputs = [_prompt() for _ in range(random.randint(1, 4))]
        body = {"model": EMBEDDING_MODEL, "input": inputs[0] if len(inputs) == 1 else inputs}
        with self.client.post("/v1/embeddings", json=body, headers=self.auth(), name="embeddings",
                              catch_response=True) as resp:
            _judge(resp, "embeddings", ok=lambda: _check_embeddings(resp, len(inputs)))


class ModelsUser(_RelayUser):
    weight = 5

    @task
    def models(self) -> None:
        with self.client.get("/v1/models", headers=self.auth(), name="models", catch_response=True) as resp:
            _judge(resp, "models", ok=lambda: None if any(
                m.get("id") == CHAT_MODEL for m in resp.json().get("data") or ()) else f"{CHAT_MODEL} not listed")


class AnthropicUser(_RelayUser):
    """An Anthropic SDK client: `x-api-key`, `anthropic-version`, Messages API, half of it streamed."""

    weight = 10

    def _post(self, stream: bool) -> None:
        body = {"model": MESSAGES_MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": _prompt()}]}
        if random.random() < 0.3:
            body["system"] = "You are a terse assistant."
        name = "messages stream" if stream else "messages"
        if stream:
            body["stream"] = True
        headers = {"x-api-key": self.key, "anthropic-version": "2023-06-01"}
        started = time.perf_counter()
        with self.client.post("/v1/messages", json=body, headers=headers, name=name, stream=stream,
                              catch_response=True) as resp:
            if stream:
                _judge(resp, name, ok=lambda: _check_messages_stream(resp), started=started)
            else:
                _judge(resp, name, ok=lambda: _check_messages(resp))

    def on_start(self) -> None:
        super().on_start()
        self.streamed = random.random() < 0.5

    @task
    def messages(self) -> None:
        self.streamed = not self.streamed  # alternate: half of the requests stream
        self._post(stream=self.streamed)


def _random_key() -> str:
    alphabet = string.ascii_letters + string.digits
    prefix = "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    return f"rr-{prefix}_{''.join(random.choice(alphabet) for _ in range(32))}"


class BadKeyUser(_RelayUser):
    """Clients with wrong credentials: each must get 401 and nothing else."""

    weight = 5

    # Unknown 4 : malformed 2 : revoked 2 : missing 1, in a fixed cycle so that a short run sees every kind.
    KINDS = ("unknown", "malformed", "unknown", "revoked", "unknown", "malformed", "missing", "unknown", "revoked")

    def on_start(self) -> None:
        super().on_start()
        self.turn = random.randrange(len(self.KINDS))

    @task
    def bad_key(self) -> None:
        self.turn += 1
        kind = self.KINDS[self.turn % len(self.KINDS)]
        if kind == "unknown":  # well-formed, never issued: a cache miss down to PostgreSQL each time
            headers, code = self.auth(_random_key()), "invalid_api_key"
        elif kind == "malformed":
            headers, code = self.auth("sk-" + secrets.token_urlsafe(24)), "invalid_api_key"
        elif kind == "revoked":
            headers, code = self.auth(random.choice(_tenants().revoked)), "api_key_revoked"
        else:
            headers, code = {}, "missing_api_key"
        scenario = f"bad key ({kind})"
        with self.client.post("/v1/chat/completions", json=_chat_body(short=True), headers=headers, name=scenario,
                              catch_response=True) as resp:
            _judge(resp, scenario, ok=lambda: "a bad key was served", expected={401: code})


# Successes seen per (limited key, minute window) in this process: at most the key's rpm may succeed.
_LIMITED_OK: Counter = Counter()
_LIMITED_LOCK = threading.Lock()


class RateLimitedUser(_RelayUser):
    """A client hammering keys limited to a few requests per minute: 200 up to the limit, then 429."""

    weight = 5
    wait_time = between(WAIT[0] / 2, WAIT[1] / 2)

    @task
    def limited(self) -> None:
        entry = random.choice(_tenants().limited)
        window = int(time.time() // 60)
        with self.client.post("/v1/chat/completions", json=_chat_body(short=True), headers=self.auth(entry["key"]),
                              name="limited", catch_response=True) as resp:

            def ok() -> str | None:
                if resp.headers.get("x-ratelimit-limit-requests") != str(entry["rpm"]):
                    return f"x-ratelimit-limit-requests {resp.headers.get('x-ratelimit-limit-requests')}"
                if int(time.time() // 60) == window:  # the request began and ended in one window
                    with _LIMITED_LOCK:
                        _LIMITED_OK[entry["key"], window] += 1
                        if _LIMITED_OK[entry["key"], window] > entry["rpm"]:
                            return f"more than {entry['rpm']} requests in a minute succeeded"
                return _check_chat(resp)

            _judge(resp, "limited", ok=ok, expected={429: "rate_limit_exceeded"}, ok_name="limited: 200")


class DrainingOrgUser(_RelayUser):
    """A client of an org with a tiny balance: served until the money runs out, then 402."""

    weight = 5
    wait_time = between(WAIT[0] / 2, WAIT[1] / 2)

    @task
    def drain(self) -> None:
        entry = random.choice(_tenants().drain)
        with self.client.post("/v1/chat/completions", json=_chat_body(short=True), headers=self.auth(entry["key"]),
                              name="drain", catch_response=True) as resp:
            _judge(resp, "drain", ok=lambda: _check_chat(resp), expected={402: "insufficient_quota"},
                   ok_name="drain: 200")

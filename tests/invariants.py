"""Invariants the adversarial suite checks after hostile traffic, and a raw HTTP/1.1 client for it.

- `check_answer`: what every answer of the relay must look like (no unprovoked 5xx; the error shape of
  the path's dialect on 4xx; valid JSON or a properly ended stream on 200).
- `raw_exchange`: one request written byte for byte on a fresh socket (header tricks httpx refuses to
  send), the answer parsed by hand; `None` when the server closed without answering, `HUNG` on timeout.
- `assert_money_invariants`: the ledger, the live balance, the credit limit, the usage records and the
  reconciler agree for a set of orgs, after the billing flusher drained the stream (bounded wait).
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

import asyncpg
import orjson
from redis.asyncio import Redis

from shared.reconcile import reconcile
from shared.redis_keys import RedisKeys
from shared.settings import Settings

__all__ = ["HUNG", "RawResponse", "assert_money_invariants", "check_answer", "raw_exchange"]

ANTHROPIC_PATH = "/v1/messages"


def check_answer(path: str, status: int, headers: dict[str, str], body: bytes, *,
                 allowed_5xx: frozenset[int] = frozenset(), stream: bool = False) -> None:
    """Raise AssertionError unless this is an answer the relay may give to a hostile request."""
    where = f"{path} answered {status}: {body[:300]!r}"
    assert status < 500 or status in allowed_5xx, f"unprovoked 5xx: {where}"
    if status >= 400:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"error body is not JSON: {where}") from None
        if path == ANTHROPIC_PATH:
            assert isinstance(doc, dict) and doc.get("type") == "error", f"not an Anthropic error: {where}"
            err = doc.get("error")
            assert isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(
                err.get("message"), str), f"Anthropic error without type/message: {where}"
        else:
            assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), f"not an OpenAI error: {where}"
            err = doc["error"]
            assert {"message", "type", "code", "param"} <= err.keys(), f"error lacks a field: {where}"
            assert isinstance(err["message"], str) and isinstance(err["type"], str), f"bad error fields: {where}"
            assert err["code"] is None or isinstance(err["code"], str), f"bad error code: {where}"
            assert err["param"] is None or isinstance(err["param"], str), f"bad error param: {where}"
        return
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            text = body.rstrip()
            end = b"event: message_stop" if path == ANTHROPIC_PATH else b"data: [DONE]"
            assert end in text[-400:], f"stream not properly ended: {where} … {body[-300:]!r}"
            assert b'"error"' not in body, f"stream ended with an error event: {body[-300:]!r}"
        else:
            assert not stream or path == "/v1/embeddings", f"stream asked, JSON answered: {where}"
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise AssertionError(f"200 answer is not JSON: {where}") from None
            assert isinstance(doc, dict), f"200 answer is not an object: {where}"


# ---- a raw HTTP/1.1 client ------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


HUNG = RawResponse(-1)  # no answer and no close within the timeout


def _recv_until(sock: socket.socket, buf: bytearray, marker: bytes, deadline: float) -> int:
    while (at := buf.find(marker)) < 0:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return at


def _recv_exact(sock: socket.socket, buf: bytearray, size: int, deadline: float) -> None:
    while len(buf) < size:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, pause_after: int | None = None,
                 host: str = "127.0.0.1") -> RawResponse | None:
    """Send `data` on a new connection and read one answer. `pause_after`: send only that many bytes and
    then stay silent (a client that never finishes its request). None: closed without any answer."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data if pause_after is None else data[:pause_after])
        except OSError:
            pass  # the server may close while we still send; what it answered is read below
        buf = bytearray()
        try:
            end = _recv_until(sock, buf, b"\r\n\r\n", deadline)
        except TimeoutError:
            return HUNG
        except ConnectionError:
            return None if not buf else RawResponse(0, {}, bytes(buf))
        head, rest = bytes(buf[:end]).decode("latin-1"), bytearray(buf[end + 4:])
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            if "content-length" in headers:
                _recv_exact(sock, rest, int(headers["content-length"]), deadline)
                body = bytes(rest[: int(headers["content-length"])])
            elif "chunked" in headers.get("transfer-encoding", ""):
                body = b""
                while True:
                    at = _recv_until(sock, rest, b"\r\n", deadline)
                    size = int(bytes(rest[:at]).split(b";")[0], 16)
                    _recv_exact(sock, rest, at + 2 + size + 2, deadline)
                    body += bytes(rest[at + 2: at + 2 + size])
                    del rest[: at + 2 + size + 2]
                    if size == 0:
                        break
            else:
                while chunk := sock.recv(65536):
                    rest += chunk
                body = bytes(rest)
        except TimeoutError:
            return RawResponse(-status, headers, bytes(rest))  # headers came, the body never ended
        except ConnectionError:
            return RawResponse(status, headers, bytes(rest))
        return RawResponse(status, headers, body)


# ---- money -------------------------------------------------------------------------------------------


@dataclass
class OrgExpectation:
    """What a test knows about one org it sent traffic for."""

    credit_limit: int = 0
    billed: int = 0  # answers that must have exactly one usage record each (status 200)
    spend_caps: dict[int, int] = field(default_factory=dict)  # key id -> monthly cap (µ$)
    # Budget counters (calendar: a string, rolling: a hash of buckets) -> the budget's limit (µ$).
    budget_counters: dict[str, int] = field(default_factory=dict)


async def live_state(redis: Redis, keys: RedisKeys, org_id: int) -> dict[str, int]:
    raw = await redis.hgetall(keys.org(org_id).balance)
    return {k.decode(): int(v) for k, v in raw.items() if k != b"epoch"}


async def key_spend(redis: Redis, keys: RedisKeys, org_id: int, key_id: int) -> int:
    month = time.strftime("%Y%m", time.gmtime())
    return int(await redis.get(keys.org(org_id).key_spend(key_id, month)) or 0)


async def budget_spend(redis: Redis, counter: str) -> int:
    """What a budget counter holds: a calendar period's spend, or the sum of a rolling window's buckets."""
    if await redis.type(counter) == b"hash":
        return sum(int(v) for v in (await redis.hgetall(counter)).values())
    return int(await redis.get(counter) or 0)


async def assert_live_invariants(redis: Redis, keys: RedisKeys, org_id: int, exp: OrgExpectation) -> None:
    """Once every answer came back: nothing reserved, no overdraft, no key past its cap. Settlement runs right
    after the last byte is sent, so the last requests' holds may still be released a moment after the client
    has its answer: polled for up to 2 s (a hold that outlives that was never released)."""
    state = await live_state(redis, keys, org_id)
    if not state:
        return  # never reserved: no live balance was created
    for _ in range(40):
        if state.get("reserved", 0) == 0:
            break
        await asyncio.sleep(0.05)
        state = await live_state(redis, keys, org_id)
    assert state.get("reserved", 0) == 0, f"org {org_id}: {state['reserved']} µ$ still reserved after all answers"
    assert state["balance"] >= -exp.credit_limit, (
        f"org {org_id} overdrawn: live balance {state['balance']} µ$ < -credit limit {-exp.credit_limit} µ$")
    for key_id, cap in exp.spend_caps.items():
        spent = await key_spend(redis, keys, org_id, key_id)
        assert spent <= cap, f"key {key_id} spent {spent} µ$ this month, past its cap of {cap} µ$"


async def _drained(db: asyncpg.Pool, redis: Redis, keys: RedisKeys, org_id: int, billed: int) -> bool:
    records = await db.fetchval("select count(*) from usage_records where org_id = $1", org_id)
    pg = await db.fetchval("select balance_micros from org_balances where org_id = $1", org_id)
    state = await live_state(redis, keys, org_id)
    return records >= billed and (not state or (state["balance"] == pg and state.get("reserved", 0) == 0))


async def assert_money_invariants(db: asyncpg.Pool, redis: Redis, settings: Settings,
                                  orgs: dict[int, OrgExpectation], *, timeout: float = 20.0) -> None:
    """After the flusher drained the billing stream (waited for, bounded): for every org, PostgreSQL's
    balance is the sum of its transactions and equals the live balance; nothing is reserved; the balance
    is above -credit limit; one usage record per billed answer and no more; no key past its spend cap and no
    budget counter past its limit; the reconciler sees no drift."""
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    deadline = time.monotonic() + timeout
    pending = set(orgs)
    while pending and time.monotonic() < deadline:
        pending = {o for o in pending if not await _drained(db, redis, keys, o, orgs[o].billed)}
        if pending:
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # a usage record too many would arrive now
    problems = []
    for org_id, exp in sorted(orgs.items()):
        row = await db.fetchrow(
            """select b.balance_micros, (select coalesce(sum(amount_micros), 0) from balance_transactions t
                                         where t.org_id = b.org_id)::bigint as ledger,
                      (select count(*) from usage_records u where u.org_id = b.org_id) as records,
                      (select count(*) from usage_records u where u.org_id = b.org_id
                                                            and u.transaction_id is null) as unlinked
               from org_balances b where b.org_id = $1""", org_id)
        state = await live_state(redis, keys, org_id)
        if row["balance_micros"] != row["ledger"]:
            problems.append(f"org {org_id}: balance {row['balance_micros']} != sum of transactions {row['ledger']}")
        if state and state["balance"] != row["balance_micros"]:
            problems.append(f"org {org_id}: live balance {state['balance']} != PostgreSQL {row['balance_micros']}"
                            f" after {timeout} s of draining")
        if state.get("reserved", 0):
            problems.append(f"org {org_id}: {state['reserved']} µ$ still reserved")
        if row["balance_micros"] < -exp.credit_limit:
            problems.append(f"org {org_id} overdrawn: {row['balance_micros']} µ$ < -{exp.credit_limit} µ$")
        if row["records"] != exp.billed:
            problems.append(f"org {org_id}: {row['records']} usage records for {exp.billed} billed answers")
        if row["unlinked"]:
            problems.append(f"org {org_id}: {row['unlinked']} usage records without a ledger transaction")
        for key_id, cap in exp.spend_caps.items():
            spent = await key_spend(redis, keys, org_id, key_id)
            if spent > cap:
                problems.append(f"key {key_id}: spent {spent} µ$, past its cap of {cap} µ$")
        for counter, limit in exp.budget_counters.items():
            spent = await budget_spend(redis, counter)
            if spent > limit:
                problems.append(f"budget counter {counter}: {spent} µ$ spent, past its limit of {limit} µ$")
    drifts = [str(d) for d in await reconcile(settings) if d.org_id in orgs]
    problems += [f"reconcile: {d}" for d in drifts]
    assert not problems, "money invariants broken:\n  " + "\n  ".join(problems)

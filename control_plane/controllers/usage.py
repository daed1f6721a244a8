"""Balance, balance transactions, usage per day × model × key, and request logs of an org.

Usage and request logs read from `cp.read_pool` (a replica, when one is set): they are scans of the
partitioned tables, already behind the answers by the flush interval, so a replica's lag only adds to that.
The balance and the ledger stay on the primary: a top-up must show at once.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, get
from litestar.params import FromQuery, Parameter

from control_plane.common import CP, DEPENDENCIES, IdParam, LimitParam, utc
from control_plane.errors import Invalid, NotFound
from control_plane.logs import (
    LogFilter,
    UsageFilter,
    decode_cursor,
    encode_cursor,
    log_window,
    request_log_query,
    usage_query,
    usage_window,
)
from control_plane.permissions import require
from control_plane.state import MAX_ID
from shared.generations import fetch_generation
from shared.money import COMPONENTS, Price, component_costs
from shared.usage import Usage as Tokens

MAX_LOG_RANGE = datetime.timedelta(days=93)
MAX_USAGE_DAYS = 366


class Balance(msgspec.Struct, frozen=True):
    balance_micros: int  # the ledger's balance (PostgreSQL): the sum of all transactions
    credit_limit_micros: int
    updated_at: datetime.datetime
    live_balance_micros: int | None  # the hot path's balance (Redis), ahead of the ledger by unflushed usage
    reserved_micros: int | None  # held by requests in flight


class Transaction(msgspec.Struct, frozen=True):
    id: int
    kind: str
    amount_micros: int
    created_at: datetime.datetime
    reason: str | None
    external_id: str | None
    request_count: int | None


class TransactionPage(msgspec.Struct, frozen=True):
    data: list[Transaction]
    next_before_id: int | None  # pass as before_id for the next (older) page


class ComponentUsage(msgspec.Struct, frozen=True):
    tokens: int
    cost_micros: int  # this component's share, rounded down (the row's cost_micros is what was charged)


class UsageRow(msgspec.Struct, frozen=True):
    day: datetime.date
    model: str
    api_key_id: int | None
    requests: int
    prompt_tokens: int  # all input components
    completion_tokens: int  # all output components (reasoning included)
    cost_micros: int
    # input, cached_input, cache_write_5m, cache_write_1h, input_image, input_audio, output, reasoning,
    # output_image, output_audio: tokens and cost of each (only those with tokens)
    components: dict[str, ComponentUsage] = {}


class Generation(msgspec.Struct, frozen=True):
    """One request's record with its usage components and what each cost (the request-log detail)."""

    id: str
    created_at: datetime.datetime
    model: str | None
    provider: str | None
    route_id: int | None
    upstream_model: str | None
    reported_model: str | None
    path: str
    status_code: int
    error_code: str | None
    stream: bool
    latency_ms: int
    ttfb_ms: int | None
    attempts: int
    byok: bool
    estimated: bool
    billed: bool
    service_tier: str | None
    cost_micros: int | None
    uncharged_micros: int | None
    components: dict[str, ComponentUsage]


class Usage(msgspec.Struct, frozen=True):
    start: datetime.date
    end: datetime.date
    data: list[UsageRow]
    total_cost_micros: int


class RequestLog(msgspec.Struct, frozen=True):
    created_at: datetime.datetime
    request_id: str
    client_request_id: str | None
    api_key_id: int | None
    model: str | None
    provider: str | None
    upstream_model: str | None
    path: str
    method: str
    status_code: int
    error_code: str | None
    stream: bool
    latency_ms: int
    ttfb_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    attempts: int
    cost_micros: int | None
    client_ip: str | None
    user_agent: str | None
    byok: bool


class RequestLogPage(msgspec.Struct, frozen=True):
    data: list[RequestLog]
    next_cursor: str | None  # pass as cursor for the next (older) page


TxKind = Literal["topup", "usage", "refund", "adjustment", "payment_reversal"]
ModelParam = Annotated[str | None, Parameter(max_length=200)]


class UsageController(Controller):
    path = "/v1/orgs/{org_id:int}"
    dependencies = DEPENDENCIES
    tags = ("usage and billing",)

    @get("/balance", guards=[require("billing.read")])
    async def balance(self, cp: CP, org_id: IdParam) -> Balance:
        row = await cp.pool.fetchrow(
            """select b.balance_micros, b.updated_at, o.credit_limit_micros from org_balances b
               join orgs o on o.id = b.org_id where b.org_id = $1""", org_id)
        live, reserved = await cp.redis.hmget(cp.keys.org(org_id).balance, "balance", "reserved")
        return Balance(row["balance_micros"], row["credit_limit_micros"], row["updated_at"],
                       int(live) if live is not None else None, int(reserved) if reserved is not None else None)

    @get("/transactions", guards=[require("billing.read")])
    async def transactions(self, cp: CP, org_id: IdParam, kind: FromQuery[TxKind | None] = None,
                           before_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                           limit: LimitParam = 50) -> TransactionPage:
        """Ledger entries, newest first."""
        rows = await cp.pool.fetch(
            """select id, kind, amount_micros, created_at, reason, external_id, request_count
               from balance_transactions
               where org_id = $1 and ($2::text is null or kind = $2) and ($3::bigint is null or id < $3)
               order by id desc limit $4""", org_id, kind, before_id, limit + 1)
        more = len(rows) > limit
        data = [Transaction(**dict(r)) for r in rows[:limit]]
        return TransactionPage(data, data[-1].id if more else None)

    @get("/usage", guards=[require("usage.read")])
    async def usage(self, cp: CP, org_id: IdParam, start: FromQuery[datetime.date | None] = None,
                    end: FromQuery[datetime.date | None] = None,
                    key_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                    model: ModelParam = None) -> Usage:
        """Requests, tokens and cost per UTC day × model × key, from `start` to `end` (inclusive; default: the
        last 30 days)."""
        start, end = usage_window(start, end, datetime.datetime.now(datetime.UTC))
        if start > end or (end - start).days >= MAX_USAGE_DAYS:
            raise Invalid(f"start must not be after end, and the range at most {MAX_USAGE_DAYS} days.")
        try:
            lower = datetime.datetime.combine(start, datetime.time(), datetime.UTC)
            upper = datetime.datetime.combine(end, datetime.time(), datetime.UTC) + datetime.timedelta(days=1)
        except OverflowError:
            raise Invalid("The date range is out of bounds.") from None
        sql, args = usage_query(UsageFilter(org_id, lower, upper, key_id, model))
        rows = await cp.read_pool.fetch(sql, *args)
        prices = await _prices(cp, {r["price_id"] for r in rows})
        merged: dict[tuple, dict] = {}
        for r in rows:  # one row per price row and credential: priced, then merged per day × model × key
            row = merged.setdefault((r["day"], r["model"], r["api_key_id"]), {
                "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_micros": 0, "components": {}})
            for f in ("requests", "prompt_tokens", "completion_tokens", "cost_micros"):
                row[f] += r[f]
            for name, (tokens, cost) in _components(prices.get(r["price_id"]), _usage_of(r), r["byok"]).items():
                was = row["components"].get(name, (0, 0))
                row["components"][name] = (was[0] + tokens, was[1] + cost)
        data = [UsageRow(day, m, k, v["requests"], v["prompt_tokens"], v["completion_tokens"], v["cost_micros"],
                         {n: ComponentUsage(*tc) for n, tc in v["components"].items()})
                for (day, m, k), v in merged.items()]
        return Usage(start, end, data, sum(r.cost_micros for r in data))

    @get("/request-logs/{request_id:str}", guards=[require("usage.read")])
    async def request_log(self, cp: CP, org_id: IdParam,
                          request_id: Annotated[str, Parameter(max_length=64)]) -> Generation:
        """One request's record, with tokens and cost per usage component."""
        record = await fetch_generation(cp.read_pool, org_id, request_id)
        if record is None:
            raise NotFound("No such request (records appear a moment after the answer).")
        tokens = record.pop("tokens")
        price = (await _prices(cp, {record["price_id"]})).get(record["price_id"])
        usage = _usage_of({"prompt_tokens": tokens["prompt"] or 0, "completion_tokens": tokens["completion"] or 0,
                           **{f"{c}_tokens": tokens.get(c) for c in (*_INPUT_PARTS, *_OUTPUT_PARTS)}})
        components = {n: ComponentUsage(*tc) for n, tc in _components(price, usage, record["byok"]).items()}
        return Generation(**{f: record[f] for f in Generation.__struct_fields__ if f != "components"},
                          components=components)

    @get("/request-logs", guards=[require("usage.read")])
    async def request_logs(self, cp: CP, org_id: IdParam, start: FromQuery[datetime.datetime | None] = None,
                           end: FromQuery[datetime.datetime | None] = None,
                           key_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
                           model: ModelParam = None,
                           status: Annotated[int | None, Parameter(ge=100, le=599)] = None,
                           cursor: Annotated[str | None, Parameter(max_length=400)] = None,
                           limit: LimitParam = 50) -> RequestLogPage:
        """Request metadata (never bodies), newest first, from `start` (inclusive) to `end` (exclusive;
        default: the 24 hours up to now; at most 93 days). Pages with `cursor` = the previous `next_cursor`."""
        start, end = log_window(utc(start) if start else None, utc(end) if end else None,
                                datetime.datetime.now(datetime.UTC))
        if start >= end or end - start > MAX_LOG_RANGE:
            raise Invalid("start must be before end, and the range at most 93 days.")
        position = None
        if cursor is not None:
            position = decode_cursor(cursor)
            if position is None:
                raise Invalid("cursor is not a cursor this API returned.", code="invalid_cursor")
        sql, args = request_log_query(LogFilter(org_id, start, end, limit, key_id, model, status, position))
        rows = await cp.read_pool.fetch(sql, *args)
        data = [RequestLog(**dict(r)) for r in rows[:limit]]
        last = data[-1] if len(rows) > limit else None
        return RequestLogPage(data, encode_cursor(last.created_at, last.request_id) if last else None)


async def _prices(cp: CP, ids: set[int | None]) -> dict[int, Price]:
    wanted = [i for i in ids if i is not None]
    if not wanted:
        return {}
    rows = await cp.read_pool.fetch(f"select {', '.join(_PRICE_FIELDS)}, extract(epoch from effective_from)::float8 "
                               "as effective_from from model_prices where id = any($1)", wanted)
    return {r["id"]: Price(**dict(r)) for r in rows}


_PRICE_FIELDS = tuple(f for f in Price.__struct_fields__ if f != "effective_from")
_INPUT_PARTS = ("cached_input", "cache_write_5m", "cache_write_1h", "input_image", "input_audio")
_OUTPUT_PARTS = ("reasoning", "output_image", "output_audio")


def _usage_of(row: Any) -> Tokens:
    """A summed usage row as `Usage`: the plain input/output are what the other components leave."""
    parts = {c: row[f"{c}_tokens"] or 0 for c in (*_INPUT_PARTS, *_OUTPUT_PARTS)}
    return Tokens(input=row["prompt_tokens"] - sum(parts[c] for c in _INPUT_PARTS),
                 output=row["completion_tokens"] - sum(parts[c] for c in _OUTPUT_PARTS), **parts)


def _components(price: Price | None, usage: Tokens, byok: bool) -> dict[str, tuple[int, int]]:
    """{component: (tokens, µ$)} for the components with tokens (cost 0 when the price row is gone)."""
    costs = component_costs(price, usage, byok=byok) if price is not None else {}
    return {c: (getattr(usage, c), costs.get(c, 0)) for c in COMPONENTS if getattr(usage, c)}

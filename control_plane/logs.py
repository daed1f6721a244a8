"""Queries over the monthly-partitioned `request_logs` and `usage_records` tables.

Both always bound `created_at` on both sides with plain comparisons, so PostgreSQL prunes every partition
outside the range (at plan time, or at executor start-up for a generic plan) — with millions of rows a
month, a listing touches only the months it asks for. Request logs page with a keyset on the
`(org_id, created_at desc, request_id)` index: the cursor is the last row's (created_at, request_id), each
page is an index range scan that stops after `limit` rows, however deep the page. The cursor also lowers
the upper bound, so later pages prune newer partitions as well.
"""

from __future__ import annotations

import base64
import binascii
import datetime

import msgspec

from shared.generations import COMPONENT_COLUMNS

__all__ = ["LogCursor", "LogFilter", "UsageFilter", "decode_cursor", "encode_cursor", "log_window",
           "request_log_query", "usage_query", "usage_window"]

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

_LOG_COLUMNS = """created_at, request_id, client_request_id, api_key_id, model, provider, upstream_model, path,
       method, status_code, error_code, stream, latency_ms, ttfb_ms, prompt_tokens, completion_tokens,
       total_tokens, attempts, cost_micros, host(client_ip) as client_ip, user_agent, byok"""


class LogCursor(msgspec.Struct, frozen=True):
    created_at: datetime.datetime
    request_id: str


class LogFilter(msgspec.Struct, frozen=True):
    org_id: int
    start: datetime.datetime  # inclusive
    end: datetime.datetime  # exclusive
    limit: int
    api_key_id: int | None = None
    model: str | None = None
    status_code: int | None = None
    cursor: LogCursor | None = None


class UsageFilter(msgspec.Struct, frozen=True):
    org_id: int
    start: datetime.datetime
    end: datetime.datetime
    api_key_id: int | None = None
    model: str | None = None


def encode_cursor(created_at: datetime.datetime, request_id: str) -> str:
    micros = (created_at - _EPOCH) // datetime.timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}:{request_id}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> LogCursor | None:
    """The cursor's position, or None if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        micros, _, request_id = raw.partition(":")
        when = _EPOCH + datetime.timedelta(microseconds=int(micros))
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        return None
    return LogCursor(when, request_id) if request_id else None


def usage_window(start: datetime.date | None, end: datetime.date | None,
                 now: datetime.datetime) -> tuple[datetime.date, datetime.date]:
    """The usage listing's days (inclusive): `end` defaults to today (UTC) as of `now`, `start` to 29 days
    before `end`. `now` is the caller's clock, passed in so the month and year ends can be tested."""
    end = end or now.astimezone(datetime.UTC).date()
    return start or end - datetime.timedelta(days=29), end


def log_window(start: datetime.datetime | None, end: datetime.datetime | None,
               now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    """The request-log listing's range [start, end): by default the 24 hours up to `now`."""
    end = end or now
    return start or end - datetime.timedelta(hours=24), end


def _filters(f: LogFilter | UsageFilter, args: list) -> list[str]:
    where = ["org_id = $1", "created_at >= $2", "created_at < $3"]
    for column, value in (("api_key_id", f.api_key_id), ("model", f.model),
                          ("status_code", getattr(f, "status_code", None))):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    return where


def request_log_query(f: LogFilter) -> tuple[str, list]:
    """SQL and arguments for one page (`limit + 1` rows: the extra one says whether there is a next page)."""
    args: list = [f.org_id, f.start, f.end]
    where = _filters(f, args)
    if f.cursor is not None:
        args += [f.cursor.created_at, f.cursor.request_id]
        c, r = f"${len(args) - 1}", f"${len(args)}"
        where.append(f"created_at <= {c} and (created_at < {c} or request_id > {r})")
    args.append(f.limit + 1)
    sql = (f"select {_LOG_COLUMNS}\nfrom request_logs\nwhere {' and '.join(where)}\n"
           f"order by created_at desc, request_id\nlimit ${len(args)}")
    return sql, args


def usage_query(f: UsageFilter) -> tuple[str, list]:
    """Usage per UTC day × model × key × price row × credential, with the token sum of every component."""
    args: list = [f.org_id, f.start, f.end]
    where = _filters(f, args)
    components = "".join(f", sum({c})::bigint as {c}" for c in COMPONENT_COLUMNS)
    sql = f"""select (created_at at time zone 'UTC')::date as day, model, api_key_id, price_id, byok,
       count(*) as requests, sum(prompt_tokens)::bigint as prompt_tokens,
       sum(completion_tokens)::bigint as completion_tokens, sum(cost_micros)::bigint as cost_micros{components}
from usage_records
where {' and '.join(where)}
group by 1, 2, 3, 4, 5
order by 1, 2, 3"""
    return sql, args

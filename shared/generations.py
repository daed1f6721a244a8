"""One request's metadata record (a "generation"): the proxy's `GET /v1/generations/{request_id}` for the
key's org, and the control plane's request-log detail.

The relay's request ids start with the request's start time (8 hex digits of unix seconds), so the lookup
touches one partition and a few seconds of the org's index, however large `request_logs` grows; the usage
record shares the request log's `created_at` to the microsecond. The record is written in batches (and its
usage components by the billing flusher), so it appears a moment after the answer. Not on the hot path.
"""

from __future__ import annotations

import datetime
import os
import re
import time

import asyncpg

from shared.money import format_usd

__all__ = ["COMPONENT_COLUMNS", "fetch_generation", "new_request_id"]

_ID = re.compile(r"[0-9a-f]{24}")
COMPONENT_COLUMNS = ("cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "reasoning_tokens",
               "input_image_tokens", "input_audio_tokens", "output_image_tokens", "output_audio_tokens")
_SQL = f"""
select l.request_id, l.created_at, l.model, l.provider, l.route_id, l.upstream_model, l.reported_model, l.path,
       l.status_code, l.error_code, l.stream, l.latency_ms, l.ttfb_ms, l.attempts, l.byok, l.estimated,
       l.prompt_tokens, l.completion_tokens, l.cost_micros, u.uncharged_micros, u.service_tier,
       u.price_id, {", ".join(f"u.{c}" for c in COMPONENT_COLUMNS)}, u.request_id is not null as billed
from request_logs l
left join usage_records u on u.created_at = l.created_at and u.request_id = l.request_id
where l.org_id = $1 and l.request_id = $2 and l.created_at >= $3 and l.created_at < $4
limit 1
"""


def new_request_id(now: float | None = None) -> str:
    """24 hex digits: the start time (unix seconds) then 64 random bits."""
    return f"{int(time.time() if now is None else now) & 0xFFFFFFFF:08x}{os.urandom(8).hex()}"


async def fetch_generation(pool: asyncpg.Pool, org_id: int, request_id: str) -> dict | None:
    """The record as a JSON-ready dict (`price_id` included), or None: an id of another org, unknown, malformed,
    or not recorded yet."""
    if not _ID.fullmatch(request_id):
        return None
    started = datetime.datetime.fromtimestamp(int(request_id[:8], 16), datetime.UTC)
    row = await pool.fetchrow(_SQL, org_id, request_id, started, started + datetime.timedelta(seconds=2))
    if row is None:
        return None
    cost = row["cost_micros"]
    return {
        "id": row["request_id"], "object": "generation", "created_at": row["created_at"].isoformat(),
        "model": row["model"], "provider": row["provider"], "route_id": row["route_id"],
        "upstream_model": row["upstream_model"], "reported_model": row["reported_model"], "path": row["path"],
        "status_code": row["status_code"], "error_code": row["error_code"], "stream": row["stream"],
        "latency_ms": row["latency_ms"], "ttfb_ms": row["ttfb_ms"], "attempts": row["attempts"],
        "byok": row["byok"], "estimated": row["estimated"], "billed": row["billed"],
        "service_tier": row["service_tier"], "price_id": row["price_id"],
        "tokens": {"prompt": row["prompt_tokens"], "completion": row["completion_tokens"],
                   **{c.removesuffix("_tokens"): row[c] for c in COMPONENT_COLUMNS}},
        "cost_micros": cost, "cost": format_usd(cost) if cost is not None else None,
        "uncharged_micros": row["uncharged_micros"],
    }

"""Platform admin: usage that was delivered but not charged.

A request is charged at most its reservation (`proxy/bounds.py`): when an upstream produces more than the
output cap the relay forwarded, or a prompt costs more than its bound, the excess is not charged to the org
(it could push it past its credit limit) but recorded per request in `usage_records.uncharged_micros`.
This view sums it per org × model × route, so admins can see which provider ignores caps and at what cost.
"""

from __future__ import annotations

import datetime
from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import FromQuery, Parameter

from control_plane.common import CP, DEPENDENCIES, utc
from control_plane.errors import Invalid
from control_plane.permissions import require
from control_plane.state import MAX_ID

MAX_RANGE = datetime.timedelta(days=366)


class UnchargedUsage(msgspec.Struct, frozen=True):
    org_id: int
    model: str
    provider: str | None
    route_id: int | None
    requests: int
    charged_micros: int
    uncharged_micros: int
    last_at: datetime.datetime


class UnchargedUsageReport(msgspec.Struct, frozen=True):
    start: datetime.datetime
    end: datetime.datetime
    data: list[UnchargedUsage]
    total_uncharged_micros: int


class AdminUsageController(Controller):
    path = "/v1/admin/uncharged-usage"
    dependencies = DEPENDENCIES
    tags = ("admin",)

    @get("/", guards=[require("platform.usage.read")])
    async def uncharged_usage(self, cp: CP, start: FromQuery[datetime.datetime | None] = None,
                              end: FromQuery[datetime.datetime | None] = None,
                              org_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None) -> UnchargedUsageReport:
        """Uncharged usage per org × model × route between `start` and `end` (default: the last 30 days)."""
        end = utc(end) if end else datetime.datetime.now(datetime.UTC)
        start = utc(start) if start else end - datetime.timedelta(days=30)
        if start > end or end - start > MAX_RANGE:
            raise Invalid("start must not be after end, and the range at most 366 days.")
        rows = await cp.read_pool.fetch(  # a scan of usage_records: the replica, if any
            """select org_id, model, provider, route_id, count(*)::int as requests,
                      sum(cost_micros)::bigint as charged_micros, sum(uncharged_micros)::bigint as uncharged_micros,
                      max(created_at) as last_at
               from usage_records
               where created_at >= $1 and created_at < $2 and uncharged_micros > 0
                 and ($3::bigint is null or org_id = $3)
               group by 1, 2, 3, 4 order by uncharged_micros desc, org_id limit 1000""", start, end, org_id)
        data = [UnchargedUsage(**dict(r)) for r in rows]
        return UnchargedUsageReport(start, end, data, sum(r.uncharged_micros for r in data))

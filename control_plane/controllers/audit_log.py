"""Reading the audit log: an org's owners see their org's entries, platform admins see everything."""

from __future__ import annotations

import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.params import Parameter

from control_plane.common import CP, DEPENDENCIES, IdParam, LimitParam
from control_plane.permissions import require
from control_plane.state import MAX_ID, ControlPlane

OptionalId = Annotated[int | None, Parameter(ge=1, le=MAX_ID)]
ActionParam = Annotated[str | None, Parameter(max_length=100)]


class AuditEntry(msgspec.Struct, frozen=True):
    id: int
    created_at: datetime.datetime
    actor_user_id: int | None
    actor_email: str | None
    actor_role: str
    org_id: int | None
    action: str
    target_type: str
    target_id: str | None
    changes: dict[str, Any]  # {"field": {"before": …, "after": …}}; secrets as "[redacted]"
    ip: str | None


class AuditPage(msgspec.Struct, frozen=True):
    data: list[AuditEntry]
    next_before_id: int | None


async def _page(cp: ControlPlane, limit: int, before_id: int | None, **filters: Any) -> AuditPage:
    args: list[Any] = [limit + 1]
    where = ["true"]
    for column, value in (("id <", before_id), *((f"{k} =", v) for k, v in filters.items())):
        if value is not None:
            args.append(value)
            where.append(f"{column} ${len(args)}")
    # The replica (if any): an entry may show a moment after its change, never in place of it.
    rows = await cp.read_pool.fetch(
        f"""select id, created_at, actor_user_id, actor_email, actor_role, org_id, action, target_type, target_id,
                   changes, host(ip) as ip
            from audit_log where {' and '.join(where)} order by id desc limit $1""", *args)
    data = [AuditEntry(**dict(r)) for r in rows[:limit]]
    return AuditPage(data, data[-1].id if len(rows) > limit else None)


class OrgAuditController(Controller):
    path = "/v1/orgs/{org_id:int}/audit-log"
    dependencies = DEPENDENCIES
    tags = ("audit",)

    @get("/", guards=[require("audit.read")])
    async def org_audit(self, cp: CP, org_id: IdParam, action: ActionParam = None,
                        before_id: OptionalId = None, limit: LimitParam = 50) -> AuditPage:
        """Changes made in this org (by its members and by platform admins), newest first."""
        return await _page(cp, limit, before_id, org_id=org_id, action=action)


class AdminAuditController(Controller):
    path = "/v1/admin/audit-log"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    @get("/", guards=[require("platform.audit.read")])
    async def admin_audit(self, cp: CP, org_id: OptionalId = None, actor_user_id: OptionalId = None,
                          action: ActionParam = None, before_id: OptionalId = None,
                          limit: LimitParam = 50) -> AuditPage:
        """Every change, newest first, filtered by org, actor or action."""
        return await _page(cp, limit, before_id, org_id=org_id, actor_user_id=actor_user_id, action=action)

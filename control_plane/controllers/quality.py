"""Model quality: platform admins see each route's probe status, its findings with their evidence and its
probe rounds over time, ask for a round now, choose a model's reference route and override a status with a
reason (all audited); an org sees which routes served its traffic and their probe status then and now
(model-route evidence), and nothing of other orgs.

What the probe runner stores is hashes and derived numbers (shared/workers/probes.py); these endpoints show
the same, hashes as hex. A status change publishes `config`, on which every proxy reloads its routes.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, get, post
from litestar.params import FromQuery, JSONBody, Parameter

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, IdParam, LimitParam, PositiveId, WireName, utc
from control_plane.errors import Invalid, NotFound
from control_plane.permissions import require

ProbeStatus = Literal["healthy", "degraded", "failing", "quarantined"]
# A reason is shown to admins and kept in the history and audit log: text without control characters (a NUL
# cannot be stored in PostgreSQL text at all).
Reason = Annotated[str, msgspec.Meta(min_length=3, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$(?!\n)")]
MAX_EVIDENCE_RANGE = datetime.timedelta(days=93)


class RouteQuality(msgspec.Struct, frozen=True):
    route_id: int
    model: str
    provider_name: str
    upstream_model: str
    status: str  # the catalogue's admin status (active | degraded | disabled)
    probe_status: str  # healthy | degraded | failing | quarantined: what the router reads
    pinned: bool  # an admin's override holds the probe status
    pin_reason: str | None
    is_reference: bool
    status_since: datetime.datetime | None
    last_round_at: datetime.datetime | None
    next_round_at: datetime.datetime | None
    rounds: int
    findings_24h: int


class Finding(msgspec.Struct, frozen=True):
    id: int
    round_id: str
    detector: str
    severity: str
    confidence: float
    p_value: float | None
    evidence: dict[str, Any]
    reference_route_id: int | None
    created_at: datetime.datetime


class StatusChange(msgspec.Struct, frozen=True):
    id: int
    from_status: str
    to_status: str
    reason: str
    actor_user_id: int | None  # None: the detectors
    round_id: str | None
    created_at: datetime.datetime


class RoundSummary(msgspec.Struct, frozen=True):
    round_id: str
    started_at: datetime.datetime
    route_status: str
    probes: int
    errors: int
    passed: int
    checked: int
    median_total_ms: float | None
    cost_micros: int


class RouteQualityDetail(msgspec.Struct, frozen=True):
    route: RouteQuality
    history: list[StatusChange]
    findings: list[Finding]
    rounds: list[RoundSummary]


class ProbeResult(msgspec.Struct, frozen=True):
    id: int
    round_id: str
    suite_version: str
    probe_id: str
    kind: str
    started_at: datetime.datetime
    http_status: int | None
    error_code: str | None
    ttfb_ms: int | None
    total_ms: int | None
    prompt_hash: str
    response_hash: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    reported_model: str | None
    system_fingerprint: str | None
    outcome: str
    features: dict[str, Any]
    cost_micros: int
    route_status: str


class StatusOverride(msgspec.Struct, frozen=True):
    status: ProbeStatus | Literal["auto"]  # auto: lift the pin, the detectors decide again
    reason: Reason


class ReferenceChoice(msgspec.Struct, frozen=True):
    model: WireName
    route_id: PositiveId | None  # None: back to the default (the provider named like the model's owner)
    reason: Reason


class ProbeSpend(msgspec.Struct, frozen=True):
    day: datetime.date
    route_id: int | None  # None: all routes
    spent_micros: int
    reserved_micros: int
    probes: int
    refused: int
    budget_micros: int


class RouteEvidence(msgspec.Struct, frozen=True):
    model: str | None
    route_id: int | None
    provider: str | None
    upstream_model: str | None
    route_status: str | None  # the route's probe status when it served these requests
    requests: int
    first_at: datetime.datetime
    last_at: datetime.datetime
    current_probe_status: str | None  # None: the route no longer exists


_ROUTE_SQL = """
select r.id as route_id, r.model, p.name as provider_name, r.upstream_model, r.status, r.probe_status,
       coalesce(q.pinned, false) as pinned, q.pin_reason, q.status_since, q.last_round_at, q.next_round_at,
       coalesce(q.rounds, 0) as rounds,
       coalesce(m.reference_route_id = r.id or (m.reference_route_id is null and
           r.id = (select r2.id from routes r2 join providers p2 on p2.id = r2.provider_id
                   where r2.model = r.model and r2.status <> 'disabled' and lower(p2.name) = lower(m.owned_by)
                   order by r2.id limit 1)), false) as is_reference,
       (select count(*) from quality_findings f
        where f.route_id = r.id and f.created_at > now() - interval '24 hours') as findings_24h
from routes r join providers p on p.id = r.provider_id join models m on m.name = r.model
left join route_quality q on q.route_id = r.id
"""
_ROUNDS_SQL = """
select round_id::text, min(started_at) as started_at, min(route_status) as route_status, count(*) as probes,
       count(*) filter (where outcome = 'error') as errors, count(*) filter (where outcome = 'pass') as passed,
       count(*) filter (where outcome in ('pass', 'fail')) as checked,
       percentile_cont(0.5) within group (order by total_ms) filter (where outcome <> 'error') as median_total_ms,
       sum(cost_micros)::bigint as cost_micros
from probe_results where route_id = $1 group by round_id order by started_at desc limit $2
"""
_FINDING_COLUMNS = ("id, round_id::text, detector, severity, confidence, p_value, evidence, reference_route_id, "
                    "created_at")


def _row(struct: type[msgspec.Struct], row) -> Any:
    return struct(**{f: row[f] for f in struct.__struct_fields__})


def _probe(row) -> ProbeResult:
    values = {f: row[f] for f in ProbeResult.__struct_fields__ if f not in ("prompt_hash", "response_hash")}
    return ProbeResult(**values, prompt_hash=bytes(row["prompt_hash"]).hex(),
                       response_hash=None if row["response_hash"] is None else bytes(row["response_hash"]).hex())


class AdminQualityController(Controller):
    path = "/v1/admin/quality"
    dependencies = DEPENDENCIES
    tags = ("platform admin",)

    @get("/routes", guards=[require("platform.quality.read")])
    async def list_routes(self, cp: CP, model: Annotated[str | None, Parameter(max_length=200)] = None,
                          probe_status: FromQuery[ProbeStatus | None] = None) -> list[RouteQuality]:
        """Every route with its probe status, whether it is its model's reference, and recent findings."""
        rows = await cp.pool.fetch(_ROUTE_SQL + """ where ($1::text is null or r.model = $1)
                                                   and ($2::text is null or r.probe_status = $2)
                                                   order by r.model, r.id""", model, probe_status)
        return [_row(RouteQuality, r) for r in rows]

    @get("/routes/{route_id:int}", guards=[require("platform.quality.read")])
    async def route_detail(self, cp: CP, route_id: IdParam, limit: LimitParam = 50) -> RouteQualityDetail:
        """A route's status, its status changes (why and by whom), findings with evidence, and its rounds."""
        row = await cp.pool.fetchrow(_ROUTE_SQL + " where r.id = $1", route_id)
        if row is None:
            raise NotFound("No such route.")
        history = await cp.pool.fetch("""select id, from_status, to_status, reason, actor_user_id, round_id::text,
                                                created_at from route_status_history where route_id = $1
                                         order by id desc limit $2""", route_id, limit)
        findings = await cp.pool.fetch(f"""select {_FINDING_COLUMNS} from quality_findings where route_id = $1
                                           order by id desc limit $2""", route_id, limit)
        rounds = await cp.pool.fetch(_ROUNDS_SQL, route_id, limit)
        return RouteQualityDetail(_row(RouteQuality, row), [_row(StatusChange, h) for h in history],
                                  [_row(Finding, f) for f in findings], [_row(RoundSummary, r) for r in rounds])

    @get("/routes/{route_id:int}/probes", guards=[require("platform.quality.read")])
    async def probes(self, cp: CP, route_id: IdParam, limit: LimitParam = 100,
                     before_id: FromQuery[PositiveId | None] = None) -> list[ProbeResult]:
        """The route's probe results, newest first: hashes, latencies, usage and outcome — no answer text."""
        if not await cp.pool.fetchval("select 1 from routes where id = $1", route_id):
            raise NotFound("No such route.")
        rows = await cp.pool.fetch("""select *, round_id::text as round_id from probe_results
                                      where route_id = $1 and ($3::bigint is null or id < $3)
                                      order by id desc limit $2""", route_id, limit, before_id)
        return [_probe(r) for r in rows]

    @post("/routes/{route_id:int}/rounds", guards=[require("platform.quality.manage")], status_code=202)
    async def request_round(self, cp: CP, principal: Caller, route_id: IdParam) -> RouteQuality:
        """Run a probe round on this route as soon as a probe runner is free (within its poll interval)."""
        async with cp.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select 1 from routes where id = $1", route_id):
                raise NotFound("No such route.")
            before = await conn.fetchval("select next_round_at from route_quality where route_id = $1", route_id)
            await conn.execute("""insert into route_quality (route_id, next_round_at) values ($1, now())
                                  on conflict (route_id) do update set next_round_at = now()""", route_id)
            await audit.record(conn, principal, "quality.round.request", "route", route_id, org_id=None,
                               before={"next_round_at": before}, after={"next_round_at": "now"})
            row = await conn.fetchrow(_ROUTE_SQL + " where r.id = $1", route_id)
        return _row(RouteQuality, row)

    @post("/routes/{route_id:int}/status", guards=[require("platform.quality.manage")], status_code=200)
    async def override_status(self, cp: CP, principal: Caller, route_id: IdParam,
                              data: JSONBody[StatusOverride]) -> RouteQuality:
        """Set a route's probe status and pin it (quarantine is only ever set so), or `auto` to unpin (a
        quarantined route then starts at failing)."""
        async with cp.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select 1 from routes where id = $1", route_id):
                raise NotFound("No such route.")
            await conn.execute("insert into route_quality (route_id) values ($1) on conflict do nothing", route_id)
            # The runner locks the same row before it moves a status: the two never interleave.
            before = await conn.fetchrow("""select r.probe_status, q.pinned, q.pin_reason from routes r
                                            join route_quality q on q.route_id = r.id where r.id = $1
                                            for update of q, r""", route_id)
            if before is None:
                raise NotFound("No such route.")
            if data.status == "auto":
                # Unpinned, the detectors decide again; out of quarantine a route starts at failing (not used)
                # and comes down step by step as clean evaluations accrue.
                current = before["probe_status"]
                status, pinned, pin_reason = ("failing" if current == "quarantined" else current), False, None
            else:
                status, pinned, pin_reason = data.status, True, data.reason
            await conn.execute("""update route_quality set pinned = $2, pin_reason = $3, degraded_streak = 0,
                                  failing_streak = 0, clean_streak = 0,
                                  status_since = case when $4 then now() else status_since end
                                  where route_id = $1""", route_id, pinned, pin_reason,
                               status != before["probe_status"])
            if status != before["probe_status"]:
                await conn.execute("update routes set probe_status = $2 where id = $1", route_id, status)
            await conn.execute("""insert into route_status_history (route_id, from_status, to_status, reason,
                                                                    actor_user_id)
                                  values ($1, $2, $3, $4, $5)""", route_id, before["probe_status"], status,
                               f"{'unpinned' if data.status == 'auto' else 'override'}: {data.reason}",
                               principal.user_id)
            await audit.record(conn, principal, "quality.status.override", "route", route_id, org_id=None,
                               before=dict(before), after={"probe_status": status, "pinned": pinned,
                                                           "pin_reason": pin_reason, "reason": data.reason})
            row = await conn.fetchrow(_ROUTE_SQL + " where r.id = $1", route_id)
        await cp.publish_config()
        return _row(RouteQuality, row)

    @post("/references", guards=[require("platform.quality.manage")], status_code=200)
    async def choose_reference(self, cp: CP, principal: Caller, data: JSONBody[ReferenceChoice]) -> list[RouteQuality]:
        """Choose the route a model's other routes are compared with (null: the first-party default)."""
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("select reference_route_id from models where name = $1 for update",
                                         data.model)
            if before is None:
                raise Invalid("No such model.", code="unknown_model")
            if data.route_id is not None and not await conn.fetchval(
                    "select 1 from routes where id = $1 and model = $2", data.route_id, data.model):
                raise Invalid("That route does not serve this model.", code="unknown_route")
            await conn.execute("update models set reference_route_id = $2 where name = $1", data.model, data.route_id)
            await audit.record(conn, principal, "quality.reference.set", "model", data.model, org_id=None,
                               before={"reference_route_id": before["reference_route_id"]},
                               after={"reference_route_id": data.route_id, "reason": data.reason})
            rows = await conn.fetch(_ROUTE_SQL + " where r.model = $1 order by r.id", data.model)
        return [_row(RouteQuality, r) for r in rows]

    @get("/spend", guards=[require("platform.quality.read")])
    async def spend(self, cp: CP, days: Annotated[int, Parameter(ge=1, le=93)] = 7) -> list[ProbeSpend]:
        """Probe spend of the platform account per day (all routes, then each route) against its budgets."""
        rows = await cp.pool.fetch("""select * from probe_spend where day > (now() at time zone 'UTC')::date - $1::int
                                      order by day desc, route_id""", days)
        s = cp.settings
        return [ProbeSpend(r["day"], r["route_id"] or None, r["spent_micros"], r["reserved_micros"], r["probes"],
                           r["refused"], s.probe_daily_budget_micros if r["route_id"] == 0
                           else s.probe_route_budget_micros) for r in rows]


class RouteEvidenceController(Controller):
    path = "/v1/orgs/{org_id:int}"
    dependencies = DEPENDENCIES
    tags = ("usage",)

    @get("/route-evidence", guards=[require("route_evidence.read")])
    async def route_evidence(self, cp: CP, org_id: IdParam, start: FromQuery[datetime.datetime | None] = None,
                             end: FromQuery[datetime.datetime | None] = None) -> list[RouteEvidence]:
        """Which routes (provider, upstream model) served this org's requests in [start, end) — default the
        last 30 days, at most 93 — with the route's probe status when it served them and now."""
        stop = utc(end) if end else datetime.datetime.now(datetime.UTC)
        begin = utc(start) if start else stop - datetime.timedelta(days=30)
        if begin >= stop or stop - begin > MAX_EVIDENCE_RANGE:
            raise Invalid("start must be before end, at most 93 days apart.", code="invalid_range")
        rows = await cp.pool.fetch(
            """select l.model, l.route_id, l.provider, l.upstream_model, l.route_status, count(*) as requests,
                      min(l.created_at) as first_at, max(l.created_at) as last_at,
                      r.probe_status as current_probe_status
               from request_logs l left join routes r on r.id = l.route_id
               where l.org_id = $1 and l.created_at >= $2 and l.created_at < $3 and l.route_id is not null
               group by l.model, l.route_id, l.provider, l.upstream_model, l.route_status, r.probe_status
               order by l.model, l.route_id, l.route_status""", org_id, begin, stop)
        return [_row(RouteEvidence, r) for r in rows]

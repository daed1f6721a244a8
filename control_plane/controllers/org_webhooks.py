"""An org's outbound webhooks: endpoints (URL, event types), their signing secrets, deliveries and replays.

Not the inbound Stripe webhook (controllers/webhooks.py). A URL is checked when it is registered or changed
— https, a host resolving only to public addresses (shared/notify/ssrf.py) — and again by the worker at
every attempt. A signing secret is shown once, when the endpoint is created or its secret rotated, and
stored envelope-encrypted; a rotation keeps the previous secret signing for an overlap window, so the
receiver can switch without missing a delivery. Every change is audited.
"""

from __future__ import annotations

import datetime
import time
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import FromQuery, JSONBody, Parameter
from msgspec import UNSET, UnsetType

from control_plane import audit
from control_plane.common import CP, DEPENDENCIES, Caller, IdParam, LimitParam, set_fields
from control_plane.errors import Conflict, Invalid, NotFound
from control_plane.permissions import require
from control_plane.state import MAX_ID, ControlPlane
from shared.crypto import store_secret
from shared.notify.queue import DueQueue
from shared.notify.ssrf import RefusedTarget, resolve_target
from shared.notify.webhooks import new_signing_secret

__all__ = ["WebhookDeliveriesController", "WebhookEndpointsController"]

SECRET_KIND = "webhook_signing_secret"
MAX_ENDPOINTS_PER_ORG = 20
MAX_OVERLAP_S = 7 * 86400

EventType = Literal["balance.low", "balance.depleted", "payment.succeeded", "payment.failed", "key.created",
                    "key.revoked", "budget.exceeded", "usage.daily"]
EventTypes = Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=8)]
Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048)]
Description = Annotated[str, msgspec.Meta(max_length=500)]


class EndpointCreate(msgspec.Struct, frozen=True):
    url: Url
    event_types: EventTypes
    description: Description = ""


class EndpointUpdate(msgspec.Struct, frozen=True):
    url: Url | UnsetType = UNSET
    event_types: EventTypes | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    active: bool | UnsetType = UNSET


class Rotation(msgspec.Struct, frozen=True):
    # How long the previous secret keeps signing too (0: stop at once); default RR_WEBHOOK_ROTATION_OVERLAP_S.
    overlap_s: Annotated[int, msgspec.Meta(ge=0, le=MAX_OVERLAP_S)] | None = None


class Endpoint(msgspec.Struct, frozen=True):
    id: int
    url: str
    description: str
    event_types: list[str]
    active: bool
    previous_secret_expires_at: datetime.datetime | None  # during a rotation: both secrets sign until then
    created_at: datetime.datetime
    updated_at: datetime.datetime


class EndpointWithSecret(msgspec.Struct, frozen=True):
    secret: str  # the signing secret (`whsec_…`): shown only in this response, store it now
    endpoint: Endpoint


class Delivery(msgspec.Struct, frozen=True):
    id: int
    endpoint_id: int
    event_id: str  # the `webhook-id` the receiver saw
    event_type: str
    status: str  # pending, succeeded, failed (gave up) or refused (address or redirect not allowed)
    attempts: int
    next_attempt_at: datetime.datetime | None
    last_attempt_at: datetime.datetime | None
    response_status: int | None
    latency_ms: int | None
    error: str | None
    replay_of: int | None
    created_at: datetime.datetime
    completed_at: datetime.datetime | None


class DeliveryPage(msgspec.Struct, frozen=True):
    data: list[Delivery]
    next_before_id: int | None


_COLUMNS = "id, url, description, event_types, active, previous_secret_expires_at, created_at, updated_at"
_DELIVERY_COLUMNS = """id, endpoint_id, event_id, event_type, status, attempts, next_attempt_at, last_attempt_at,
                       response_status, latency_ms, error, replay_of, created_at, completed_at"""


def _view(row: asyncpg.Record) -> Endpoint:
    return Endpoint(**{f: row[f] for f in Endpoint.__struct_fields__})


def delivery_view(row: asyncpg.Record) -> Delivery:
    fields = {f: row[f] for f in Delivery.__struct_fields__ if f != "event_id"}
    if row["status"] != "pending":
        fields["next_attempt_at"] = None
    return Delivery(event_id=f"evt_{row['event_id']}", **fields)


async def _checked_url(cp: ControlPlane, url: str) -> str:
    try:
        await resolve_target(url, allow_insecure=cp.settings.webhook_allow_insecure)
    except RefusedTarget as exc:
        raise Invalid(str(exc), code=exc.code) from None
    return url


async def _endpoint(conn: asyncpg.Connection | asyncpg.Pool, org_id: int, endpoint_id: int, *,
                    lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"select {_COLUMNS}, secret_id, previous_secret_id from webhook_endpoints where id = $1 and org_id = $2"
        + (" for update" if lock else ""), endpoint_id, org_id)
    if row is None:
        raise NotFound("No such webhook endpoint.")
    return row


class WebhookEndpointsController(Controller):
    path = "/v1/orgs/{org_id:int}/webhooks"
    dependencies = DEPENDENCIES
    tags = ("webhooks",)

    @get("/", guards=[require("webhooks.read")])
    async def list_endpoints(self, cp: CP, org_id: IdParam) -> list[Endpoint]:
        rows = await cp.pool.fetch(f"select {_COLUMNS} from webhook_endpoints where org_id = $1 order by id", org_id)
        return [_view(r) for r in rows]

    @post("/", guards=[require("webhooks.manage")], opt={"errors": (409,)})
    async def create_endpoint(self, cp: CP, principal: Caller, org_id: IdParam,
                              data: JSONBody[EndpointCreate]) -> EndpointWithSecret:
        """Register an endpoint. The response holds its signing secret once (Standard Webhooks, `whsec_…`)."""
        url = await _checked_url(cp, data.url)
        secret = new_signing_secret()
        async with cp.pool.acquire() as conn, conn.transaction():
            count = await conn.fetchval("select count(*) from webhook_endpoints where org_id = $1", org_id)
            if count >= MAX_ENDPOINTS_PER_ORG:
                raise Conflict(f"An org can have at most {MAX_ENDPOINTS_PER_ORG} webhook endpoints.",
                               code="too_many_endpoints")
            secret_id = await store_secret(conn, cp.box, SECRET_KIND, secret, org_id=org_id, hint="…")
            row = await conn.fetchrow(
                f"""insert into webhook_endpoints (org_id, url, description, event_types, secret_id, created_by)
                    values ($1, $2, $3, $4, $5, $6) returning {_COLUMNS}""",
                org_id, url, data.description, sorted(set(data.event_types)), secret_id, principal.user_id)
            await audit.record(conn, principal, "webhook_endpoint.create", "webhook_endpoint", row["id"],
                               org_id=org_id, after={"url": url, "event_types": row["event_types"],
                                                     "webhook_secret": "set"})
        return EndpointWithSecret(secret, _view(row))

    @get("/{endpoint_id:int}", guards=[require("webhooks.read")])
    async def get_endpoint(self, cp: CP, org_id: IdParam, endpoint_id: IdParam) -> Endpoint:
        return _view(await _endpoint(cp.pool, org_id, endpoint_id))

    @patch("/{endpoint_id:int}", guards=[require("webhooks.manage")])
    async def update_endpoint(self, cp: CP, principal: Caller, org_id: IdParam, endpoint_id: IdParam,
                              data: JSONBody[EndpointUpdate]) -> Endpoint:
        """Change the URL (checked again), the event types, the description, or pause it (`active: false`)."""
        fields = set_fields(data)
        if "url" in fields:
            fields["url"] = await _checked_url(cp, fields["url"])
        if "event_types" in fields:
            fields["event_types"] = sorted(set(fields["event_types"]))
        async with cp.pool.acquire() as conn, conn.transaction():
            before = await _endpoint(conn, org_id, endpoint_id, lock=True)
            if not fields:
                return _view(before)
            sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
            after = await conn.fetchrow(
                f"update webhook_endpoints set {sets}, updated_at = now() where id = $1 returning {_COLUMNS}",
                endpoint_id, *fields.values())
            await audit.record(conn, principal, "webhook_endpoint.update", "webhook_endpoint", endpoint_id,
                               org_id=org_id, before={k: before[k] for k in fields},
                               after={k: after[k] for k in fields})
        return _view(after)

    @delete("/{endpoint_id:int}", guards=[require("webhooks.manage")])
    async def delete_endpoint(self, cp: CP, principal: Caller, org_id: IdParam, endpoint_id: IdParam) -> None:
        """Delete an endpoint, its secrets and its delivery records."""
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await _endpoint(conn, org_id, endpoint_id, lock=True)
            await conn.execute("delete from webhook_endpoints where id = $1", endpoint_id)
            await conn.execute("delete from secrets where id = any($1::uuid[])",
                               [s for s in (row["secret_id"], row["previous_secret_id"]) if s])
            await audit.record(conn, principal, "webhook_endpoint.delete", "webhook_endpoint", endpoint_id,
                               org_id=org_id, before={"url": row["url"], "event_types": row["event_types"]})

    @post("/{endpoint_id:int}/rotate-secret", guards=[require("webhooks.manage")], status_code=200)
    async def rotate_secret(self, cp: CP, principal: Caller, org_id: IdParam, endpoint_id: IdParam,
                            data: JSONBody[Rotation]) -> EndpointWithSecret:
        """A new signing secret (shown once). The previous one keeps signing too — deliveries carry both
        signatures — for `overlap_s` seconds; one rotated out earlier is dropped now."""
        overlap = cp.settings.webhook_rotation_overlap_s if data.overlap_s is None else data.overlap_s
        secret = new_signing_secret()
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await _endpoint(conn, org_id, endpoint_id, lock=True)
            secret_id = await store_secret(conn, cp.box, SECRET_KIND, secret, org_id=org_id, hint="…")
            expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=overlap)
            after = await conn.fetchrow(
                f"""update webhook_endpoints set secret_id = $2, previous_secret_id = $3,
                           previous_secret_expires_at = $4, updated_at = now()
                    where id = $1 returning {_COLUMNS}""",
                endpoint_id, secret_id, row["secret_id"] if overlap else None, expires if overlap else None)
            dropped = [s for s in (row["previous_secret_id"], None if overlap else row["secret_id"]) if s]
            await conn.execute("delete from secrets where id = any($1::uuid[])", dropped)
            await audit.record(conn, principal, "webhook_endpoint.rotate_secret", "webhook_endpoint", endpoint_id,
                               org_id=org_id, before={"webhook_secret": "set"},
                               after={"webhook_secret": "rotated", "previous_secret_expires_at": after[
                                   "previous_secret_expires_at"]})
        return EndpointWithSecret(secret, _view(after))


class WebhookDeliveriesController(Controller):
    path = "/v1/orgs/{org_id:int}/webhook-deliveries"
    dependencies = DEPENDENCIES
    tags = ("webhooks",)

    @get("/", guards=[require("webhooks.read")])
    async def list_deliveries(
        self, cp: CP, org_id: IdParam,
        endpoint_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
        status: FromQuery[Literal["pending", "succeeded", "failed", "refused"] | None] = None,
        before_id: Annotated[int | None, Parameter(ge=1, le=MAX_ID)] = None,
        limit: LimitParam = 50,
    ) -> DeliveryPage:
        """Deliveries of the org's events, newest first: status, attempts, the last response code and latency
        (never the receiver's body), and the error class of the last failure."""
        rows = await cp.pool.fetch(
            f"""select {_DELIVERY_COLUMNS} from webhook_deliveries
                where org_id = $1 and ($2::bigint is null or endpoint_id = $2) and ($3::text is null or status = $3)
                  and ($4::bigint is null or id < $4)
                order by id desc limit $5""", org_id, endpoint_id, status, before_id, limit + 1)
        data = [delivery_view(r) for r in rows[:limit]]
        return DeliveryPage(data, data[-1].id if len(rows) > limit else None)

    @get("/{delivery_id:int}", guards=[require("webhooks.read")])
    async def get_delivery(self, cp: CP, org_id: IdParam, delivery_id: IdParam) -> Delivery:
        row = await cp.pool.fetchrow(f"select {_DELIVERY_COLUMNS} from webhook_deliveries where id = $1 and "
                                     "org_id = $2", delivery_id, org_id)
        if row is None:
            raise NotFound("No such delivery.")
        return delivery_view(row)

    @post("/{delivery_id:int}/replay", guards=[require("webhooks.manage")], status_code=202, opt={"errors": (409,)})
    async def replay(self, cp: CP, principal: Caller, org_id: IdParam, delivery_id: IdParam) -> Delivery:
        """Send a delivery's event again to its endpoint: a new delivery (same `webhook-id`, so a receiver can
        tell it handled it), with attempts and retries of its own."""
        now = datetime.datetime.now(datetime.UTC)
        async with cp.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """select d.endpoint_id, d.event_id, d.event_type, e.active from webhook_deliveries d
                   join webhook_endpoints e on e.id = d.endpoint_id where d.id = $1 and d.org_id = $2""",
                delivery_id, org_id)
            if row is None:
                raise NotFound("No such delivery.")
            if not row["active"]:
                raise Conflict("The endpoint is paused; activate it first.", code="endpoint_paused")
            new = await conn.fetchrow(
                f"""insert into webhook_deliveries (org_id, endpoint_id, event_id, event_type, next_attempt_at,
                                                    created_at, replay_of)
                    values ($1, $2, $3, $4, $5, $5, $6) returning {_DELIVERY_COLUMNS}""",
                org_id, row["endpoint_id"], row["event_id"], row["event_type"], now, delivery_id)
            await audit.record(conn, principal, "webhook_delivery.replay", "webhook_delivery", new["id"],
                               org_id=org_id, after={"replay_of": delivery_id, "event_id": row["event_id"]})
        # After the commit; if this push is lost, the worker's requeue finds the pending row.
        await DueQueue(cp.redis, cp.keys.webhook_queue).push({new["id"]: time.time()})
        return delivery_view(new)

"""rr-worker's notify loop: org events from the outbox out to webhooks and mail.

Each round (`NotifyWorker.run_once`):

1. Dispatch: pending `event_outbox` rows, in id order (locked with `skip locked`, so workers share them), become
   one `webhook_deliveries` row per active endpoint of the org subscribed to the type, and one `mail_messages`
   row where the type calls for mail (balance.* → the org's alert emails; payment.* → its billing contact),
   and are marked dispatched — one transaction. Then the new ids go to the Redis queues.
2. Requeue: pending records due for a while but not in the queue (a worker died between pop and attempt, or
   Redis lost them) are put back, from PostgreSQL.
3. Deliver and send what is due. An attempt is claimed first in PostgreSQL (its `next_attempt_at` moved a lease
   ahead, only if it is still pending and due), so an id popped twice is attempted once; a worker that dies
   mid-attempt leaves it to be retried when the lease is over. The outcome, the attempt count, the response
   code and latency (webhooks) and an error class are recorded; a retry is scheduled with exponential backoff
   and jitter, for at most the configured attempts, after which the record is `failed` for good.
4. Once a day (UTC), `usage.daily` for the previous day of each org with an endpoint subscribed to it (dedupe
   key: the date, so any number of workers announce a day once).

Time comes from the injected `clock` (unix seconds) and randomness from `rng`, and every time written to
PostgreSQL is computed from them, never by the database's now(): a test moves the clock instead of waiting
for a backoff. The SSRF `resolver` is injected the same way.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib
import asyncpg
import orjson
import redis.exceptions
from redis.asyncio import Redis

from shared.crypto import box_from_settings, load_secret
from shared.notify.events import emit
from shared.notify.mail import SmtpConfig, load_smtp_config, render, send_mail
from shared.notify.queue import DueQueue
from shared.notify.ssrf import RefusedTarget, Resolver, resolve_target, system_resolver
from shared.notify.webhooks import (
    AttemptResult,
    attempt_delivery,
    backoff_delay,
    event_body,
    message_id,
    sign_headers,
)
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers import sleep_unless_stopped

__all__ = ["MAIL_OF_EVENT", "NotifyWorker", "RoundResult", "run_notify"]

log = logging.getLogger("rocket_relay.notify")

# event type -> (mail template, to the alert emails (else the billing contact))
MAIL_OF_EVENT: dict[str, tuple[str, bool]] = {
    "balance.low": ("balance_low", True),
    "balance.depleted": ("balance_depleted", True),
    "payment.succeeded": ("payment_receipt", False),
    "payment.failed": ("payment_failed", False),
}
DISPATCH_BATCH = 200
ATTEMPT_BATCH = 50
REQUEUE_GRACE_S = 30.0  # due this long and still pending: its queue entry may be lost
REQUEUE_INTERVAL_S = 15.0
_UTC = datetime.UTC

_DELIVERY_ROWS_SQL = """
insert into webhook_deliveries (org_id, endpoint_id, event_id, event_type, next_attempt_at, created_at)
select e.org_id, w.id, e.id, e.event_type, $2, $2
from event_outbox e join webhook_endpoints w on w.org_id = e.org_id and w.active and e.event_type = any(w.event_types)
where e.id = any($1::bigint[])
order by e.id, w.id
returning id
"""
_MAIL_ROWS_SQL = """
insert into mail_messages (org_id, event_id, template, recipients, next_attempt_at, created_at)
select e.org_id, e.id, m.template,
       case when m.to_alerts then o.alert_emails[1:50] else array[o.billing_email] end, $2, $2
from event_outbox e
join orgs o on o.id = e.org_id
join unnest($3::text[], $4::text[], $5::bool[]) as m(event_type, template, to_alerts) on m.event_type = e.event_type
where e.id = any($1::bigint[])
  and case when m.to_alerts then cardinality(o.alert_emails) > 0 else o.billing_email is not null end
order by e.id
returning id
"""


@dataclass(slots=True)
class RoundResult:
    """What one round did (counts only)."""

    dispatched: int = 0
    deliveries: dict[str, int] | None = None  # outcome -> count
    mails: dict[str, int] | None = None
    daily_events: int = 0


def _at(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, _UTC)


class NotifyWorker:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis_client: Redis, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 resolver: Resolver = system_resolver) -> None:
        self.settings = settings
        self.pool = pool
        self.clock = clock
        self.rng = rng or random.Random()
        self.resolver = resolver
        self.box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)
        keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self.webhooks = DueQueue(redis_client, keys.webhook_queue)
        self.mail = DueQueue(redis_client, keys.mail_queue)
        self._requeued_at = float("-inf")
        self._daily_done: datetime.date | None = None
        # An attempt is claimed for this long: longer than it can take, so no other worker retries it meanwhile.
        self._lease_s = max(settings.webhook_timeout_s, settings.smtp_timeout_s) * 2 + 30

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, redis.exceptions.RedisError) as exc:
                log.warning("notify round failed (%s); retrying", type(exc).__name__)
            except Exception:
                log.exception("notify round failed unexpectedly; retrying")
            await sleep_unless_stopped(stop, self.settings.notify_interval_s)

    async def run_once(self) -> RoundResult:
        result = RoundResult()
        while (n := await self.dispatch()) > 0:
            result.dispatched += n
            if n < DISPATCH_BATCH:
                break
        if self.clock() - self._requeued_at >= REQUEUE_INTERVAL_S:
            await self.requeue()
        result.deliveries = await self.deliver_due()
        result.mails = await self.send_due()
        result.daily_events = await self.announce_daily_usage()
        return result

    # --- 1. dispatch -------------------------------------------------------------------------------------

    async def dispatch(self) -> int:
        """Fan out up to DISPATCH_BATCH pending events; returns how many events it dispatched."""
        now = self.clock()
        mail_types = list(MAIL_OF_EVENT)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                events = await conn.fetch(
                    """select id from event_outbox where dispatched_at is null order by id limit $1
                       for update skip locked""", DISPATCH_BATCH)
                if not events:
                    return 0
                ids = [r["id"] for r in events]
                deliveries = await conn.fetch(_DELIVERY_ROWS_SQL, ids, _at(now))
                mails = await conn.fetch(_MAIL_ROWS_SQL, ids, _at(now), mail_types,
                                         [MAIL_OF_EVENT[t][0] for t in mail_types],
                                         [MAIL_OF_EVENT[t][1] for t in mail_types])
                await conn.execute("update event_outbox set dispatched_at = $2 where id = any($1::bigint[])",
                                   ids, _at(now))
        # After the commit: a lost push is found by requeue().
        await self.webhooks.push({r["id"]: now for r in deliveries})
        await self.mail.push({r["id"]: now for r in mails})
        return len(ids)

    # --- 2. requeue --------------------------------------------------------------------------------------

    async def requeue(self) -> None:
        now = self.clock()
        self._requeued_at = now
        for table, queue in (("webhook_deliveries", self.webhooks), ("mail_messages", self.mail)):
            rows = await self.pool.fetch(
                f"""select id, next_attempt_at from {table} where status = 'pending' and next_attempt_at <= $1
                    order by next_attempt_at limit 1000""", _at(now - REQUEUE_GRACE_S))
            await queue.requeue({r["id"]: r["next_attempt_at"].timestamp() for r in rows})

    async def _claim(self, table: str, record_id: int, now: float) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            f"""update {table} set next_attempt_at = $3
                where id = $1 and status = 'pending' and next_attempt_at <= $2 returning *""",
            record_id, _at(now), _at(now + self._lease_s))

    # --- 3a. webhooks ------------------------------------------------------------------------------------

    async def deliver_due(self) -> dict[str, int]:
        """Attempt every delivery due now, ATTEMPT_BATCH at a time (concurrently within a batch)."""
        outcomes: dict[str, int] = {}
        while ids := await self.webhooks.pop_due(self.clock(), ATTEMPT_BATCH):
            for outcome in await asyncio.gather(*(self._deliver(i) for i in ids)):
                if outcome is not None:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if len(ids) < ATTEMPT_BATCH:
                break
        return outcomes

    async def _deliver(self, delivery_id: int) -> str | None:
        now = self.clock()
        row = await self._claim("webhook_deliveries", delivery_id, now)
        if row is None:
            return None  # done, not due yet, or another worker has it
        endpoint = await self.pool.fetchrow(
            """select url, active, secret_id, previous_secret_id, previous_secret_expires_at from webhook_endpoints
               where id = $1""", row["endpoint_id"])
        event = await self.pool.fetchrow(
            "select event_type, payload::text as payload, created_at from event_outbox where id = $1", row["event_id"])
        if endpoint is None or event is None or not endpoint["active"]:
            return await self._record_delivery(row, now, AttemptResult("refused", error="endpoint disabled"))
        try:
            target = await resolve_target(endpoint["url"], allow_insecure=self.settings.webhook_allow_insecure,
                                          resolver=self.resolver)
        except RefusedTarget as exc:
            # Checked again at every attempt: the name may resolve elsewhere than when it was registered.
            return await self._record_delivery(row, now, AttemptResult("refused", error=f"{exc.code}: {exc}"[:200]))
        signing = [await load_secret(self.pool, self.box, endpoint["secret_id"])]
        if endpoint["previous_secret_id"] and endpoint["previous_secret_expires_at"] \
                and endpoint["previous_secret_expires_at"].timestamp() > now:
            signing.append(await load_secret(self.pool, self.box, endpoint["previous_secret_id"]))
        body = event_body(row["event_id"], event["event_type"], event["created_at"], row["org_id"],
                          orjson.loads(event["payload"]))
        headers = sign_headers(signing, message_id(row["event_id"]), _at(now), body)
        result = await attempt_delivery(target, headers, body, timeout_s=self.settings.webhook_timeout_s)
        return await self._record_delivery(row, self.clock(), result)

    async def _record_delivery(self, row: asyncpg.Record, now: float, result: AttemptResult) -> str:
        attempts = row["attempts"] + 1
        status, next_at = result.outcome, None
        if status == "retry":
            if attempts >= self.settings.webhook_max_attempts:
                status = "failed"
            else:
                status = "pending"
                next_at = now + backoff_delay(attempts, base_s=self.settings.webhook_backoff_base_s,
                                              max_s=self.settings.webhook_backoff_max_s,
                                              jitter=self.settings.webhook_backoff_jitter, rng=self.rng)
        await self.pool.execute(
            """update webhook_deliveries set status = $2::text, attempts = $3, last_attempt_at = $4::timestamptz,
                      response_status = $5, latency_ms = $6, error = $7,
                      next_attempt_at = coalesce($8, $4::timestamptz),
                      completed_at = case when $2::text = 'pending' then null else $4::timestamptz end
               where id = $1""",
            row["id"], status, attempts, _at(now), result.status_code, result.latency_ms, result.error,
            _at(next_at) if next_at is not None else None)
        if next_at is not None:
            await self.webhooks.push({row["id"]: next_at})
        return status

    # --- 3b. mail ----------------------------------------------------------------------------------------

    async def send_due(self) -> dict[str, int]:
        """Send every mail due now, one SMTP session at a time (mail servers throttle parallel senders)."""
        outcomes: dict[str, int] = {}
        while ids := await self.mail.pop_due(self.clock(), ATTEMPT_BATCH):
            config = await load_smtp_config(self.pool, self.box)
            for mail_id in ids:
                outcome = await self._send(mail_id, config)
                if outcome is not None:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if len(ids) < ATTEMPT_BATCH:
                break
        return outcomes

    async def _send(self, mail_id: int, config: SmtpConfig | None) -> str | None:
        now = self.clock()
        row = await self._claim("mail_messages", mail_id, now)
        if row is None:
            return None
        if config is None:
            return await self._record_mail(row, now, "SMTP is not configured")
        try:
            subject, text, html = await self._render(row)
        except Exception as exc:  # a template or data bug: retrying would render the same
            log.error("mail %d could not be rendered (%s)", row["id"], type(exc).__name__)
            return await self._record_mail(row, now, f"render error ({type(exc).__name__})", final=True)
        try:
            await send_mail(config, list(row["recipients"]), subject, text, html,
                            timeout_s=self.settings.smtp_timeout_s)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._record_mail(row, self.clock(), f"SMTP {exc.code}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return await self._record_mail(row, self.clock(), f"SMTP error ({type(exc).__name__})")
        return await self._record_mail(row, self.clock(), None)

    async def _render(self, row: asyncpg.Record) -> tuple[str, str, str]:
        context: dict = {"amount_micros": None, "reason": None}
        if row["org_id"] is not None:
            org = await self.pool.fetchrow("select name, code from orgs where id = $1", row["org_id"])
            context |= {"org_name": org["name"], "org_code": org["code"]}
        if row["event_id"] is not None:
            event = await self.pool.fetchrow("select payload::text as payload, created_at from event_outbox "
                                             "where id = $1", row["event_id"])
            context |= orjson.loads(event["payload"])
            context["created_at"] = event["created_at"].astimezone(_UTC).strftime("%Y-%m-%d %H:%M UTC")
        return render(row["template"], context)

    async def _record_mail(self, row: asyncpg.Record, now: float, error: str | None, *, final: bool = False) -> str:
        attempts = row["attempts"] + 1
        next_at = None
        if error is None:
            status = "sent"
        elif final or attempts >= self.settings.mail_max_attempts:
            status = "failed"
            log.warning("mail %d (%s) failed for good after %d attempt(s): %s", row["id"], row["template"],
                        attempts, error)
        else:
            status = "pending"
            next_at = now + backoff_delay(attempts, base_s=self.settings.mail_backoff_base_s,
                                          max_s=self.settings.mail_backoff_max_s,
                                          jitter=self.settings.webhook_backoff_jitter, rng=self.rng)
        await self.pool.execute(
            """update mail_messages set status = $2::text, attempts = $3, last_attempt_at = $4::timestamptz,
                      error = $5, next_attempt_at = coalesce($6, $4::timestamptz),
                      sent_at = case when $2::text = 'sent' then $4::timestamptz end
               where id = $1""", row["id"], status, attempts, _at(now), error,
            _at(next_at) if next_at is not None else None)
        if next_at is not None:
            await self.mail.push({row["id"]: next_at})
        return status

    # --- 4. usage.daily ----------------------------------------------------------------------------------

    async def announce_daily_usage(self) -> int:
        """`usage.daily` for yesterday (UTC, by the clock) to each org subscribed to it; once per org-day."""
        today = _at(self.clock()).date()
        if self._daily_done == today:
            return 0
        day = today - datetime.timedelta(days=1)
        start = datetime.datetime(day.year, day.month, day.day, tzinfo=_UTC)
        orgs = await self.pool.fetch(
            """select distinct org_id from webhook_endpoints where active and 'usage.daily' = any(event_types)""")
        emitted = 0
        for org in orgs:
            async with self.pool.acquire() as conn, conn.transaction():
                totals = await conn.fetchrow(
                    """select count(*) as requests, coalesce(sum(cost_micros), 0)::bigint as cost_micros,
                              coalesce(sum(prompt_tokens), 0)::bigint as prompt_tokens,
                              coalesce(sum(completion_tokens), 0)::bigint as completion_tokens
                       from usage_records where org_id = $1 and created_at >= $2 and created_at < $3""",
                    org["org_id"], start, start + datetime.timedelta(days=1))
                event_id = await emit(conn, org["org_id"], "usage.daily", {"date": day.isoformat(), **dict(totals)},
                                      dedupe_key=day.isoformat())
                emitted += event_id is not None
        self._daily_done = today
        return emitted


async def run_notify(pool: asyncpg.Pool, redis_client: Redis, settings: Settings, stop: asyncio.Event) -> None:
    await NotifyWorker(settings, pool, redis_client).run(stop)

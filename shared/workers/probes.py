"""The probe runner of `rr-worker`: a round of the probe suite per route on a jittered schedule, then the
detectors and the status machine, whose verdict the proxies read from `routes.probe_status`.

Probes travel exactly as customer requests do: the proxy's `UpstreamClient`, the chat endpoint's dialect for
the route (`proxy.endpoints`: its `request` and `answer`, translation included), with the route's own
credential — so a provider that treats the relay's traffic differently cannot tell probes apart by their
shape. (This is why this worker imports from `proxy/`: the dialects must be the same code, not a copy.)

Schedule: `route_quality.next_round_at`. A runner claims a due route by moving that time forward in one
UPDATE (interval ± jitter), so any number of `rr-worker` copies run each round once; a platform admin's
"probe now" sets it to now. One probe request at a time per route, at least `probe_gap_ms` apart.

Money: probes are paid by the platform, never by an org — no org balance, reservation or usage record is
touched. Each probe first reserves its worst case (every request byte a prompt token, plus its
`max_tokens` of output, at the model's price in force) in `probe_spend` against the route's and the
day's budgets, in one transaction holding both rows, so concurrent runners cannot pass a budget together;
then the real cost replaces the reservation. A refused reservation ends the round.

Privacy: probe prompts are ours; of an answer only hashes, token counts and derived features are stored.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import numpy as np
import orjson
from redis.asyncio import Redis

from proxy.endpoints import endpoint_for
from proxy.errors import ProxyError, UpstreamError
from proxy.exchange import Exchange
from proxy.inputs import recordable
from proxy.routing import ModelEntry, Route, load_catalogue
from proxy.translate import TranslationError
from proxy.upstream import UpstreamClient
from shared.crypto import box_from_settings
from shared.money import version_cost_micros, worst_case_micros
from shared.quality.detect import Finding, Observation, Thresholds, evaluate, level_of
from shared.quality.status import Streaks, Transition, next_status
from shared.quality.suite import SUITE_VERSION, Probe, answer_of, build_round
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.usage import Usage
from shared.workers import sleep_unless_stopped

__all__ = ["ProbeBudget", "ProbeRunner", "RoundReport", "reference_route_id"]

log = logging.getLogger("rocket_relay.probes")

PATH = "/v1/chat/completions"
PRUNE_INTERVAL_S = 3600.0
_OUTCOME = 20  # index of `outcome` in a row of `_probe` (the columns of _INSERT_RESULT after round_id)


class RoundReport(msgspec.Struct):
    route_id: int
    round_id: str
    probes: int = 0
    errors: int = 0
    refused: bool = False
    cost_micros: int = 0
    findings: list[Finding] = msgspec.field(default_factory=list)
    status: str = "healthy"
    changed: bool = False


def _day(now: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date()


class ProbeBudget:
    """The platform account's probe spend per UTC day: per route and for all routes (route id 0)."""

    def __init__(self, pool: asyncpg.Pool, *, route_micros: int, daily_micros: int) -> None:
        self._pool = pool
        self.route_micros = route_micros
        self.daily_micros = daily_micros

    async def reserve(self, day: datetime.date, route_id: int, micros: int) -> bool:
        """Hold `micros` of both budgets, or refuse (and count the refusal) if either would be passed."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("""insert into probe_spend (day, route_id) values ($1, 0), ($1, $2)
                                  on conflict do nothing""", day, route_id)
            # Both rows locked in one order (0 first): two runners reserving at once are serialised here.
            rows = await conn.fetch("""select route_id, spent_micros + reserved_micros as used from probe_spend
                                       where day = $1 and route_id in (0, $2) order by route_id for update""",
                                    day, route_id)
            used = {r["route_id"]: r["used"] for r in rows}
            if used[0] + micros > self.daily_micros or used[route_id] + micros > self.route_micros:
                await conn.execute("update probe_spend set refused = refused + 1 where day = $1 and route_id = $2",
                                   day, route_id)
                return False
            await conn.execute("""update probe_spend set reserved_micros = reserved_micros + $3, probes = probes + 1
                                  where day = $1 and route_id in (0, $2)""", day, route_id, micros)
            return True

    async def settle(self, day: datetime.date, route_id: int, reserved: int, actual: int) -> None:
        await self._pool.execute(
            """update probe_spend set reserved_micros = greatest(reserved_micros - $3, 0),
                                      spent_micros = spent_micros + $4
               where day = $1 and route_id in (0, $2)""", day, route_id, reserved, actual)


_REFERENCE_SQL = """
select coalesce(m.reference_route_id,
                (select r.id from routes r join providers p on p.id = r.provider_id
                 where r.model = m.name and r.status <> 'disabled' and lower(p.name) = lower(m.owned_by)
                 order by r.id limit 1))
from models m where m.name = $1
"""


async def reference_route_id(conn: asyncpg.Connection | asyncpg.Pool, model: str) -> int | None:
    """The route a model's others are compared with: the platform's choice, else the route of the provider
    named like the model's owner (the first-party provider), else none."""
    return await conn.fetchval(_REFERENCE_SQL, model)


_INSERT_RESULT = """
insert into probe_results (round_id, route_id, model, provider, upstream_model, suite_version, probe_id, kind,
    started_at, http_status, error_code, ttfb_ms, total_ms, prompt_hash, response_hash, prompt_chars,
    answer_chars, prompt_tokens, completion_tokens, reported_model, system_fingerprint, outcome, features,
    cost_micros, route_status)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
        $23, $24, $25)
"""
_ROUNDS_SQL = """
select round_id, min(started_at) as at, min(route_status) as status from probe_results
where route_id = $1 and started_at > $3 group by round_id order by at desc limit $2
"""
_OBS_SQL = """
select round_id, probe_id, kind, outcome, total_ms, prompt_hash, response_hash, reported_model, features
from probe_results where round_id = any($1::uuid[]) and route_id = $2
"""


class ProbeRunner:
    """Runs due probe rounds. `clock` (unix seconds) and `rng` are injectable; `upstream` may be shared."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis | None, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 upstream: UpstreamClient | None = None, thresholds: Thresholds | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self._clock = clock
        self._rng = rng or random.Random()
        self._np_rng = np.random.default_rng(self._rng.getrandbits(64))
        self._box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)
        self._own_upstream = upstream is None
        self._upstream = upstream or UpstreamClient(pool_size=64,
                                                    max_connect_timeout_s=settings.upstream_connect_timeout_s,
                                                    max_read_timeout_s=settings.upstream_read_timeout_s)
        self._thresholds = thresholds or Thresholds()
        self.budget = ProbeBudget(pool, route_micros=settings.probe_route_budget_micros,
                                  daily_micros=settings.probe_daily_budget_micros)
        self._last_prune = 0.0
        self.rounds = 0

    async def start(self) -> None:
        if self._own_upstream:
            await self._upstream.start()

    async def close(self) -> None:
        if self._own_upstream:
            await self._upstream.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: run the due rounds, then wait `probe_poll_interval_s`."""
        await self.start()
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                    if self._clock() - self._last_prune > PRUNE_INTERVAL_S:
                        await self.prune()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("probe tick failed (%s)", type(exc).__name__)
                await sleep_unless_stopped(stop, self._settings.probe_poll_interval_s)
        finally:
            await self.close()

    def _next_round(self, now: float) -> datetime.datetime:
        s = self._settings
        delay = s.probe_interval_s * (1 + self._rng.uniform(-s.probe_jitter, s.probe_jitter))
        return datetime.datetime.fromtimestamp(now + delay, datetime.UTC)

    async def tick(self) -> list[RoundReport]:
        """Schedule new routes, claim the due ones, run their rounds (`probe_concurrency` at a time)."""
        now = self._clock()
        at = datetime.datetime.fromtimestamp(now, datetime.UTC)
        new = await self._pool.fetch("""select r.id from routes r left join route_quality q on q.route_id = r.id
                                        where q.route_id is null and r.status <> 'disabled'""")
        if new:
            # A new route's first round comes within one jitter span, so a fleet of routes spreads out.
            spread = self._settings.probe_interval_s * max(self._settings.probe_jitter, 0.01)
            await self._pool.executemany(
                "insert into route_quality (route_id, next_round_at) values ($1, $2) on conflict do nothing",
                [(r["id"], datetime.datetime.fromtimestamp(now + self._rng.uniform(0, spread), datetime.UTC))
                 for r in new])
        due = [r["route_id"] for r in await self._pool.fetch(
            "select route_id from route_quality where next_round_at <= $1 order by next_round_at", at)]
        if not due:
            return []
        catalogue = await load_catalogue(self._pool, self._box)
        routes = {r.id: (entry, r) for entry in catalogue.models.values() for r in entry.routes}
        claimed = []
        for route_id in due:
            if route_id not in routes:
                continue  # disabled, or its provider is: no round until it is back
            if await self._pool.fetchval("""update route_quality set next_round_at = $2
                                            where route_id = $1 and next_round_at <= $3 returning route_id""",
                                         route_id, self._next_round(now), at):
                claimed.append(routes[route_id])
        gate = asyncio.Semaphore(self._settings.probe_concurrency)

        async def one(entry: ModelEntry, route: Route) -> RoundReport:
            async with gate:
                return await self.run_round(entry, route)

        return list(await asyncio.gather(*(one(e, r) for e, r in claimed)))

    async def run_round(self, entry: ModelEntry, route: Route) -> RoundReport:
        """One round of the suite against `route`, stored, then evaluated."""
        round_id = uuid.uuid4()
        report = RoundReport(route.id, str(round_id), status=route.probe_status)
        if entry.kind != "chat":
            return report  # the suite is chat prompts; other kinds are watched by their breakers only
        await self._pool.execute("insert into route_quality (route_id) values ($1) on conflict do nothing", route.id)
        probes = build_round(self._rng, long_context_chars=self._settings.probe_long_context_chars)
        gap = self._settings.probe_gap_ms / 1000
        for i, probe in enumerate(probes):
            if i and gap:
                await asyncio.sleep(gap)  # the per-route rate limit: one probe at a time, spaced
            now = self._clock()
            price = entry.price_at(now)
            body = orjson.dumps(probe.body(entry.name))
            worst = worst_case_micros(price, len(body), probe.max_tokens) if price is not None else 0
            day = _day(now)
            if not await self.budget.reserve(day, route.id, worst):
                report.refused = True
                log.info("probe budget reached for route %d; round %s ends after %d probes", route.id, round_id, i)
                break
            row, cost = await self._probe(entry, route, probe, body, price, worst, now)
            await self.budget.settle(day, route.id, worst, cost)
            await self._pool.execute(_INSERT_RESULT, round_id, *row)
            report.probes += 1
            report.errors += row[_OUTCOME] == "error"
            report.cost_micros += cost
        if report.probes:
            await self._pool.execute("""update route_quality set last_round_at = $2, rounds = rounds + 1
                                        where route_id = $1""", route.id,
                                     datetime.datetime.fromtimestamp(self._clock(), datetime.UTC))
            transition, report.findings = await self.evaluate_route(route, round_id)
            report.status, report.changed = transition.status, transition.changed
        self.rounds += 1
        return report

    async def _probe(self, entry: ModelEntry, route: Route, probe: Probe, body: bytes, price, worst: int,
                     now: float) -> tuple[tuple, int]:
        """Send one probe; (the probe_results row after round_id, its cost)."""
        started = time.perf_counter()
        ttfb = total = status = None
        error_code: str | None = None
        answer = None
        try:
            dialect = endpoint_for(PATH).dialect_for_format(route.api_format)
            upstream_path, payload = dialect.request(Exchange.for_body(endpoint_for(PATH), body, entry.name), route,
                                                     False)
            resp = await self._upstream.send(route, upstream_path, payload, route.credential)
            ttfb = int((time.perf_counter() - started) * 1000)
            raw = await resp.read()
            total = int((time.perf_counter() - started) * 1000)
            status, client_body, _ = dialect.answer(resp.status, raw, entry.name)
            if status == 200:
                parsed = orjson.loads(client_body)
                if isinstance(parsed, dict):
                    answer = answer_of(parsed)
                else:
                    error_code = "probe_answer_not_an_object"
            else:
                error_code = "upstream_rejected_probe"
        except UpstreamError as exc:
            status, error_code = exc.upstream_status, exc.code
        except (TranslationError, orjson.JSONDecodeError):
            error_code = "probe_answer_unreadable"
        except ProxyError as exc:
            error_code = exc.code
        total = total if total is not None else int((time.perf_counter() - started) * 1000)
        if answer is None:
            checked_outcome, response_hash, answer_chars, features = "error", None, None, {}
            prompt_tokens = completion_tokens = reported = fingerprint = None
            cost = 0  # an answer that failed is not billed by providers
        else:
            checked = probe.judge(answer)
            checked_outcome, response_hash = checked.outcome, checked.response_hash
            answer_chars, features = checked.answer_chars, checked.features
            prompt_tokens, completion_tokens = answer.prompt_tokens, answer.completion_tokens
            reported = recordable(answer.model) if answer.model else None
            fingerprint = recordable(answer.system_fingerprint, 100) if answer.system_fingerprint else None
            if price is None:
                cost = 0
            elif prompt_tokens is None or completion_tokens is None:
                cost = worst  # no usage reported: the most it can have cost
            else:
                usage = Usage(input=max(prompt_tokens, 0), output=max(completion_tokens, 0))
                cost = version_cost_micros(price, usage)[0]
        row = (route.id, entry.name, route.provider, route.upstream_model, SUITE_VERSION, probe.probe_id, probe.kind,
               datetime.datetime.fromtimestamp(now, datetime.UTC), status, error_code, ttfb, total,
               probe.prompt_hash(), response_hash, probe.prompt_chars, answer_chars, prompt_tokens,
               completion_tokens, reported, fingerprint, checked_outcome, orjson.dumps(features).decode(), cost,
               route.probe_status)
        return row, cost

    async def _window(self, conn: asyncpg.Connection, route_id: int, rounds: int,
                      since: datetime.datetime) -> list[tuple[str, list[Observation]]]:
        """The route's last `rounds` rounds, newest first: (status while probed, observations)."""
        heads = await conn.fetch(_ROUNDS_SQL, route_id, rounds, since)
        if not heads:
            return []
        order = {h["round_id"]: i for i, h in enumerate(heads)}
        grouped: list[list[Observation]] = [[] for _ in heads]
        for r in await conn.fetch(_OBS_SQL, list(order), route_id):
            features = r["features"]
            if isinstance(features, str):
                features = orjson.loads(features)
            grouped[order[r["round_id"]]].append(Observation(
                order[r["round_id"]], r["probe_id"], r["kind"], r["outcome"], r["total_ms"], bytes(r["prompt_hash"]),
                None if r["response_hash"] is None else bytes(r["response_hash"]), r["reported_model"], features))
        return [(h["status"], grouped[i]) for i, h in enumerate(heads)]

    async def evaluate_route(self, route: Route, round_id: uuid.UUID) -> tuple[Transition, list[Finding]]:
        """Detectors over the route's windows, findings stored, status moved with hysteresis (and the
        proxies told if it moved)."""
        s = self._settings
        since = datetime.datetime.fromtimestamp(self._clock() - s.probe_retention_days * 86400, datetime.UTC)
        async with self._pool.acquire() as conn:
            rounds = await self._window(conn, route.id, s.probe_window_rounds + s.probe_baseline_rounds, since)
            recent = [o for _, obs in rounds[:s.probe_window_rounds] for o in obs]
            baseline = [o for status, obs in rounds[s.probe_window_rounds:] if status == "healthy" for o in obs]
            ref_id = await reference_route_id(conn, route.model)
            reference = None
            if ref_id is not None and ref_id != route.id:
                # The reference's healthy rounds over the route's whole span (recent + baseline): more samples of
                # the model as it should be, so smaller effects are significant sooner.
                ref_rounds = await self._window(conn, ref_id, s.probe_window_rounds + s.probe_baseline_rounds, since)
                reference = [o for status, obs in ref_rounds if status == "healthy" for o in obs] or None
            findings = evaluate(recent, baseline, reference, expected_model=route.upstream_model, rng=self._np_rng,
                                t=self._thresholds)
            level = level_of(findings)
            async with conn.transaction():
                q = await conn.fetchrow("""select q.*, r.probe_status from route_quality q
                                           join routes r on r.id = q.route_id
                                           where q.route_id = $1 for update of q""", route.id)
                if q is None:
                    return Transition(route.probe_status, Streaks(), False, "route removed"), findings
                step = next_status(q["probe_status"], level,
                                   Streaks(q["degraded_streak"], q["failing_streak"], q["clean_streak"]),
                                   pinned=q["pinned"], up=s.probe_status_up, down=s.probe_status_down)
                if findings:
                    await conn.executemany(
                        """insert into quality_findings (route_id, round_id, detector, severity, confidence, p_value,
                                                         evidence, reference_route_id)
                           values ($1, $2, $3, $4, $5, $6, $7, $8)""",
                        [(route.id, round_id, f.detector, f.severity, min(max(f.confidence, 0.0), 1.0), f.p_value,
                          _plain(f.evidence), ref_id if reference is not None else None) for f in findings])
                await conn.execute("""update route_quality set degraded_streak = $2, failing_streak = $3,
                                      clean_streak = $4 where route_id = $1""", route.id, step.streaks.degraded,
                                   step.streaks.failing, step.streaks.clean)
                if step.changed:
                    await conn.execute("update routes set probe_status = $2 where id = $1", route.id, step.status)
                    await conn.execute("update route_quality set status_since = $2 where route_id = $1", route.id,
                                       datetime.datetime.fromtimestamp(self._clock(), datetime.UTC))
                    detectors = ", ".join(sorted({f.detector for f in findings})) or "no findings"
                    await conn.execute(
                        """insert into route_status_history (route_id, from_status, to_status, reason, round_id)
                           values ($1, $2, $3, $4, $5)""", route.id, q["probe_status"], step.status,
                        f"{step.reason} ({detectors})", round_id)
        if step.changed:
            log.warning("route %d: probe status %s -> %s (%s)", route.id, q["probe_status"], step.status, step.reason)
            await self._publish_config()
        return step, findings

    async def _publish_config(self) -> None:
        if self._redis is not None:
            await self._redis.publish(self._keys.events_channel, "config")

    async def prune(self) -> int:
        """Drop probe results and findings older than `probe_retention_days`."""
        self._last_prune = self._clock()
        cutoff = datetime.datetime.fromtimestamp(self._last_prune - self._settings.probe_retention_days * 86400,
                                                 datetime.UTC)
        deleted = await self._pool.fetchval(
            """with a as (delete from probe_results where started_at < $1 returning 1),
                    b as (delete from quality_findings where created_at < $1 returning 1)
               select (select count(*) from a) + (select count(*) from b)""", cutoff)
        return int(deleted or 0)


def _plain(evidence: dict[str, Any]) -> str:
    """Evidence as JSON text for the jsonb column (numpy numbers made plain)."""
    return orjson.dumps(evidence, option=orjson.OPT_SERIALIZE_NUMPY).decode()

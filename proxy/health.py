"""Per-route circuit breakers, kept in each proxy process.

A route that fails `threshold` times in a row (connection errors, timeouts, 5xx) is opened: no traffic for
`cooldown_s`. Then one probe request is let through (half-open); success closes the breaker, failure
opens it for another cool-down. A probe that never reports back (its client went away) is retried after a
cool-down too. Upstream 429s fail over but don't open the breaker: the route is busy, not broken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.routing import Route

__all__ = ["DEGRADED", "HEALTHY", "CircuitBreakers", "RouteStats", "route_rank"]

HEALTHY, DEGRADED = 0, 1
_PROBE_RANK = {"healthy": HEALTHY, "degraded": DEGRADED}  # failing, quarantined: not used


def route_rank(breakers: CircuitBreakers, route: Route, now: float) -> int | None:
    """One picture of a route's health for the router: None if it is not to be used now (its breaker is
    open, or the quality probes find it failing, or an admin quarantined it); else HEALTHY, or DEGRADED when
    either the probes or the catalogue's admin status say degraded. (A half-open breaker keeps its rank, so
    that its one trial request is actually sent.)"""
    probe = _PROBE_RANK.get(route.probe_status)
    if probe is None or not breakers.allows(route.id, now):
        return None
    if probe == DEGRADED or route.status != "active":
        return DEGRADED
    return HEALTHY


class CircuitBreakers:
    __slots__ = ("_cooldown", "_state", "_threshold")

    def __init__(self, *, threshold: int, cooldown_s: float) -> None:
        if threshold <= 0 or cooldown_s <= 0:
            raise ValueError("threshold and cooldown_s must be positive")
        self._threshold = threshold
        self._cooldown = cooldown_s
        # route id -> [consecutive failures, open until (monotonic s, 0 = closed), probe started at (0 = none)]
        self._state: dict[int, list] = {}

    def allows(self, route_id: int, now: float) -> bool:
        state = self._state.get(route_id)
        if state is None or state[1] == 0.0:
            return True
        return now >= state[1] and (state[2] == 0.0 or now - state[2] > self._cooldown)

    def is_open(self, route_id: int) -> bool:
        state = self._state.get(route_id)
        return state is not None and state[1] != 0.0

    def attempt(self, route_id: int, now: float) -> None:
        state = self._state.get(route_id)
        if state is not None and state[1] != 0.0:
            state[2] = now  # this request is the half-open probe

    def success(self, route_id: int) -> None:
        if route_id in self._state:
            del self._state[route_id]

    def failure(self, route_id: int, now: float) -> None:
        state = self._state.setdefault(route_id, [0, 0.0, 0.0])
        state[0] += 1
        if state[2] != 0.0 or state[0] >= self._threshold:
            state[1] = now + self._cooldown
            state[2] = 0.0


class RouteStats:
    """Recent latency (seconds to the first byte) and throughput (output tokens per second) of each route, as
    this process saw them: exponentially weighted means, for `provider.sort` ("latency", "throughput"). A route
    never measured ranks after measured ones, so that a new route is not preferred on no evidence."""

    __slots__ = ("_alpha", "_latency", "_throughput")

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be within (0, 1]")
        self._alpha = alpha
        self._latency: dict[int, float] = {}
        self._throughput: dict[int, float] = {}

    def observe(self, route_id: int, latency_s: float, output_tokens: int, duration_s: float) -> None:
        a = self._alpha
        old = self._latency.get(route_id)
        self._latency[route_id] = latency_s if old is None else old + a * (latency_s - old)
        if output_tokens > 0 and duration_s > 0:
            rate = output_tokens / duration_s
            old = self._throughput.get(route_id)
            self._throughput[route_id] = rate if old is None else old + a * (rate - old)

    def latency(self, route_id: int) -> float:
        """Seconds (infinity when never measured)."""
        return self._latency.get(route_id, float("inf"))

    def throughput(self, route_id: int) -> float:
        """Output tokens per second (0 when never measured)."""
        return self._throughput.get(route_id, 0.0)

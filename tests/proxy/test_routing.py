"""plan_attempts and route_rank as units: the probe status and the breakers as one picture (seeded random
order, injected clock)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.errors import UpstreamError
from proxy.health import DEGRADED, HEALTHY, CircuitBreakers, route_rank
from proxy.routing import ModelEntry, Route, plan_attempts


def _route(route_id: int, *, priority: int = 0, weight: int = 100, status: str = "active",
           probe_status: str = "healthy", provider_id: int | None = None) -> Route:
    return Route(id=route_id, model="m", provider_id=provider_id or route_id, provider=f"p{route_id}",
                 api_format="openai", base_url="http://127.0.0.1:9/v1", upstream_model="m", credential="sk",
                 connect_timeout_s=1, read_timeout_s=1, priority=priority, weight=weight, status=status,
                 probe_status=probe_status)


def _entry(*routes: Route) -> ModelEntry:
    return ModelEntry("m", "chat", "x", 0, tuple(sorted(routes, key=lambda r: -r.priority)), ())


def _breakers() -> CircuitBreakers:
    return CircuitBreakers(threshold=2, cooldown_s=10)


def test_route_rank_joins_breaker_probe_and_admin_status() -> None:
    b = _breakers()
    assert route_rank(b, _route(1), 0) == HEALTHY
    assert route_rank(b, _route(1, probe_status="degraded"), 0) == DEGRADED
    assert route_rank(b, _route(1, status="degraded"), 0) == DEGRADED
    assert route_rank(b, _route(1, probe_status="failing"), 0) is None
    assert route_rank(b, _route(1, probe_status="quarantined"), 0) is None
    b.failure(1, 0.0)
    b.failure(1, 0.0)
    assert route_rank(b, _route(1), 5.0) is None  # breaker open
    assert route_rank(b, _route(1), 11.0) == HEALTHY  # half-open: its trial request goes out


def test_healthy_before_degraded_and_failing_never_planned() -> None:
    entry = _entry(_route(1, probe_status="degraded", weight=1000), _route(2), _route(3, probe_status="failing"),
                   _route(4, probe_status="quarantined"))
    rng = random.Random(1)
    for _ in range(200):
        plan = plan_attempts(entry, {}, _breakers(), 0.0, 10, rng)
        assert [a.route.id for a in plan] == [2, 1]


def test_priority_still_first_and_weights_within_a_rank() -> None:
    entry = _entry(_route(1, priority=5, probe_status="degraded"), _route(2), _route(3, weight=300))
    rng = random.Random(7)
    firsts = Counter(plan_attempts(entry, {}, _breakers(), 0.0, 3, rng)[0].route.id for _ in range(2000))
    assert set(firsts) == {1}  # a degraded route of a better priority still comes first
    entry = _entry(_route(2), _route(3, weight=300))
    firsts = Counter(plan_attempts(entry, {}, _breakers(), 0.0, 3, rng)[0].route.id for _ in range(2000))
    assert 0.70 < firsts[3] / 2000 < 0.80  # 300 : 100
    again = [plan_attempts(entry, {}, _breakers(), 0.0, 3, random.Random(3))[0].route.id for _ in range(5)]
    assert len(set(again)) == 1  # the same seed, the same order


def test_a_model_whose_only_routes_fail_is_unavailable() -> None:
    with pytest.raises(UpstreamError) as exc:
        plan_attempts(_entry(_route(1, probe_status="failing")), {}, _breakers(), 0.0, 3)
    assert exc.value.status == 503 and exc.value.code == "model_unavailable"
    with pytest.raises(UpstreamError):
        plan_attempts(_entry(_route(1, probe_status="quarantined"), _route(2, probe_status="failing")), {},
                      _breakers(), 0.0, 3)


def test_byok_routes_first_but_not_when_failing() -> None:
    entry = _entry(_route(1, provider_id=10), _route(2, provider_id=20, probe_status="failing"))
    plan = plan_attempts(entry, {20: "org-key", 10: "org-key-2"}, _breakers(), 0.0, 3, random.Random(0))
    assert [(a.route.id, a.byok) for a in plan] == [(1, True)]

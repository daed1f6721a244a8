"""A route's probe status, from the level of each evaluation, with hysteresis.

    healthy ⇄ degraded ⇄ failing        quarantined: set and lifted by a platform admin only

Up: a status is entered after `up` consecutive evaluations at (or above) its level — one bad window is not
enough. Down: one step at a time, after `down` consecutive evaluations below the current status. So a route
flapping around a threshold does not flap the router. A pinned route (an admin's override, quarantine
always) keeps its status; the streaks go on being counted, so lifting the pin hands back a current picture.
"""

from __future__ import annotations

import msgspec

__all__ = ["LEVELS", "STATUSES", "Streaks", "Transition", "next_status"]

STATUSES = ("healthy", "degraded", "failing", "quarantined")
LEVELS = {"healthy": 0, "degraded": 1, "failing": 2, "quarantined": 3}
_BY_LEVEL = ("healthy", "degraded", "failing")


class Streaks(msgspec.Struct, frozen=True):
    degraded: int = 0  # consecutive evaluations at degraded or worse
    failing: int = 0  # consecutive evaluations at failing
    clean: int = 0  # consecutive evaluations below the current status


class Transition(msgspec.Struct, frozen=True):
    status: str
    streaks: Streaks
    changed: bool
    reason: str


def next_status(current: str, level: str, streaks: Streaks, *, pinned: bool = False, up: int = 2,
                down: int = 3) -> Transition:
    """The status after an evaluation at `level` (healthy | degraded | failing)."""
    if up < 1 or down < 1:
        raise ValueError("up and down must be at least 1")
    lv, cur = LEVELS[level], LEVELS[current]
    s = Streaks(degraded=streaks.degraded + 1 if lv >= 1 else 0, failing=streaks.failing + 1 if lv >= 2 else 0,
                clean=streaks.clean + 1 if lv < cur else 0)
    if pinned or current == "quarantined":
        return Transition(current, s, False, "pinned" if pinned else "quarantined")
    if s.failing >= up and cur < 2:
        return Transition("failing", msgspec.structs.replace(s, clean=0), True,
                          f"failing findings in {s.failing} consecutive evaluations")
    if s.degraded >= up and cur < 1:
        return Transition("degraded", msgspec.structs.replace(s, clean=0), True,
                          f"findings in {s.degraded} consecutive evaluations")
    if cur > 0 and s.clean >= down:
        lower = _BY_LEVEL[cur - 1]
        return Transition(lower, msgspec.structs.replace(s, clean=0), True,
                          f"{s.clean} consecutive evaluations below {current}")
    return Transition(current, s, False, "unchanged")

"""Spend budgets: a limit per period on what one API key, or a whole org, may spend.

A budget has a period (`day`, `week`, `month`) and a window:

- `calendar`: the calendar day, ISO week (Monday to Sunday) or month in the time zone `RR_BUDGET_TIMEZONE`
  (default UTC). A period starts at the first instant of its local date and ends where the next one starts,
  so a day is 23 or 25 hours long across a DST change (and a month one hour shorter or longer). Its counter
  is named by the period's first local date; the budget "resets" when the next period starts.
- `rolling`: the last 24 hours, 7 days or 30 days, kept as 24 buckets of a 24th of the window (1 h, 7 h,
  30 h). Spend is counted in the bucket of the moment its request started and stops counting when that
  bucket is 24 buckets old: a micro-dollar counts for at least 23/24 and at most the whole window (for a day:
  between 23 and 24 hours). The reserve script sums at most 24 bucket fields, so the work is bounded.

Spend counts reservations too, corrected to the real cost at settlement (as the monthly spend cap), so no
concurrency can pass a limit. The proxy computes the period (Python's clock, `zoneinfo`) and hands the
counter keys and boundaries to the reserve script as KEYS/ARGV (`proxy.billing`); nothing here touches Redis.
"""

from __future__ import annotations

import datetime
import math
from zoneinfo import ZoneInfo

import msgspec

__all__ = [
    "MAX_BUDGET_MICROS",
    "PERIODS",
    "ROLLING_BUCKETS",
    "ROLLING_SECONDS",
    "WINDOWS",
    "Budget",
    "BudgetCalendar",
    "CalendarPeriod",
    "calendar_period",
    "rolling_bucket",
    "rolling_resets_at",
]

PERIODS = ("day", "week", "month")
WINDOWS = ("calendar", "rolling")
ROLLING_BUCKETS = 24
ROLLING_SECONDS = {"day": 86_400, "week": 7 * 86_400, "month": 30 * 86_400}
# The largest limit: a billion dollars. Sums of counters and reservations stay far below 2^53, where the
# script's Lua numbers (doubles) would stop being exact.
MAX_BUDGET_MICROS = 10**15


class Budget(msgspec.Struct, frozen=True, array_like=True):
    """One budget as the proxy knows it (in the cached key record): the key's own or its org's."""

    budget_id: int
    scope: str  # "key" or "org"
    period: str  # PERIODS
    window: str  # WINDOWS
    limit_micros: int


class CalendarPeriod(msgspec.Struct, frozen=True):
    label: str  # the local date the period starts on, YYYYMMDD: names its counter
    start: float  # unix seconds
    end: float  # unix seconds: the next period's start (the reset time)


def _first_instant(day: datetime.date, zone: ZoneInfo) -> float:
    # Local midnight; where a DST gap swallows midnight, fold=0 maps it onto the instant of the jump, which is
    # the first instant of that local date.
    return datetime.datetime.combine(day, datetime.time(0), tzinfo=zone).timestamp()


def calendar_period(now: float, period: str, zone: ZoneInfo) -> CalendarPeriod:
    """The calendar day, ISO week or month (in `zone`) that holds the instant `now` (unix seconds)."""
    # Whole seconds: every period boundary is one, and fromtimestamp would round 23:59:59.9999996 up to the
    # next day.
    today = datetime.datetime.fromtimestamp(math.floor(now), zone).date()
    if period == "day":
        first, following = today, today + datetime.timedelta(days=1)
    elif period == "week":
        first = today - datetime.timedelta(days=today.weekday())
        following = first + datetime.timedelta(days=7)
    elif period == "month":
        first = today.replace(day=1)
        following = (first + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    start, end = _first_instant(first, zone), _first_instant(following, zone)
    return CalendarPeriod(first.strftime("%Y%m%d"), start, end)


def rolling_bucket(now: float, period: str) -> tuple[int, int]:
    """(bucket index, bucket length in ms) of the instant `now` in a rolling window of `period`."""
    bucket_ms = ROLLING_SECONDS[period] * 1000 // ROLLING_BUCKETS
    return int(now * 1000) // bucket_ms, bucket_ms


def rolling_resets_at(bucket: int, bucket_ms: int) -> float:
    """When spend counted in `bucket` stops counting (unix seconds)."""
    return (bucket + ROLLING_BUCKETS) * bucket_ms / 1000


class BudgetCalendar:
    """The current calendar periods of one time zone, recomputed only when one ends: per request a look-up."""

    __slots__ = ("_current", "zone")

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self._current: dict[str, CalendarPeriod] = {}

    def period(self, now: float, period: str) -> CalendarPeriod:
        current = self._current.get(period)
        if current is None or not current.start <= now < current.end:
            current = self._current[period] = calendar_period(now, period, self.zone)
        return current

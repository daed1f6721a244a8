"""Budget periods as pure functions: calendar days, weeks and months in a time zone (DST included) and the
rolling windows' buckets. No clock is read: every instant is given."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.budgets import (
    ROLLING_BUCKETS,
    ROLLING_SECONDS,
    BudgetCalendar,
    calendar_period,
    rolling_bucket,
    rolling_resets_at,
)
from shared.settings import SettingsError, load_settings

NEW_YORK = ZoneInfo("America/New_York")
# Zones with awkward transitions: DST (1 h, and Lord Howe's 30 min), DST changes at midnight (Santiago,
# Havana), a 45-minute offset, and a date-line jump (Apia skipped 2011-12-30 entirely).
ZONES = [ZoneInfo(z) for z in ("UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe",
                               "America/Santiago", "America/Havana", "Asia/Kathmandu", "Pacific/Apia")]
HOUR = 3600.0


def _utc(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def test_a_spring_forward_day_in_new_york_lasts_23_hours_and_a_fall_back_day_25() -> None:
    spring = calendar_period(_utc("2027-03-14T12:00:00+00:00"), "day", NEW_YORK)
    assert spring.label == "20270314"
    assert spring.start == _utc("2027-03-14T05:00:00+00:00")  # midnight EST (UTC-5)
    assert spring.end == _utc("2027-03-15T04:00:00+00:00")  # midnight EDT (UTC-4)
    assert spring.end - spring.start == 23 * HOUR
    fall = calendar_period(_utc("2027-11-07T12:00:00+00:00"), "day", NEW_YORK)
    assert (fall.label, fall.end - fall.start) == ("20271107", 25 * HOUR)


def test_weeks_start_on_monday_and_months_on_the_first_in_the_zone() -> None:
    # Sunday 2027-03-14 19:30 in New York is Monday 00:30 UTC: still the week of Monday 2027-03-08 there.
    now = _utc("2027-03-15T00:30:00+00:00")
    week = calendar_period(now, "week", NEW_YORK)
    assert (week.label, week.start, week.end) == ("20270308", _utc("2027-03-08T05:00:00+00:00"),
                                                  _utc("2027-03-15T04:00:00+00:00"))
    assert week.end - week.start == 7 * 24 * HOUR - HOUR  # the DST week is an hour short
    assert calendar_period(now, "week", ZoneInfo("UTC")).label == "20270315"
    month = calendar_period(_utc("2027-04-01T03:00:00+00:00"), "month", NEW_YORK)  # 23:00 on 31 March there
    assert (month.label, month.end) == ("20270301", _utc("2027-04-01T04:00:00+00:00"))
    dec = calendar_period(_utc("2026-12-31T23:59:59+00:00"), "month", ZoneInfo("UTC"))
    assert (dec.label, dec.end) == ("20261201", _utc("2027-01-01T00:00:00+00:00"))


def test_a_day_whose_midnight_does_not_exist_starts_at_the_jump() -> None:
    # Santiago springs forward at 24:00 → 01:00 (2026-09-06): the day starts at 01:00 local, 04:00 UTC.
    day = calendar_period(_utc("2026-09-06T12:00:00+00:00"), "day", ZoneInfo("America/Santiago"))
    assert day.label == "20260906" and day.start == _utc("2026-09-06T04:00:00+00:00")
    assert day.end - day.start == 23 * HOUR


def test_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError):
        calendar_period(0.0, "fortnight", NEW_YORK)


@settings(max_examples=400, deadline=None)
@given(now=st.floats(min_value=_utc("1990-01-01T00:00:00+00:00"), max_value=_utc("2090-01-01T00:00:00+00:00")),
       zone=st.sampled_from(ZONES), period=st.sampled_from(["day", "week", "month"]))
def test_calendar_periods_tile_time_in_every_zone(now: float, zone: ZoneInfo, period: str) -> None:
    p = calendar_period(now, period, zone)
    assert p.start <= now < p.end
    start_local = datetime.datetime.fromtimestamp(p.start, zone)
    assert start_local.strftime("%Y%m%d") == p.label
    # The next period starts exactly where this one ends, and the one before ends where this starts.
    following = calendar_period(p.end, period, zone)
    assert following.start == p.end and following.label > p.label
    assert calendar_period(p.start - 0.001, period, zone).end == p.start
    nominal = {"day": 24 * HOUR, "week": 7 * 24 * HOUR}.get(period)
    if nominal is not None:  # a DST change moves a day or week by at most 2 h (Apia: one whole day)
        assert abs((p.end - p.start) - nominal) <= 24 * HOUR if zone.key == "Pacific/Apia" else 2 * HOUR
    else:
        assert 27 * 24 * HOUR <= p.end - p.start <= 32 * 24 * HOUR


@settings(max_examples=200, deadline=None)
@given(start=st.floats(min_value=_utc("2026-01-01T00:00:00+00:00"), max_value=_utc("2028-01-01T00:00:00+00:00")),
       steps=st.lists(st.floats(min_value=0, max_value=40 * HOUR), min_size=1, max_size=30),
       zone=st.sampled_from(ZONES), period=st.sampled_from(["day", "week", "month"]))
def test_the_cached_calendar_agrees_with_the_function(start: float, steps: list[float], zone: ZoneInfo,
                                                      period: str) -> None:
    calendar, now = BudgetCalendar(zone), start
    for step in steps:
        now += step
        assert calendar.period(now, period) == calendar_period(now, period, zone)


@given(now=st.floats(min_value=0, max_value=4e9), period=st.sampled_from(["day", "week", "month"]))
def test_rolling_spend_counts_for_between_23_and_24_24ths_of_its_window(now: float, period: str) -> None:
    bucket, bucket_ms = rolling_bucket(now, period)
    assert bucket_ms * ROLLING_BUCKETS == ROLLING_SECONDS[period] * 1000
    assert bucket * bucket_ms <= now * 1000 < (bucket + 1) * bucket_ms
    counted_for = rolling_resets_at(bucket, bucket_ms) - now
    window = ROLLING_SECONDS[period]
    assert window * 23 / 24 - 0.001 <= counted_for <= window


@pytest.mark.parametrize("zone", ["", "Mars/Olympus", "../../etc/passwd", "UTC\n", "a" * 300])
def test_a_bad_budget_time_zone_stops_start_up(zone: str) -> None:
    with pytest.raises(SettingsError, match="RR_BUDGET_TIMEZONE"):
        load_settings({}, database_url="postgresql://x", redis_url="redis://x", key_pepper="p" * 20,
                      master_key="bWFzdGVya2V5bWFzdGVya2V5bWFzdGVya2V5bWFzdGU=", budget_timezone=zone)

"""Template filters: money (integer micro-units) and times, shown the same way on every page."""

from __future__ import annotations

import datetime

__all__ = ["FILTERS", "usd"]


def usd(micros: int | None, places: int = 2) -> str:
    """12_345_678 → "$12.35"; amounts below a cent keep up to six places ("$0.000123"). Exact: integers only."""
    if micros is None:
        return "—"
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    digits = f"{frac:06d}"
    shown = digits[:places]
    if whole == 0 and frac and not int(shown or "0"):
        shown = digits.rstrip("0")
    rounded = whole
    if len(shown) == places and len(digits.rstrip("0")) > places:  # round half up at `places`
        scaled = (abs(micros) * 10**places + 500_000) // 1_000_000
        rounded, rest = divmod(scaled, 10**places)
        shown = f"{rest:0{places}d}"
    return f"{sign}${rounded:,}.{shown}" if shown else f"{sign}${rounded:,}"


def when(value: datetime.datetime | str | None) -> str:
    """A UTC time to the second; also an ISO string (the generation record's `created_at`)."""
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def micros_to_dollars(micros: int | None) -> str:
    """For a form field: 1_500_000 → "1.5" (exact)."""
    if micros is None:
        return ""
    whole, frac = divmod(abs(micros), 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return f"-{text}" if micros < 0 else text


FILTERS = {"usd": usd, "when": when, "dollars": micros_to_dollars}

"""Money: integer micro-units (1 USD = 1,000,000) everywhere, and the price of a request.

Prices are per million tokens, also in micro-units, so a cost is an exact integer product divided by a
million; the division rounds up (a fraction of a micro-dollar is charged as one), never via floats.
"""

from __future__ import annotations

import functools

import msgspec

from shared.usage import Usage

__all__ = ["COMPONENTS", "MICROS_PER_USD", "Price", "PriceVersion", "component_costs", "cost_micros", "format_usd",
           "parse_usd", "usage_cost_micros", "version_cost_micros", "worst_case_micros"]

MICROS_PER_USD = 1_000_000
_PER_MTOK = 1_000_000


class Price(msgspec.Struct, frozen=True):
    """One row of a price version: µ$ per million tokens of each component, plus a fee per request.

    A component left unset (None) falls back, never to zero: cached input, cache writes (5-minute; 1-hour
    falls back to the 5-minute price, then to input), input images and audio to the input price; reasoning,
    output images and audio to the output price. The BYOK rule (what we charge when the org's own credential
    served the request) has its own input/output/request prices and optional cached-input, cache-write and
    reasoning prices that fall back the same way to the BYOK input/output prices.
    """

    id: int
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    request_micros: int
    effective_from: float  # unix seconds
    byok_input_micros_per_mtok: int = 0
    byok_output_micros_per_mtok: int = 0
    byok_request_micros: int = 0
    cached_input_micros_per_mtok: int | None = None
    cache_write_5m_micros_per_mtok: int | None = None
    cache_write_1h_micros_per_mtok: int | None = None
    reasoning_micros_per_mtok: int | None = None
    input_image_micros_per_mtok: int | None = None
    input_audio_micros_per_mtok: int | None = None
    output_image_micros_per_mtok: int | None = None
    output_audio_micros_per_mtok: int | None = None
    byok_cached_input_micros_per_mtok: int | None = None
    byok_cache_write_5m_micros_per_mtok: int | None = None
    byok_cache_write_1h_micros_per_mtok: int | None = None
    byok_reasoning_micros_per_mtok: int | None = None
    service_tier: str = "default"
    min_prompt_tokens: int = 0  # this row applies from this many prompt tokens up (a long-context tier)

    def rates(self, *, byok: bool) -> tuple[tuple[int, ...], int]:
        """(µ$ per Mtok for each `Usage` component in `_COMPONENTS` order, fee per request)."""
        if byok:
            inp, out = self.byok_input_micros_per_mtok, self.byok_output_micros_per_mtok
            cached, w5, w1 = (self.byok_cached_input_micros_per_mtok, self.byok_cache_write_5m_micros_per_mtok,
                              self.byok_cache_write_1h_micros_per_mtok)
            reasoning, fee = self.byok_reasoning_micros_per_mtok, self.byok_request_micros
            image_in = audio_in = image_out = audio_out = None
        else:
            inp, out = self.input_micros_per_mtok, self.output_micros_per_mtok
            cached, w5, w1 = (self.cached_input_micros_per_mtok, self.cache_write_5m_micros_per_mtok,
                              self.cache_write_1h_micros_per_mtok)
            reasoning, fee = self.reasoning_micros_per_mtok, self.request_micros
            image_in, audio_in = self.input_image_micros_per_mtok, self.input_audio_micros_per_mtok
            image_out, audio_out = self.output_image_micros_per_mtok, self.output_audio_micros_per_mtok
        w5 = inp if w5 is None else w5
        return ((inp, _or(cached, inp), w5, _or(w1, w5), _or(image_in, inp), _or(audio_in, inp),
                 out, _or(reasoning, out), _or(image_out, out), _or(audio_out, out)), fee)


def _or(value: int | None, fallback: int) -> int:
    return fallback if value is None else value


# The order of `Price.rates`: input components first, then output components.
COMPONENTS = _COMPONENTS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "input_image", "input_audio",
               "output", "reasoning", "output_image", "output_audio")
_INPUTS = 6


class PriceVersion(msgspec.Struct, frozen=True):
    """The rows of one model in force from one `effective_from`: one per (service tier, prompt-size tier)."""

    effective_from: float
    rows: tuple[Price, ...]  # sorted by (service_tier, min_prompt_tokens)

    @property
    def id(self) -> int:
        return self.base.id

    @property
    def base(self) -> Price:
        """The default tier's row for the smallest prompts (what a client is quoted)."""
        return self.row_for("default", 0)

    def row_for(self, service_tier: str | None, prompt_tokens: int) -> Price:
        """The row that bills a request: its service tier's rows (the default tier's when it has none), the
        one with the largest `min_prompt_tokens` not above the prompt."""
        tier = service_tier or "default"
        rows = [r for r in self.rows if r.service_tier == tier] or [r for r in self.rows if r.service_tier == "default"]
        rows = rows or list(self.rows)
        fitting = [r for r in rows if r.min_prompt_tokens <= prompt_tokens] or [min(rows, key=_threshold)]
        return max(fitting, key=_threshold)


def _threshold(row: Price) -> int:
    return row.min_prompt_tokens


@functools.lru_cache(maxsize=4096)
def _rates(price: Price, byok: bool) -> tuple[tuple[int, ...], int]:
    return price.rates(byok=byok)  # the fallbacks resolved once per price row (on the hot path per request)


def usage_cost_micros(price: Price, usage: Usage, *, byok: bool = False) -> int:
    """Exact cost of `usage` at one price row: the sum over components, rounded up once, plus the fee."""
    r, fee = _rates(price, byok)
    u = usage
    total = u.input * r[0] + u.output * r[6]
    if u.cached_input or u.cache_write_5m or u.cache_write_1h or u.input_image or u.input_audio:
        total += (u.cached_input * r[1] + u.cache_write_5m * r[2] + u.cache_write_1h * r[3] + u.input_image * r[4]
                  + u.input_audio * r[5])
    if u.reasoning or u.output_image or u.output_audio:
        total += u.reasoning * r[7] + u.output_image * r[8] + u.output_audio * r[9]
    return -(-total // _PER_MTOK) + fee


def component_costs(price: Price, usage: Usage, *, byok: bool = False) -> dict[str, int]:
    """What each component of `usage` contributes at one price row, in µ$ rounded down (the charged cost is
    their exact sum rounded up once, plus the fee: these parts may add up to a few µ$ less)."""
    rates, _ = price.rates(byok=byok)
    return {name: getattr(usage, name) * rate // _PER_MTOK for name, rate in zip(_COMPONENTS, rates, strict=True)}


def version_cost_micros(version: PriceVersion, usage: Usage, *, byok: bool = False) -> tuple[int, Price]:
    """The cost of `usage` under a price version, and the row that priced it (by service tier and prompt)."""
    row = version.row_for(usage.service_tier, usage.prompt_total)
    return usage_cost_micros(row, usage, byok=byok), row


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int, *, byok: bool = False) -> int:
    """Exact cost of plain text tokens at one price row, rounded up to a whole micro-unit."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    return usage_cost_micros(price, Usage(input=prompt_tokens, output=completion_tokens), byok=byok)


def worst_case_micros(price: Price | PriceVersion, prompt_tokens: int, completion_tokens: int) -> int:
    """The most a request of these (upper-bound) sizes can cost: whichever row of the version, credential
    and component (the dearest input and output component) bills it."""
    worst = 0
    for top_in, top_out, fee in _dearest(price):
        worst = max(worst, -(-(prompt_tokens * top_in + completion_tokens * top_out) // _PER_MTOK) + fee)
    return worst


@functools.lru_cache(maxsize=4096)
def _dearest(price: Price | PriceVersion) -> tuple[tuple[int, int, int], ...]:
    """(dearest input rate, dearest output rate, fee) of every row and credential: computed once per version."""
    rows = price.rows if isinstance(price, PriceVersion) else (price,)
    out = []
    for row in rows:
        for byok in (False, True):
            rates, fee = _rates(row, byok)
            out.append((max(rates[:_INPUTS]), max(rates[_INPUTS:]), fee))
    return tuple(out)


def format_usd(micros: int) -> str:
    """`12345678` -> `"12.345678"`: a decimal string for display, exact."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def parse_usd(text: str) -> int:
    """`"12.5"` -> `12500000`; at most six decimals, no floats involved."""
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() and not (whole == "" and frac.isdigit()):
        raise ValueError(f"not an amount: {text!r}")
    if len(frac) > 6 or (frac and not frac.isdigit()):
        raise ValueError(f"at most six decimals: {text!r}")
    return sign * (int(whole or 0) * MICROS_PER_USD + int(frac.ljust(6, "0") or 0))

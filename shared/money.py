"""Money: integer micro-units (1 USD = 1,000,000) everywhere, and the price of a request.

Prices are per million tokens, also in micro-units, so a cost is an exact integer product divided by a
million; the division rounds up (a fraction of a micro-dollar is charged as one), never via floats.
"""

from __future__ import annotations

import msgspec

__all__ = ["MICROS_PER_USD", "Price", "cost_micros", "format_usd", "parse_usd", "worst_case_micros"]

MICROS_PER_USD = 1_000_000
_PER_MTOK = 1_000_000


class Price(msgspec.Struct, frozen=True):
    id: int
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    request_micros: int
    effective_from: float  # unix seconds
    # The org's BYOK rule: what we charge when the org's own provider credential served the request.
    byok_input_micros_per_mtok: int = 0
    byok_output_micros_per_mtok: int = 0
    byok_request_micros: int = 0


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int, *, byok: bool = False) -> int:
    """Exact cost of a request in micro-units, rounded up to a whole micro-unit."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    if byok:
        tokens = (prompt_tokens * price.byok_input_micros_per_mtok
                  + completion_tokens * price.byok_output_micros_per_mtok)
        return -(-tokens // _PER_MTOK) + price.byok_request_micros
    tokens = prompt_tokens * price.input_micros_per_mtok + completion_tokens * price.output_micros_per_mtok
    return -(-tokens // _PER_MTOK) + price.request_micros


def worst_case_micros(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """The most a request of these (upper-bound) sizes can cost, whichever credential serves it."""
    return max(cost_micros(price, prompt_tokens, completion_tokens),
               cost_micros(price, prompt_tokens, completion_tokens, byok=True))


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

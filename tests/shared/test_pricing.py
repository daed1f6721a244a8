"""Usage normalisation and cost from price components: pure rules, exact to the micro-unit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.money import Price, PriceVersion, cost_micros, usage_cost_micros, version_cost_micros, worst_case_micros
from shared.usage import Usage, from_anthropic, from_openai, normalise

# $2.50 / $1.25 cached / $10 output per Mtok; above 200k prompt tokens $5 / $2.50 / $15; flex at half price.
BASE = Price(1, 2_500_000, 10_000_000, 0, 0.0, cached_input_micros_per_mtok=1_250_000)
LONG = Price(2, 5_000_000, 15_000_000, 0, 0.0, cached_input_micros_per_mtok=2_500_000, min_prompt_tokens=200_000)
FLEX = Price(3, 1_250_000, 5_000_000, 0, 0.0, cached_input_micros_per_mtok=625_000, service_tier="flex")
VERSION = PriceVersion(0.0, (BASE, LONG, FLEX))
# Anthropic's list: $3 input, $0.30 cache read (0.1x), $3.75 5-minute writes (1.25x), $6 1-hour writes (2x), $15.
CLAUDE = Price(4, 3_000_000, 15_000_000, 0, 0.0, cached_input_micros_per_mtok=300_000,
               cache_write_5m_micros_per_mtok=3_750_000, cache_write_1h_micros_per_mtok=6_000_000)


def test_openai_prompt_tokens_include_cached_and_completion_tokens_include_reasoning() -> None:
    usage = from_openai({"prompt_tokens": 100_000, "completion_tokens": 1_000, "total_tokens": 101_000,
                         "prompt_tokens_details": {"cached_tokens": 90_000, "audio_tokens": 0},
                         "completion_tokens_details": {"reasoning_tokens": 600, "audio_tokens": 0}})
    assert (usage.input, usage.cached_input, usage.output, usage.reasoning) == (10_000, 90_000, 400, 600)
    assert (usage.prompt_total, usage.completion_total) == (100_000, 1_000)
    # 10,000 × 2.5 + 90,000 × 1.25 + 1,000 × 10 (reasoning at the output price) = 147,500 µ$, not 260,000.
    assert usage_cost_micros(BASE, usage) == 147_500


def test_responses_usage_shape() -> None:
    usage = from_openai({"input_tokens": 50, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 30,
                         "output_tokens_details": {"reasoning_tokens": 10}, "total_tokens": 80})
    assert (usage.input, usage.cached_input, usage.output, usage.reasoning) == (30, 20, 20, 10)


def test_anthropic_input_tokens_exclude_cache_reads_and_writes() -> None:
    usage = from_anthropic({"input_tokens": 1_000, "cache_read_input_tokens": 50_000,
                            "cache_creation_input_tokens": 12_000, "output_tokens": 2_000,
                            "cache_creation": {"ephemeral_5m_input_tokens": 10_000,
                                               "ephemeral_1h_input_tokens": 2_000}})
    assert (usage.input, usage.cached_input, usage.cache_write_5m, usage.cache_write_1h) == (1_000, 50_000, 10_000,
                                                                                             2_000)
    assert usage.prompt_total == 63_000
    # 1,000 × 3 + 50,000 × 0.3 + 10,000 × 3.75 + 2,000 × 6 + 2,000 × 15 = 97,500 µ$
    assert usage_cost_micros(CLAUDE, usage) == 97_500
    # Without the split, every write is a 5-minute one.
    flat = from_anthropic({"input_tokens": 0, "cache_creation_input_tokens": 4_000, "output_tokens": 0})
    assert (flat.cache_write_5m, flat.cache_write_1h) == (4_000, 0)


def test_a_split_that_does_not_add_up_trusts_the_total() -> None:
    usage = from_anthropic({"cache_creation_input_tokens": 100,
                            "cache_creation": {"ephemeral_5m_input_tokens": 900, "ephemeral_1h_input_tokens": 30}})
    assert (usage.cache_write_5m, usage.cache_write_1h) == (70, 30)


def test_missing_components_fall_back_never_to_zero() -> None:
    plain = Price(9, 1_000_000, 2_000_000, 0, 0.0)
    usage = Usage(input=1, cached_input=1, cache_write_5m=1, cache_write_1h=1, input_image=1, input_audio=1,
                  output=1, reasoning=1, output_image=1, output_audio=1)
    rates, _ = plain.rates(byok=False)
    assert rates == (1_000_000,) * 6 + (2_000_000,) * 4
    only_5m = Price(9, 1_000_000, 2_000_000, 0, 0.0, cache_write_5m_micros_per_mtok=1_250_000)
    assert only_5m.rates(byok=False)[0][2:4] == (1_250_000, 1_250_000)  # 1-hour falls back to 5-minute
    byok = Price(9, 1_000_000, 2_000_000, 0, 0.0, byok_input_micros_per_mtok=100_000,
                 byok_output_micros_per_mtok=200_000, byok_request_micros=7)
    assert byok.rates(byok=True) == ((100_000,) * 6 + (200_000,) * 4, 7)
    assert usage_cost_micros(plain, usage) == -(-(6 * 1_000_000 + 4 * 2_000_000) // 1_000_000)


def test_the_old_two_prices_still_price_plain_tokens() -> None:
    price = Price(1, 150_000, 600_000, 0, 0.0)
    assert cost_micros(price, 1_000_000, 0) == 150_000 and cost_micros(price, 7, 3) == 3


def test_tiers_by_prompt_size_and_service_tier() -> None:
    short, long_ = Usage(input=199_999), Usage(input=200_000)
    assert version_cost_micros(VERSION, short) == (-(-199_999 * 2_500_000 // 1_000_000), BASE)
    assert version_cost_micros(VERSION, long_) == (1_000_000, LONG)
    flex = Usage(input=1_000, output=1_000, service_tier="flex")
    assert version_cost_micros(VERSION, flex) == (6_250, FLEX)
    # A tier the version does not price is billed as the default tier.
    assert version_cost_micros(VERSION, Usage(input=1_000, service_tier="priority"))[1] == BASE


@given(st.integers(0, 400_000), st.integers(0, 400_000), st.integers(0, 50_000), st.integers(0, 50_000),
       st.sampled_from([None, "default", "flex", "priority"]), st.booleans())
def test_the_worst_case_bounds_every_split_of_the_same_sizes(prompt: int, cached: int, output: int, reasoning: int,
                                                              tier: str | None, byok: bool) -> None:
    """Whatever the upstream reports within the reserved sizes (any split into components, any tier, either
    credential), the cost never exceeds the reservation's worst case."""
    usage = Usage(input=prompt, cached_input=cached, output=output, reasoning=reasoning, service_tier=tier)
    for version in (VERSION, PriceVersion(0.0, (CLAUDE,))):
        worst = worst_case_micros(version, usage.prompt_total, usage.completion_total)
        assert version_cost_micros(version, usage, byok=byok)[0] <= worst


@given(st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                                        "cache_read_input_tokens", "cache_creation_input_tokens",
                                        "prompt_tokens_details", "completion_tokens_details", "cache_creation"]),
                       st.one_of(st.integers(-10, 2**40), st.text(max_size=3), st.none(), st.booleans(),
                                 st.dictionaries(st.text(max_size=30), st.integers(-5, 2**40), max_size=3))))
def test_hostile_usage_objects_normalise_to_bounded_non_negative_counts(usage: dict) -> None:
    for dialect in ("openai", "anthropic"):
        u = normalise(dialect, usage)
        assert u is not None
        counts = [getattr(u, f) for f in Usage.__struct_fields__ if f not in ("service_tier", "estimated")]
        assert all(isinstance(c, int) and 0 <= c < 2**31 for c in counts)
    assert normalise("openai", None) is None and normalise("anthropic", [1]) is None

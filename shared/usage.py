"""Usage, normalised once: every dialect's `usage` object becomes one `Usage` with the components providers
bill separately, with no double counting.

What each dialect means (the providers' own definitions):

- OpenAI Chat Completions: `prompt_tokens` *includes* `prompt_tokens_details.cached_tokens` and
  `.audio_tokens`; `completion_tokens` *includes* `completion_tokens_details.reasoning_tokens` and
  `.audio_tokens`. Image input tokens are text-priced input for chat models (no separate count is reported).
- OpenAI Responses: `input_tokens` includes `input_tokens_details.cached_tokens`; `output_tokens` includes
  `output_tokens_details.reasoning_tokens`.
- OpenAI embeddings: `prompt_tokens` (== `total_tokens`).
- Anthropic Messages: `input_tokens` *excludes* cache reads and writes; `cache_read_input_tokens` and
  `cache_creation_input_tokens` (split by `cache_creation.ephemeral_5m_input_tokens` / `ephemeral_1h_...`;
  without the split, all writes are 5-minute ones) come on top; `output_tokens` includes thinking.
  Streams report `message_start.message.usage` then cumulative `message_delta.usage`: merged, later wins.

Values of the wrong type or sign count as 0 (an upstream is not trusted either); every component is capped at
2^31 - 1 so that a hostile usage object cannot overflow the records.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Usage", "from_anthropic", "from_openai", "merge_anthropic", "normalise"]

_CAP = 2**31 - 1


class Usage(msgspec.Struct, frozen=True):
    """Tokens by what they are billed as. `input`/`output` are the plain text parts only."""

    input: int = 0
    cached_input: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    input_image: int = 0
    input_audio: int = 0
    output: int = 0
    reasoning: int = 0
    output_image: int = 0
    output_audio: int = 0
    service_tier: str | None = None
    estimated: bool = False

    @property
    def prompt_total(self) -> int:
        return (self.input + self.cached_input + self.cache_write_5m + self.cache_write_1h + self.input_image
                + self.input_audio)

    @property
    def completion_total(self) -> int:
        return self.output + self.reasoning + self.output_image + self.output_audio


def _n(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, _CAP)
    return 0


def _details(usage: dict, key: str) -> dict:
    value = usage.get(key)
    return value if isinstance(value, dict) else {}


def _tier(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= 32 and value.replace("_", "").isalnum() and value.isascii():
        return value.lower()
    return None


def from_openai(usage: dict, service_tier: Any = None) -> Usage:
    """Chat Completions, Responses or embeddings usage."""
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses
        prompt, completion = _n(usage.get("input_tokens")), _n(usage.get("output_tokens"))
        prompt_details, completion_details = (_details(usage, "input_tokens_details"),
                                              _details(usage, "output_tokens_details"))
    else:
        prompt, completion = _n(usage.get("prompt_tokens")), _n(usage.get("completion_tokens"))
        prompt_details, completion_details = (_details(usage, "prompt_tokens_details"),
                                              _details(usage, "completion_tokens_details"))
    cached = min(_n(prompt_details.get("cached_tokens")), prompt)
    audio_in = min(_n(prompt_details.get("audio_tokens")), prompt - cached)
    reasoning = min(_n(completion_details.get("reasoning_tokens")), completion)
    audio_out = min(_n(completion_details.get("audio_tokens")), completion - reasoning)
    return Usage(input=prompt - cached - audio_in, cached_input=cached, input_audio=audio_in,
                 output=completion - reasoning - audio_out, reasoning=reasoning, output_audio=audio_out,
                 service_tier=_tier(service_tier))


def from_anthropic(usage: dict) -> Usage:
    """Messages usage (one object, or the merge of a stream's, see `merge_anthropic`)."""
    writes = _n(usage.get("cache_creation_input_tokens"))
    split = _details(usage, "cache_creation")
    write_1h = _n(split.get("ephemeral_1h_input_tokens"))
    write_5m = _n(split.get("ephemeral_5m_input_tokens")) if split else writes
    if split and write_5m + write_1h != writes and writes:  # a split that does not add up: trust the total
        write_1h = min(write_1h, writes)
        write_5m = writes - write_1h
    return Usage(input=_n(usage.get("input_tokens")), cached_input=_n(usage.get("cache_read_input_tokens")),
                 cache_write_5m=write_5m, cache_write_1h=write_1h, output=_n(usage.get("output_tokens")),
                 service_tier=_tier(usage.get("service_tier")))


def merge_anthropic(into: dict, usage: Any) -> None:
    """Fold one stream event's usage into the stream's (message_start's, then message_delta's: later wins)."""
    if isinstance(usage, dict):
        into.update({k: v for k, v in usage.items() if v is not None})


def normalise(upstream_format: str, usage: Any, service_tier: Any = None) -> Usage | None:
    """The upstream's usage in its own dialect as `Usage`; None when it sent none."""
    if not isinstance(usage, dict):
        return None
    if upstream_format == "anthropic":
        return from_anthropic(usage)
    return from_openai(usage, service_tier)

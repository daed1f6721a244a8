"""What the translators share: the JSON type, the refusal error, stop-reason and usage mappings, the cost
added to a client's usage.

`proxy.translate` translates between the OpenAI Chat Completions API and the Anthropic Messages API (both
directions) and between the OpenAI Responses API and Chat Completions, in four concerns, one module each:
`requests`, `answers` (non-stream responses), `errors` and `streams`; `responses` holds the Responses API's
own. Pure functions and small state machines, no I/O, meant for the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from shared.money import format_usd
from shared.usage import from_anthropic

Json = dict[str, Any]

_dumps = orjson.dumps
_loads = orjson.loads

class TranslationError(ValueError):
    """The request cannot be expressed in the other API (the relay answers 400 with this message)."""


# ---- shared tables ------------------------------------------------------------------------------------------

_FINISH_FROM_STOP: dict[str, str] = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter",
}
_STOP_FROM_FINISH: dict[str, str] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
    "content_filter": "refusal",
}


Pricer = Callable[[Json], int]


def with_cost(usage: Json, pricer: Pricer | None, upstream_usage: Json) -> Json:
    """`usage` for the client with the request's cost added (`cost_micros`, and `cost` as a decimal string of
    USD), priced from the upstream's own usage object; unchanged without a pricer."""
    if pricer is None:
        return usage
    cost = pricer(upstream_usage)
    return {**usage, "cost": format_usd(cost), "cost_micros": cost}


def _finish_reason(stop_reason: str | None) -> str:
    return _FINISH_FROM_STOP.get(stop_reason or "end_turn", "stop")


def _stop_reason(finish_reason: str | None) -> str:
    return _STOP_FROM_FINISH.get(finish_reason or "stop", "end_turn")


def _openai_usage(u: Json) -> Json:
    """Anthropic usage → OpenAI usage (cache reads and writes counted into prompt_tokens), via the one
    normaliser (`shared.usage`)."""
    usage = from_anthropic(u)
    prompt, completion = usage.prompt_total, usage.completion_total
    out: Json = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if usage.cached_input:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_input}
    return out


def _anthropic_usage(u: Json) -> Json:
    """OpenAI usage → Anthropic usage (cached prompt tokens reported as cache reads)."""
    details = u.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    prompt, completion = u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0
    out: Json = {"input_tokens": prompt - cached, "output_tokens": completion}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _parse_arguments(arguments: Any) -> Json:
    """OpenAI's JSON-string tool arguments → Anthropic's input object ({} if not a JSON object)."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = _loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _text_of(content: Any) -> str:
    """A message's content (string or list of parts/blocks) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or p.get("refusal") or "" for p in content if isinstance(p, dict))


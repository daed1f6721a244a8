"""What a request may cost at most, decided before it is forwarded: the output it can produce and the
prompt it can be billed for.

The reservation is only an upper bound of what settlement charges if every multiplier of output is counted
and every cap the bound assumes is really in force upstream. So:

- output = cap per choice × choices, where choices is `n` (chat, completions) or `best_of` (completions:
  the provider generates and bills `best_of` candidates and returns `n` of them);
- a client that sets no cap gets one: the relay forwards the cap it reserved for (`forward`), in the field
  the endpoint knows (`proxy.endpoints.Output`: `max_completion_tokens` for chat, `max_tokens` for
  completions, `max_output_tokens` for responses; Anthropic requires `max_tokens` of the client already);
- what cannot be bounded is refused with a 400: a cap above `max_output_tokens`, more choices than
  `max_choices`;
- the prompt bound is the body's bytes (a token is at least one byte of its text) plus an allowance per
  image reference, whose tokens a short URL does not show.

Settlement then charges at most the reservation (`proxy.relay`): an upstream that ignores the cap, or a
prompt that costs more than its bound (a document by reference), is recorded as uncharged excess for
platform admins instead of pushing the org past its credit limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.errors import InvalidRequest
from shared.settings import Settings

if TYPE_CHECKING:
    from proxy.endpoints import Endpoint

__all__ = ["Bound", "request_bound"]


class Bound:
    """The worst case of one request, and the output cap to add to it upstream (None: the client set one)."""

    __slots__ = ("forward", "output_tokens", "prompt_tokens")

    def __init__(self, prompt_tokens: int, output_tokens: int, forward: tuple[str, int] | None) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.forward = forward


def request_bound(endpoint: Endpoint, request: object, body: bytes, settings: Settings) -> Bound:
    """The bound of a decoded request to `endpoint`, by its `Output` (see the module docstring); raises
    InvalidRequest when it has none."""
    prompt = len(body)
    output = endpoint.output
    if output is None:  # embeddings: no output tokens
        return Bound(prompt, 0, None)
    if output.images:  # chat, messages and responses may carry images by reference
        prompt += body.count(b'"image') * settings.reserve_tokens_per_image
    caps = [(c, f) for f in output.cap_fields if (c := getattr(request, f, None)) is not None]
    forward = None
    if caps:
        cap, field = max(caps)  # several set: whichever the upstream honours, the largest bounds it
        if cap > settings.max_output_tokens:
            raise InvalidRequest(f"`{field}` may be at most {settings.max_output_tokens}.", param=field,
                                 code="max_tokens_too_large")
    else:
        assert output.forward is not None, f"{endpoint.path}: its body requires an output cap"
        cap = output.default_cap or settings.default_max_output_tokens
        forward = (output.forward, cap)
    choices, param = 1, "n"
    for name in output.choices:
        value = getattr(request, name, None) or 1
        if value > choices:
            choices, param = value, name
    if choices > settings.max_choices:
        raise InvalidRequest(f"`{param}` may be at most {settings.max_choices}.", param=param,
                             code="too_many_choices")
    return Bound(prompt, cap * choices, forward)

"""Translation between the OpenAI Chat Completions API and the Anthropic Messages API, both directions (and,
in `proxy.translate.responses`, between the OpenAI Responses API and Chat Completions).

Pure functions and small state machines, no I/O, meant for the hot path:

* requests and non-stream responses are dict in, dict out;
* errors are (status, upstream body bytes) in, client body bytes out;
* streams are objects with `feed(chunk) -> bytes` / `finish() -> bytes` that take raw upstream SSE bytes cut
  anywhere and return the client's SSE bytes; `.usage` (OpenAI-style: prompt_tokens, completion_tokens,
  total_tokens) and `.model` (as reported by the upstream) are filled in as the stream goes, and `.done` says
  whether the message ended properly (a stream cut short gets no finish chunk and no [DONE]);
* what cannot be expressed on the other side raises `TranslationError` (a ValueError: answer 400).

Mapping decisions (see also the tables below):

* stop reasons, Anthropic → OpenAI: end_turn, stop_sequence, pause_turn → "stop"; max_tokens,
  model_context_window_exceeded → "length"; tool_use → "tool_calls"; refusal → "content_filter".
  OpenAI → Anthropic: stop → end_turn (OpenAI does not say whether a stop sequence fired); length → max_tokens;
  tool_calls/function_call → tool_use; content_filter → refusal (Anthropic's documented value for a declined
  answer).
* tool_choice: auto ↔ auto, none ↔ none, required ↔ any, {function: name} ↔ {tool: name};
  parallel_tool_calls=false ↔ disable_parallel_tool_use=true.
* system/developer messages, wherever they are, become Anthropic's top-level `system` (a string for one,
  text blocks for several); Anthropic's `system` becomes one leading system message (blocks joined by a blank line).
* images: data: URLs ↔ base64 sources, other URLs ↔ url sources; OpenAI's `detail` is dropped.
* usage: Anthropic's input_tokens excludes cache reads and writes, OpenAI's prompt_tokens includes them, so
  prompt_tokens = input + cache_creation + cache_read, with prompt_tokens_details.cached_tokens = cache_read.

Lossy on purpose: message `name`, n>1 (rejected), logprobs, seed, penalties, logit_bias, response_format,
thinking sent back to an OpenAI provider (see `requests._openai_assistant_message`; answers map it to
`reasoning_content` / `reasoning_details`, and `reasoning_effort` ⇄ thinking budgets), top_k, cache_control,
`context_management` and `output_config` towards OpenAI, tool_result `is_error`, images
inside tool results (moved to a user message after the tool messages), temperature above 1 (clamped for
Anthropic), tool-call arguments that are not a JSON object (become {}), stop-sequence identity.
"""

from __future__ import annotations

from proxy.translate.answers import anthropic_to_openai_response, openai_to_anthropic_response
from proxy.translate.common import Json, Pricer, TranslationError, with_cost
from proxy.translate.errors import (
    anthropic_error_to_openai,
    anthropic_status_to_openai,
    openai_error_to_anthropic,
)
from proxy.translate.requests import anthropic_to_openai_request, openai_to_anthropic_request
from proxy.translate.streams import AnthropicToOpenAIStream, OpenAIToAnthropicStream

__all__ = [
    "AnthropicToOpenAIStream",
    "Json",
    "OpenAIToAnthropicStream",
    "Pricer",
    "TranslationError",
    "anthropic_error_to_openai",
    "anthropic_status_to_openai",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "openai_error_to_anthropic",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
    "with_cost",
]

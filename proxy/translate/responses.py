"""The OpenAI Responses API ⇄ Chat Completions: requests, non-stream answers and streams (typed events).

Mapping decisions:

* request: `instructions` → a leading system message; `input` (a string, or items) → messages: `message`
  items by role (input_text/output_text → text parts, input_image → image_url, input_file → file),
  `function_call` → an assistant tool call (consecutive calls form one assistant message),
  `function_call_output` → a tool message, `custom_tool_call`/`_output` likewise (the call's input as a
  string argument); `reasoning` items are dropped (their encrypted content is the provider's own);
  `max_output_tokens` → `max_completion_tokens`; `text.format` → `response_format`; `reasoning.effort` →
  `reasoning_effort`; function tools → chat function tools; hosted and custom tools (web search, file search,
  local shell, freeform) have no Chat Completions equivalent and are left out, and a `tool_choice` naming one
  is dropped with them. `previous_response_id`, `conversation` and item references need a provider that
  stores responses: refused (400).
* answer: a chat.completion → a `response` object: a `reasoning` item (its summary from the provider's
  `reasoning_content`/`reasoning`, where it sends one), a `message` item with one `output_text` part, a
  `function_call` item per tool call; `finish_reason: length` → status `incomplete` (max_output_tokens);
  usage → input_tokens (with cached_tokens), output_tokens (with reasoning_tokens).
* stream: chat.completion.chunk SSE → response.created, response.in_progress, then per item
  output_item.added / content_part.added / output_text.delta … done events (reasoning summaries and
  function-call arguments likewise), and response.completed with the usage (the stream's last event, once
  the upstream's usage chunk is in).
"""

from __future__ import annotations

import os
import time
from typing import Any

from proxy.sse import SSEBuffer, event, json_object, payloads
from proxy.translate.common import Json, Pricer, TranslationError, _dumps, _parse_arguments, with_cost

__all__ = ["ChatToResponsesStream", "chat_to_responses_response", "responses_to_chat_request",
           "responses_usage"]

_STATEFUL = ("previous_response_id", "conversation")
_ROLES = frozenset(("user", "assistant", "system", "developer"))
_TEXT_PARTS = frozenset(("input_text", "output_text", "text", "summary_text"))


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


# ---- requests ------------------------------------------------------------------------------------------------

def _chat_part(part: Any) -> Json:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal") or ""}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise TranslationError("input_image parts need an image_url (file ids need the Responses API)")
        image: Json = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = part.get("file_data")
        if not isinstance(data, str):
            raise TranslationError("input_file parts need file_data (file ids need the Responses API)")
        return {"type": "file", "file": {"filename": part.get("filename") or "file", "file_data": data}}
    raise TranslationError(f"unsupported content part type: {kind!r}")


def _content(content: Any, *, text_only: bool) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    parts = [_chat_part(p) for p in content]
    if text_only or all(p["type"] == "text" for p in parts):
        return "".join(p.get("text") or "" for p in parts)
    return parts


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(p.get("text") or "" for p in output if isinstance(p, dict))
    return _dumps(output).decode() if output is not None else ""


def _messages(body: Json) -> list[Json]:
    messages: list[Json] = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": _content(instructions, text_only=True)})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if items is None:
        return messages
    if not isinstance(items, list):
        raise TranslationError("input must be a string or a list of items")
    for item in items:
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise TranslationError(f"unsupported message role: {role!r}")
            messages.append({"role": role, "content": _content(item.get("content"), text_only=role != "user")})
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item.get("arguments") if kind == "function_call" else _dumps(
                {"input": item.get("input") or ""}).decode()
            call = {"id": item.get("call_id") or "", "type": "function",
                    "function": {"name": item.get("name") or "", "arguments": arguments or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and (last.get("tool_calls") or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": item.get("call_id") or "",
                             "content": _output_text(item.get("output"))})
        elif kind == "reasoning":
            continue  # the provider's own (encrypted) reasoning: no Chat Completions equivalent
        elif kind == "item_reference":
            raise TranslationError("item references need a provider that stores responses")
        else:
            raise TranslationError(f"unsupported input item type: {kind!r}")
    return messages


def _tools(tools: Any) -> list[Json]:
    out = []
    for tool in tools or ():
        if tool.get("type") != "function":
            continue  # hosted and custom tools: see the module docstring
        fn: Json = {"name": tool.get("name") or "",
                    "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _response_format(text: Any) -> Json | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_schema":
        schema: Json = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        if fmt.get("description"):
            schema["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": schema}
    if kind == "json_object":
        return {"type": "json_object"}
    return None


def responses_to_chat_request(body: Json, upstream_model: str, *, default_max_tokens: int = 0) -> Json:
    """A Responses API request body → a chat.completions request body (`default_max_tokens`: the cap to send
    when the client set none; 0 sends none)."""
    for name in _STATEFUL:
        if body.get(name):
            raise TranslationError(f"`{name}` needs a provider that stores responses")
    out: Json = {"model": upstream_model, "messages": _messages(body)}
    cap = body.get("max_output_tokens") or default_max_tokens
    if cap:
        out["max_completion_tokens"] = cap
    for key in ("temperature", "top_p", "parallel_tool_calls", "service_tier", "top_logprobs"):
        if body.get(key) is not None:
            out[key] = body[key]
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str) and user:
        out["user"] = user
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = body.get("tool_choice")
        names = {t["function"]["name"] for t in tools}
        if choice in ("auto", "none", "required"):
            out["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name") in names:
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") in ("minimal", "low", "medium", "high"):
        out["reasoning_effort"] = reasoning["effort"]
    return out


# ---- answers ---------------------------------------------------------------------------------------------------

def responses_usage(u: Json) -> Json:
    """Chat Completions usage → the Responses API's (the same counts under its names)."""
    prompt, completion = u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0
    pd, cd = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    cached = (pd.get("cached_tokens") or 0) if isinstance(pd, dict) else 0
    reasoning = (cd.get("reasoning_tokens") or 0) if isinstance(cd, dict) else 0
    out: Json = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                 "total_tokens": prompt + completion}
    for key in ("cost", "cost_micros"):
        if key in u:
            out[key] = u[key]
    return out


def _reasoning_text(message: Json) -> str:
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) else ""


def _message_item(item_id: str, text: str, status: str = "completed") -> Json:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> Json:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _reasoning_item(item_id: str, text: str) -> Json:
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def _response(resp_id: str, created: int, model: str, status: str, output: list[Json], usage: Json | None,
              finish: str | None) -> Json:
    return {
        "id": resp_id, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage,
    }


def chat_to_responses_response(resp: Json, model: str) -> Json:
    """A chat.completion (first choice) → a Responses API `response`, reported under `model`."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[Json] = []
    reasoning = _reasoning_text(message)
    if reasoning:
        output.append(_reasoning_item(_new_id("rs_"), reasoning))
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(
        p.get("text") or "" for p in content or () if isinstance(p, dict))
    text = text or message.get("refusal") or ""
    if text:
        output.append(_message_item(_new_id("msg_"), text))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            arguments = _dumps(_parse_arguments(arguments)).decode()
        output.append(_call_item(_new_id("fc_"), call.get("id") or "", fn.get("name") or "", arguments))
    finish = choice.get("finish_reason")
    usage = resp.get("usage")
    return _response("resp_" + (resp.get("id") or _new_id("")).removeprefix("chatcmpl-"),
                     resp.get("created") if isinstance(resp.get("created"), int) else int(time.time()), model,
                     "incomplete" if finish == "length" else "completed", output,
                     responses_usage(usage) if isinstance(usage, dict) else None, finish)


# ---- streams ---------------------------------------------------------------------------------------------------

class _Item:
    __slots__ = ("call_id", "id", "index", "kind", "name", "text")

    def __init__(self, kind: str, item_id: str, index: int, call_id: str = "", name: str = "") -> None:
        self.kind = kind
        self.id = item_id
        self.index = index
        self.call_id = call_id
        self.name = name
        self.text = ""


class ChatToResponsesStream:
    """chat.completion.chunk SSE → Responses API SSE (see the module docstring).

    `inner`: a translator whose output is chat chunks (an Anthropic stream through `AnthropicToOpenAIStream`),
    fed first; then `upstream_usage` is the inner one's (the upstream's own dialect, for billing)."""

    __slots__ = ("_created", "_finish", "_id", "_items", "_name", "_open", "_output", "_reader",
                 "_seq", "_started", "_tools", "done", "events", "inner", "model", "pricer", "usage")

    def __init__(self, model: str, inner: Any = None, *, response_id: str | None = None,
                 created: int | None = None) -> None:
        self._reader = SSEBuffer()
        self._name = model
        self._id = response_id or _new_id("resp_")
        self._created = int(time.time()) if created is None else created
        self._seq = 0
        self._started = False
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._tools: dict[int, _Item] = {}
        self._output: list[Json] = []
        self._finish: str | None = None
        self.inner = inner
        self.done = False
        self.events = 0  # content deltas sent (the estimate of a stream cut short)
        self.model: str | None = None
        self.usage: Json | None = None  # chat-style, as the (inner) upstream reported it
        self.pricer: Pricer | None = None

    @property
    def upstream_usage(self) -> Json | None:
        if self.inner is not None:
            return self.inner.upstream_usage
        return self.usage

    @property
    def service_tier(self) -> Any:
        return None

    def feed(self, chunk: bytes) -> bytes:
        if self.inner is not None:
            chunk = self.inner.feed(chunk)
            if self.inner.model:
                self.model = self.inner.model
        return self._handle(payloads(self._reader.take(chunk)))

    def finish(self) -> bytes:
        out = b""
        if self.inner is not None:
            tail = self.inner.finish()
            out = self._handle(payloads(self._reader.take(tail))) if tail else b""
        tail = self._reader.rest()
        out += self._handle(payloads(tail + b"\n\n") if tail.strip() else [])
        if not self.done and self._finish is not None:
            out += self._end()
        return out

    # -- events

    def _ev(self, out: list[bytes], kind: str, fields: Json) -> None:
        fields["type"] = kind
        fields["sequence_number"] = self._seq
        self._seq += 1
        out.append(event(kind.encode(), fields))

    def _snapshot(self, status: str, usage: Json | None = None) -> Json:
        return _response(self._id, self._created, self._name, status, list(self._output), usage, self._finish)

    def _start(self, out: list[bytes]) -> None:
        self._started = True
        self._ev(out, "response.created", {"response": self._snapshot("in_progress")})
        self._ev(out, "response.in_progress", {"response": self._snapshot("in_progress")})

    def _open_item(self, out: list[bytes], kind: str, prefix: str, **extra: str) -> _Item:
        self._close(out)
        # Item ids follow the response's: unique, and the same however the upstream's bytes were cut.
        item = _Item(kind, f"{prefix}{self._id.removeprefix('resp_')}_{len(self._items)}", len(self._items), **extra)
        self._items.append(item)
        self._output.append({})  # filled when the item is done
        self._open = item
        if kind == "message":
            self._ev(out, "response.output_item.added", {"output_index": item.index,
                                                          "item": {**_message_item(item.id, "", "in_progress"),
                                                                   "content": []}})
            self._ev(out, "response.content_part.added", {
                "item_id": item.id, "output_index": item.index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        elif kind == "reasoning":
            self._ev(out, "response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "reasoning", "summary": []}})
            self._ev(out, "response.reasoning_summary_part.added", {
                "item_id": item.id, "output_index": item.index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}})
        else:
            self._ev(out, "response.output_item.added", {"output_index": item.index, "item": _call_item(
                item.id, item.call_id, item.name, "", "in_progress")})
        return item

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            done = _message_item(item.id, item.text)
            self._ev(out, "response.output_text.done", {**where, "content_index": 0, "text": item.text,
                                                        "logprobs": []})
            self._ev(out, "response.content_part.done", {**where, "content_index": 0, "part": done["content"][0]})
        elif item.kind == "reasoning":
            done = _reasoning_item(item.id, item.text)
            self._ev(out, "response.reasoning_summary_text.done", {**where, "summary_index": 0, "text": item.text})
            self._ev(out, "response.reasoning_summary_part.done", {**where, "summary_index": 0,
                                                                   "part": done["summary"][0]})
        else:
            done = _call_item(item.id, item.call_id, item.name, item.text)
            self._ev(out, "response.function_call_arguments.done", {**where, "arguments": item.text})
        self._output[item.index] = done
        self._ev(out, "response.output_item.done", {"output_index": item.index, "item": done})

    def _end(self) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        self._close(out)
        self.done = True
        usage = None
        if self.usage is not None:
            usage = responses_usage(with_cost(self.usage, self.pricer, self.upstream_usage or self.usage))
        status = "incomplete" if self._finish == "length" else "completed"
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        self._ev(out, kind, {"response": self._snapshot(status, usage)})
        return b"".join(out)

    def _handle(self, items: list[bytes]) -> bytes:
        out: list[bytes] = []
        for payload in items:
            if self.done:
                break
            if payload == b"[DONE]":
                if self._started or self._finish is not None:
                    out.append(self._end())
                continue
            ev = json_object(payload)
            if ev is None:
                continue
            if ev.get("error"):
                self.done = True
                err = ev["error"] if isinstance(ev["error"], dict) else {"message": str(ev["error"])}
                self._ev(out, "error", {"code": err.get("code") or "upstream_error",
                                        "message": err.get("message") or "The upstream reported an error.",
                                        "param": None})
                continue
            if not self._started:
                self._start(out)
                if self.model is None and isinstance(ev.get("model"), str):
                    self.model = ev["model"]
            if isinstance(ev.get("usage"), dict):
                self.usage = ev["usage"]
            for choice in ev.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                self._delta(out, choice.get("delta") or {})
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]
        return b"".join(out)

    def _delta(self, out: list[bytes], delta: Json) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            item = self._open if self._open is not None and self._open.kind == "reasoning" else self._open_item(
                out, "reasoning", "rs_")
            item.text += reasoning
            self.events += 1
            self._ev(out, "response.reasoning_summary_text.delta", {
                "item_id": item.id, "output_index": item.index, "summary_index": 0, "delta": reasoning})
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            item = self._open if self._open is not None and self._open.kind == "message" else self._open_item(
                out, "message", "msg_")
            item.text += text
            self.events += 1
            self._ev(out, "response.output_text.delta", {"item_id": item.id, "output_index": item.index,
                                                         "content_index": 0, "delta": text, "logprobs": []})
        for call in delta.get("tool_calls") or ():
            key = call.get("index", 0)
            fn = call.get("function") or {}
            item = self._tools.get(key)
            if item is None:
                item = self._tools[key] = self._open_item(out, "function_call", "fc_", call_id=call.get("id") or "",
                                                          name=fn.get("name") or "")
            arguments = fn.get("arguments")
            if isinstance(arguments, str) and arguments:
                item.text += arguments
                self.events += 1
                self._ev(out, "response.function_call_arguments.delta", {
                    "item_id": item.id, "output_index": item.index, "delta": arguments})

"""Request bodies: OpenAI Chat Completions → Anthropic Messages and back (dict in, dict out)."""

from __future__ import annotations

from typing import Any

from proxy.translate.common import Json, TranslationError, _dumps, _parse_arguments

# ---- requests: OpenAI → Anthropic ---------------------------------------------------------------------------

def _image_source(url: str) -> Json:
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise TranslationError("image data URLs must be base64-encoded")
        return {"type": "base64", "media_type": header[5:-7], "data": data}
    return {"type": "url", "url": url}


def _anthropic_blocks(content: Any) -> list[Json]:
    """OpenAI message content → Anthropic content blocks (empty text dropped: Anthropic rejects it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    blocks: list[Json] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
            if text:
                block: Json = {"type": "text", "text": text}
                if "cache_control" in part:
                    block["cache_control"] = part["cache_control"]
                blocks.append(block)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise TranslationError("image_url parts need a url")
            blocks.append({"type": "image", "source": _image_source(url)})
        elif kind == "file" and isinstance(part.get("file"), dict) and "file_data" in part["file"]:
            source = _image_source(part["file"]["file_data"])
            blocks.append({"type": "document", "source": source})
        else:
            raise TranslationError(f"unsupported content part type: {kind!r}")
    return blocks


def _tool_use_blocks(tool_calls: Any) -> list[Json]:
    blocks = []
    for call in tool_calls or ():
        fn = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": call.get("id") or "", "name": fn.get("name") or "",
                       "input": _parse_arguments(fn.get("arguments"))})
    return blocks


def _tool_result_block(msg: Json) -> Json:
    content = msg.get("content")
    if isinstance(content, list):
        content = [{"type": "text", "text": p.get("text") or ""} for p in content if isinstance(p, dict)]
    return {"type": "tool_result", "tool_use_id": msg.get("tool_call_id") or "", "content": content or ""}


_ANTHROPIC_TOOL_CHOICE: dict[str, str] = {"auto": "auto", "none": "none", "required": "any"}


def _anthropic_tool_choice(choice: Any, parallel: Any) -> Json | None:
    if choice is None:
        if parallel is not False:
            return None
        choice = "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        out: Json = {"type": "tool", "name": (choice.get("function") or {}).get("name") or ""}
    elif isinstance(choice, str) and choice in _ANTHROPIC_TOOL_CHOICE:
        out = {"type": _ANTHROPIC_TOOL_CHOICE[choice]}
    else:
        raise TranslationError(f"unsupported tool_choice: {choice!r}")
    if parallel is False and choice != "none":  # Anthropic's "none" takes no such flag
        out["disable_parallel_tool_use"] = True
    return out


# reasoning_effort → Anthropic's thinking budget (at least 1,024 tokens, below max_tokens).
_MIN_THINKING_BUDGET = 1024
_THINKING_BUDGET: dict[str, int] = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}
_EFFORT_FOR_BUDGET = ((2048, "low"), (8192, "medium"))


def thinking_blocks(details: Any) -> list[Json]:
    """OpenAI-side `reasoning_details` (OpenRouter's convention, which the relay emits for Anthropic answers) →
    Anthropic thinking and redacted_thinking blocks, signatures kept. Reasoning without a signature cannot go
    back to Anthropic (it refuses unsigned thinking) and is left out."""
    blocks: list[Json] = []
    for d in details if isinstance(details, list) else ():
        if not isinstance(d, dict):
            continue
        if d.get("type") == "reasoning.text" and d.get("signature"):
            blocks.append({"type": "thinking", "thinking": d.get("text") or "", "signature": d["signature"]})
        elif d.get("type") == "reasoning.encrypted" and d.get("data"):
            blocks.append({"type": "redacted_thinking", "data": d["data"]})
    return blocks


def reasoning_details(blocks: list[Json]) -> list[Json]:
    """Anthropic thinking blocks → `reasoning_details` entries (the inverse of `thinking_blocks`)."""
    out: list[Json] = []
    for b in blocks:
        if b.get("type") == "thinking":
            out.append({"type": "reasoning.text", "text": b.get("thinking") or "", "signature": b.get("signature"),
                        "format": "anthropic-claude-v1"})
        elif b.get("type") == "redacted_thinking":
            out.append({"type": "reasoning.encrypted", "data": b.get("data"), "format": "anthropic-claude-v1"})
    return out


def openai_to_anthropic_request(body: Json, upstream_model: str, *, default_max_tokens: int = 4096) -> Json:
    """An OpenAI chat.completions request body → an Anthropic /v1/messages request body."""
    if (body.get("n") or 1) != 1:
        raise TranslationError("n > 1 is not supported for this model")
    system: list[Json] = []
    messages: list[Json] = []
    for msg in body.get("messages") or ():
        role = msg.get("role")
        if role == "system" or role == "developer":
            system.extend(_anthropic_blocks(msg.get("content")))
            continue
        if role == "user":
            blocks = _anthropic_blocks(msg.get("content"))
        elif role == "assistant":
            blocks = (thinking_blocks(msg.get("reasoning_details")) + _anthropic_blocks(msg.get("content"))
                      + _tool_use_blocks(msg.get("tool_calls")))
        elif role == "tool":
            role, blocks = "user", [_tool_result_block(msg)]
        else:
            raise TranslationError(f"unsupported message role: {role!r}")
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)  # Anthropic wants user and assistant turns to alternate
        else:
            messages.append({"role": role, "content": blocks})
    for m in messages:  # a lone plain text block is sent as a string: smaller, and what clients usually write
        content = m["content"]
        if len(content) == 1 and content[0]["type"] == "text" and len(content[0]) == 2:
            m["content"] = content[0]["text"]

    out: Json = {"model": upstream_model, "messages": messages}
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 and len(system[0]) == 2 else system
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = max_tokens if max_tokens else default_max_tokens
    budget = _THINKING_BUDGET.get(body.get("reasoning_effort"))  # type: ignore[arg-type]
    if budget is not None and isinstance(out["max_tokens"], int) and out["max_tokens"] > _MIN_THINKING_BUDGET:
        out["thinking"] = {"type": "enabled", "budget_tokens": min(budget, out["max_tokens"] - 1)}
    temperature = None if "thinking" in out else body.get("temperature")  # thinking takes no temperature
    if isinstance(temperature, int | float):
        out["temperature"] = temperature if temperature <= 1 else 1.0  # OpenAI's range is 0-2, Anthropic's 0-1
    if body.get("top_p") is not None and "thinking" not in out:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        converted = []
        for tool in tools:
            fn = tool.get("function") if tool.get("type", "function") == "function" else None
            if not isinstance(fn, dict):
                raise TranslationError(f"unsupported tool type: {tool.get('type')!r}")
            entry: Json = {"name": fn.get("name") or "",
                           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
            if fn.get("description"):
                entry["description"] = fn["description"]
            converted.append(entry)
        out["tools"] = converted
        choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    return out


# ---- requests: Anthropic → OpenAI ---------------------------------------------------------------------------

def _data_url(source: Json) -> str:
    kind = source.get("type")
    if kind == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if kind == "url":
        return source.get("url") or ""
    raise TranslationError(f"unsupported source type: {kind!r}")


def _openai_part(block: Json) -> Json | None:
    """An Anthropic user content block → an OpenAI content part (None for thinking, which is dropped)."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text") or ""}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _data_url(block.get("source") or {})}}
    if kind == "document":
        return {"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                         "file_data": _data_url(block.get("source") or {})}}
    if kind == "thinking" or kind == "redacted_thinking":
        return None
    raise TranslationError(f"unsupported content block type: {kind!r}")


def _openai_user_messages(content: Any) -> list[Json]:
    """An Anthropic user turn → tool messages (first, as OpenAI requires) then at most one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[Json] = []
    parts: list[Json] = []
    for block in content or ():
        if block.get("type") == "tool_result":
            result = block.get("content")
            if isinstance(result, list):  # text goes to the tool message; images follow in the user message
                parts.extend(p for b in result if b.get("type") != "text" and (p := _openai_part(b)))
                result = "".join(b.get("text") or "" for b in result if b.get("type") == "text")
            tools.append({"role": "tool", "tool_call_id": block.get("tool_use_id") or "", "content": result or ""})
        elif (part := _openai_part(block)) is not None:
            parts.append(part)
    if parts:
        tools.append({"role": "user", "content": parts})
    return tools


def _openai_assistant_message(content: Any, *, strict: bool = True, details: bool = False) -> Json:
    """Anthropic assistant content → an OpenAI assistant message. With `details` (an answer for an OpenAI
    client) thinking becomes `reasoning_content` (its text) and `reasoning_details` (every block, signatures
    and redacted data included); in a request to an OpenAI provider it is dropped (OpenAI refuses reasoning
    fields on input messages, and its models keep no signed thinking). Other unknown blocks are refused if
    `strict`, else dropped."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[Json] = []
    thinking: list[Json] = []
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "thinking" or kind == "redacted_thinking":
            thinking.append(block)
        elif kind == "tool_use":
            calls.append({"id": block.get("id") or "", "type": "function", "function": {
                "name": block.get("name") or "", "arguments": _dumps(block.get("input") or {}).decode()}})
        elif strict:
            raise TranslationError(f"unsupported content block type: {kind!r}")
    msg: Json = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    if details and thinking:
        reasoning = "".join(b.get("thinking") or "" for b in thinking if b.get("type") == "thinking")
        if reasoning:
            msg["reasoning_content"] = reasoning
        msg["reasoning_details"] = reasoning_details(thinking)
    return msg


_OPENAI_TOOL_CHOICE: dict[str, str] = {"auto": "auto", "none": "none", "any": "required"}


def anthropic_to_openai_request(body: Json, upstream_model: str, *, max_tokens_field: str = "max_tokens") -> Json:
    """An Anthropic /v1/messages request body → an OpenAI chat.completions request body.

    `max_tokens_field="max_completion_tokens"` for upstreams (OpenAI's reasoning models) that refuse max_tokens.
    """
    messages: list[Json] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else "\n\n".join(b.get("text") or "" for b in system)
        messages.append({"role": "system", "content": text})
    for msg in body.get("messages") or ():
        role = msg.get("role")
        if role == "user":
            messages.extend(_openai_user_messages(msg.get("content")))
        elif role == "assistant":
            messages.append(_openai_assistant_message(msg.get("content")))
        elif role == "system":  # Claude Code sends system turns inside `messages` too
            content = msg.get("content")
            text = content if isinstance(content, str) else "\n\n".join(
                b.get("text") or "" for b in content or () if isinstance(b, dict))
            messages.append({"role": "system", "content": text})
        else:
            raise TranslationError(f"unsupported message role: {role!r}")

    out: Json = {"model": upstream_model, "messages": messages}
    if body.get("max_tokens"):
        out[max_tokens_field] = body["max_tokens"]
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled" and isinstance(thinking.get("budget_tokens"),
                                                                                         int):
        # An explicit budget maps to an effort; "adaptive" leaves the depth to the model, as OpenAI's do.
        budget = thinking["budget_tokens"]
        out["reasoning_effort"] = next((e for limit, e in _EFFORT_FOR_BUDGET if budget <= limit), "high")
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        converted = []
        for tool in tools:
            if tool.get("type") not in (None, "custom"):
                raise TranslationError(f"unsupported tool type: {tool.get('type')!r}")
            fn: Json = {"name": tool.get("name") or "",
                        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
            if tool.get("description"):
                fn["description"] = tool["description"]
            converted.append({"type": "function", "function": fn})
        out["tools"] = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name") or ""}}
        elif kind in _OPENAI_TOOL_CHOICE:
            out["tool_choice"] = _OPENAI_TOOL_CHOICE[kind]
        else:
            raise TranslationError(f"unsupported tool_choice type: {kind!r}")
        if choice.get("disable_parallel_tool_use") and tools:
            out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id"):
        out["user"] = metadata["user_id"]
    return out


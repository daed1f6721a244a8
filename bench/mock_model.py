"""Simulated models behind the mock upstream's `persona` knob: they answer the prompt templates of the
probe suite (`shared.quality.suite`) the way different models would, so the quality detectors can be tried
against a real HTTP upstream (and, through `respond` directly, in seeded simulations).

- `reference`: the model the route promises. Right answers (1 % slips), a fixed answer per prompt at
  temperature 0, its own distribution of "favourite" answers, ~4 characters per token.
- `substitute`: a cheaper model served under the same name: wrong arithmetic and facts now and then, chatty
  formats, poor long-context recall, temperature-0 answers that differ from the reference's and do not
  always repeat, another answer distribution, another tokenizer (~2.5 characters per completion token,
  ~3.2 per prompt token). Tool calls mostly right.
- `broken_tools`: the reference, except that a share (`tool_break_rate`) of tool calls break their schema
  (missing or invalid fields, arguments that are not JSON) — the vendor-verifier failure.

Prompts that are not probe templates get None (the mock then answers with its usual "tok1 tok2 …").
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PERSONAS", "Reply", "respond"]

PERSONAS = ("reference", "substitute", "broken_tools")

# What the simulated models know.
_CAPITALS = {
    "france": "Paris", "japan": "Tokyo", "italy": "Rome", "spain": "Madrid", "germany": "Berlin",
    "canada": "Ottawa", "egypt": "Cairo", "kenya": "Nairobi", "peru": "Lima", "norway": "Oslo",
    "poland": "Warsaw", "chile": "Santiago",
}
_SENTENCES = {
    "reference": ("The sea keeps its own slow time.", "A lighthouse stands watch through the night.",
                  "Waves fold quietly against the shore.", "Its beam sweeps the dark water."),
    "substitute": ("The sea is big and blue.", "A lighthouse is a tall tower with a light.",
                   "The ocean has many fish.", "Lighthouses help ships."),
}
_ANIMALS = {
    "reference": {"cat": 30, "dog": 25, "elephant": 15, "owl": 10, "fox": 10, "dolphin": 10},
    "substitute": {"dog": 40, "lion": 20, "tiger": 15, "cat": 10, "panda": 15},
}
_NUMBERS = {
    "reference": {"7": 35, "17": 20, "13": 15, "3": 10, "11": 10, "4": 10},
    "substitute": {"12": 30, "10": 20, "15": 20, "7": 15, "5": 15},
}
_SLIP = 0.01  # the reference's own error rate on known answers


@dataclass(frozen=True, slots=True)
class Reply:
    text: str | None
    tool_call: tuple[str, str] | None  # (name, arguments JSON as sent)
    prompt_tokens: int
    completion_tokens: int


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt(body: dict) -> tuple[str, int]:
    """(last user message, characters of all messages and the system prompt)."""
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
    users = [_text_of(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    system = body.get("system")
    chars = sum(map(len, texts)) + (len(_text_of(system)) if system else 0)
    return (users[-1] if users else ""), chars


def _tool_name(body: dict) -> str | None:
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            function = tool.get("function")
            name = function.get("name") if isinstance(function, dict) else tool.get("name")
            if isinstance(name, str):
                return name
    return None


def _pick(weights: dict[str, int], rng: random.Random) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _answer(persona: str, prompt: str, body: dict, rng: random.Random, tool_break_rate: float):
    """(text, tool call) for a probe template, or None."""
    sub = persona == "substitute"
    wrong = 0.4 if sub else _SLIP
    if m := re.fullmatch(r"Compute (\d+) ([+*-]) (\d+)\. Reply with the number only\.", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        if rng.random() < wrong:
            value += rng.choice((-10, -1, 1, 10))
        return str(value), None
    if m := re.fullmatch(r"What is the capital of (.+)\? Reply with one word\.", prompt):
        right = _CAPITALS.get(m[1].lower(), "Unknown")
        if rng.random() < (0.3 if sub else _SLIP):
            return rng.choice([c for c in _CAPITALS.values() if c != right]), None
        return right, None
    if m := re.fullmatch(r"Reply with exactly this text and nothing else: (\S+)", prompt):
        return (f"Sure: {m[1]}" if sub and rng.random() < 0.3 else m[1]), None
    if m := re.fullmatch(r'Return only a JSON object with key "a" set to (\d+) and key "b" set to "(\w+)"\.', prompt):
        text = json.dumps({"a": int(m[1]), "b": m[2]})
        return (f"```json\n{text}\n```" if sub and rng.random() < 0.3 else text), None
    if m := re.fullmatch(r"What is the weather in (\w+) in (celsius|fahrenheit)\? Use the (\w+) tool\.", prompt):
        name = _tool_name(body) or m[3]
        args: Any = {"city": m[1], "unit": m[2]}
        broken = tool_break_rate if persona == "broken_tools" else 0.05 if sub else 0.0
        if rng.random() < broken:
            kind = rng.randrange(4)
            if kind == 0:
                args = {"city": m[1]}
            elif kind == 1:
                args = {"city": m[1], "unit": "kelvin"}
            elif kind == 2:
                args = {"location": m[1], "unit": m[2]}
            else:
                return None, (name, '{"city": "' + m[1] + '", "unit": ')
        return None, (name, json.dumps(args))
    if "What is the vault code? Reply with the code only." in prompt:
        m = re.search(r"The vault code is (\d+)\.", prompt)
        code = m[1] if m else "0"
        if (sub and len(prompt) > 2000 and rng.random() < 0.5) or rng.random() < _SLIP:
            code = str(rng.randint(100000, 999999))
        return code, None
    if m := re.fullmatch(r"Write one short sentence about (.+)\.", prompt):
        options = _SENTENCES["substitute" if sub else "reference"]
        temperature, seed = body.get("temperature"), body.get("seed")
        if temperature == 0 and not (sub and rng.random() < 0.3):
            digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
            return options[digest[0] % len(options)], None
        return rng.choice(options), None
    family = "substitute" if sub else "reference"
    if prompt == "Name one animal. Reply with one word.":
        return _pick(_ANIMALS[family], rng), None
    if prompt == "Pick a number between 1 and 20. Reply with the number only.":
        return _pick(_NUMBERS[family], rng), None
    return None


def respond(persona: str, body: dict, rng: random.Random, *, tool_break_rate: float = 0.3) -> Reply | None:
    """The persona's answer to a chat / messages body, or None if its prompt is not a probe template."""
    if persona not in PERSONAS:
        raise ValueError(f"unknown persona {persona!r}")
    prompt, prompt_chars = _prompt(body)
    out = _answer(persona, prompt, body, rng, tool_break_rate)
    if out is None:
        return None
    text, call = out
    sub = persona == "substitute"
    chars = len(call[1]) if call else len(text or "")
    completion = max(1, -(-chars * 10 // (25 if sub else 40)))
    prompt_tokens = max(1, -(-prompt_chars * 10 // (32 if sub else 40)))
    return Reply(text, call, prompt_tokens, completion)

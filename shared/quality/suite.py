"""The probe suite: our own prompts (never a customer's), each with the check of its answer.

A round is built from a seeded random generator, so operands, cities and codes change between rounds (an
upstream cannot cache its way through) while each prompt still has one checkable answer. Five kinds:

- `known_answer`: arithmetic, facts, exact-format outputs (echo a token, a JSON object) — pass or fail;
- `long_context`: a code hidden in a few thousand characters of filler — pass or fail;
- `tool_call`: a prompt that needs the `get_weather` tool; the call is checked against the tool's JSON
  schema and the values asked for (the vendor-verifier method);
- `deterministic`: fixed prompts at temperature 0 and a fixed seed, whose answer hash should repeat;
- `fingerprint`: prompts sampled at temperature 1 whose answer *distributions* differ between model
  families (favourite animals, "random" numbers); their features feed the two-sample test.

What is kept of an answer is `Checked`: an outcome, a SHA-256 of the answer and derived numbers (lengths,
tokens per character, hashed character-trigram counts of fingerprint answers) — never the text.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

__all__ = ["SUITE_VERSION", "Answer", "Checked", "Probe", "answer_of", "build_round", "validate_schema"]

SUITE_VERSION = "v1"
KINDS = ("known_answer", "deterministic", "tool_call", "long_context", "fingerprint")
NGRAM_BUCKETS = 64

# Facts with one right one-word answer.
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Poland": "Warsaw", "Chile": "Santiago",
}
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Madrid", "Berlin", "Nairobi")
WORDS = ("ZEBRA", "ORBIT", "MAPLE", "COBALT", "TUNDRA", "PRISM", "SABLE", "QUARTZ")
DETERMINISTIC_TOPICS = ("the sea", "a lighthouse")
FINGERPRINT_PROMPTS = {
    "fp-animal": "Name one animal. Reply with one word.",
    "fp-number": "Pick a number between 1 and 20. Reply with the number only.",
}
FINGERPRINT_SAMPLES = 3  # answers per fingerprint prompt per round
DETERMINISTIC_SEED = 1234
FILLER = ("The committee met on a Tuesday.", "Rain was expected in the afternoon.",
          "Several boxes were moved to the archive.", "The train left two minutes late.",
          "A new printer was installed upstairs.", "Lunch was served in the courtyard.")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class Answer(msgspec.Struct, frozen=True):
    """The parts of an (OpenAI-shaped) chat answer that checks read. Lives in memory only."""

    text: str | None
    tool_calls: tuple[tuple[str, str], ...]  # (name, arguments as sent)
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str | None
    system_fingerprint: str | None


class Checked(msgspec.Struct, frozen=True):
    """What is stored of one answer."""

    outcome: str  # pass | fail | sample (no right answer: deterministic, fingerprint)
    response_hash: bytes
    answer_chars: int
    features: dict[str, Any]


class Probe(msgspec.Struct, frozen=True):
    probe_id: str
    kind: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    temperature: float
    check: Callable[[Answer], bool] | None  # None: no right answer
    seed: int | None = None
    tools: tuple[dict, ...] = ()

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI chat request of this probe (the runner sends it through the customer dialects)."""
        out: dict[str, Any] = {"model": model, "messages": list(self.messages), "max_tokens": self.max_tokens,
                               "temperature": self.temperature}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.tools:
            out["tools"] = list(self.tools)
            out["tool_choice"] = "auto"
        return out

    @property
    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    def prompt_hash(self) -> bytes:
        """SHA-256 of the prompt and its sampling parameters, not of the route: equal across routes."""
        canonical = {"suite": SUITE_VERSION, "messages": self.messages, "max_tokens": self.max_tokens,
                     "temperature": self.temperature, "seed": self.seed, "tools": self.tools}
        return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).digest()

    def judge(self, answer: Answer) -> Checked:
        if answer.tool_calls:
            canonical = orjson.dumps([list(c) for c in answer.tool_calls])
            chars = sum(len(args) for _, args in answer.tool_calls)
        else:
            canonical = (answer.text or "").encode()
            chars = len(answer.text or "")
        features: dict[str, Any] = {}
        if answer.prompt_tokens:
            features["ptpc"] = round(answer.prompt_tokens / max(1, self.prompt_chars), 5)
        if answer.completion_tokens is not None and chars > 0:
            features["ctpc"] = round(answer.completion_tokens / chars, 5)
        if self.kind == "fingerprint":
            features["ng"] = trigram_buckets(answer.text or "")
        if self.check is None:
            outcome = "sample"
        else:
            try:
                outcome = "pass" if self.check(answer) else "fail"
            except (ValueError, TypeError, KeyError, AttributeError):
                outcome = "fail"
        return Checked(outcome, hashlib.sha256(canonical).digest(), chars, features)


def trigram_buckets(text: str) -> list[list[int]]:
    """Hashed character-trigram counts of a normalised answer: [[bucket, count], ...], sorted. The feature
    vector of the spectrum (string) kernel of the two-sample test; it is not the text."""
    norm = f"^{' '.join(text.lower().split())}$"
    counts: dict[int, int] = {}
    for i in range(max(1, len(norm) - 2)):
        gram = norm[i:i + 3].encode()
        bucket = int.from_bytes(hashlib.blake2b(gram, digest_size=2).digest(), "big") % NGRAM_BUCKETS
        counts[bucket] = counts.get(bucket, 0) + 1
    return [[b, c] for b, c in sorted(counts.items())]


def answer_of(parsed: dict) -> Answer:
    """The `Answer` of an OpenAI chat completion (the runner translates other dialects to it first)."""
    choices = parsed.get("choices")
    message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(choices[0], dict) \
        else None
    message = message if isinstance(message, dict) else {}
    text = message.get("content")
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            name, args = function.get("name"), function.get("arguments")
            calls.append((name if isinstance(name, str) else "", args if isinstance(args, str) else ""))
    usage = parsed.get("usage") if isinstance(parsed.get("usage"), dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    model, fingerprint = parsed.get("model"), parsed.get("system_fingerprint")
    return Answer(text if isinstance(text, str) else None, tuple(calls),
                  prompt if isinstance(prompt, int) else None, completion if isinstance(completion, int) else None,
                  model if isinstance(model, str) else None, fingerprint if isinstance(fingerprint, str) else None)


# ---- checks ----------------------------------------------------------------------------------------------

def _clean(text: str | None) -> str:
    return (text or "").strip().rstrip(".").strip()


def _number_is(expected: int) -> Callable[[Answer], bool]:
    return lambda a: re.fullmatch(r"-?\d+", _clean(a.text)) is not None and int(_clean(a.text)) == expected


def _word_is(expected: str) -> Callable[[Answer], bool]:
    return lambda a: _clean(a.text).lower() == expected.lower()


def _exactly(expected: str) -> Callable[[Answer], bool]:
    return lambda a: (a.text or "").strip() == expected


def _json_is(expected: dict) -> Callable[[Answer], bool]:
    def check(a: Answer) -> bool:
        try:
            return orjson.loads((a.text or "").strip()) == expected
        except orjson.JSONDecodeError:
            return False
    return check


def validate_schema(value: Any, schema: dict) -> bool:
    """The JSON-schema subset our tools use: type, properties, required, additionalProperties, enum."""
    kind = schema.get("type")
    types = {"object": dict, "string": str, "array": list, "boolean": bool}
    if kind in types and not isinstance(value, types[kind]):
        return False
    if kind in ("integer", "number") and (isinstance(value, bool) or not isinstance(
            value, int if kind == "integer" else (int, float))):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if kind == "object":
        props = schema.get("properties", {})
        if any(name not in value for name in schema.get("required", ())):
            return False
        if schema.get("additionalProperties") is False and any(name not in props for name in value):
            return False
        return all(validate_schema(value[name], sub) for name, sub in props.items() if name in value)
    return True


def tool_call_valid(answer: Answer, tool: dict, expected: dict) -> bool:
    """One call of the tool, its arguments valid JSON matching the schema and the values asked for."""
    if len(answer.tool_calls) != 1:
        return False
    name, raw = answer.tool_calls[0]
    if name != tool["function"]["name"]:
        return False
    try:
        args = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    if not validate_schema(args, tool["function"]["parameters"]):
        return False
    return all(str(args.get(k, "")).lower() == str(v).lower() for k, v in expected.items())


def _user(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


# ---- a round ---------------------------------------------------------------------------------------------

def build_round(rng: random.Random, *, long_context_chars: int = 4000) -> list[Probe]:
    """The probes of one round (suite `SUITE_VERSION`), drawn with `rng`."""
    probes: list[Probe] = []
    for i in range(3):
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        probes.append(Probe(f"arith-{i}", "known_answer", _user(f"Compute {a} {op} {b}. Reply with the number only."),
                            16, 0.0, _number_is(value)))
    for i, country in enumerate(rng.sample(sorted(CAPITALS), 2)):
        probes.append(Probe(f"capital-{i}", "known_answer",
                            _user(f"What is the capital of {country}? Reply with one word."), 16, 0.0,
                            _word_is(CAPITALS[country])))
    token = f"{rng.choice(WORDS)}-{rng.randint(1000, 9999)}"
    probes.append(Probe("echo", "known_answer", _user(f"Reply with exactly this text and nothing else: {token}"),
                        16, 0.0, _exactly(token)))
    n, word = rng.randint(1, 999), rng.choice(WORDS).lower()
    probes.append(Probe("json", "known_answer",
                        _user(f'Return only a JSON object with key "a" set to {n} and key "b" set to "{word}".'),
                        32, 0.0, _json_is({"a": n, "b": word})))
    for i in range(4):
        city, unit = rng.choice(CITIES), rng.choice(("celsius", "fahrenheit"))
        probes.append(Probe(f"tool-{i}", "tool_call",
                            _user(f"What is the weather in {city} in {unit}? Use the get_weather tool."),
                            64, 0.0, lambda a, c=city, u=unit: tool_call_valid(a, WEATHER_TOOL, {"city": c, "unit": u}),
                            tools=(WEATHER_TOOL,)))
    code = str(rng.randint(100000, 999999))
    lines, size = [], 0
    while size < long_context_chars:
        lines.append(rng.choice(FILLER))
        size += len(lines[-1]) + 1
    lines.insert(rng.randrange(len(lines) + 1), f"The vault code is {code}.")
    probes.append(Probe("recall", "long_context",
                        _user(" ".join(lines) + "\n\nWhat is the vault code? Reply with the code only."),
                        16, 0.0, _number_is(int(code))))
    for i, topic in enumerate(DETERMINISTIC_TOPICS):
        probes.append(Probe(f"det-{i}", "deterministic", _user(f"Write one short sentence about {topic}."),
                            48, 0.0, None, seed=DETERMINISTIC_SEED))
    for probe_id, prompt in FINGERPRINT_PROMPTS.items():
        for j in range(FINGERPRINT_SAMPLES):
            probes.append(Probe(f"{probe_id}-{j}", "fingerprint", _user(prompt), 8, 1.0, None))
    return probes

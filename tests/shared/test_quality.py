"""The probe suite's checks, the detectors and the status machine as units (seeded, no I/O), and the
statistics the README states: the false-positive rate on an honest route and the rounds to detection."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.quality_sim import simulate
from shared.quality.detect import Finding, Observation, evaluate, level_of, mmd_permutation_test, model_matches
from shared.quality.status import Streaks, next_status
from shared.quality.suite import WEATHER_TOOL, Answer, build_round, tool_call_valid, trigram_buckets, validate_schema


def _text(text: str, prompt: int = 10, completion: int = 2) -> Answer:
    return Answer(text, (), prompt, completion, "m", None)


def _probe(probes, probe_id):
    return next(p for p in probes if p.probe_id == probe_id)


# ---- the suite -------------------------------------------------------------------------------------------

def test_a_round_is_reproducible_from_its_seed_and_covers_every_kind() -> None:
    a, b = build_round(random.Random(9)), build_round(random.Random(9))
    assert [p.body("m") for p in a] == [p.body("m") for p in b]
    assert [p.prompt_hash() for p in a] == [p.prompt_hash() for p in b]
    assert {p.kind for p in a} == {"known_answer", "deterministic", "tool_call", "long_context", "fingerprint"}
    assert len(a) == 20
    det = _probe(a, "det-0").body("m")
    assert det["temperature"] == 0.0 and det["seed"] == 1234
    assert _probe(a, "tool-0").body("m")["tools"] == [WEATHER_TOOL]
    assert len(_probe(a, "recall").messages[0]["content"]) > 4000
    # The same prompt hashes the same whichever model it is sent to; another seed draws other prompts.
    assert _probe(a, "det-0").prompt_hash() == _probe(build_round(random.Random(1)), "det-0").prompt_hash()
    assert _probe(a, "arith-0").prompt_hash() != _probe(build_round(random.Random(1)), "arith-0").prompt_hash()


def test_known_answer_checks() -> None:
    probes = build_round(random.Random(3))
    echo = _probe(probes, "echo")
    token = echo.messages[0]["content"].rsplit(" ", 1)[1]
    assert echo.judge(_text(token)).outcome == "pass"
    assert echo.judge(_text(f"Sure: {token}")).outcome == "fail"
    arith = _probe(probes, "arith-0")
    a, op, b = arith.messages[0]["content"].split(".")[0].split(" ")[1:4]
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert arith.judge(_text(f"{value}.")).outcome == "pass"
    assert arith.judge(_text(str(value + 1))).outcome == "fail"
    assert arith.judge(_text(None)).outcome == "fail"
    js = _probe(probes, "json")
    prompt = js.messages[0]["content"]
    n, word = prompt.split("set to ")[1].split(" ")[0], prompt.rsplit('"', 2)[1]
    assert js.judge(_text(f'{{"a": {n}, "b": "{word}"}}')).outcome == "pass"
    assert js.judge(_text(f'```json\n{{"a": {n}, "b": "{word}"}}\n```')).outcome == "fail"


def test_tool_calls_are_checked_against_their_schema() -> None:
    good = '{"city": "Paris", "unit": "celsius"}'

    def call(args: str, name: str = "get_weather") -> Answer:
        return Answer(None, ((name, args),), 10, 5, "m", None)

    expected = {"city": "Paris", "unit": "celsius"}
    assert tool_call_valid(call(good), WEATHER_TOOL, expected)
    for bad in ('{"city": "Paris"}', '{"city": "Paris", "unit": "kelvin"}', '{"location": "Paris", "unit": "celsius"}',
                '{"city": "Paris", "unit": ', '{"city": 5, "unit": "celsius"}', '["Paris"]',
                '{"city": "Paris", "unit": "celsius", "extra": 1}', '{"city": "Rome", "unit": "celsius"}'):
        assert not tool_call_valid(call(bad), WEATHER_TOOL, expected), bad
    assert not tool_call_valid(call(good, "get_time"), WEATHER_TOOL, expected)
    assert not tool_call_valid(Answer("Paris is sunny", (), 1, 1, "m", None), WEATHER_TOOL, expected)
    assert validate_schema(3, {"type": "integer"}) and not validate_schema(True, {"type": "integer"})


def test_what_is_kept_of_an_answer_is_hashes_and_numbers() -> None:
    probe = _probe(build_round(random.Random(2)), "fp-animal-0")
    checked = probe.judge(Answer("Elephant", (), 12, 2, "m", "fp"))
    assert checked.outcome == "sample" and len(checked.response_hash) == 32 and checked.answer_chars == 8
    assert set(checked.features) == {"ptpc", "ctpc", "ng"} and "elephant" not in repr(checked).lower()
    assert trigram_buckets("Cat") == trigram_buckets(" cat ") != trigram_buckets("dog")


# ---- detectors -------------------------------------------------------------------------------------------

def _obs(kind="known_answer", outcome="pass", *, ms=100, probe_id="p", h=b"a", reported="m", features=None,
         prompt=b"p") -> Observation:
    return Observation(0, probe_id, kind, outcome, ms, prompt, h, reported, features or {})


def _detectors(findings: list[Finding]) -> set[str]:
    return {f.detector for f in findings}


RNG = np.random.default_rng(0)


def test_error_rate_against_the_healthy_baseline() -> None:
    baseline = [_obs() for _ in range(100)]
    bad = [_obs(outcome="error") for _ in range(12)] + [_obs() for _ in range(28)]
    [f] = evaluate(bad, baseline, None, expected_model="m", rng=RNG)
    assert f.detector == "error_rate" and f.severity == "degraded" and f.p_value < 0.001
    assert f.evidence["errors"] == 12 and f.evidence["null_rate"] == 0.02
    worse = [_obs(outcome="error") for _ in range(25)] + [_obs() for _ in range(15)]
    assert evaluate(worse, baseline, None, expected_model="m", rng=RNG)[0].severity == "failing"
    # A bad baseline cannot hide errors: it counts at most 10 %.
    assert evaluate(worse, worse, None, expected_model="m", rng=RNG)[0].evidence["null_rate"] == 0.10
    assert evaluate([_obs(outcome="error")] + [_obs() for _ in range(39)], baseline, None, expected_model="m",
                    rng=RNG) == []


def test_latency_against_the_baseline() -> None:
    rng = random.Random(1)
    baseline = [_obs(ms=int(rng.gauss(400, 40))) for _ in range(60)]
    slow = [_obs(ms=int(rng.gauss(1200, 100))) for _ in range(30)]
    [f] = evaluate(slow, baseline, None, expected_model="m", rng=RNG)
    assert f.detector == "latency" and f.evidence["ratio"] > 2.5
    a_bit_slower = [_obs(ms=int(rng.gauss(600, 40))) for _ in range(30)]
    assert evaluate(a_bit_slower, baseline, None, expected_model="m", rng=RNG) == []


def test_accuracy_and_tool_validity_against_the_reference() -> None:
    # The reference's span (window + baseline rounds): 120 tool calls at 4 a round.
    reference = [_obs() for _ in range(60)] + [_obs("tool_call") for _ in range(120)]
    route = [_obs(outcome="fail" if i % 3 == 0 else "pass") for i in range(40)] + [_obs("tool_call") for _ in range(40)]
    [f] = evaluate(route, [], reference, expected_model="m", rng=RNG)
    assert (f.detector, f.severity, f.evidence["against"]) == ("accuracy", "failing", "reference")
    tools = [_obs()] * 40 + [_obs("tool_call", "fail" if i % 7 == 0 else "pass") for i in range(40)]
    [f] = evaluate(tools, [], reference, expected_model="m", rng=RNG)
    assert (f.detector, f.severity) == ("tool_calls", "degraded")  # 86 %: the Kimi K2 verifier's case
    # Without a reference, the route's own healthy past is the comparison.
    [f] = evaluate(route, reference, None, expected_model="m", rng=RNG)
    assert f.evidence["against"] == "baseline"


def test_repeat_stability_divergence_and_reported_model() -> None:
    ref = [_obs("deterministic", "sample", probe_id=f"d{i % 2}", h=b"x%d" % (i % 2)) for i in range(40)]
    shaky = [_obs("deterministic", "sample", probe_id=f"d{i % 2}", h=b"x%d" % (i % 2) if i % 4 else b"y%d" % i)
             for i in range(40)]
    found = evaluate(shaky, [], ref, expected_model="m", rng=RNG)
    assert "repeat_stability" in _detectors(found)
    other = [_obs("deterministic", "sample", probe_id=f"d{i % 2}", h=b"z%d" % (i % 2)) for i in range(40)]
    assert _detectors(evaluate(other, [], ref, expected_model="m", rng=RNG)) == {"deterministic_divergence"}
    renamed = [_obs(reported="cheap-model-8b") for _ in range(20)]
    [f] = evaluate(renamed, [], None, expected_model="big-model", rng=RNG)
    assert f.detector == "reported_model" and f.evidence["reported"] == ["cheap-model-8b"]
    assert model_matches("gpt-4o-2024-08-06", "gpt-4o") and model_matches("openai/gpt-4o", "gpt-4o")
    assert not model_matches("gpt-4o-mini", "gpt-4o-2024-08-06") and not model_matches("llama-3-8b", "llama-3-70b")


def test_usage_shape_against_the_reference() -> None:
    rng = random.Random(2)
    ref = [_obs(features={"ptpc": rng.gauss(0.25, 0.005), "ctpc": rng.gauss(0.25, 0.02)}) for _ in range(60)]
    other_tokenizer = [_obs(features={"ptpc": rng.gauss(0.33, 0.005), "ctpc": rng.gauss(0.4, 0.02)})
                       for _ in range(40)]
    [f] = evaluate(other_tokenizer, [], ref, expected_model="m", rng=RNG)
    assert f.detector == "usage_shape" and set(f.evidence) == {"against", "ptpc", "ctpc"}
    same = [_obs(features={"ptpc": rng.gauss(0.25, 0.005), "ctpc": rng.gauss(0.25, 0.02)}) for _ in range(40)]
    assert evaluate(same, [], ref, expected_model="m", rng=RNG) == []


def _fingerprints(weights: dict[str, int], n: int, rng: random.Random) -> list[Observation]:
    words = rng.choices(list(weights), weights=list(weights.values()), k=n)
    return [_obs("fingerprint", "sample", features={"ng": trigram_buckets(w)}) for w in words]


def test_mmd_permutation_test() -> None:
    rng = random.Random(3)
    a = {"cat": 30, "dog": 25, "elephant": 15, "owl": 10, "fox": 10, "dolphin": 10}
    b = {"dog": 40, "lion": 20, "tiger": 15, "cat": 10, "panda": 15}
    ref = _fingerprints(a, 120, rng)
    [f] = evaluate(_fingerprints(b, 60, rng), [], ref, expected_model="m", rng=np.random.default_rng(1))
    assert f.detector == "answer_distribution" and f.p_value < 0.001 and f.evidence["mmd2"] > 0
    # Under the null the permutation p-value is (about) uniform: at alpha 0.05, about 5 % rejections.
    gen = np.random.default_rng(5)
    rejections = 0
    for _ in range(100):
        x = np.vstack([gen.normal(size=(20, 3)), gen.normal(size=(20, 3))])
        kernel = np.exp(-((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / 2)
        _, p = mmd_permutation_test(kernel, 20, 199, gen)
        rejections += p < 0.05
    assert rejections <= 12
    shifted = np.vstack([gen.normal(size=(20, 3)), gen.normal(loc=1.5, size=(20, 3))])
    kernel = np.exp(-((shifted[:, None, :] - shifted[None, :, :]) ** 2).sum(-1) / 2)
    assert mmd_permutation_test(kernel, 20, 199, gen)[1] < 0.01


def test_too_few_samples_find_nothing() -> None:
    assert evaluate([_obs(outcome="error")] * 5, [], None, expected_model="m", rng=RNG) == []
    assert evaluate([], [], [], expected_model="m", rng=RNG) == []


def test_level_and_corroboration() -> None:
    def f(detector: str, severity: str = "degraded") -> Finding:
        return Finding(detector, severity, 0.999, 0.001, {})
    assert level_of([]) == "healthy"
    assert level_of([f("latency")]) == "degraded"
    assert level_of([f("latency"), f("error_rate")]) == "degraded"  # service trouble, not substitution
    assert level_of([f("accuracy"), f("usage_shape")]) == "failing"  # two independent substitution signs
    assert level_of([f("error_rate", "failing")]) == "failing"


# ---- status with hysteresis --------------------------------------------------------------------------------

def _run(levels: list[str], start: str = "healthy", **kw) -> list[str]:
    status, streaks, out = start, Streaks(), []
    for level in levels:
        step = next_status(status, level, streaks, **kw)
        status, streaks = step.status, step.streaks
        out.append(status)
    return out


def test_status_goes_up_after_consecutive_evaluations_and_down_one_step_at_a_time() -> None:
    assert _run(["degraded", "healthy", "degraded", "healthy"]) == ["healthy"] * 4  # one bad window: nothing
    assert _run(["degraded", "degraded"]) == ["healthy", "degraded"]
    assert _run(["failing", "failing", "failing"]) == ["healthy", "failing", "failing"]
    assert _run(["failing"] * 2 + ["healthy"] * 6) == ["healthy", "failing", "failing", "failing", "degraded",
                                                       "degraded", "degraded", "healthy"]
    # A flapping route does not come back until it has been clean long enough.
    assert _run(["failing", "failing", "healthy", "healthy", "failing", "healthy", "healthy"])[-1] == "failing"
    assert _run(["failing", "failing", "degraded", "degraded", "degraded"])[-1] == "degraded"


def test_pinned_and_quarantined_routes_keep_their_status() -> None:
    assert _run(["failing"] * 4, pinned=True) == ["healthy"] * 4
    assert _run(["healthy"] * 6, start="quarantined") == ["quarantined"] * 6
    assert _run(["failing"] * 3, start="quarantined") == ["quarantined"] * 3
    with pytest.raises(ValueError):
        next_status("healthy", "healthy", Streaks(), up=0)


# ---- the stated statistics (docs/model-quality.md) --------------------------------------------------------

def test_false_positive_rate_on_an_honest_route() -> None:
    """Seeded: 2 × 150 rounds of an honest route (the reference model behind another provider): no
    evaluation with a finding, so the route is never taken off healthy (the recorded run: 0 of 2,000)."""
    flagged = evaluations = unhealthy = 0
    for seed in (11, 12):
        res = simulate("reference", 150, seed)
        evaluations += len(res.levels)
        flagged += sum(level != "healthy" for level in res.levels)
        unhealthy += sum(status != "healthy" for status in res.statuses)
    assert evaluations == 300 and flagged <= 3 and unhealthy == 0


@pytest.mark.parametrize(("case", "kwargs", "status", "within"), [
    ("substitute", {"persona": "substitute"}, ("failing",), 7),
    ("broken tools", {"persona": "broken_tools"}, ("degraded", "failing"), 10),
    ("degraded", {"persona": "reference", "errors": 0.4, "latency": 4.0}, ("degraded", "failing"), 7),
])
def test_rounds_to_detection(case: str, kwargs: dict, status: tuple[str, ...], within: int) -> None:
    for seed in (21, 22):
        res = simulate(kwargs["persona"], 20 + within, seed, bad_from=20, errors=kwargs.get("errors", 0.0),
                       latency=kwargs.get("latency", 1.0))
        assert res.statuses[19] == "healthy", case
        assert res.first(status, 20) is not None, f"{case} (seed {seed}) not flagged within {within} rounds"

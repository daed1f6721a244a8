"""Detectors: what a route's recent probe results say, against its own healthy past and its reference route.

`evaluate` takes three windows of `Observation`s — the route's last rounds (`recent`), its older rounds
while it was healthy (`baseline`), and the reference route's last rounds (`reference`, None for the
reference itself or a model without one) — and returns `Finding`s, each with a severity, a confidence and
the evidence (counts, rates, medians, statistic, p-value) that an admin reads. Every test is one-sided
where only one direction is bad, at `alpha` (0.001 by default), and also needs an effect large enough to
matter (a minimum difference or ratio), so a significant but tiny shift is not a finding.

detector: compares (test) -> degraded / failing
- error_rate: recent errors vs max(2 %, min(healthy baseline, 10 %)) (binomial) -> rate >= 10 % / >= 50 %
- latency: recent vs healthy-baseline total latency (Mann-Whitney U) -> median x2 / -
- accuracy: known answers + long-context recall vs reference, else baseline (Fisher) -> -10 pts / -25 pts
- tool_calls: tool-call schema and value validity vs reference, else baseline (Fisher) -> -10 pts / -20 pts
- repeat_stability: temperature-0 answers equal to their modal hash vs reference, else baseline (Fisher) -> -20 pts
- deterministic_divergence: each fixed prompt's modal answer differs from the reference's, both stable -> degraded
- reported_model: answers naming another model than the route's upstream model (share) -> >= 50 %
- usage_shape: prompt / completion tokens per character vs reference, else baseline (Mann-Whitney U)
  -> median ratio outside [0.8, 1.25]
- answer_distribution: fingerprint answers vs reference, MMD² with a character-trigram spectrum kernel
  (permutation test) -> p < alpha

Two or more of the substitution detectors (all but error_rate and latency) at `degraded` in one
evaluation corroborate each other: the evaluation's level is then `failing` (`level_of`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
from scipy import stats

from shared.quality.suite import NGRAM_BUCKETS

__all__ = ["Finding", "Observation", "Thresholds", "evaluate", "level_of", "mmd_permutation_test",
           "model_matches"]

SUBSTITUTION_DETECTORS = frozenset({"accuracy", "tool_calls", "repeat_stability", "deterministic_divergence",
                                    "reported_model", "usage_shape", "answer_distribution"})


class Observation(msgspec.Struct, frozen=True):
    """One probe result as the detectors see it (a `probe_results` row, or a simulated one)."""

    round_no: int
    probe_id: str
    kind: str
    outcome: str  # pass | fail | error | sample
    total_ms: int | None
    prompt_hash: bytes
    response_hash: bytes | None
    reported_model: str | None
    features: dict[str, Any]


class Finding(msgspec.Struct, frozen=True):
    detector: str
    severity: str  # degraded | failing
    confidence: float  # 0..1 (1 - p-value for tests)
    p_value: float | None
    evidence: dict[str, Any]


class Thresholds(msgspec.Struct, frozen=True, kw_only=True):
    alpha: float = 0.001
    error_floor: float = 0.02
    error_cap: float = 0.10
    error_degraded: float = 0.10
    error_failing: float = 0.50
    latency_ratio: float = 2.0
    accuracy_degraded: float = 0.10
    accuracy_failing: float = 0.25
    tools_degraded: float = 0.10
    tools_failing: float = 0.20
    stability_drop: float = 0.20
    stable: float = 0.9
    reported_share: float = 0.5
    usage_low: float = 0.8
    usage_high: float = 1.25
    permutations: int = 1999
    min_samples: int = 10
    min_fingerprints: int = 12


def evaluate(recent: Sequence[Observation], baseline: Sequence[Observation], reference: Sequence[Observation] | None,
             *, expected_model: str, rng: np.random.Generator, t: Thresholds | None = None) -> list[Finding]:
    """The findings of one evaluation. `rng` drives the permutation test (seed it for reproducibility)."""
    t = t or Thresholds()
    found = [
        _error_rate(recent, baseline, t), _latency(recent, baseline, t),
        _proportion("accuracy", ("known_answer", "long_context"), recent, baseline, reference, t,
                    t.accuracy_degraded, t.accuracy_failing),
        _proportion("tool_calls", ("tool_call",), recent, baseline, reference, t, t.tools_degraded, t.tools_failing),
        _stability(recent, baseline, reference, t), _divergence(recent, reference, t),
        _reported_model(recent, expected_model, t), _usage_shape(recent, baseline, reference, t),
        _distribution(recent, reference, t, rng),
    ]
    return [f for f in found if f is not None]


def level_of(findings: Iterable[Finding]) -> str:
    """healthy | degraded | failing: the worst severity, raised to failing by corroborating detectors."""
    findings = list(findings)
    if any(f.severity == "failing" for f in findings):
        return "failing"
    if len({f.detector for f in findings if f.detector in SUBSTITUTION_DETECTORS}) >= 2:
        return "failing"
    return "degraded" if findings else "healthy"


def _answered(obs: Iterable[Observation], kinds: tuple[str, ...] | None = None) -> list[Observation]:
    return [o for o in obs if o.outcome != "error" and (kinds is None or o.kind in kinds)]


def _error_rate(recent: Sequence[Observation], baseline: Sequence[Observation], t: Thresholds) -> Finding | None:
    n = len(recent)
    if n < t.min_samples:
        return None
    k = sum(o.outcome == "error" for o in recent)
    base = sum(o.outcome == "error" for o in baseline) / len(baseline) if baseline else 0.0
    # A baseline that is itself bad must not hide errors: it counts at most up to the cap.
    p0 = max(t.error_floor, min(base, t.error_cap))
    rate = k / n
    p = float(stats.binomtest(k, n, p0, alternative="greater").pvalue)
    if p >= t.alpha or rate < t.error_degraded:
        return None
    return Finding("error_rate", "failing" if rate >= t.error_failing else "degraded", 1 - p, p,
                   {"errors": k, "probes": n, "rate": round(rate, 4), "baseline_rate": round(base, 4),
                    "null_rate": round(p0, 4), "baseline_probes": len(baseline)})


def _latencies(obs: Iterable[Observation]) -> list[int]:
    return [o.total_ms for o in obs if o.outcome != "error" and o.total_ms is not None]


def _latency(recent: Sequence[Observation], baseline: Sequence[Observation], t: Thresholds) -> Finding | None:
    now, before = _latencies(recent), _latencies(baseline)
    if len(now) < t.min_samples or len(before) < t.min_samples:
        return None
    med_now, med_before = float(np.median(now)), float(np.median(before))
    ratio = med_now / max(med_before, 1.0)
    if ratio < t.latency_ratio:
        return None
    p = float(stats.mannwhitneyu(now, before, alternative="greater").pvalue)
    if p >= t.alpha:
        return None
    return Finding("latency", "degraded", 1 - p, p, {"median_ms": med_now, "baseline_median_ms": med_before,
                                                     "ratio": round(ratio, 3), "samples": len(now),
                                                     "baseline_samples": len(before)})


def _proportion(name: str, kinds: tuple[str, ...], recent, baseline, reference, t: Thresholds,
                degraded: float, failing: float) -> Finding | None:
    mine = _answered(recent, kinds)
    other = _answered(reference if reference is not None else baseline, kinds)
    if len(mine) < t.min_samples or len(other) < t.min_samples:
        return None
    a, b = sum(o.outcome == "pass" for o in mine), sum(o.outcome == "pass" for o in other)
    rate, rate_other = a / len(mine), b / len(other)
    diff = rate_other - rate
    if diff < degraded:
        return None
    # One-sided: is the route's pass rate below the other's?
    p = float(stats.fisher_exact([[b, len(other) - b], [a, len(mine) - a]], alternative="greater").pvalue)
    if p >= t.alpha:
        return None
    against = "reference" if reference is not None else "baseline"
    return Finding(name, "failing" if diff >= failing else "degraded", 1 - p, p, {
        "pass_rate": round(rate, 4), "passed": a, "checked": len(mine), f"{against}_pass_rate": round(rate_other, 4),
        f"{against}_passed": b, f"{against}_checked": len(other), "against": against})


def _stable_share(obs: Sequence[Observation]) -> tuple[int, int, dict[str, bytes]]:
    """(answers equal to their prompt's modal hash, answers, modal hash per probe)."""
    groups: dict[str, list[bytes]] = {}
    for o in _answered(obs, ("deterministic",)):
        if o.response_hash is not None:
            groups.setdefault(o.probe_id, []).append(o.response_hash)
    matches, total, modes = 0, 0, {}
    for probe_id, hashes in groups.items():
        mode, count = Counter(hashes).most_common(1)[0]
        matches, total, modes[probe_id] = matches + count, total + len(hashes), mode
    return matches, total, modes


def _stability(recent, baseline, reference, t: Thresholds) -> Finding | None:
    a, n, _ = _stable_share(recent)
    b, m, _ = _stable_share(reference if reference is not None else baseline)
    if n < t.min_samples or m < t.min_samples:
        return None
    diff = b / m - a / n
    if diff < t.stability_drop:
        return None
    p = float(stats.fisher_exact([[b, m - b], [a, n - a]], alternative="greater").pvalue)
    if p >= t.alpha:
        return None
    against = "reference" if reference is not None else "baseline"
    return Finding("repeat_stability", "degraded", 1 - p, p, {
        "stability": round(a / n, 4), "answers": n, f"{against}_stability": round(b / m, 4), f"{against}_answers": m})


def _divergence(recent, reference, t: Thresholds) -> Finding | None:
    if reference is None:
        return None
    a, n, mine = _stable_share(recent)
    b, m, theirs = _stable_share(reference)
    common = sorted(set(mine) & set(theirs))
    if not common or n < t.min_samples or m < t.min_samples or a / n < t.stable or b / m < t.stable:
        return None
    differ = [p for p in common if mine[p] != theirs[p]]
    if len(differ) != len(common):
        return None
    # Both routes answer each fixed prompt the same way every time, but not the same way as each other.
    return Finding("deterministic_divergence", "degraded", min(a / n, b / m), None, {
        "prompts": len(common), "differing": len(differ), "stability": round(a / n, 4),
        "reference_stability": round(b / m, 4)})


def model_matches(reported: str, expected: str) -> bool:
    """Whether an upstream's reported model names the model the route asks for (dated snapshots and
    provider prefixes allowed: gpt-4o → gpt-4o-2024-08-06, openai/gpt-4o)."""
    r, e = reported.strip().lower(), expected.strip().lower()
    r, e = r.rsplit("/", 1)[-1], e.rsplit("/", 1)[-1]
    return r == e or r.startswith(e + "-") or e.startswith(r + "-")


def _reported_model(recent, expected: str, t: Thresholds) -> Finding | None:
    named = [o.reported_model for o in _answered(recent) if o.reported_model]
    if len(named) < t.min_samples:
        return None
    wrong = [r for r in named if not model_matches(r, expected)]
    share = len(wrong) / len(named)
    if share < t.reported_share:
        return None
    return Finding("reported_model", "degraded", share, None, {
        "expected": expected, "mismatched": len(wrong), "answers": len(named),
        "reported": [name for name, _ in Counter(wrong).most_common(3)]})


def _feature(obs: Iterable[Observation], name: str) -> list[float]:
    return [o.features[name] for o in _answered(obs) if isinstance(o.features.get(name), int | float)]


def _usage_shape(recent, baseline, reference, t: Thresholds) -> Finding | None:
    other = reference if reference is not None else baseline
    evidence, p_min = {}, 1.0
    for name in ("ptpc", "ctpc"):
        mine, theirs = _feature(recent, name), _feature(other, name)
        if len(mine) < t.min_samples or len(theirs) < t.min_samples:
            continue
        ratio = float(np.median(mine)) / max(float(np.median(theirs)), 1e-9)
        if t.usage_low <= ratio <= t.usage_high:
            continue
        p = float(stats.mannwhitneyu(mine, theirs, alternative="two-sided").pvalue)
        if p < t.alpha:
            evidence[name] = {"median": round(float(np.median(mine)), 5),
                              "other_median": round(float(np.median(theirs)), 5), "ratio": round(ratio, 4),
                              "p_value": p, "samples": len(mine), "other_samples": len(theirs)}
            p_min = min(p_min, p)
    if not evidence:
        return None
    return Finding("usage_shape", "degraded", 1 - p_min, p_min,
                   {"against": "reference" if reference is not None else "baseline", **evidence})


def _vectors(obs: Iterable[Observation]) -> tuple[np.ndarray, list[bytes]]:
    rows, prompts = [], []
    for o in obs:
        if o.kind != "fingerprint" or o.outcome == "error" or not isinstance(o.features.get("ng"), list):
            continue
        v = np.zeros(NGRAM_BUCKETS)
        for bucket, count in o.features["ng"]:
            if 0 <= bucket < NGRAM_BUCKETS:
                v[bucket] = count
        rows.append(v)
        prompts.append(o.prompt_hash)
    return (np.array(rows) if rows else np.zeros((0, NGRAM_BUCKETS))), prompts


def mmd_permutation_test(kernel: np.ndarray, n: int, permutations: int,
                         rng: np.random.Generator) -> tuple[float, float]:
    """(unbiased MMD² of the first `n` samples against the rest, permutation p-value) for a precomputed
    kernel matrix; p = (1 + #{permuted ≥ observed}) / (1 + permutations)."""
    total = kernel.shape[0]
    m = total - n
    diag = np.diag(kernel)

    def mmd2(masks: np.ndarray) -> np.ndarray:
        # masks: (P, total) booleans, True for the first sample. Sums over the blocks via quadratic forms.
        x = masks.astype(float)
        y = 1.0 - x
        kx, ky = x @ kernel, y @ kernel
        sxx = np.einsum("ij,ij->i", kx, x) - x @ diag
        syy = np.einsum("ij,ij->i", ky, y) - y @ diag
        sxy = np.einsum("ij,ij->i", kx, y)
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)

    observed = mmd2(np.arange(total)[None, :] < n)[0]
    perms = np.argsort(rng.random((permutations, total)), axis=1) < n
    null = mmd2(perms)
    return float(observed), float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))


def _distribution(recent, reference, t: Thresholds, rng: np.random.Generator) -> Finding | None:
    if reference is None:
        return None
    x, px = _vectors(recent)
    y, py = _vectors(reference)
    n, m = len(x), len(y)
    if n < t.min_fingerprints or m < t.min_fingerprints:
        return None
    both = np.vstack([x, y])
    norms = np.linalg.norm(both, axis=1, keepdims=True)
    unit = both / np.where(norms == 0, 1, norms)
    prompts = px + py
    same_prompt = np.array([[a == b for b in prompts] for a in prompts], dtype=float)
    # Spectrum (character-trigram) kernel, cosine-normalised, times "same prompt": answers to different
    # prompts are never compared with each other.
    kernel = (unit @ unit.T) * same_prompt
    stat, p = mmd_permutation_test(kernel, n, t.permutations, rng)
    if p >= t.alpha:
        return None
    return Finding("answer_distribution", "degraded", 1 - p, p, {
        "mmd2": round(stat, 6), "samples": n, "reference_samples": m, "permutations": t.permutations,
        "kernel": "cosine character-trigram spectrum x same prompt"})

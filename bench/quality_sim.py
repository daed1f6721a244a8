"""Seeded simulation of probe rounds against the mock's simulated models: the false-positive rate of the
quality detectors on an honest route and the rounds they need to catch a substituted, degraded or
tool-breaking one. No HTTP: each round is the real suite (`shared.quality.suite.build_round`), answered by
`bench.mock_model.respond`, judged by the suite's checks, windowed as the probe runner windows
(`shared.workers.probes`), evaluated by `shared.quality.detect.evaluate` and fed to the status machine.

    python -m bench.quality_sim [--rounds 300] [--seeds 3]

prints the table recorded in docs/model-quality.md.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

import numpy as np

from bench.mock_model import respond
from shared.quality.detect import Finding, Observation, Thresholds, evaluate, level_of
from shared.quality.status import Streaks, next_status
from shared.quality.suite import Answer, build_round

__all__ = ["SimResult", "simulate"]

MODEL = "sim-model"


@dataclass
class SimResult:
    statuses: list[str] = field(default_factory=list)  # the route's status after each round
    levels: list[str] = field(default_factory=list)  # each evaluation's level
    findings: list[list[Finding]] = field(default_factory=list)

    def first(self, statuses: tuple[str, ...], start: int = 0) -> int | None:
        """Rounds from `start` until the route first had one of `statuses` (1: right after round `start`)."""
        for i, s in enumerate(self.statuses[start:], start=1):
            if s in statuses:
                return i
        return None


def _round(persona: str, round_no: int, rng: random.Random, *, errors: float, latency: float,
           reported: str) -> list[Observation]:
    out = []
    for probe in build_round(rng, long_context_chars=4000):
        prompt_hash = probe.prompt_hash()
        ms = int(rng.lognormvariate(6.0, 0.3) * latency)
        if rng.random() < errors:
            out.append(Observation(round_no, probe.probe_id, probe.kind, "error", ms, prompt_hash, None, None, {}))
            continue
        reply = respond(persona, probe.body(MODEL), rng)
        assert reply is not None, probe.probe_id
        answer = Answer(reply.text, (reply.tool_call,) if reply.tool_call else (), reply.prompt_tokens,
                        reply.completion_tokens, reported, None)
        checked = probe.judge(answer)
        out.append(Observation(round_no, probe.probe_id, probe.kind, checked.outcome, ms, prompt_hash,
                               checked.response_hash, reported, checked.features))
    return out


def simulate(persona: str, rounds: int, seed: int, *, bad_from: int = 0, errors: float = 0.0,
             latency: float = 1.0, reported: str = MODEL, window: int = 10, baseline: int = 20,
             t: Thresholds | None = None) -> SimResult:
    """`rounds` rounds of a route (persona `persona` from round `bad_from` on, `reference` before; with
    `errors`/`latency` from then on for a degraded one) next to a reference route, evaluated after each."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    ref_rounds: list[list[Observation]] = []
    route_rounds: list[tuple[str, list[Observation]]] = []  # (status while probed, results)
    status, streaks, result = "healthy", Streaks(), SimResult()
    for r in range(rounds):
        bad = r >= bad_from
        ref_rounds.append(_round("reference", r, rng, errors=0.0, latency=1.0, reported=MODEL))
        obs = _round(persona if bad else "reference", r, rng, errors=errors if bad else 0.0,
                     latency=latency if bad else 1.0, reported=reported if bad else MODEL)
        route_rounds.append((status, obs))
        recent = [o for _, rnd in route_rounds[-window:] for o in rnd]
        older = [rnd for s, rnd in route_rounds[:-window] if s == "healthy"][-baseline:]
        reference = [o for rnd in ref_rounds[-(window + baseline):] for o in rnd]
        findings = evaluate(recent, [o for rnd in older for o in rnd], reference, expected_model=MODEL, rng=np_rng,
                            t=t)
        level = level_of(findings)
        step = next_status(status, level, streaks)
        status, streaks = step.status, step.streaks
        result.statuses.append(status)
        result.levels.append(level)
        result.findings.append(findings)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    evaluations = flagged = unhealthy = 0
    for seed in range(args.seeds):
        res = simulate("reference", args.rounds, seed)
        evaluations += len(res.levels)
        flagged += sum(lv != "healthy" for lv in res.levels)
        unhealthy += sum(s != "healthy" for s in res.statuses)
    print(f"honest route: {evaluations} evaluations, {flagged} with a finding ({flagged / evaluations:.4%}), "
          f"{unhealthy} rounds not healthy ({unhealthy / evaluations:.4%})")
    cases = {"substitute": {"persona": "substitute"}, "broken_tools": {"persona": "broken_tools"},
             "degraded (40 % errors, latency x4)": {"persona": "reference", "errors": 0.4, "latency": 4.0},
             "slow (latency x4)": {"persona": "reference", "latency": 4.0}}
    for name, case in cases.items():
        got = []
        for seed in range(args.seeds):
            res = simulate(case["persona"], 60, seed, bad_from=30, errors=case.get("errors", 0.0),
                           latency=case.get("latency", 1.0))
            got.append((res.first(("degraded", "failing"), 30), res.first(("failing",), 30)))
        print(f"{name}: rounds to degraded-or-worse / failing per seed: {got}")


if __name__ == "__main__":
    main()

"""The gate on simulated val scores: false accepts, real improvements, the run-level error, racing savings.

    .venv/bin/python benchmarks/gate.py [--trials 200] [--run-trials 100] [--seed 0]

Drives pipemend's own gate code (``optimize.race.race``: racing looks,
confirmation re-runs, ``evidence.compare`` at the candidate's share of the
run's error budget from ``evidence.alpha_for``) with evaluations simulated at
the score level. The model (issue 12): a binary metric, base accuracy 0.5; each
evaluation of a side observes an example's true outcome flipped with
probability f, independently per side, example and sample index (the same
index gives the same answer: the gateway's cache); an "identical" candidate has
the base's true outcomes, the "real" change fixes 7.5 % of the examples and
breaks 2.5 % (net +5 pp). Gates: ``pipemend init``'s defaults.

Prints, per n (50, 100, 300) and f (0, 0.05, 0.10):
- identical accepted: the first candidate of a run (the largest share of the
  error budget) identical to its base; target at most 5 %;
- +5 pp accepted: the real change as the first candidate; as the fifth (after
  four refused); target at least 80 % at n = 300, f <= 0.05 (first);
- run-level: a run of 20 identical candidates, any kept; target at most 10 %;
- racing saved: the share of the candidate's first-look val evaluations that
  racing did not pay on refused candidates; target at least 40 %;
- racing = full: how often racing reached the verdict the full evaluation
  (``racing: [1.0]``) reaches on the same simulated evaluations; target 95 %.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from pipemend import evidence
from pipemend.manifest import Gates
from pipemend.optimize.race import race

GATES = Gates()


@dataclass
class World:
    """One trial's truth: per example, whether the base and the candidate are right, and the noise f."""

    base_true: list[bool]
    cand_true: list[bool]
    f: float
    seed: int

    def observe(self, side: str, i: int, sample: int) -> float:
        truth = self.base_true[i] if side == "base" else self.cand_true[i]
        noisy = random.Random(f"{self.seed}:{side}:{i}:{sample}").random() < self.f
        return float(truth != noisy)


def world(n: int, f: float, real: bool, rng: random.Random) -> World:
    base = [rng.random() < 0.5 for _ in range(n)]
    cand = list(base)
    if real:
        wrong = [i for i in range(n) if not base[i]]
        right = [i for i in range(n) if base[i]]
        for i in rng.sample(wrong, min(len(wrong), round(0.075 * n))):
            cand[i] = True
        for i in rng.sample(right, min(len(right), round(0.025 * n))):
            cand[i] = False
    return World(base, cand, f, rng.randrange(1 << 30))


def judge(w: World, gates: Gates, alpha: float) -> evidence.Comparison:
    n = len(w.base_true)
    ids = [str(i) for i in range(n)]
    base_first = {str(i): {"id": str(i), "score": w.observe("base", i, 0)} for i in range(n)}
    order = list(ids)
    random.Random(w.seed).shuffle(order)

    def evaluate(side: str, look: int, part: list[str], sample: int) -> list[dict[str, Any]]:
        return [{"id": i, "score": w.observe(side, int(i), sample)} for i in part]

    return race(gates, order, base_first, evaluate, alpha=alpha)


def cell(n: int, f: float, trials: int, run_trials: int, rng: random.Random) -> dict[str, float]:
    _, alpha1 = evidence.alpha_for(GATES.confidence, [])
    _, alpha5 = evidence.alpha_for(GATES.confidence, [False] * 4)
    full = GATES.model_copy(update={"racing": [1.0]})
    same = real1 = real5 = agree = judged = 0
    saved, refused = 0.0, 0
    for _ in range(trials):
        for real in (False, True):
            w = world(n, f, real, rng)
            raced = judge(w, GATES, alpha1)
            whole = judge(w, full, alpha1)
            judged += 1
            agree += int(raced.accepted_as == whole.accepted_as)
            if raced.accepted_as is None:
                refused += 1
                saved += raced.racing["saved"] / n
            if real:
                real1 += int(raced.accepted_as is not None)
                real5 += int(judge(w, GATES, alpha5).accepted_as is not None)
            else:
                same += int(raced.accepted_as is not None)
    any_kept = 0
    for _ in range(run_trials):
        kept: list[bool] = []
        for _ in range(20):
            _, alpha = evidence.alpha_for(GATES.confidence, kept)
            kept.append(judge(world(n, f, False, rng), GATES, alpha).accepted_as is not None)
        any_kept += int(any(kept))
    return {"identical": same / trials, "real1": real1 / trials, "real5": real5 / trials,
            "run": any_kept / run_trials, "saved": saved / refused if refused else 0.0, "agree": agree / judged}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--run-trials", type=int, default=100, help="runs of 20 identical candidates per cell")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    table = Table(title=f"the gate on simulated val ({args.trials} trials a cell; {args.run_trials} runs of 20 "
                        f"for the run level; confidence {GATES.confidence}, min_delta {GATES.min_delta}, "
                        f"max_regressions {GATES.max_regressions}, confirm_runs {GATES.confirm_runs}, "
                        f"racing {GATES.racing})")
    for col in ("n", "f", "identical accepted", "+5 pp accepted (1st)", "+5 pp accepted (5th)",
                "run-level (20 identical)", "racing saved (refused)", "racing = full"):
        table.add_column(col, justify="right")
    for n in (50, 100, 300):
        for f in (0.0, 0.05, 0.10):
            r = cell(n, f, args.trials, args.run_trials, rng)
            table.add_row(str(n), f"{f:.2f}", f"{r['identical']:.1%}", f"{r['real1']:.1%}", f"{r['real5']:.1%}",
                          f"{r['run']:.1%}", f"{r['saved']:.1%}", f"{r['agree']:.1%}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

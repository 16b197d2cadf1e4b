"""``pipemend optimize``: propose, gate and keep candidates as git branches; ``resume`` after a crash or kill.

    config.py     OptimizeConfig (run.json), OptimizeSummary (summary.json)
    env.py        RunEnv: frozen target, snapshot, gateway(s), sandbox, proposer, evaluation; built once
    loop.py       the loop: baseline, limits -> propose -> judge -> keep -> journal -> rebase, test split
    stops.py      stop rules and what a spent budget does (skip the candidate or stop the run)
    candidate.py  one candidate's steps;  bench.py  TrainBench, the proposer's train runs
    base.py       baseline, the base's diagnosis, the test split;  run.py  entry points, lock, summary
"""

from __future__ import annotations

from .config import CandidateSummary, OptimizeConfig, OptimizeSummary
from .run import ladder_change, resume, run_optimize

__all__ = ["CandidateSummary", "OptimizeConfig", "OptimizeSummary", "ladder_change", "resume", "run_optimize"]

"""The base's evaluations: the baseline (train and val, once), the current base's train diagnosis, and the
final test split (baseline and best, once)."""

from __future__ import annotations

from typing import Any

from ..diagnose import diagnose_eval_dir
from ..errors import BudgetExhausted, RunFailed
from ..fsutil import atomic_write_json
from ..journal import RunState, record, replay
from .env import RunEnv


def baseline(env: RunEnv) -> RunState:
    """Evaluate the base on train and val unless the journal has it (``baseline_done``)."""
    st = replay(env.run_dir)
    if st.baseline is None:
        assert st.base_sha is not None
        train = env.evaluate("baseline-train", "evals/baseline-train", st.base_sha, "train")
        val = env.evaluate("baseline-val", "evals/baseline-val", st.base_sha, "val")
        if env.failures:
            raise RunFailed(f"the baseline could not be evaluated: {'; '.join(env.failures.values())}")
        record(env.run_dir, "baseline_done", train_dir="evals/baseline-train", val_dir="evals/baseline-val",
               train_score=mean_score(train), val_score=mean_score(val))
        st = replay(env.run_dir)
    return st


def base_train_dir(n: int) -> str:
    """Where base ``n``'s train evaluation lives (0: the baseline)."""
    return "evals/baseline-train" if n == 0 else f"candidates/{n}/evals/train"


def base_diagnosis(env: RunEnv, st: RunState) -> dict[str, Any]:
    """The current base's train diagnosis; an accepted base gets its train run first (``base_ready``)."""
    n, sha, _ = st.current_base
    train_dir = base_train_dir(n)
    if n not in st.ready:
        assert sha is not None
        env.evaluate(f"cand-{n}-train", train_dir, sha, "train")
    diag = diagnose_eval_dir(env.run_dir / train_dir, env.splits["train"]).to_json()
    atomic_write_json(env.run_dir / ("diagnosis.json" if n == 0 else f"candidates/{n}/diagnosis.json"), diag)
    if n not in st.ready:
        record(env.run_dir, "base_ready", n=n, train_dir=train_dir)
        st.ready.add(n)
    return diag


def final_test(env: RunEnv, st: RunState) -> RunState:
    """The test split, once: the baseline and the best candidate (``test_done``; a spent budget is noted)."""
    if st.test is not None:
        return st
    best = st.best
    out: dict[str, Any] = {"baseline": None, "best": None}
    try:
        assert st.base_sha is not None
        env.show("test split: baseline")
        out["baseline"] = mean_score(env.evaluate("baseline-test", "evals/baseline-test", st.base_sha, "test"))
        if best is not None and best.sha:
            env.show(f"test split: candidate {best.n}")
            out["best"] = mean_score(env.evaluate("best-test", f"candidates/{best.n}/evals/test", best.sha, "test"))
    except BudgetExhausted as e:
        out["error"] = str(e)
    record(env.run_dir, "test_done", **out)
    return replay(env.run_dir)


def mean_score(rows: list[dict[str, Any]]) -> float:
    return sum(float(r.get("score") or 0.0) for r in rows) / len(rows) if rows else 0.0

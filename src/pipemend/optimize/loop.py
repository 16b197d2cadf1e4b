"""The optimize loop, in one screen.

    baseline (train, val) -> diagnosis of the base on train
    per candidate: limits -> propose -> judge -> keep -> journal -> rebase (an accepted one is the new base)
    until a stop rule (``stops``) or the proposer's lack of ideas -> test split (baseline, best) once

With ``parallel`` K > 1 each step of the loop is a round of up to K candidates from the same base
(``parallel.py``): propose them in order, judge them at once, keep the best that passes, re-judge each
other one that passed against the new base.

Every step is journaled after its files and refs exist (``journal.py``), so a
resumed run redoes only the step a kill interrupted; finished evaluations are
reused from disk and the gateway's cache answers repeated LLM calls.
"""

from __future__ import annotations

import time

from ..errors import BudgetExhausted
from ..journal import RunState, record
from . import candidate, parallel
from .base import base_diagnosis, baseline, final_test
from .env import RunEnv
from .stops import StopRun, check_limits


def run(env: RunEnv) -> RunState:
    st = env.track(baseline(env))
    env.notify("baseline_done")
    # a round left open by a kill goes on from its own base's diagnosis (the base may have moved within it)
    diagnosis = parallel.round_diagnosis(env, st.round) if st.round is not None else base_diagnosis(env, st)
    env.progress.log(f"baseline: train {st.baseline['train_score']:.3f}, val {st.baseline['val_score']:.3f}")
    env.progress.event("diagnosis", split="train", diagnosis=diagnosis)
    env.render_report()
    if st.stop_reason is None:
        try:
            while True:
                if env.cfg.parallel > 1 or st.round is not None:
                    st, diagnosis = parallel_step(env, st, diagnosis)
                    continue
                step_limits(env, st)
                n, (_, base_sha, base_val_dir) = st.next_index, st.current_base
                candidate.start(env, n, base_sha)
                with candidate.worktree(env, n, base_sha) as wt:
                    proposed = candidate.propose(env, st, n, wt, base_sha, diagnosis)
                    judged = candidate.judge(env, st, n, wt, base_sha, base_val_dir, proposed)
                    sha, ref = candidate.keep(env, n, judged, proposed.rationale)
                    st = env.track(candidate.journal(env, n, judged.verdict, sha, ref, proposed.rationale))
                env.notify("candidate_done", n)
                if proposed.stop or judged.stop:
                    raise proposed.stop or judged.stop
                if st.best is not None and st.best.n == n:  # rebase: the accepted candidate is the new base
                    diagnosis = base_diagnosis(env, st)
                env.render_report()
        except StopRun as stop:
            reason, code = stop.message, stop.reason
        except BudgetExhausted as e:
            reason, code = StopRun.from_budget(e).message, "budget"
        record(env.run_dir, "loop_stopped", reason=reason, code=code)
        env.progress.log(f"loop stopped: {reason}")
    st = final_test(env, st)
    env.notify("run_done")
    return st


def parallel_step(env: RunEnv, st: RunState, diagnosis: dict) -> tuple[RunState, dict]:
    """One round of parallel candidates (an open one first); raises the stop it met once it is finished."""
    if st.round is None:
        step_limits(env, st)
        st = parallel.open_round(env, st)
    assert st.round is not None
    base_before = st.round.base_sha  # resumed mid-round, the base may have moved already
    st, stop, finished = parallel.run_round(env, st, diagnosis)
    st = env.track(st)
    for n in finished:
        env.notify("candidate_done", n)
    if stop is not None:
        raise stop
    if st.current_base[1] != base_before:  # rebase: the round's last accepted candidate is the new base
        diagnosis = base_diagnosis(env, st)
    env.render_report()
    return st, diagnosis


def step_limits(env: RunEnv, st: RunState) -> None:
    """Raise ``StopRun`` when a stop rule holds before the next candidate."""
    cfg = env.cfg
    check_limits(done=len(st.candidates), max_candidates=cfg.max_candidates, elapsed_s=time.time() - env.started_at,
                 hours=cfg.hours, spent_usd=env.gateway_stats()["spent_usd"], budget_usd=cfg.budget_usd,
                 test_reserve=cfg.test_reserve, now=time.time(), deadline=cfg.deadline)

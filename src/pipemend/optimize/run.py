"""Entry points of an optimize run: start one, resume one, drive it to its summary under the run's lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .. import evidence
from ..dataset import FrozenTarget
from ..errors import PipemendError, RunFailed, SandboxUnavailable, UsageError
from ..fsutil import atomic_write_json, read_json
from ..journal import RunState, record, replay
from ..manifest import Gates, load_manifest
from ..protocols import NullProgress, Progress
from ..report import render_report
from ..rundir import create_run_dir, finish_run, new_run_id, read_run, update_run
from . import loop
from .config import CandidateSummary, OptimizeConfig, OptimizeSummary, proposer_options
from .env import RunEnv, branch_name, call_log_stats, open_env


def run_optimize(cfg: OptimizeConfig, progress: Progress | None = None) -> OptimizeSummary:
    """Start a new run in ``reports_dir/run_id`` and drive it to the end."""
    load_manifest(cfg.target)  # a bad manifest or proposer is a usage error before any run directory exists
    proposer_options(cfg)
    cfg = cfg.model_copy(update={"run_id": cfg.run_id or new_run_id("optimize"),
                                 "target": str(Path(cfg.target).resolve())})
    run_dir = create_run_dir(cfg.reports_dir, cfg.run_id, kind="optimize", target=cfg.target,
                             config=cfg.model_dump(mode="json"))
    with _run_lock(run_dir):
        return _drive(run_dir.resolve(), cfg, progress or NullProgress())


def resume(run_dir: str | Path, progress: Progress | None = None, *, deadline: float | None = None) -> OptimizeSummary:
    """Continue a killed or crashed run; a finished one just returns its summary. ``deadline`` (seconds since
    the epoch) replaces the run's own for this drive only (a CI job's end); ``hours`` still count from the
    run's first start. A run that finished because an earlier drive's deadline came is reopened by a resume
    with a later deadline (``loop_reopened``): it proposes again, and the test split runs again at the end."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() and (Path("reports") / run_dir).is_dir():
        run_dir = Path("reports") / run_dir
    run = read_run(run_dir)
    if run.get("kind") != "optimize":
        raise UsageError(f"{run_dir}: not an optimize run (kind {run.get('kind')!r})")
    cfg = OptimizeConfig.model_validate(run["config"])
    if deadline is not None:  # validated like the run's own (a positive time)
        cfg = OptimizeConfig.model_validate({**cfg.model_dump(mode="json"), "deadline": deadline})
    with _run_lock(run_dir):
        reopen = (run.get("status") == "done" and deadline is not None and deadline > time.time()
                  and replay(run_dir).stop_code == "deadline")
        if reopen:
            record(run_dir, "loop_reopened", deadline=deadline)
        if run.get("status") != "done" or reopen:
            update_run(run_dir, status="running")
            record(run_dir, "run_resumed", **({"deadline": deadline} if deadline is not None else {}))
        return _drive(run_dir.resolve(), cfg, progress or NullProgress())


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One process drives a run at a time: an exclusive ``flock`` on ``RUN_DIR/run.lock``, which the
    kernel releases when the process dies (even by kill -9), so a resume after a crash never waits."""
    fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run_dir}: another pipemend process is driving this run (it holds "
                             f"{run_dir / 'run.lock'}); wait for it or stop it first") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _drive(run_dir: Path, cfg: OptimizeConfig, progress: Progress) -> OptimizeSummary:
    """Open the run's environment, run the loop, write ``summary.json`` and finish the run; any failure
    finishes it ``failed`` (usage errors stay usage errors, the rest is ``RunFailed``)."""
    st = replay(run_dir)
    if st.status == "done":
        return summarize(run_dir, cfg, st)
    env: RunEnv | None = None
    try:
        env = open_env(run_dir, cfg, progress)
        st = loop.run(env)
        st.status = "done"  # the summary says so; run.json is marked done once the summary is on disk
        summary = summarize(run_dir, cfg, st, env)
        atomic_write_json(run_dir / "summary.json", summary.model_dump(mode="json"))
        finish_run(run_dir, "done", stop_reason=st.stop_reason)
        return summary
    except (UsageError, SandboxUnavailable) as e:
        finish_run(run_dir, "failed", error=str(e))
        raise
    except PipemendError as e:
        finish_run(run_dir, "failed", error=str(e))
        raise RunFailed(f"optimize run {cfg.run_id} failed: {e}") from e
    except Exception as e:
        finish_run(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise RunFailed(f"optimize run {cfg.run_id} failed: {type(e).__name__}: {e}") from e
    finally:
        if env is not None:
            env.close()
            env.render_report()
        else:
            _render_quietly(run_dir, progress)


def _render_quietly(run_dir: Path, progress: Progress) -> None:
    try:
        render_report(run_dir)
    except Exception as e:  # noqa: BLE001 - a report fault never hides the run's own error
        progress.event("warning", text=f"report not refreshed: {type(e).__name__}: {e}")


def _frozen_gates(run_dir: Path) -> Gates | None:
    try:
        return FrozenTarget.open(run_dir).manifest.gates
    except (PipemendError, OSError, ValueError):
        return None


def summarize(run_dir: Path, cfg: OptimizeConfig, st: RunState, env: RunEnv | None = None) -> OptimizeSummary:
    """The run's summary from the journal and the call log (valid with the gateway stopped, across resumes)."""
    stats = env.gateway_stats() if env is not None else call_log_stats(run_dir)
    started_at = env.started_at if env is not None else float(read_run(run_dir).get("started_at") or time.time())
    run_id = cfg.run_id or run_dir.name
    best, base, test = st.best, st.baseline or {}, st.test or {}
    gates = env.manifest.gates if env is not None else _frozen_gates(run_dir)
    return OptimizeSummary(
        run_id=run_id, run_dir=str(run_dir), status=st.status, stop_reason=st.stop_reason,
        baseline={"train": base.get("train_score"), "val": base.get("val_score"), "test": test.get("baseline")},
        best=None if best is None else {"n": best.n, "branch": branch_name(run_id, best.n), "sha": best.sha,
                                        "val": best.val_score, "test": test.get("best")},
        candidates=[CandidateSummary(n=c.n, accepted=c.accepted, val_score=c.val_score, delta=c.delta,
                                     reasons=c.reasons, rationale=c.rationale, ref=c.ref, alpha=c.alpha,
                                     val_evaluated=c.evaluated, val_saved=c.saved)
                    for _, c in sorted(st.candidates.items())],
        spent_usd=stats["spent_usd"], llm_calls=stats["calls"], cache_hits=stats["cache_hits"],
        wall_s=time.time() - started_at, val_saved=sum(c.saved or 0 for c in st.candidates.values()),
        guarantee=evidence.guarantee(gates) if gates is not None else "",
    )


def ladder_change(run_dir: str | Path, best_n: int | None) -> str | None:
    """``prompt 6 → 0, retrieval 3 → 3, ...`` from the baseline's and the best's train diagnoses."""
    run_dir = Path(run_dir)
    try:
        before = read_json(run_dir / "diagnosis.json")["counts"]
        after = read_json(run_dir / "candidates" / str(best_n) / "diagnosis.json")["counts"] if best_n else None
    except (OSError, KeyError, ValueError):
        return None
    return ", ".join(f"{rung} {before.get(rung, 0)}" + (f" → {after.get(rung, 0)}" if after else "")
                     for rung in before)

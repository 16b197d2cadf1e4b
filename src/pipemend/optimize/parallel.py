"""Parallel candidates (``optimize --parallel K``): a round of up to K candidates from one base.

A round (journal events in ``journal.py``):

1. ``round_started``: the base (the current one) and the candidates ``first .. first+k-1``
   (k = K, or fewer when ``max_candidates`` is near). Each candidate holds, by its position i in the
   round, the error-budget slot ``alpha_for(confidence, kept_before + [False] * i)``: the k slots are
   reserved at once and count as not kept (no level is carried between siblings), so the run-level
   guarantee holds whichever of them pass.
2. Propose, one after another, in the main thread: candidate i's proposer is told what candidates
   0..i-1 are working on (``ProposalContext.in_flight``: ``{n, rung, rationale, meta}`` read back from
   their ``proposal.json`` and ``rationale.md``). Proposing in order, not at once, is what lets each
   proposer see its siblings' plans, and what makes a resumed round propose the same things (an LLM
   proposer's calls come again from the cache). Each proposal is judged as soon as it is made, in a
   thread of its own (``candidate.judge`` against the round's base, at its slot), while the next one is
   proposed: the round's evaluations run at once, each a sandboxed subprocess or container.
   One that fails against the base is finished at once (``candidate_done`` with ``round``, its rejected
   ref); one that passes gets the ref ``refs/pipemend/<run>/judged/<n>`` on its commit, is journaled
   ``candidate_judged`` (commit, delta) and waits. Nothing else names that commit until the candidate is
   finished, and a ``git gc`` between a kill and the resume would delete an unnamed one.
3. Select: the passed ones ranked by delta (highest first, ties by lower index). The first is accepted
   as judged (its branch, ``best``). Each next one is re-judged against the new base: the candidate's
   diff (round base -> its commit) is applied onto a checkout of the new base, a fresh commit is built
   from those files, checked and raced on val against the new base's rows
   (``candidates/<n>/rebased/evals``) at the next free slot of the error budget; a diff that does not
   apply is rejected with a ``rebase_conflict`` reason naming the files, and keeps its first commit as
   its rejected ref. One that passes again is accepted and is the new base for the next. A finished
   candidate's ``judged`` ref is deleted once its ``candidate_done`` is journaled (until then a resume may
   re-judge it from that commit).
4. ``round_done``.

Resume: ``replay`` gives the open round (``RunState.round``): members with a ``candidate_done`` are
finished, judged ones wait for the selection (their ``judged`` refs are set again from the journal, and
any other ``judged`` ref of the run is deleted), the rest are proposed and judged again (their finished
evaluations read back by ``EvalKey``). The selected candidate's verdict is rebuilt by judging its
commit again from disk (every evaluation reused). The selection is a function of the journal, so the
resumed round ends in the same refs.

Shared state while a round runs: journal appends are serialized by ``fsutil``; git calls of the
snapshot and the progress calls go through a lock (``_Serialized``), and evaluation worktrees get
a unique name per call; ``env.failures`` is read as a copy.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import git

from .. import evidence, gate
from ..errors import RunFailed
from ..fsutil import atomic_write_bytes, atomic_write_text, read_json
from ..journal import RoundState, RunState, record, replay
from ..protocols import Proposal
from . import candidate
from .candidate import Judged, Proposed
from .env import RunEnv
from .stops import StopRun


def open_round(env: RunEnv, st: RunState) -> RunState:
    """Journal ``round_started`` from the current base (call after the stop rules allowed one more)."""
    base_n, base_sha, base_val_dir = st.current_base
    k = min(env.cfg.parallel, max(1, env.cfg.max_candidates - len(st.candidates)))
    record(env.run_dir, "round_started", round=st.rounds + 1, base_n=base_n, base_sha=base_sha,
           base_val_dir=base_val_dir, first=st.next_index, k=k)
    return replay(env.run_dir)


def round_diagnosis(env: RunEnv, rnd: RoundState) -> dict[str, Any]:
    """The round base's train diagnosis, as written before the round started."""
    path = env.run_dir / ("diagnosis.json" if rnd.base_n == 0 else f"candidates/{rnd.base_n}/diagnosis.json")
    data = read_json(path) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def run_round(env: RunEnv, st: RunState, diagnosis: dict[str, Any]) -> tuple[RunState, StopRun | None, list[int]]:
    """Finish the open round: propose and judge its members, select, re-judge, ``round_done``.
    Returns the new state, a stop the round met (the proposer's lack of ideas, a spent budget) and the
    candidates finished by this call (for the observers)."""
    rnd = st.round
    assert rnd is not None
    finished: list[int] = []
    hold_judged(env, rnd)
    with _serialized(env):
        stop = _judge_members(env, st, rnd, diagnosis, finished)
        st = replay(env.run_dir)
        assert st.round is not None
        stop = _select(env, st, st.round, finished) or stop
    _set_judged_refs(env, {})
    record(env.run_dir, "round_done", round=rnd.id)
    return replay(env.run_dir), stop, sorted(finished)


# --------------------------------------------------------------------------- propose and judge


def _judge_members(env: RunEnv, st: RunState, rnd: RoundState, diagnosis: dict[str, Any],
                   finished: list[int]) -> StopRun | None:
    """Propose the members not judged yet, in order, each judged in a thread as soon as it is proposed."""
    before = replace(st, candidates={n: c for n, c in st.candidates.items() if n < rnd.first})
    stop: StopRun | None = None
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=rnd.k, thread_name_prefix="pipemend-candidate") as pool:
        for n in rnd.members:
            if n in rnd.judged or n in rnd.done:
                continue
            candidate.start(env, n, rnd.base_sha, round=rnd.id)
            wt = env.worktree_of(f"cand-{n}", rnd.base_sha)
            try:
                proposed = candidate.propose(env, before, n, wt, rnd.base_sha, diagnosis,
                                             in_flight=in_flight(env, rnd, n), round=rnd.id)
            except StopRun as s:  # out of ideas: the round ends before n
                env.snap.remove_worktree(wt)
                stop = s
                break
            atomic_write_text(env.run_dir / "candidates" / str(n) / "rationale.md", proposed.rationale + "\n")
            futures.append(pool.submit(_judge_first, env, before, rnd, n, wt, proposed, finished))
            if proposed.stop is not None:  # a spent run budget: no more proposals
                stop = proposed.stop
                break
        for f in futures:
            judged_stop = f.result()
            stop = stop or judged_stop
    return stop


def in_flight(env: RunEnv, rnd: RoundState, n: int) -> list[dict[str, Any]]:
    """What the round's candidates before ``n`` are working on (from their files: the same after a resume)."""
    out = []
    for m in range(rnd.first, n):
        cdir = env.run_dir / "candidates" / str(m)
        meta = read_json(cdir / "proposal.json") if (cdir / "proposal.json").is_file() else {}
        meta = dict(meta) if isinstance(meta, dict) else {}
        meta.pop("format", None)
        why = cdir / "rationale.md"
        rationale = why.read_text(encoding="utf-8").strip() if why.is_file() else ""
        out.append({"n": m, "rung": meta.pop("rung", None), "rationale": rationale, "meta": meta})
    return out


def slot_alpha(env: RunEnv, st: RunState, rnd: RoundState, n: int) -> float:
    """The error-budget level reserved for the round's candidate ``n`` (by its position)."""
    kept = st.tests[:rnd.tests_before] + [False] * (n - rnd.first)
    return evidence.alpha_for(env.manifest.gates.confidence, kept)[1]


def _judge_first(env: RunEnv, st: RunState, rnd: RoundState, n: int, wt: Path, proposed: Proposed,
                 finished: list[int]) -> StopRun | None:
    """Judge ``n`` against the round's base; a failure is finished here, a pass journaled ``candidate_judged``.
    Nothing it raises takes the round down: a crash is a rejected candidate."""
    try:
        try:
            judged = candidate.judge(env, st, n, wt, rnd.base_sha, rnd.base_val_dir, proposed,
                                     alpha=slot_alpha(env, st, rnd, n))
        except Exception as e:  # noqa: BLE001 - a crashing candidate costs itself, not the round
            atomic_write_text(env.run_dir / "candidates" / str(n) / "error.txt", traceback.format_exc())
            reason = gate.Reason("candidate_crashed", f"judging crashed: {type(e).__name__}: {e}")
            judged = _refused(env, n, None, reason)
    finally:
        env.snap.remove_worktree(wt)
    if judged.verdict.accepted:
        s = judged.verdict.stats
        assert s is not None and judged.sha is not None
        env.snap.set_ref(judged_ref(env.run_id, n), judged.sha)  # its only name until it is finished
        record(env.run_dir, "candidate_judged", n=n, round=rnd.id, sha=judged.sha, delta=s.delta,
               val_score=s.cand_mean, rationale=proposed.rationale[:4000])
    else:
        _finish(env, n, judged, proposed.rationale, round=rnd.id, rejudged=False)
        finished.append(n)
    return proposed.stop or judged.stop


def _refused(env: RunEnv, n: int, sha: str | None, reason: gate.Reason) -> Judged:
    verdict = gate.decide(n, changed=[], static_reasons=[], stats=None, gates=env.manifest.gates,
                          extra_reasons=[reason])
    verdict.write(env.run_dir / "candidates" / str(n) / "verdict.json")
    return Judged(verdict, sha)


def _finish(env: RunEnv, n: int, judged: Judged, rationale: str, *, evals: str | None = None, **extra: Any) -> None:
    sha, ref = candidate.keep(env, n, judged, rationale)
    candidate.journal(env, n, judged.verdict, sha, ref, rationale, evals=evals, **extra)
    env.snap.delete_ref(judged_ref(env.run_id, n))


# --------------------------------------------------------------------------- judged commits waiting for the selection


def judged_ref(run_id: str, n: int) -> str:
    """``refs/pipemend/<run>/judged/<n>``: the commit of candidate ``n``, judged and waiting for its round's
    selection (beside ``rejected/<n>``; deleted once the candidate is finished)."""
    return f"refs/pipemend/{run_id}/judged/{n}"


def hold_judged(env: RunEnv, rnd: RoundState) -> None:
    """The ``judged`` refs as the journal says, before a round goes on: one on each judged candidate that waits
    (set again: a restored copy of the repo may lack it), none other (a kill may have come before a delete)."""
    waiting = {n: str(ev["sha"]) for n, ev in rnd.judged.items() if n not in rnd.done}
    for n, sha in sorted(waiting.items()):
        try:
            env.snap.resolve(sha)
        except git.GitCommandError:
            raise RunFailed(f"candidate {n} waits for its round's selection, but its commit {sha[:12]} is gone from "
                            f"{env.snap.repo} (its ref {judged_ref(env.run_id, n)} was deleted?)") from None
    _set_judged_refs(env, waiting)


def _set_judged_refs(env: RunEnv, wanted: dict[int, str]) -> None:
    prefix = judged_ref(env.run_id, 0)[:-1]
    for ref, sha in env.snap.refs(prefix).items():
        n = ref[len(prefix):]
        if not (n.isdigit() and wanted.get(int(n)) == sha):
            env.snap.delete_ref(ref)
    for n, sha in sorted(wanted.items()):
        env.snap.set_ref(judged_ref(env.run_id, n), sha)


# --------------------------------------------------------------------------- select and re-judge


def ranked(rnd: RoundState) -> list[int]:
    """The round's passed candidates, best first: highest delta, ties by lower index."""
    return sorted(rnd.judged, key=lambda n: (-float(rnd.judged[n].get("delta") or 0.0), n))


def _select(env: RunEnv, st: RunState, rnd: RoundState, finished: list[int]) -> StopRun | None:
    stop: StopRun | None = None
    order = ranked(rnd)
    for rank, n in enumerate(order):
        if n in rnd.done:
            continue
        ev = rnd.judged[n]
        rationale = str(ev.get("rationale") or "")
        if rank == 0:
            judged = _rejudge_as_first(env, st, rnd, n, str(ev["sha"]), rationale)
            _finish(env, n, judged, rationale, round=rnd.id, rejudged=False)
        else:
            try:
                stop = _rejudge(env, replay(env.run_dir), rnd, n, str(ev["sha"]), rationale) or stop
            except Exception as e:  # noqa: BLE001 - a crashing re-judgement costs this candidate, not the run
                atomic_write_text(env.run_dir / "candidates" / str(n) / "error.txt", traceback.format_exc())
                reason = gate.Reason("candidate_crashed", f"re-judging crashed: {type(e).__name__}: {e}")
                _finish(env, n, _refused(env, n, str(ev["sha"]), reason), rationale, round=rnd.id, rejudged=True)
        finished.append(n)
    return stop


def _rejudge_as_first(env: RunEnv, st: RunState, rnd: RoundState, n: int, sha: str, rationale: str) -> Judged:
    """The selected candidate's verdict against the round's base, rebuilt from its commit (every evaluation is
    read back from disk: nothing is paid again)."""
    before = replace(st, candidates={m: c for m, c in st.candidates.items() if m < rnd.first})
    with _worktree(env, f"cand-{n}-first", sha) as wt:
        judged = candidate.judge(env, before, n, wt, rnd.base_sha, rnd.base_val_dir,
                                 Proposed(Proposal(rationale=rationale), []), alpha=slot_alpha(env, st, rnd, n))
    if not judged.verdict.accepted:  # cannot happen unless the files on disk changed under the run
        judged.verdict.reasons.append(gate.Reason("rejudged", "its verdict changed when read back"))
    return judged


def _rejudge(env: RunEnv, st: RunState, rnd: RoundState, n: int, sha: str, rationale: str) -> StopRun | None:
    """Candidate ``n`` (commit ``sha`` on the round's base) rebased onto the current base and judged again."""
    base_n, base_sha, base_val_dir = st.current_base
    assert base_sha is not None and base_val_dir is not None
    cdir = env.run_dir / "candidates" / str(n)
    if (cdir / "verdict.json").is_file() and not (cdir / "first-verdict.json").exists():  # whole, or not there
        atomic_write_bytes(cdir / "first-verdict.json", (cdir / "verdict.json").read_bytes())
    env.show(f"candidate {n}: rebasing onto candidate {base_n}")
    evals = f"candidates/{n}/rebased/evals"
    with _worktree(env, f"cand-{n}-rebased", base_sha) as wt:
        conflict = apply_diff(env, rnd.base_sha, sha, wt)
        if conflict is not None:
            reason = gate.Reason("rebase_conflict", f"its change does not apply onto the new base (candidate "
                                                    f"{base_n}, {base_sha[:12]}): {conflict}")
            _finish(env, n, _refused(env, n, sha, reason), rationale, round=rnd.id, rejudged=True)
            return None
        judged = candidate.judge(env, st, n, wt, base_sha, base_val_dir, Proposed(Proposal(rationale=rationale), []),
                                 evals=evals)
    _finish(env, n, judged, rationale, evals=evals, round=rnd.id, rejudged=True)
    return judged.stop


def apply_diff(env: RunEnv, base_sha: str, sha: str, wt: Path) -> str | None:
    """Apply the change ``base_sha`` -> ``sha`` to the files of ``wt``; None, or what conflicts."""
    repo = str(env.snap.repo)
    diff = subprocess.run(["git", "-C", repo, "diff", "--binary", "--no-color", "--no-ext-diff", base_sha, sha],
                          capture_output=True, check=True).stdout
    if not diff:
        return None
    done = subprocess.run(["git", "-C", str(wt), "apply", "--whitespace=nowarn", "-"], input=diff,
                          capture_output=True)
    if done.returncode == 0:
        return None
    lines = [ln for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.startswith("error:")]
    return "; ".join(ln[len("error:"):].strip() for ln in lines[:5]) or f"git apply exited {done.returncode}"


@contextlib.contextmanager
def _worktree(env: RunEnv, name: str, sha: str) -> Iterator[Path]:
    wt = env.worktree_of(name, sha)
    try:
        yield wt
    finally:
        env.snap.remove_worktree(wt)


# --------------------------------------------------------------------------- shared state


class _Serialized:
    """``target``'s methods called under one lock (git's worktree bookkeeping and a progress display are not
    made for concurrent callers); ``add_worktree`` names are made unique (``eval-val-look1`` of two candidates)."""

    def __init__(self, target: Any, lock: threading.RLock, unique: bool = False):
        self._target = target
        self._lock = lock
        self._unique = unique
        self._count = itertools.count(1)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        if name == "add_worktree" and self._unique:
            def add(wt_name: str, *args: Any, **kwargs: Any) -> Any:
                with self._lock:
                    return attr(f"{wt_name}-p{next(self._count)}" if wt_name.startswith("eval-") else wt_name,
                                *args, **kwargs)
            return add

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)
        return call


@contextlib.contextmanager
def _serialized(env: RunEnv) -> Iterator[None]:
    snap, progress = env.snap, env.progress
    env.snap = _Serialized(snap, threading.RLock(), unique=True)  # type: ignore[assignment]
    env.progress = _Serialized(progress, threading.RLock())  # type: ignore[assignment]
    try:
        yield
    finally:
        env.snap, env.progress = snap, progress

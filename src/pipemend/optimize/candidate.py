"""One candidate's steps: propose, judge, keep, journal. Any failure in them is a rejected candidate.

``propose`` gives the proposer a worktree of the base, the guarded tools over a
``TrainBench``, its budget and the history; a crash or a spent per-candidate
budget is a reason, and so is an agent session the harness ended (``AgentSessionEnded``: looping,
malformed calls, no submit); a spent run budget also ends the loop (``stops.ON_BUDGET``),
no proposal at all ends it (``StopRun("ideas")``). ``judge`` first builds the
candidate commit from the worktree's files alone (``Snapshot.build_candidate``:
a fresh index, no attributes, filters or index flags of the candidate's; every
change it will not keep is a refusal), runs the static checks on that commit's
diff, then evaluates clean checkouts of exactly that commit against the base on
val (``race``: racing looks, flips confirmed on both sides), then the verdict: the tree that is checked is the
tree that is evaluated and the tree that is kept. ``keep`` gives that commit the
verdict as its message (same tree) and its ref: an accepted candidate gets its
branch and moves ``best``, a rejected one a ref. ``journal`` writes what later
proposers may read (``history/<n>``: ``history.py``; val as aggregates only, train traces whole) and
``candidate_done``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from git import GitCommandError

from .. import gate
from ..errors import BudgetExhausted
from ..fsutil import atomic_write_json, atomic_write_text, read_json
from ..journal import RunState, record, replay
from ..protocols import Proposal, ProposalContext
from ..proposers import ProposerBudget
from ..proposers.agent_tools import AgentSessionEnded
from ..proposers.isolation import PluginFailed
from ..proposers.tools import ProposerTools
from .base import base_train_dir
from .bench import TrainBench
from . import race
from .env import RunEnv
from .history import write_history
from .stops import StopRun, on_budget


@dataclass
class Proposed:
    """What came of asking the proposer: its proposal (None: it failed), the reasons it failed, and a
    ``StopRun`` when its failure also ends the loop."""

    proposal: Proposal | None
    problems: list[gate.Reason]
    stop: StopRun | None = None

    @property
    def rationale(self) -> str:
        return self.proposal.rationale if self.proposal else ""


@dataclass
class Judged:
    verdict: gate.Verdict
    sha: str | None
    """The candidate commit that was checked and evaluated (None: nothing to keep)."""
    stop: StopRun | None = None


def start(env: RunEnv, n: int, base_sha: str, **extra: Any) -> Path:
    """Journal ``candidate_started`` (``extra``: a parallel run's ``round``); a fresh ``candidates/<n>`` (finished
    evaluations of a redone candidate stay, reused when their key matches)."""
    record(env.run_dir, "candidate_started", n=n, base_sha=base_sha, **extra)
    cdir = env.run_dir / "candidates" / str(n)
    cdir.mkdir(parents=True, exist_ok=True)
    for child in cdir.iterdir():
        if child.name in ("evals", "train"):
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    env.show(f"candidate {n}: proposing")
    return cdir


@contextlib.contextmanager
def worktree(env: RunEnv, n: int, base_sha: str) -> Iterator[Path]:
    """The proposer's worktree: a clean checkout of the base without the sealed files."""
    wt = env.worktree_of(f"cand-{n}", base_sha)
    try:
        yield wt
    finally:
        env.snap.remove_worktree(wt)


def propose(env: RunEnv, st: RunState, n: int, wt: Path, base_sha: str, diagnosis: dict[str, Any], *,
            in_flight: list[dict[str, Any]] | None = None, **extra: Any) -> Proposed:
    """Ask the proposer for candidate ``n``; ``in_flight``: what its siblings of a parallel round are working on
    (``extra``: the round, journaled with an abandonment)."""
    cdir = env.run_dir / "candidates" / str(n)
    try:
        proposal = env.proposer.propose(context(env, st, n, wt, base_sha, diagnosis, in_flight=in_flight))
    except BudgetExhausted as e:
        _save_meta(cdir, e.meta)
        stop = StopRun.from_budget(e) if on_budget(e) == "stop_run" else None
        return Proposed(None, [gate.Reason("budget", f"budget exhausted while proposing: {e}")], stop)
    except AgentSessionEnded as e:  # the harness ended a session going nowhere (looping, malformed, no submit)
        _save_meta(cdir, e.meta)
        return Proposed(None, [gate.Reason("proposer_ended", str(e))])
    except PluginFailed as e:  # the plugin's own crash, reported from its sandbox
        atomic_write_text(cdir / "error.txt", f"{e}\n\n{e.details}\n")
        return Proposed(None, [gate.Reason("proposer_crashed", f"proposer crashed: {e}")])
    except Exception as e:  # noqa: BLE001 - a crashing proposer costs this candidate, not the run
        atomic_write_text(cdir / "error.txt", traceback.format_exc())
        return Proposed(None, [gate.Reason("proposer_crashed", f"proposer crashed: {type(e).__name__}: {e}")])
    if proposal is None:
        shutil.rmtree(cdir, ignore_errors=True)
        record(env.run_dir, "candidate_abandoned", n=n, reason="out of ideas", **extra)
        raise StopRun("ideas", "the proposer is out of ideas")
    _save_meta(cdir, {"rung": proposal.rung, **proposal.meta})
    return Proposed(proposal, [])


def judge(env: RunEnv, st: RunState, n: int, wt: Path, base_sha: str, base_val_dir: str,
          proposed: Proposed, *, alpha: float | None = None, evals: str | None = None) -> Judged:
    """Build the candidate commit, check its diff, evaluate a clean checkout of it on val (only when clean),
    then the verdict (``candidates/<n>/verdict.json``). ``alpha`` and ``evals``: ``race.gate_val``'s."""
    cdir = env.run_dir / "candidates" / str(n)
    tree = env.snap.build_candidate(wt, base_sha, message=f"pipemend {env.run_id} cand-{n} (being judged)\n",
                                    is_editable=env.is_editable, sealed=env.sealed_in_repo)
    atomic_write_text(cdir / "diff.patch", tree.diff)
    atomic_write_text(cdir / "rationale.md", proposed.rationale + "\n")
    problems = list(proposed.problems)
    static = [] if problems else [gate.Reason(f"refused_{r.code}", str(r)) for r in tree.refusals]
    if not problems and tree.sha:
        static += static_checks(env, wt, tree.diff, tree.changed, base_sha)
    if not problems and not static and tree.sha and (same := judged_before(env, st, tree.sha, base_sha)) is not None:
        problems.append(gate.Reason("duplicate", f"the same files as candidate {same}, judged on this base and not "
                                                 "kept; not evaluated again"))
    stats, stop = None, None
    if not problems and not static and tree.sha:
        try:
            stats = race.gate_val(env, st, n, tree.sha, base_sha, base_val_dir, alpha=alpha, evals=evals)
        except BudgetExhausted as e:
            problems.append(gate.Reason("budget", str(e)))
            stop = StopRun.from_budget(e) if on_budget(e) == "stop_run" else None
    verdict = gate.decide(n, changed=tree.changed, static_reasons=static, stats=stats, gates=env.manifest.gates,
                          extra_reasons=problems)
    verdict.write(cdir / "verdict.json")
    return Judged(verdict, tree.sha, stop)


def judged_before(env: RunEnv, st: RunState, sha: str, base_sha: str) -> int | None:
    """The earliest candidate whose judged commit has ``sha``'s tree on the same base (``sha`` is built on
    ``base_sha``, and a judged commit's parent is the base it was judged on) and that was evaluated on val and
    not kept, else None: its evaluation would only be repeated. A small model proposes the same change over
    and over."""
    try:
        tree, base = env.snap.tree_of(sha), env.snap.resolve(base_sha)
    except GitCommandError:  # no answer is no duplicate: the evaluation decides
        return None
    for c in sorted(st.candidates.values(), key=lambda c: c.n):
        if c.accepted or not c.tested or not c.sha:
            continue
        try:
            if env.snap.tree_of(c.sha) == tree and env.snap.resolve(f"{c.sha}^") == base:
                return c.n
        except GitCommandError:  # a commit gone (gc) is no duplicate
            continue
    return None


def static_checks(env: RunEnv, wt: Path, diff: str, changed: list[str], base_sha: str) -> list[gate.Reason]:
    def base_text(path: str) -> str:
        try:
            return env.snap.show(base_sha, path)
        except Exception:  # noqa: BLE001 - a new or binary file has no base text
            return ""

    return gate.check_diff(diff=diff, changed=changed, worktree=wt, target_subdir=env.snap.target_subdir,
                           editable=env.manifest.editable, protected=env.manifest.all_protected(),
                           sealed=env.label_check, base_text=base_text, metric_lines=env.metric_lines)


def keep(env: RunEnv, n: int, judged: Judged, rationale: str) -> tuple[str | None, str | None]:
    """The judged commit, with the verdict as its message (the same tree); an accepted one gets its branch and
    moves best, a rejected one a ref. A candidate that changed nothing has no commit."""
    verdict = judged.verdict
    if judged.sha is None:
        return None, None
    s = verdict.stats
    head = rationale.strip().splitlines()[0][:72] if rationale.strip() else "candidate"
    body = (f"{rationale.strip()}\n\nval {s.base_mean:.4f} -> {s.cand_mean:.4f} (delta {s.delta:+.4f})"
            if s else rationale.strip())
    if not verdict.accepted:
        body += "\n\nrejected:\n" + "\n".join(f"- {r}" for r in verdict.reasons)
    sha = env.snap.reword(judged.sha, f"pipemend {env.run_id} cand-{n}: {head}\n\n{body}\n")
    if verdict.accepted:
        env.snap.set_branch(env.branch(n), sha)
        env.snap.set_branch(env.branch("best"), sha)
        return sha, f"refs/heads/{env.branch(n)}"
    env.snap.set_ref(env.rejected_ref(n), sha)
    return sha, env.rejected_ref(n)


def journal(env: RunEnv, n: int, verdict: gate.Verdict, sha: str | None, ref: str | None, rationale: str, *,
            evals: str | None = None, **extra: Any) -> RunState:
    """``history/<n>`` for later proposers, then ``candidate_done`` (``evals``: where its val evaluations are,
    default ``candidates/<n>/evals``; ``extra``: a parallel run's ``round``, ``rejudged``); returns the journal's
    new state."""
    cdir = env.run_dir / "candidates" / str(n)
    evals = evals or f"candidates/{n}/evals"
    write_history(env.run_dir / "history" / str(n), cdir, verdict, [ex.id for ex in env.splits["train"]])
    stats = verdict.stats
    record(env.run_dir, "candidate_done", n=n, accepted=verdict.accepted, sha=sha, ref=ref,
           reasons=gate.texts(verdict.reasons), rationale=rationale[:4000],
           val_dir=f"{evals}/val" if stats and stats.evaluated == stats.n else None,
           val_score=stats.cand_mean if stats else None, delta=stats.delta if stats else None,
           tested=stats is not None, alpha=stats.alpha if stats else None,
           evaluated=stats.evaluated if stats else None, saved=stats.racing["saved"] if stats else None, **extra)
    env.progress.event("candidate_done", n=n, accepted=verdict.accepted,
                       val_score=stats.cand_mean if stats else None, delta=stats.delta if stats else None,
                       reasons=gate.texts(verdict.reasons), verdict=verdict.to_json())
    return replay(env.run_dir)


# --------------------------------------------------------------------------- what the proposer gets


def context(env: RunEnv, st: RunState, n: int, wt: Path, base_sha: str, diagnosis: dict[str, Any], *,
            in_flight: list[dict[str, Any]] | None = None) -> ProposalContext:
    base_n, _, _ = st.current_base
    bench = TrainBench(env, n=n, worktree=wt, base_sha=base_sha, base_train_dir=env.run_dir / base_train_dir(base_n),
                       base_diagnosis=diagnosis)
    tools = ProposerTools(worktree=wt, target_subdir=env.snap.target_subdir, editable=env.manifest.editable,
                          protected=env.manifest.all_protected(), run_train=bench.run, read_trace=bench.trace,
                          diagnose=bench.diagnose, diff=bench.diff, tool_timeout_s=env.cfg.per_tool_timeout_s)
    budget = ProposerBudget(max_turns=env.cfg.max_turns, max_agent_usd=env.cfg.max_agent_usd,
                            per_tool_timeout_s=env.cfg.per_tool_timeout_s)
    history = []
    for _, c in sorted(st.candidates.items()):
        meta = _read_optional(env.run_dir / "candidates" / str(c.n) / "proposal.json") or {}
        meta.pop("format", None)
        history.append({"n": c.n, "accepted": c.accepted, "rationale": c.rationale, "rung": meta.pop("rung", None),
                        "meta": meta, "verdict": _read_optional(env.run_dir / "history" / str(c.n) / "verdict.json")})
    return ProposalContext(candidate_index=n, worktree=wt, target_subdir=env.snap.target_subdir,
                           manifest=env.manifest, diagnosis=diagnosis, history=history,
                           history_dir=env.run_dir / "history", tools=tools, budget=budget,
                           train_examples=[ex.model_dump() for ex in env.splits["train"]], log=env.progress.log,
                           in_flight=list(in_flight or []))


def _save_meta(cdir: Path, meta: dict[str, Any]) -> None:
    meta = dict(meta)
    transcript = meta.pop("transcript", None)
    if isinstance(transcript, list):
        atomic_write_text(cdir / "transcript.jsonl", "".join(json.dumps(t, default=str) + "\n" for t in transcript))
    atomic_write_json(cdir / "proposal.json", {"format": "pipemend-proposal-1", **meta})


def _read_optional(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None

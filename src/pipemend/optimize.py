"""``pipemend optimize``: the loop that proposes, gates and keeps candidates as git branches.

    freeze target -> snapshot -> gateway -> baseline (train, val) -> diagnosis
    loop: candidate worktree from the base -> proposer -> gate (same val examples)
          accept: commit, branch pipemend/<run>/cand-N, move .../best, it is the new base
          reject: commit, ref refs/pipemend/<run>/rejected/N, with its reasons
    until dollars, candidates, hours or ideas run out -> test split (baseline, best) once -> summary

Every step is journaled after its files and refs exist (``journal.py``), so
``resume`` redoes only the step a kill interrupted; finished evaluations are
reused from disk and the gateway's cache answers repeated LLM calls. The loop
stops through ``StopLoop``; a candidate that crashes is a rejected candidate.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from . import gate
from .dataset import Example, FrozenTarget, freeze_target, limit_splits
from .errors import BudgetExhausted, PipemendError, RunFailed, SandboxUnavailable, UsageError
from .fsutil import atomic_write_json, atomic_write_text, read_json, read_jsonl
from .journal import RunState, record, replay
from .rundir import create_run_dir, finish_run, new_run_id, read_run, update_run

SUMMARY_FORMAT = "pipemend-optimize-summary-1"


LLM_PROPOSERS = ("claude", "claude-code")
"""Proposers that call a model: they get an agent-side gateway, a transcript folder and ``--agent-model``."""


class StopLoop(Exception):
    """Ends the candidate loop; the message is the reason recorded in the journal."""


class OptimizeConfig(BaseModel):
    """One optimize run. Stored in ``run.json``; ``resume`` reads it back."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="The target pipeline's folder (holding pipemend.yaml).")
    proposer: str = Field("ladder", description="claude | claude-code | ladder | package.module:Class.")
    proposer_options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the proposer.")
    model: str | None = Field(None, description="Model the pipeline calls (PIPEMEND_MODEL); default the manifest's llm.model.")
    agent_model: str | None = Field(None, description="Model of an LLM proposer (passed to it as `model`).")
    budget_usd: float = Field(5.0, gt=0, description="Dollars the gateway may spend on pipeline calls, test split included.")
    test_reserve: float = Field(0.2, ge=0, lt=1, description="Share of budget_usd kept for the final test split.")
    max_candidates: int = Field(10, ge=0, description="Candidates to propose at most.")
    hours: float | None = Field(None, gt=0, description="Stop proposing after this many hours since the run started.")
    limit: int | None = Field(None, ge=1, description="Use only the first N examples of each split.")
    sandbox: str = Field("auto", description="docker | bwrap | process | auto.")
    run_id: str | None = Field(None, description="Run id (default optimize-<date>-<time>-<hex>).")
    reports_dir: str = Field("reports", description="Folder holding run directories.")
    cache_dir: str | None = Field(None, description="LLM response cache (default RUN_DIR/gateway/cache).")
    max_turns: int = Field(40, ge=1, description="Turns of an LLM proposer per candidate.")
    max_agent_usd: float = Field(2.0, ge=0, description="Dollars of an LLM proposer's own calls per candidate.")
    per_tool_timeout_s: float = Field(300.0, gt=0, description="Time limit of one proposer tool call.")
    seed: int = Field(0, description="Seed of the gate's bootstrap.")


class CandidateSummary(BaseModel):
    n: int
    accepted: bool
    val_score: float | None
    delta: float | None
    reasons: list[str]
    rationale: str
    ref: str | None


class OptimizeSummary(BaseModel):
    format: str = SUMMARY_FORMAT
    run_id: str
    run_dir: str
    status: str
    stop_reason: str | None
    baseline: dict[str, float | None] = Field(description="train, val and test scores of the base.")
    best: dict[str, Any] | None = Field(description="The last accepted candidate: n, branch, sha, val, test.")
    candidates: list[CandidateSummary]
    spent_usd: float
    llm_calls: int
    cache_hits: int
    wall_s: float


# --------------------------------------------------------------------------- entry points


def run_optimize(cfg: OptimizeConfig, console: Console | None = None) -> OptimizeSummary:
    """Start a new run in ``reports_dir/run_id`` and drive it to the end."""
    from .manifest import load_manifest

    load_manifest(cfg.target)  # a bad manifest or proposer is a usage error before any run directory exists
    _check_proposer(cfg)
    cfg = cfg.model_copy(update={"run_id": cfg.run_id or new_run_id("optimize"),
                                 "target": str(Path(cfg.target).resolve())})
    run_dir = create_run_dir(cfg.reports_dir, cfg.run_id, kind="optimize", target=cfg.target,
                             config=cfg.model_dump(mode="json"))
    with _run_lock(run_dir):
        return _Run(run_dir, cfg, console).drive()


def resume(run_dir: str | Path, console: Console | None = None) -> OptimizeSummary:
    """Continue a killed or crashed run; a finished one just returns its summary."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() and (Path("reports") / run_dir).is_dir():
        run_dir = Path("reports") / run_dir
    run = read_run(run_dir)
    if run.get("kind") != "optimize":
        raise UsageError(f"{run_dir}: not an optimize run (kind {run.get('kind')!r})")
    cfg = OptimizeConfig.model_validate(run["config"])
    with _run_lock(run_dir):
        if run.get("status") != "done":
            update_run(run_dir, status="running")
            record(run_dir, "run_resumed")
        return _Run(run_dir, cfg, console).drive()


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


# --------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, run_dir: Path, cfg: OptimizeConfig, console: Console | None):
        self.run_dir = Path(run_dir).resolve()
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.st: RunState = replay(self.run_dir)
        self.started_at = float(read_run(self.run_dir).get("started_at") or time.time())
        self.gateway: Any = None
        self.agent_gateway: Any = None
        self._status: Any = None
        self._spent = 0.0
        self.failures: dict[str, str] = {}
        """Evaluations whose sandbox or runner died (rel dir -> why); their examples scored 0."""

    def drive(self) -> OptimizeSummary:
        if self.st.status == "done":
            return self.summary()
        try:
            self.setup()
            with self.console.status("starting") as self._status:
                self.loop()
                self.final_test()
            summary = self.summary()
            atomic_write_json(self.run_dir / "summary.json", summary.model_dump(mode="json"))
            finish_run(self.run_dir, "done", stop_reason=self.st.stop_reason)
            self.st.status = "done"
            self.print_summary(summary)
            return self.summary()
        except (UsageError, SandboxUnavailable) as e:
            finish_run(self.run_dir, "failed", error=str(e))
            raise
        except PipemendError as e:
            finish_run(self.run_dir, "failed", error=str(e))
            raise RunFailed(f"optimize run {self.cfg.run_id} failed: {e}") from e
        except Exception as e:
            finish_run(self.run_dir, "failed", error=f"{type(e).__name__}: {e}")
            raise RunFailed(f"optimize run {self.cfg.run_id} failed: {type(e).__name__}: {e}") from e
        finally:
            for gw in (self.gateway, self.agent_gateway):
                if gw is not None:
                    gw.stop()
            self.render_report()

    # ------------------------------------------------------------------ setup: freeze, snapshot, gateway, baseline

    def setup(self) -> None:
        from .diagnose import diagnose_eval_dir
        from .evaluate import EvalContext
        from .gateway import Gateway, GatewayConfig
        from .manifest import load_manifest
        from .sandbox import get_sandbox
        from .sandbox.worktrees import Snapshot, snapshot_target

        if not self.st.frozen:
            shutil.rmtree(self.run_dir / "frozen", ignore_errors=True)
            freeze_target(self.cfg.target, load_manifest(self.cfg.target), self.run_dir)
            record(self.run_dir, "frozen")
        self.frozen = FrozenTarget.open(self.run_dir)
        self.manifest = self.frozen.manifest
        self.splits = limit_splits(self.frozen.splits(), self.cfg.limit)
        if self.st.snapshot is None:
            snap = snapshot_target(Path(self.cfg.target), self.cfg.run_id, self.run_dir)
            record(self.run_dir, "snapshot", snapshot=snap.to_json(), base_sha=snap.resolve(snap.base_branch))
            self.st = replay(self.run_dir)
        self.snap = Snapshot.from_json(self.st.snapshot)
        self.snap.prune()
        self._restore_refs()

        cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.run_dir / "gateway" / "cache"
        self.gateway = Gateway(GatewayConfig(run_dir=self.run_dir, budget_usd=self.cfg.budget_usd, cache_dir=cache,
                                             socket_path=_socket_path(self.run_dir)))
        self.gateway.start()
        sandbox = get_sandbox(self.cfg.sandbox, announce=lambda msg: self.console.print(f"[yellow]{msg}[/]"))
        self.ectx = EvalContext(self.run_dir, self.frozen, sandbox, self.gateway, self.cfg.model or self.manifest.llm.model)
        self.proposer = self._make_proposer(cache)

        if self.st.baseline is None:
            train = self.evaluate("baseline-train", "evals/baseline-train", self.st.base_sha, "train")
            val = self.evaluate("baseline-val", "evals/baseline-val", self.st.base_sha, "val")
            if self.failures:
                raise RunFailed(f"the baseline could not be evaluated: {'; '.join(self.failures.values())}")
            record(self.run_dir, "baseline_done", train_dir="evals/baseline-train", val_dir="evals/baseline-val",
                   train_score=_mean_score(train), val_score=_mean_score(val))
            self.st = replay(self.run_dir)
        self.diagnosis = self._base_diagnosis(diagnose_eval_dir)
        self.log(f"baseline: train {self.st.baseline['train_score']:.3f}, val {self.st.baseline['val_score']:.3f}")
        from .diagnose import Diagnosis, render_diagnosis

        self.console.print(render_diagnosis(Diagnosis.from_json(self.diagnosis)))
        self.render_report()

    def _restore_refs(self) -> None:
        """Re-set every journaled branch and ref from its sha (a kill may have come before a ref moved)."""
        for c in self.st.candidates.values():
            if c.sha and c.accepted:
                self.snap.set_branch(self._branch(c.n), c.sha)
            elif c.sha:
                self.snap.set_ref(self._rejected_ref(c.n), c.sha)
        if self.st.best is not None:
            self.snap.set_branch(self._branch("best"), self.st.best.sha)

    def _branch(self, n: int | str) -> str:
        return f"pipemend/{self.cfg.run_id}/{'best' if n == 'best' else f'cand-{n}'}"

    def _rejected_ref(self, n: int) -> str:
        return f"refs/pipemend/{self.cfg.run_id}/rejected/{n}"

    def _base_diagnosis(self, diagnose_eval_dir: Callable[..., Any]) -> dict[str, Any]:
        """The current base's train diagnosis; an accepted base gets its train run first."""
        n, sha, _ = self.st.current_base
        train_dir = "evals/baseline-train" if n == 0 else f"candidates/{n}/evals/train"
        if n not in self.st.ready:
            self.evaluate(f"cand-{n}-train", train_dir, sha, "train")
        diag = diagnose_eval_dir(self.run_dir / train_dir, self.splits["train"]).to_json()
        atomic_write_json(self.run_dir / ("diagnosis.json" if n == 0 else f"candidates/{n}/diagnosis.json"), diag)
        if n not in self.st.ready:
            record(self.run_dir, "base_ready", n=n, train_dir=train_dir)
            self.st.ready.add(n)
        return diag

    # ------------------------------------------------------------------ evaluation (reused from disk when finished)

    def evaluate(self, name: str, rel_dir: str, sha: str | None, split: str, *, worktree: Path | None = None,
                 diff: str = "", examples: list[Example] | None = None, writable: bool = False) -> list[dict[str, Any]]:
        """Scored rows of ``split`` for the commit ``sha`` (+ ``diff``); a finished identical evaluation is read back."""
        from .evaluate import evaluate

        examples = self.splits[split] if examples is None else examples
        out = self.run_dir / rel_dir
        key = {"sha": sha, "diff": hashlib.sha256(diff.encode()).hexdigest(), "split": split,
               "ids": [ex.id for ex in examples], "model": self.ectx.model}
        key_file = out.parent / f"{out.name}.key.json"
        if (out / "outcome.json").is_file() and key_file.is_file() and read_json(key_file) == key:
            return list(read_jsonl(out / "scored.jsonl"))
        shutil.rmtree(out, ignore_errors=True)
        key_file.unlink(missing_ok=True)
        own = worktree is None
        wt = self.snap.add_worktree(f"eval-{out.name}", sha) if own else worktree
        refused_before = self.gateway_stats()["budget_refusals"]
        try:
            res = evaluate(self.ectx, name=name, worktree=wt, target_subdir=self.snap.target_subdir, split=split,
                           examples=examples, out_dir=out, writable=writable,
                           progress=lambda done, total: self.show(f"{name}: {done}/{total}"))
        finally:
            if own:
                self.snap.remove_worktree(wt)
        if self.gateway_stats()["budget_refusals"] > refused_before:
            raise BudgetExhausted(f"the gateway's ${self.cfg.budget_usd:.2f} budget ran out during {name}")
        if res.failed_systemically:
            o = res.outcome
            self.failures[rel_dir] = o.error or ("timed out" if o.timed_out else f"runner exited {o.returncode}")
        else:
            atomic_write_json(key_file, key)
        return res.rows

    # ------------------------------------------------------------------ the loop

    def loop(self) -> None:
        if self.st.stop_reason is not None:
            return
        try:
            while True:
                self.check_limits()
                self.candidate(self.st.next_index)
                self.render_report()
        except StopLoop as stop:
            reason = str(stop)
        except BudgetExhausted as e:
            reason = f"budget: {e}"
        record(self.run_dir, "loop_stopped", reason=reason)
        self.st.stop_reason = reason
        self.log(f"loop stopped: {reason}")

    def check_limits(self) -> None:
        done = len(self.st.candidates)
        if done >= self.cfg.max_candidates:
            raise StopLoop(f"candidate limit reached ({done} of {self.cfg.max_candidates})")
        if self.cfg.hours is not None and time.time() - self.started_at >= self.cfg.hours * 3600:
            raise StopLoop(f"time limit reached ({self.cfg.hours:g} h)")
        if self.spent() >= self.cfg.budget_usd * (1 - self.cfg.test_reserve):
            raise StopLoop(f"budget spent (${self.spent():.4f} of ${self.cfg.budget_usd:.2f}, "
                           f"{self.cfg.test_reserve:.0%} kept for the test split)")

    def candidate(self, n: int) -> None:
        """Propose, gate, commit and journal candidate ``n``; any failure in it is a rejected candidate."""
        base_n, base_sha, base_val_dir = self.st.current_base
        record(self.run_dir, "candidate_started", n=n, base_sha=base_sha)
        cdir = self.run_dir / "candidates" / str(n)
        _clear_candidate_dir(cdir)
        self.show(f"candidate {n}: proposing")
        wt = self.snap.add_worktree(f"cand-{n}", base_sha)
        problems: list[str] = []
        stop: str | None = None
        stats = None
        proposal = None
        try:
            try:
                proposal = self.proposer.propose(self.context(n, wt, cdir, base_sha))
            except BudgetExhausted as e:
                problems.append(f"budget exhausted while proposing: {e}")
                stop = None if getattr(e, "reason", None) in ("turns", "tokens", "usd", "time") else f"budget: {e}"
                self._save_meta(cdir, getattr(e, "meta", {}))
            except Exception as e:  # noqa: BLE001 - a crashing proposer costs this candidate, not the run
                problems.append(f"proposer crashed: {type(e).__name__}: {e}")
                atomic_write_text(cdir / "error.txt", traceback.format_exc())
            if proposal is None and not problems:
                shutil.rmtree(cdir, ignore_errors=True)
                record(self.run_dir, "candidate_abandoned", n=n, reason="out of ideas")
                raise StopLoop("the proposer is out of ideas")
            diff = self.snap.diff(wt, base_sha)
            changed = self.snap.changed_files(wt, base_sha)
            atomic_write_text(cdir / "diff.patch", diff)
            rationale = proposal.rationale if proposal else ""
            atomic_write_text(cdir / "rationale.md", rationale + "\n")
            if proposal is not None:
                self._save_meta(cdir, {"rung": proposal.rung, **proposal.meta})
            static = [] if problems else self.static_checks(wt, diff, changed, base_sha)
            if not problems and not static and changed:
                try:
                    stats = self.gate_val(n, wt, diff, base_sha, base_val_dir)
                except BudgetExhausted as e:
                    problems.append(str(e))
                    stop = f"budget: {e}"
            verdict = gate.decide(n, changed=changed, static_reasons=static, stats=stats,
                                  gates=self.manifest.gates, extra_reasons=problems)
            verdict.write(cdir / "verdict.json")
            sha, ref = self.keep(n, wt, verdict, rationale) if changed else (None, None)
            self._history(n, cdir, verdict)
            record(self.run_dir, "candidate_done", n=n, accepted=verdict.accepted, sha=sha, ref=ref,
                   reasons=verdict.reasons, rationale=rationale[:4000],
                   val_dir=f"candidates/{n}/evals/val" if stats else None,
                   val_score=stats["cand_mean"] if stats else None, delta=stats["delta"] if stats else None)
            self.st = replay(self.run_dir)
            self.log(f"candidate {n}: {'[green]accepted[/]' if verdict.accepted else '[red]rejected[/]'}"
                     + (f" (val {stats['cand_mean']:.3f}, delta {stats['delta']:+.3f})" if stats else "")
                     + ("" if verdict.accepted else f": {'; '.join(verdict.reasons)[:300]}"))
        finally:
            self.snap.remove_worktree(wt)
        if stop:
            raise StopLoop(stop)
        if self.st.best is not None and self.st.best.n == n:
            from .diagnose import diagnose_eval_dir

            self.diagnosis = self._base_diagnosis(diagnose_eval_dir)

    def static_checks(self, wt: Path, diff: str, changed: list[str], base_sha: str) -> list[str]:
        from .metrics import metric_fingerprint
        from .sandbox.worktrees import _git

        def base_text(path: str) -> str:
            try:
                return _git(self.snap.repo, "show", f"{base_sha}:{path}")
            except Exception:  # noqa: BLE001 - a new or binary file has no base text
                return ""

        if not hasattr(self, "_sealed"):
            self._sealed = gate.Sealed.from_splits(self.frozen.splits())
            self._metric_lines = metric_fingerprint(self.manifest.metric, self.frozen.dir)
        return gate.check_diff(diff=diff, changed=changed, worktree=wt, target_subdir=self.snap.target_subdir,
                               editable=self.manifest.editable, protected=self.manifest.all_protected(),
                               sealed=self._sealed, base_text=base_text, metric_lines=self._metric_lines)

    def gate_val(self, n: int, wt: Path, diff: str, base_sha: str, base_val_dir: str) -> dict[str, Any]:
        """Candidate vs base on the same val examples, ``gates.repeats`` times each."""
        reps = self.manifest.gates.repeats
        cand_runs, base_runs = [], [list(read_jsonl(self.run_dir / base_val_dir / "scored.jsonl"))]
        for r in range(reps):
            suffix = "" if r == 0 else f"-r{r + 1}"
            self.show(f"candidate {n}: val{suffix}")
            cand_runs.append(self.evaluate(f"cand-{n}-val{suffix}", f"candidates/{n}/evals/val{suffix}", base_sha,
                                           "val", worktree=wt, diff=diff))
            if r > 0:
                base_runs.append(self.evaluate(f"cand-{n}-base-val{suffix}", f"candidates/{n}/evals/base-val{suffix}",
                                               base_sha, "val"))
        stats = gate.compare(gate.average_repeats(base_runs), gate.average_repeats(cand_runs),
                             self.manifest.gates, seed=self.cfg.seed + n)
        died = [f"the candidate's evaluation failed: {why}" for rel, why in self.failures.items()
                if rel.startswith(f"candidates/{n}/evals/")]
        stats["reasons"] = died + stats["reasons"]
        return stats

    def keep(self, n: int, wt: Path, verdict: gate.Verdict, rationale: str) -> tuple[str, str]:
        """Commit the candidate; an accepted one gets its branch and moves best, a rejected one a ref."""
        s = verdict.stats or {}
        head = rationale.strip().splitlines()[0][:72] if rationale.strip() else "candidate"
        body = (f"{rationale.strip()}\n\nval {s.get('base_mean', 0):.4f} -> {s.get('cand_mean', 0):.4f} "
                f"(delta {s.get('delta', 0):+.4f})" if s else rationale.strip())
        if not verdict.accepted:
            body += "\n\nrejected:\n" + "\n".join(f"- {r}" for r in verdict.reasons)
        sha = self.snap.commit(wt, f"pipemend {self.cfg.run_id} cand-{n}: {head}\n\n{body}\n")
        if verdict.accepted:
            self.snap.set_branch(self._branch(n), sha)
            self.snap.set_branch(self._branch("best"), sha)
            return sha, f"refs/heads/{self._branch(n)}"
        self.snap.set_ref(self._rejected_ref(n), sha)
        return sha, self._rejected_ref(n)

    # ------------------------------------------------------------------ what the proposer gets

    def context(self, n: int, wt: Path, cdir: Path, base_sha: str) -> Any:
        from .diagnose import diagnose_eval_dir
        from .proposers import ProposerBudget
        from .proposers.tools import ProposerTools
        from .protocols import ProposalContext

        train = self.splits["train"]
        by_id = {ex.id: ex for ex in train}
        runs: list[tuple[Path, list[Example]]] = []
        base_n, _, _ = self.st.current_base
        base_train = self.run_dir / ("evals/baseline-train" if base_n == 0 else f"candidates/{base_n}/evals/train")

        def run_train(ids: list[str] | None) -> list[dict[str, Any]]:
            unknown = [i for i in ids or [] if i not in by_id]
            if unknown:
                raise UsageError(f"not train example ids: {', '.join(unknown[:5])}")
            exs = train if ids is None else [by_id[i] for i in ids]
            k = len(runs) + 1
            rows = self.evaluate(f"cand-{n}-train-{k}", f"candidates/{n}/train/{k}", base_sha, "train",
                                 worktree=wt, diff=self.snap.diff(wt, base_sha), examples=exs, writable=True)
            runs.append((self.run_dir / f"candidates/{n}/train/{k}", exs))
            return rows

        def read_trace(example_id: str) -> dict[str, Any] | None:
            if example_id not in by_id:
                return None
            for d in [r for r, _ in reversed(runs)] + [base_train]:
                path = d / "traces" / f"{example_id}.json"
                if path.is_file():
                    return read_json(path)
            return None

        def diagnose() -> dict[str, Any]:
            if not runs:
                return self.diagnosis
            d, exs = runs[-1]
            return diagnose_eval_dir(d, exs).to_json()

        tools = ProposerTools(worktree=wt, target_subdir=self.snap.target_subdir, editable=self.manifest.editable,
                              protected=self.manifest.all_protected(), run_train=run_train, read_trace=read_trace,
                              diagnose=diagnose, diff=lambda: self.snap.diff(wt, base_sha),
                              tool_timeout_s=self.cfg.per_tool_timeout_s)
        budget = ProposerBudget(max_turns=self.cfg.max_turns, max_agent_usd=self.cfg.max_agent_usd,
                                per_tool_timeout_s=self.cfg.per_tool_timeout_s)
        history = []
        for _, c in sorted(self.st.candidates.items()):
            meta = _read_optional(self.run_dir / "candidates" / str(c.n) / "proposal.json") or {}
            meta.pop("format", None)
            history.append({"n": c.n, "accepted": c.accepted, "rationale": c.rationale, "rung": meta.pop("rung", None),
                            "meta": meta, "verdict": _read_optional(self.run_dir / "history" / str(c.n) / "verdict.json")})
        return ProposalContext(candidate_index=n, worktree=wt, target_subdir=self.snap.target_subdir,
                               manifest=self.manifest, diagnosis=self.diagnosis, history=history,
                               history_dir=self.run_dir / "history", tools=tools, budget=budget,
                               train_examples=[ex.model_dump() for ex in train], log=self.log)

    def _history(self, n: int, cdir: Path, verdict: gate.Verdict) -> None:
        """``RUN_DIR/history/<n>``: what later proposers may read (val as aggregates only)."""
        h = self.run_dir / "history" / str(n)
        h.mkdir(parents=True, exist_ok=True)
        for name in ("diff.patch", "rationale.md"):
            if (cdir / name).is_file():
                shutil.copyfile(cdir / name, h / name)
        atomic_write_json(h / "verdict.json", verdict.aggregates())
        train_runs = sorted((cdir / "train").glob("*/traces"), key=lambda p: int(p.parent.name))
        if train_runs:
            shutil.copytree(train_runs[-1], h / "train_traces", dirs_exist_ok=True)

    def _save_meta(self, cdir: Path, meta: dict[str, Any]) -> None:
        meta = dict(meta)
        transcript = meta.pop("transcript", None)
        if isinstance(transcript, list):
            atomic_write_text(cdir / "transcript.jsonl",
                              "".join(__import__("json").dumps(t, default=str) + "\n" for t in transcript))
        atomic_write_json(cdir / "proposal.json", {"format": "pipemend-proposal-1", **meta})

    # ------------------------------------------------------------------ the end

    def final_test(self) -> None:
        if self.st.test is not None:
            return
        best = self.st.best
        out: dict[str, Any] = {"baseline": None, "best": None}
        try:
            self.show("test split: baseline")
            out["baseline"] = _mean_score(self.evaluate("baseline-test", "evals/baseline-test", self.st.base_sha, "test"))
            if best is not None:
                self.show(f"test split: candidate {best.n}")
                out["best"] = _mean_score(self.evaluate("best-test", f"candidates/{best.n}/evals/test", best.sha, "test"))
        except BudgetExhausted as e:
            out["error"] = str(e)
        record(self.run_dir, "test_done", **out)
        self.st = replay(self.run_dir)

    def summary(self) -> OptimizeSummary:
        st = self.st
        best = st.best
        stats = self.gateway_stats()
        base = st.baseline or {}
        test = st.test or {}
        return OptimizeSummary(
            run_id=self.cfg.run_id or self.run_dir.name, run_dir=str(self.run_dir), status=st.status,
            stop_reason=st.stop_reason,
            baseline={"train": base.get("train_score"), "val": base.get("val_score"), "test": test.get("baseline")},
            best=None if best is None else {"n": best.n, "branch": self._branch(best.n), "sha": best.sha,
                                            "val": best.val_score, "test": test.get("best")},
            candidates=[CandidateSummary(n=c.n, accepted=c.accepted, val_score=c.val_score, delta=c.delta,
                                         reasons=c.reasons, rationale=c.rationale, ref=c.ref)
                        for _, c in sorted(st.candidates.items())],
            spent_usd=stats["spent_usd"], llm_calls=stats["calls"], cache_hits=stats["cache_hits"],
            wall_s=time.time() - self.started_at,
        )

    def print_summary(self, s: OptimizeSummary) -> None:
        t = Table(title=f"pipemend optimize {s.run_id}: {s.stop_reason}")
        for col in ("", "val", "test", "note"):
            t.add_column(col)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        t.add_row("baseline", fmt(s.baseline.get("val")), fmt(s.baseline.get("test")), "")
        for c in s.candidates:
            note = c.ref or "" if c.accepted else "; ".join(c.reasons)[:80]
            t.add_row(f"cand-{c.n} " + ("[green]accepted[/]" if c.accepted else "[red]rejected[/]"),
                      fmt(c.val_score), fmt(s.best["test"]) if s.best and s.best["n"] == c.n else "", note)
        self.console.print(t)
        self.console.print(f"spent ${s.spent_usd:.4f}, {s.llm_calls} LLM calls ({s.cache_hits} from cache), "
                           f"{s.wall_s:.0f} s; best: {s.best['branch'] if s.best else 'none accepted'}")
        ladder = self.ladder_change(s.best["n"] if s.best else None)
        if ladder:
            self.console.print(f"failures per rung on train, {'baseline → best' if s.best else 'baseline'}: {ladder}")

    def ladder_change(self, best_n: int | None) -> str | None:
        """``prompt 6 → 0, retrieval 3 → 3, ...`` from the baseline's and the best's train diagnoses."""
        try:
            before = read_json(self.run_dir / "diagnosis.json")["counts"]
            after = read_json(self.run_dir / "candidates" / str(best_n) / "diagnosis.json")["counts"] if best_n else None
        except (OSError, KeyError, ValueError):
            return None
        return ", ".join(f"{rung} {before.get(rung, 0)}" + (f" → {after.get(rung, 0)}" if after else "")
                         for rung in before)

    # ------------------------------------------------------------------ spend and progress

    def gateway_stats(self) -> dict[str, Any]:
        """Spend and call counts from the call log (valid with the gateway stopped, across resumes)."""
        if self.gateway is not None and self.gateway.service is not None:
            self.gateway.flush()
        spent, calls, hits, refused = 0.0, 0, 0, 0
        for row in read_jsonl(self.run_dir / "gateway" / "calls.jsonl"):
            if row.get("error"):
                refused += "budget exhausted" in str(row["error"].get("message", "") if isinstance(row["error"], dict) else row["error"])
                continue
            calls += 1
            hits += row.get("cache") == "hit"
            spent += float(row.get("cost_usd") or 0.0) if row.get("cache") != "hit" else 0.0
        self._spent = spent
        return {"spent_usd": spent, "calls": calls, "cache_hits": hits, "budget_refusals": refused}

    def spent(self) -> float:
        return self.gateway_stats()["spent_usd"]

    def show(self, what: str) -> None:
        if self._status is not None:
            best = self.st.best
            val = best.val_score if best else (self.st.baseline or {}).get("val_score")
            self._status.update(f"{what} · best val {val if val is None else f'{val:.3f}'} · "
                                f"spent ${self._spent:.4f}")

    def log(self, msg: str) -> None:
        self.console.log(msg)

    def _make_proposer(self, cache: Path) -> Any:
        """The proposer; an LLM proposer talks to its own gateway (``RUN_DIR/agent/``) so its calls are
        logged, cached (a resumed run pays for none twice) and counted apart from the pipeline's."""
        from .gateway import Gateway, GatewayConfig
        from .proposers import get_proposer

        options = _check_proposer(self.cfg)
        if self.cfg.proposer in LLM_PROPOSERS:
            self.agent_gateway = Gateway(GatewayConfig(run_dir=self.run_dir / "agent", cache_dir=cache)).start()
            options.setdefault("base_url", self.agent_gateway.url)
            options.setdefault("api_key", "pipemend-gateway")  # the real key stays in the agent gateway
            options.setdefault("transcript_dir", str(self.run_dir / "candidates" / "{candidate}"))
        return get_proposer(self.cfg.proposer, **options)

    def render_report(self) -> None:
        """Refresh report.html / report.md so a running job can be watched; a report fault never stops the run."""
        from .report import render_report

        try:
            render_report(self.run_dir)
        except Exception as e:  # noqa: BLE001
            self.log(f"[yellow]report not refreshed: {type(e).__name__}: {e}[/]")


def _clear_candidate_dir(cdir: Path) -> None:
    """A fresh candidate folder; finished evaluations of a redone candidate stay (reused when their key matches)."""
    cdir.mkdir(parents=True, exist_ok=True)
    for child in cdir.iterdir():
        if child.name in ("evals", "train"):
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _socket_path(run_dir: Path) -> Path:
    """The gateway's unix socket for isolated sandboxes (a short /tmp path when the run dir's is too long)."""
    path = run_dir / "gateway" / "gateway.sock"
    if len(str(path)) < 100:
        return path
    return Path("/tmp") / f"pipemend-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]}.sock"


def _check_proposer(cfg: OptimizeConfig) -> dict[str, Any]:
    """Build the proposer once to validate its name and options (a UsageError names what is wrong);
    returns the options to build it with."""
    from .proposers import get_proposer

    options = dict(cfg.proposer_options)
    if cfg.agent_model:
        if cfg.proposer not in LLM_PROPOSERS:
            raise UsageError(f"--agent-model is for an LLM proposer ({', '.join(LLM_PROPOSERS)}), not {cfg.proposer!r}")
        options.setdefault("model", cfg.agent_model)
    get_proposer(cfg.proposer, **options)
    return options


def _read_optional(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _mean_score(rows: list[dict[str, Any]]) -> float:
    return sum(float(r.get("score") or 0.0) for r in rows) / len(rows) if rows else 0.0

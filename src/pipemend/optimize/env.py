"""``RunEnv``: what every step of an optimize run shares, built once when the run starts or resumes.

Opening it freezes the target (manifest, data, metric) and snapshots it into git
the first time (each journaled), restores every journaled branch and ref, starts
the gateway (and an agent-side one for an LLM proposer), picks the sandbox and
builds the proposer. ``evaluate`` is the run's one way to evaluate: a finished
identical evaluation is read back from disk (``evaluate.reuse``), a gateway
budget refusal during it is a ``BudgetExhausted``.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from ..dataset import Example, FrozenTarget, freeze_target, limit_splits
from ..errors import BudgetExhausted
from .. import gate
from ..evaluate import EvalContext, EvalKey, evaluate, gateway_socket_path, remember, reuse
from ..fsutil import atomic_write_json, read_json, read_jsonl
from ..globs import matches_any
from ..gateway import Gateway, GatewayConfig
from ..journal import RunState, record, replay
from ..manifest import Manifest, load_manifest
from ..judges.client import JUDGE_DIR, JudgeClient
from ..judges.prompts import FROZEN_SUBDIR as JUDGES_SUBDIR
from ..metric_specs import fingerprint
from ..protocols import Progress, Proposer, RunObserver
from ..proposers import get_proposer
from ..report import render_report
from ..rundir import read_run
from ..executors import gateway_token, get_executor
from ..sandbox import get_sandbox
from ..sandbox.reap import reap
from ..sandbox.worktrees import Snapshot, snapshot_target
from .config import LLM_PROPOSERS, OptimizeConfig, proposer_options
from .observers import build_observers, notify


class RunEnv:
    """The run's fixed parts; every attribute is set here. ``open_env`` builds one from a run directory."""

    def __init__(self, *, run_dir: Path, cfg: OptimizeConfig, frozen: FrozenTarget, splits: dict[str, list[Example]],
                 snap: Snapshot, gateway: Gateway, agent_gateway: Gateway | None, ectx: EvalContext,
                 proposer: Proposer, progress: Progress, started_at: float, sealed: list[str],
                 observers: list[RunObserver] | None = None):
        self.run_dir = run_dir
        self.cfg = cfg
        self.run_id: str = cfg.run_id or run_dir.name
        self.frozen = frozen
        self.manifest: Manifest = frozen.manifest
        self.splits = splits
        self.snap = snap
        self.gateway = gateway
        self.agent_gateway = agent_gateway
        self.ectx = ectx
        self.proposer = proposer
        self.progress = progress
        self.started_at = started_at
        self.observers: list[RunObserver] = list(observers or [])
        """Outside tools following the run (``observers.py``): told after the baseline, each candidate, the end."""
        self.failures: dict[str, str] = {}
        """Evaluations whose sandbox or runner died (rel dir -> why); their examples scored 0."""
        self.spent_usd = 0.0
        """The pipeline's spend as last read from the call log (shown in the status line)."""
        self.best_val: float | None = None
        """The current base's val score (shown in the status line; ``track`` keeps it)."""
        sub = snap.target_subdir.strip("/")
        self.sealed = list(sealed)
        """Target-relative files nobody may read (labels and what they derive from), fixed at the run's start."""
        self.sealed_in_repo: list[str] = [f"{sub}/{p}" if sub else p for p in sealed]
        """The same, repo-relative: what candidate and evaluation worktrees are checked out without."""
        self.label_check = gate.Sealed.from_splits(frozen.splits())
        """The val/test answers and ids a candidate's diff must not add (all of each split, not ``--limit``'s)."""
        self.metric_lines = fingerprint(self.manifest.metric, frozen.dir, frozen.dir / JUDGES_SUBDIR)
        """The frozen metric's fingerprint lines (a judge's: its frozen prompt's), which a diff must not copy."""

    def is_editable(self, repo_path: str) -> bool:
        """May a candidate change this repo-relative path (inside the target, editable, not protected)?"""
        sub = self.snap.target_subdir.strip("/")
        if sub:
            if not repo_path.startswith(sub + "/"):
                return False
            repo_path = repo_path[len(sub) + 1:]
        return matches_any(repo_path, self.manifest.editable) and not matches_any(repo_path,
                                                                                self.manifest.all_protected())

    def worktree_of(self, name: str, sha: str) -> Path:
        """A clean checkout of exactly ``sha``, without the sealed files."""
        return self.snap.add_worktree(name, sha, without=self.sealed_in_repo)

    def close(self) -> None:
        if self.ectx.executor is not None:
            self.ectx.executor.close()
        for gw in (self.gateway, self.agent_gateway, self.ectx.judge and self.ectx.judge.gateway):
            if gw is not None:
                gw.stop()

    # ------------------------------------------------------------------ names and refs

    def branch(self, n: int | str) -> str:
        return branch_name(self.run_id, n)

    def rejected_ref(self, n: int) -> str:
        return rejected_ref_name(self.run_id, n)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, name: str, rel_dir: str, sha: str, split: str, *, worktree: Path | None = None,
                 diff: str = "", examples: list[Example] | None = None, writable: bool = False,
                 sample: int = 0) -> list[dict[str, Any]]:
        """Scored rows of ``split`` for the commit ``sha`` (+ ``diff``, in ``worktree`` when given, else a clean
        checkout of ``sha`` without the sealed files); a finished identical evaluation is read back (keyed by
        the commit's tree, so a redone candidate with the same files reuses it). ``sample``: the sample index of
        the pipeline's sampled model calls (0: the first look; a confirmation re-run asks for fresh ones). A dead
        sandbox is recorded in ``failures`` (its examples score 0); a budget refusal by the gateway raises ``BudgetExhausted``."""
        examples = self.splits[split] if examples is None else examples
        out = self.run_dir / rel_dir
        key = EvalKey.of(sha=self.snap.tree_of(sha), diff=diff, split=split, examples=examples,
                         model=self.ectx.model, sample=sample)
        rows = reuse(out, key)
        if rows is not None:
            return rows
        wt = self.worktree_of(f"eval-{out.name}", sha) if worktree is None else worktree
        refused_before = self.gateway_stats()["budget_refusals"], self.judge_refusals()
        try:
            res = evaluate(self.ectx, name=name, worktree=wt, target_subdir=self.snap.target_subdir, split=split,
                           examples=examples, out_dir=out, writable=writable, sample=sample,
                           progress=lambda done, total: self.show(f"{name}: {done}/{total}"))
        finally:
            if worktree is None:
                self.snap.remove_worktree(wt)
        if self.gateway_stats()["budget_refusals"] > refused_before[0]:
            raise BudgetExhausted(f"the gateway's ${self.cfg.budget_usd:.2f} budget ran out during {name}", reason="run")
        if self.judge_refusals() > refused_before[1]:
            raise BudgetExhausted(f"the judge's ${self.manifest.judge.budget_usd:.2f} budget (judge.budget_usd) ran out "
                                  f"during {name}", reason="run")
        if res.failed_systemically:
            o = res.outcome
            self.failures[rel_dir] = res.boundary.unrouted or o.error or (
                "timed out" if o.timed_out else f"runner exited {o.returncode}")
        else:
            remember(out, key)
        return res.rows

    # ------------------------------------------------------------------ spend and progress

    def notify(self, event: str, *args: Any) -> None:
        """Tell the observers (baseline_done, candidate_done n, run_done); their faults are warnings."""
        notify(self.observers, event, self.progress, self.run_dir, *args)

    def gateway_stats(self) -> dict[str, Any]:
        """Spend and call counts from the call log (valid with the gateway stopped, across resumes)."""
        if self.gateway.service is not None:
            self.gateway.flush()
        stats = call_log_stats(self.run_dir)
        self.spent_usd = stats["spent_usd"]
        return stats

    def judge_refusals(self) -> int:
        """Judgments the judge's gateway refused for its budget (``judge.budget_usd``), from its call log."""
        judge = self.ectx.judge
        if judge is None:
            return 0
        judge.gateway.flush()
        return call_log_stats(self.run_dir / JUDGE_DIR)["budget_refusals"]

    def track(self, st: RunState) -> RunState:
        """Note the journal's latest state for the status line; returns it."""
        self.best_val = st.best.val_score if st.best else (st.baseline or {}).get("val_score")
        return st

    def show(self, what: str) -> None:
        """The status line: what is happening, the best val score so far, the spend."""
        val = self.best_val
        self.progress.status(f"{what} · best val {val if val is None else f'{val:.3f}'} · spent ${self.spent_usd:.4f}")

    def render_report(self) -> None:
        """Refresh report.html / report.md so a running job can be watched; a report fault never stops the run."""
        try:
            render_report(self.run_dir)
        except Exception as e:  # noqa: BLE001
            self.progress.event("warning", text=f"report not refreshed: {type(e).__name__}: {e}")


def open_env(run_dir: Path, cfg: OptimizeConfig, progress: Progress) -> RunEnv:
    """Freeze and snapshot (once per run, journaled), restore refs, start the gateway(s), build the proposer.
    Gateways already started are stopped again if a later step fails."""
    st = replay(run_dir)
    if not st.frozen:
        shutil.rmtree(run_dir / "frozen", ignore_errors=True)
        manifest = load_manifest(cfg.target)
        freeze_target(cfg.target, manifest, run_dir)
        atomic_write_json(run_dir / SEALED_FILE, {"format": SEALED_FORMAT,
                                                  "paths": manifest.sealed_paths(Path(cfg.target))})
        record(run_dir, "frozen")
    frozen = FrozenTarget.open(run_dir)
    sealed = read_sealed(run_dir, frozen.manifest, Path(cfg.target))
    if st.snapshot is None:
        snap = snapshot_target(Path(cfg.target), cfg.run_id or run_dir.name, run_dir)
        record(run_dir, "snapshot", snapshot=snap.to_json(), base_sha=snap.resolve(snap.base_branch))
        st = replay(run_dir)
    reaped = reap(cfg.run_id or run_dir.name)  # containers, processes, scratch folders a killed driver left
    if reaped.total():
        progress.event("warning", text=f"{reaped.summary()} left by an earlier pipemend process of this run")
    snap = Snapshot.from_json(st.snapshot or {})
    snap.prune()
    restore_refs(snap, cfg.run_id or run_dir.name, st)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "gateway" / "cache"
    observers = build_observers(cfg, run_dir)  # before any gateway: a missing extra fails fast
    gateways: list[Gateway] = []
    try:
        model = cfg.model or frozen.manifest.llm.model
        gateway = Gateway(GatewayConfig(run_dir=run_dir, budget_usd=cfg.budget_usd, cache_dir=cache,
                                        socket_path=gateway_socket_path(run_dir), models=frozen.manifest.models(model),
                                        host=cfg.gateway_host, port=cfg.gateway_port,
                                        token=gateway_token(cfg.executor, cfg.gateway_host)))
        gateway.start()
        gateways.append(gateway)
        sandbox = get_sandbox(cfg.sandbox, announce=lambda msg: progress.event("announce", text=str(msg)))
        judge = None
        if frozen.manifest.judge_specs():
            # the judge metrics' own gateway (RUN_DIR/judge/): cached in the run's cache, logged and costed
            # apart from the pipeline (whose budget and spend it never touches)
            judge = JudgeClient.start(run_dir, frozen.manifest.judge_model(), cache_dir=cache,
                                      concurrency=frozen.manifest.runner.concurrency,
                                      budget_usd=frozen.manifest.judge.budget_usd)
            gateways.append(judge.gateway)
        ectx = EvalContext(run_dir, frozen, sandbox, gateway, model, sealed=sealed, judge=judge,
                           executor=get_executor(cfg.executor, sandbox, sandbox_kind=cfg.sandbox,
                                                 ray_address=cfg.ray_address, ray_task_cpus=cfg.ray_task_cpus,
                                                 announce=lambda msg: progress.event("announce", text=str(msg))))
        options = proposer_options(cfg)
        agent_gateway = None
        if cfg.proposer in LLM_PROPOSERS:
            # its own gateway (RUN_DIR/agent/): the agent's calls are logged, cached (a resumed run pays for
            # none twice) and counted apart from the pipeline's; the real key stays in the gateway
            agent_model = get_proposer(cfg.proposer, **options).config.model  # its own default when not given
            agent_gateway = Gateway(GatewayConfig(run_dir=run_dir / "agent", cache_dir=cache,
                                                  models=[agent_model])).start()
            gateways.append(agent_gateway)
            options.setdefault("base_url", agent_gateway.url)
            options.setdefault("api_key", "pipemend-gateway")
            options.setdefault("transcript_dir", str(run_dir / "candidates" / "{candidate}"))
        proposer = get_proposer(cfg.proposer, guard=[run_dir, Path(cfg.target)], **options)
    except BaseException:
        for gw in gateways:
            gw.stop()
        raise
    return RunEnv(run_dir=run_dir, cfg=cfg, frozen=frozen, splits=limit_splits(frozen.splits(), cfg.limit),
                  snap=snap, gateway=gateway, agent_gateway=agent_gateway, ectx=ectx, proposer=proposer,
                  progress=progress, started_at=float(read_run(run_dir).get("started_at") or time.time()),
                  sealed=sealed, observers=observers)


SEALED_FILE = "frozen/sealed.json"
SEALED_FORMAT = "pipemend-sealed-1"


def read_sealed(run_dir: Path, manifest: Manifest, target: Path) -> list[str]:
    """The run's sealed files (target-relative), as listed when the target was frozen; a run frozen before
    the list existed computes it from the target now."""
    path = run_dir / SEALED_FILE
    if path.is_file():
        data = read_json(path)
        if isinstance(data, dict) and data.get("format") == SEALED_FORMAT and isinstance(data.get("paths"), list):
            return [str(p) for p in data["paths"]]
    return manifest.sealed_paths(target)


def restore_refs(snap: Snapshot, run_id: str, st: RunState) -> None:
    """Make the run's candidate refs say exactly what the journal says.

    Every journaled branch and ref is set again from its sha (a kill may have come before a ref moved).
    A ``cand-N`` branch, ``rejected/N`` ref or ``best`` the journal does not back -- set for a candidate whose
    kill came after its commit but before its ``candidate_done``, which the resumed run redoes, perhaps to a
    different verdict -- is removed, so no branch ever names a candidate that was finally rejected.
    """
    wanted: dict[str, str] = {}
    for c in st.candidates.values():
        if c.sha:
            wanted[f"refs/heads/{branch_name(run_id, c.n)}" if c.accepted else rejected_ref_name(run_id, c.n)] = c.sha
    if st.best is not None and st.best.sha:
        wanted[f"refs/heads/{branch_name(run_id, 'best')}"] = st.best.sha
    ours = re.compile(rf"^refs/heads/pipemend/{re.escape(run_id)}/(cand-\d+|best)$|"
                      rf"^refs/pipemend/{re.escape(run_id)}/rejected/\d+$")
    for prefix in (f"refs/heads/pipemend/{run_id}/", f"refs/pipemend/{run_id}/rejected/"):
        for ref, sha in snap.refs(prefix).items():
            if ours.match(ref) and wanted.get(ref) != sha:
                snap.delete_ref(ref)
    for ref, sha in wanted.items():
        snap.set_ref(ref, sha)


def branch_name(run_id: str, n: int | str) -> str:
    """``pipemend/<run>/cand-<n>``, or ``pipemend/<run>/best``."""
    return f"pipemend/{run_id}/{'best' if n == 'best' else f'cand-{n}'}"


def rejected_ref_name(run_id: str, n: int) -> str:
    """``refs/pipemend/<run>/rejected/<n>``: a rejected candidate's commit (not a branch)."""
    return f"refs/pipemend/{run_id}/rejected/{n}"


def call_log_stats(run_dir: Path) -> dict[str, Any]:
    """The pipeline's spend, calls, cache hits and budget refusals, from ``RUN_DIR/gateway/calls.jsonl``."""
    spent, calls, hits, refused = 0.0, 0, 0, 0
    for row in read_jsonl(run_dir / "gateway" / "calls.jsonl"):
        if row.get("error"):
            err = row["error"]
            refused += "budget exhausted" in str(err.get("message", "") if isinstance(err, dict) else err)
            continue
        calls += 1
        hits += row.get("cache") == "hit"
        spent += float(row.get("cost_usd") or 0.0) if row.get("cache") != "hit" else 0.0
    return {"spent_usd": spent, "calls": calls, "cache_hits": hits, "budget_refusals": refused}

"""The one choke point that runs a split in a sandbox and scores it.

``evaluate`` seals the examples (id and inputs only cross into the sandbox,
and the sandbox masks the target's data and metric files: ``SandboxJob.hidden``),
runs the runner through the sandbox, then scores on the host with the labels
and metric of the run's frozen copy, whatever the caller handed in. Nothing
else in pipemend scores. A dead sandbox is data: the examples it did not
finish score 0; ``evaluate`` itself does not raise for it.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .dataset import Example, FrozenTarget
from .errors import UsageError
from .fsutil import atomic_write_json, atomic_write_text
from .protocols import Sandbox, SandboxJob, SandboxOutcome

OUTCOME_FORMAT = "pipemend-outcome-1"
POLL_S = 0.25
WALL_SLACK_S = 300.0


@dataclass
class EvalContext:
    """What every evaluation of a run shares."""

    run_dir: Path
    frozen: FrozenTarget
    sandbox: Sandbox
    gateway: Any
    """``pipemend.gateway.Gateway`` (or anything with ``.url`` and ``.socket_path``)."""
    model: str
    """``PIPEMEND_MODEL`` for the pipeline."""


@dataclass
class EvalResult:
    name: str
    split: str
    out_dir: Path
    rows: list[dict[str, Any]]
    """``scored.jsonl`` rows, in example order."""
    summary: dict[str, Any]
    """``summary.json`` (AGENTS.md shape)."""
    outcome: SandboxOutcome

    @property
    def score(self) -> float:
        return float(self.summary.get("score", 0.0))

    @property
    def failed_systemically(self) -> bool:
        """The sandbox or runner died (as opposed to examples failing one by one)."""
        o = self.outcome
        return bool(o.error) or o.timed_out or o.returncode != 0


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def _wall_timeout(n: int, concurrency: int, example_timeout_s: float) -> float:
    return math.ceil(max(n, 1) / max(concurrency, 1)) * example_timeout_s + WALL_SLACK_S


def _hidden(manifest: Any, target_dir: Path, run_dir: Path) -> list[str]:
    """Target-relative paths no pipeline may read (the label seal, ``SandboxJob.hidden``).

    The data files (labels and evidence for every split) and a custom metric
    file; the target's own git history when the target folder is a repository's
    root (its objects hold the data too); and the folder of pipemend's run
    directories (frozen data, scores) when it lies inside the target folder.
    """
    from .dataset import frozen_files
    from .manifest import MANIFEST_NAME

    hidden = [f for f in frozen_files(manifest) if f != MANIFEST_NAME]
    if (target_dir / ".git").is_dir():
        hidden.append(".git")
    target, run_dir = target_dir.resolve(), run_dir.resolve()
    if target in run_dir.parents:
        runs = run_dir.parent if run_dir.parent != target else run_dir
        hidden.append(runs.relative_to(target).as_posix())
    return hidden


def _run_sandbox(sandbox: Sandbox, job: SandboxJob, total: int, progress: Callable[[int, int], None] | None) -> SandboxOutcome:
    """Run the sandbox in a thread, polling ``results.jsonl`` for progress; never raises."""
    box: dict[str, SandboxOutcome] = {}

    def target() -> None:
        try:
            box["outcome"] = sandbox.run(job)
        except BaseException as e:  # noqa: BLE001 - a dead sandbox is data, not a dead run
            box["outcome"] = SandboxOutcome(sandbox=getattr(sandbox, "name", "?"), returncode=None,
                                            error=f"sandbox raised {type(e).__name__}: {e}")

    thread = threading.Thread(target=target, name="pipemend-sandbox", daemon=True)
    thread.start()
    results = job.out_dir / "results.jsonl"
    last = -1
    while thread.is_alive():
        thread.join(POLL_S)
        if progress is not None:
            done = min(_count_lines(results), total)
            if done != last:
                progress(done, total)
                last = done
    if progress is not None:
        progress(min(_count_lines(results), total), total)
    return box["outcome"]


def evaluate(
    ctx: EvalContext,
    *,
    name: str,
    worktree: Path,
    target_subdir: str,
    split: str,
    examples: list[Example],
    out_dir: Path,
    writable: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Run ``examples`` of the pipeline in ``worktree/target_subdir`` and score them with the frozen labels.

    Writes ``out_dir/inputs.jsonl`` (sealed rows), lets the runner write
    ``results.jsonl`` and ``traces/``, then ``scored.jsonl``, ``summary.json``
    and ``outcome.json`` (how the sandbox ended).
    """
    from .scoring import score_results, write_eval

    frozen_by_id = ctx.frozen.examples_by_id()
    unknown = [ex.id for ex in examples if ex.id not in frozen_by_id]
    if unknown:
        raise UsageError(f"evaluate {name}: ids not in the run's frozen data: {', '.join(unknown[:5])}")
    labelled = [frozen_by_id[ex.id] for ex in examples]  # labels come from the frozen copy only

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.jsonl").unlink(missing_ok=True)  # a stale file would fake progress and results
    inputs_file = out_dir / "inputs.jsonl"
    atomic_write_text(inputs_file, "".join(json.dumps(ex.sealed(), ensure_ascii=False) + "\n" for ex in labelled))

    manifest = ctx.frozen.manifest
    worktree = Path(worktree).resolve()
    target_dir = worktree / target_subdir if target_subdir else worktree
    job = SandboxJob(
        worktree=worktree,
        target_subdir=target_subdir,
        entrypoint=manifest.entrypoint,
        inputs_file=inputs_file,
        out_dir=out_dir,
        gateway_url=ctx.gateway.url,
        gateway_socket=getattr(ctx.gateway, "socket_path", None),
        model=ctx.model,
        concurrency=manifest.runner.concurrency,
        example_timeout_s=manifest.runner.example_timeout_s,
        wall_timeout_s=_wall_timeout(len(labelled), manifest.runner.concurrency, manifest.runner.example_timeout_s),
        writable=writable,
        requirements=(target_dir / manifest.requirements) if manifest.requirements else None,
        hidden=_hidden(manifest, target_dir, Path(ctx.run_dir)),
    )
    outcome = _run_sandbox(ctx.sandbox, job, len(labelled), progress) if labelled else SandboxOutcome(
        sandbox=getattr(ctx.sandbox, "name", "?"), returncode=0)

    rows, summary = score_results(
        out_dir / "results.jsonl", labelled, ctx.frozen.metric(), split=split,
        call_log=Path(ctx.run_dir) / "gateway" / "calls.jsonl", traces_dir=out_dir / "traces",
    )
    write_eval(out_dir, rows, summary)
    atomic_write_json(out_dir / "outcome.json", {
        "format": OUTCOME_FORMAT, "name": name, "split": split, "sandbox": outcome.sandbox,
        "returncode": outcome.returncode, "timed_out": outcome.timed_out, "error": outcome.error,
        "startup_s": outcome.startup_s, "wall_s": outcome.wall_s,
        "stdout_tail": outcome.stdout_tail[-4000:], "stderr_tail": outcome.stderr_tail[-4000:],
    })
    return EvalResult(name=name, split=split, out_dir=out_dir, rows=rows, summary=summary, outcome=outcome)

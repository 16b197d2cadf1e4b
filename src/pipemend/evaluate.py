"""The one choke point that runs a split in a sandbox and scores it, and the ``eval`` flow.

``evaluate`` seals the examples (id and inputs only cross into the sandbox,
and the sandbox masks the target's data and metric files: ``SandboxJob.hidden``),
runs the runner through the sandbox, then scores on the host with the labels
and metric of the run's frozen copy, whatever the caller handed in. Nothing
else in pipemend scores. A dead sandbox is data: the examples it did not
finish score 0; ``evaluate`` itself does not raise for it.

``EvalKey`` / ``reuse`` / ``remember``: a finished evaluation is read back
from disk when its key (commit, diff, split, example ids, model) matches, so a
resumed run pays for nothing twice. ``run_eval`` is ``pipemend eval``: freeze,
gateway, evaluate the splits, diagnose; the CLI only presents its result.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .boundary import Boundary, inspect
from .dataset import Example, FrozenTarget, freeze_target, frozen_files, limit_splits, load_splits
from .diagnose import Diagnosis, LadderThresholds, diagnose_run, primary_split
from .errors import UsageError
from .executors.base import TaskOutput, task_timeout
from .executors import DEFAULT_TASK_CPUS, check_executor, check_task_cpus, gateway_token, get_executor
from .executors.local import LocalExecutor
from .fsutil import append_jsonl_many, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_jsonl
from .gateway import Gateway, GatewayConfig
from .judges.client import JudgeClient
from .manifest import MANIFEST_NAME, load_manifest
from .protocols import Executor, ExecutorBatch, NullProgress, Progress, Sandbox, SandboxJob, SandboxOutcome
from .rundir import create_run_dir, finish_run, journal, new_run_id
from .runtime.sampling import MAX_SAMPLE_INDEX, SAMPLE_ENV
from .sandbox import get_sandbox
from .sandbox.ingest import trace_name
from .scoring import score_results, write_eval

OUTCOME_FORMAT = "pipemend-outcome-1"
POLL_S = 0.25


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
    sealed: list[str] = field(default_factory=list)
    """Target-relative files the pipeline must never read (``Manifest.sealed_paths``, fixed when the run began)."""
    judge: JudgeClient | None = None
    """The run's judge (its own gateway, ``RUN_DIR/judge/``) when the metric has ``judge:*`` parts."""
    executor: Executor | None = None
    """Where the sandbox jobs run (``pipemend.executors``); None: ``LocalExecutor(sandbox)``, one task per batch."""

    def __post_init__(self) -> None:
        if self.executor is None:
            self.executor = LocalExecutor(self.sandbox)


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
    boundary: Boundary = field(default_factory=Boundary)
    """Model calls around the gateway (``unrouted``) and warnings about refused hosts and unattributed calls."""

    @property
    def score(self) -> float:
        return float(self.summary.get("score", 0.0))

    @property
    def failed_systemically(self) -> bool:
        """The sandbox or runner died (as opposed to examples failing one by one)."""
        o = self.outcome
        return bool(o.error) or o.timed_out or o.returncode != 0


def hidden_paths(manifest: Any, target_dir: Path, run_dir: Path, sealed: Sequence[str]) -> list[str]:
    """Target-relative paths no pipeline may read (the label seal, ``SandboxJob.hidden``).

    The sealed files (the data files with labels and evidence for every split,
    a custom metric, generators, the evidence corpus unless declared ``runtime``:
    ``Manifest.sealed_paths``); the target's own git
    history when the target folder is a repository's root (its objects hold the
    data too); and the folder of pipemend's run directories (frozen data,
    scores) when it lies inside the target folder.
    """
    readable = {MANIFEST_NAME, manifest.dataset.corpus} - set(sealed)  # a corpus declared `runtime` is not sealed
    hidden = sorted({f for f in [*frozen_files(manifest), *sealed] if f not in readable})
    if (target_dir / ".git").is_dir():
        hidden.append(".git")
    target, run_dir = target_dir.resolve(), run_dir.resolve()
    if target in run_dir.parents:
        runs = run_dir.parent if run_dir.parent != target else run_dir
        hidden.append(runs.relative_to(target).as_posix())
    return hidden


def _run_job(executor: Executor, job: SandboxJob, *, candidate: str, total: int,
             progress: Callable[[int, int], None] | None) -> SandboxOutcome:
    """Run ``job`` through ``executor``; what its tasks bring back is written into ``job.out_dir`` as it comes
    (``results.jsonl`` rows, ``traces/<id>.json``; then one ``runner.json`` and ``egress.json``). Never raises
    for a dead sandbox or task: that is the outcome."""
    try:
        batch = executor.submit(job, candidate=candidate)
    except Exception as e:  # noqa: BLE001 - an executor that cannot start the job is a dead sandbox
        return SandboxOutcome(sandbox=getattr(executor, "name", "?"), returncode=None,
                              error=f"executor {getattr(executor, 'name', '?')} raised {type(e).__name__}: {e}")
    try:
        _collect(batch, job.out_dir, total, progress)
    finally:
        if not batch.done:
            batch.cancel()
    outputs = getattr(batch, "outputs", lambda: [])()
    _write_task_files(job.out_dir, outputs)
    return batch.outcome()


def _collect(batch: ExecutorBatch, out_dir: Path, total: int, progress: Callable[[int, int], None] | None) -> None:
    last = -1
    while not batch.done:
        got = batch.wait(POLL_S)
        rows = [r.row for r in got if r.row is not None]
        if rows:
            append_jsonl_many(out_dir / "results.jsonl", rows)
        for r in got:
            name = trace_name(r.example_id)
            if r.trace is not None and name is not None:
                atomic_write_bytes(out_dir / "traces" / name, r.trace)
        if progress is not None:
            done = min(batch.finished(), total)
            if done != last:
                progress(done, total)
                last = done
    if progress is not None:
        progress(min(batch.finished(), total), total)


def _write_task_files(out_dir: Path, outputs: list[TaskOutput]) -> None:
    """``runner.json`` and ``egress.json`` of the batch: one task's as it wrote them; of several, the start-up
    times summed (each task paid its own) and the egress report that names an unrouted call, else the first."""
    runners = [o.runner_json for o in outputs if o.runner_json is not None]
    if len(runners) == 1:
        atomic_write_bytes(out_dir / "runner.json", runners[0])
    elif runners:
        parsed = [p for p in (_json_object(b) for b in runners) if p]
        if parsed:
            merged = {**parsed[0], "startup_s": sum(_number(p.get("startup_s")) for p in parsed)}
            atomic_write_json(out_dir / "runner.json", merged)
    egress = [o.egress_json for o in outputs if o.egress_json is not None]
    if egress:
        unrouted = [b for b in egress if (_json_object(b) or {}).get("unrouted")]
        atomic_write_bytes(out_dir / "egress.json", (unrouted or egress)[0])


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0.0


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
    sample: int = 0,
) -> EvalResult:
    """Run ``examples`` of the pipeline in ``worktree/target_subdir`` and score them with the frozen labels.

    ``sample`` is the evaluation's sample index (``$PIPEMEND_SAMPLE``, ``runtime/sampling.py``): the
    pipeline's sampled model calls get the same draws at the same index (a re-run pays nothing twice,
    base and candidate share them) and fresh ones at another (confirmation re-runs).

    Writes ``out_dir/inputs.jsonl`` (sealed rows), lets the runner write
    ``results.jsonl`` and ``traces/``, then ``scored.jsonl``, ``summary.json``
    and ``outcome.json`` (how the sandbox ended).
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample <= MAX_SAMPLE_INDEX:
        raise UsageError(f"evaluate {name}: sample {sample!r}: expected an integer from 0 to {MAX_SAMPLE_INDEX}")
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
    token = uuid.uuid4().hex
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
        wall_timeout_s=task_timeout(len(labelled), manifest.runner.concurrency, manifest.runner.example_timeout_s),
        writable=writable,
        requirements=(target_dir / manifest.requirements) if manifest.requirements else None,
        hidden=hidden_paths(manifest, target_dir, Path(ctx.run_dir), ctx.sealed),
        env={"PIPEMEND_EVAL": token, SAMPLE_ENV: str(sample)},
    )
    t0 = time.time()
    for stale in ("runner.json", "egress.json"):
        (out_dir / stale).unlink(missing_ok=True)
    for ex in labelled:  # a stale trace would pass for this run's
        if trace_name(ex.id) is not None:
            (out_dir / "traces" / trace_name(ex.id)).unlink(missing_ok=True)
    # a writable job (a proposer's train run) writes into the worktree on this machine: never shipped away
    executor = LocalExecutor(ctx.sandbox) if writable or ctx.executor is None else ctx.executor
    outcome = _run_job(executor, job, candidate=name, total=len(labelled), progress=progress) if labelled else \
        SandboxOutcome(sandbox=getattr(ctx.sandbox, "name", "?"), returncode=0)
    window = (t0, time.time())
    if hasattr(ctx.gateway, "flush") and getattr(ctx.gateway, "service", None) is not None:
        ctx.gateway.flush()  # every call of this evaluation is in the log before it is charged

    # calls tagged with this evaluation's token (or, untagged, made inside its window) that no example
    # accounts for -- model calls at import time, say -- are charged to it, as is the pipeline's start-up;
    # the trace of a pipeline that marks no steps gets its model calls as generation steps (trace_join)
    rows, summary = score_results(
        out_dir / "results.jsonl", labelled, ctx.frozen.metric(judge=ctx.judge), split=split,
        call_log=Path(ctx.run_dir) / "gateway" / "calls.jsonl", traces_dir=out_dir / "traces",
        eval_token=token, window=window, join_traces=True,
    )
    if ctx.judge is not None and manifest.judge_specs():
        summary |= ctx.judge.usage(token)  # the judges' spend, apart from the pipeline's cost_usd
    write_eval(out_dir, rows, summary)
    boundary = inspect(out_dir, summary)
    atomic_write_json(out_dir / "outcome.json", {
        "format": OUTCOME_FORMAT, "name": name, "split": split, "sandbox": outcome.sandbox,
        "executor": getattr(executor, "name", "?"),
        "returncode": outcome.returncode, "timed_out": outcome.timed_out, "error": outcome.error,
        "startup_s": outcome.startup_s, "wall_s": outcome.wall_s,
        "stdout_tail": outcome.stdout_tail[-4000:], "stderr_tail": outcome.stderr_tail[-4000:],
        "unrouted": boundary.unrouted, "warnings": boundary.warnings,
    })
    return EvalResult(name=name, split=split, out_dir=out_dir, rows=rows, summary=summary, outcome=outcome,
                      boundary=boundary)


# --------------------------------------------------------------------------- finished evaluations, reused from disk


@dataclass(frozen=True)
class EvalKey:
    """What makes two evaluations the same: the commit, the diff on top of it, the split, the example ids,
    the pipeline's model and the sample index. Stored beside a finished evaluation as ``<out_dir>.key.json``
    (a key file written before sample indices existed has no ``sample``: it reads as index 0)."""

    sha: str | None
    diff: str
    """sha256 of the diff text."""
    split: str
    ids: tuple[str, ...]
    model: str
    sample: int = 0
    """The evaluation's sample index (``evaluate(..., sample=)``)."""

    @classmethod
    def of(cls, *, sha: str | None, diff: str, split: str, examples: Sequence[Example], model: str,
           sample: int = 0) -> EvalKey:
        return cls(sha=sha, diff=hashlib.sha256(diff.encode()).hexdigest(), split=split,
                   ids=tuple(ex.id for ex in examples), model=model, sample=sample)

    def to_json(self) -> dict[str, Any]:
        return {"sha": self.sha, "diff": self.diff, "split": self.split, "ids": list(self.ids), "model": self.model,
                "sample": self.sample}


def _key_file(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.key.json"


def reuse(out_dir: Path, key: EvalKey) -> list[dict[str, Any]] | None:
    """The scored rows of a finished evaluation in ``out_dir`` with this key; otherwise None, and whatever
    is there (a torn or different evaluation) is cleared for a fresh one."""
    key_file = _key_file(out_dir)
    if (out_dir / "outcome.json").is_file() and key_file.is_file() and _stored_key(key_file) == key.to_json():
        return list(read_jsonl(out_dir / "scored.jsonl"))
    shutil.rmtree(out_dir, ignore_errors=True)
    key_file.unlink(missing_ok=True)
    return None


def _stored_key(key_file: Path) -> Any:
    stored = read_json(key_file)
    if isinstance(stored, dict) and "sample" not in stored:  # written before sample indices: index 0
        stored = {**stored, "sample": 0}
    return stored


def remember(out_dir: Path, key: EvalKey) -> None:
    """Mark the evaluation in ``out_dir`` finished (only one whose sandbox did not die is ever reused)."""
    atomic_write_json(_key_file(out_dir), key.to_json())


def gateway_socket_path(run_dir: Path) -> Path:
    """The gateway's unix socket for isolated sandboxes: ``RUN_DIR/gateway/gateway.sock``, or a short
    ``/tmp`` path named by the run dir's hash when that is too long for a socket address."""
    path = Path(run_dir) / "gateway" / "gateway.sock"
    if len(str(path)) < 100:
        return path
    return Path("/tmp") / f"pipemend-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]}.sock"


# --------------------------------------------------------------------------- the eval flow

SPLIT_CHOICES = ("train", "val", "test", "all")
SANDBOX_CHOICES = ("auto", "docker", "bwrap", "process")


@dataclass
class EvalRun:
    """What ``run_eval`` did: per split its ``summary.json``, the diagnoses, and the splits whose sandbox died."""

    run_dir: Path
    summaries: dict[str, dict[str, Any]]
    diagnosis: Diagnosis
    """The run's diagnosis: val's when val was evaluated, else the only split's."""
    per_split: dict[str, Diagnosis]
    dead: list[str]
    """``split: why`` for each split whose sandbox or runner died (its examples scored 0)."""
    warnings: list[str] = field(default_factory=list)
    """``split: what`` for hosts the sandbox refused and model calls no example accounts for."""


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    return value


def run_eval(target: Path, *, split: str = "val", limit: int | None = None, model: str | None = None,
             sandbox: str = "auto", run_id: str | None = None, reports_dir: Path = Path("reports"),
             thresholds: LadderThresholds | None = None, progress: Progress | None = None,
             judge_model: str | None = None, executor: str = "local", ray_address: str | None = None,
             ray_task_cpus: float = DEFAULT_TASK_CPUS, gateway_host: str = "127.0.0.1",
             gateway_port: int = 0) -> EvalRun:
    """``pipemend eval``: a run directory of kind ``eval``, the split(s) evaluated and diagnosed.

    Bad usage (split, sandbox, limit, manifest, data) is a ``UsageError`` before any run directory exists.
    A dead sandbox is not an exception: the run ends ``failed`` and ``EvalRun.dead`` says why. A pipeline
    that calls a model around the gateway is a ``UsageError`` naming the host and SDK (the run ends ``failed``).
    """
    progress = progress or NullProgress()
    check_choice(split, SPLIT_CHOICES, "--split")
    if ":" not in sandbox:  # a dotted path `package.module:Class` is a plugin sandbox
        check_choice(sandbox, SANDBOX_CHOICES, "--sandbox")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: expected a positive number of examples")
    check_executor(executor)
    check_task_cpus(ray_task_cpus)
    manifest = load_manifest(target)
    load_splits(manifest, target)  # bad data is a usage error before any run directory exists
    model = model or manifest.llm.model
    judge_model = manifest.judge_model(judge_model) if manifest.judge_specs() else None
    target, reports_dir = Path(target).resolve(), Path(reports_dir).resolve()  # sandboxes run elsewhere
    run_dir = create_run_dir(reports_dir, run_id or new_run_id("eval"), kind="eval", target=target, config={
        "split": split, "limit": limit, "model": model, "sandbox": sandbox,
        **({"judge_model": judge_model} if judge_model else {})})
    try:
        result = _eval_splits(target, manifest, run_dir, split=split, limit=limit, model=model,
                              sandbox_kind=sandbox, thresholds=thresholds, progress=progress, judge_model=judge_model,
                              executor_kind=executor, ray_address=ray_address, ray_task_cpus=ray_task_cpus,
                              gateway_host=gateway_host, gateway_port=gateway_port)
    except BaseException as e:
        finish_run(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finish_run(run_dir, "failed" if result.dead else "done",
               scores={s: v.get("score") for s, v in result.summaries.items()},
               **({"error": "; ".join(result.dead)} if result.dead else {}))
    return result


def _eval_splits(target: Path, manifest: Any, run_dir: Path, *, split: str, limit: int | None, model: str,
                 sandbox_kind: str, thresholds: LadderThresholds | None, progress: Progress,
                 judge_model: str | None = None, executor_kind: str = "local",
                 ray_address: str | None = None, ray_task_cpus: float = DEFAULT_TASK_CPUS,
                 gateway_host: str = "127.0.0.1", gateway_port: int = 0) -> EvalRun:
    frozen = freeze_target(target, manifest, run_dir)
    splits_all = frozen.splits()
    journal(run_dir, "frozen", dir=str(frozen.dir), sizes={k: len(v) for k, v in splits_all.items()})
    splits = limit_splits(splits_all, limit)
    wanted = ["train", "val", "test"] if split == "all" else [split]
    box = get_sandbox(sandbox_kind, announce=lambda msg: progress.event("announce", text=str(msg)))
    progress.log(f"model: {model} (sandbox {box.name})")
    gateway = Gateway(GatewayConfig(run_dir=run_dir, socket_path=gateway_socket_path(run_dir),
                                    models=manifest.models(model), host=gateway_host, port=gateway_port,
                                    token=gateway_token(executor_kind, gateway_host)))
    gateway.start()
    journal(run_dir, "gateway_started", url=gateway.address)
    summaries: dict[str, dict[str, Any]] = {}
    evals: dict[str, Path] = {}
    dead: list[str] = []
    warnings: list[str] = []
    judge = None
    executor = None
    try:
        executor = get_executor(executor_kind, box, sandbox_kind=sandbox_kind, ray_address=ray_address,
                                ray_task_cpus=ray_task_cpus,
                                announce=lambda msg: progress.event("announce", text=str(msg)))
        if judge_model:
            judge = JudgeClient.start(run_dir, judge_model, concurrency=manifest.runner.concurrency,
                                     budget_usd=manifest.judge.budget_usd)
            progress.log(f"judge: {judge_model} ({', '.join(manifest.judge_specs())})")
        ctx = EvalContext(run_dir=run_dir, frozen=frozen, sandbox=box, gateway=gateway, model=model,
                          sealed=manifest.sealed_paths(target), judge=judge, executor=executor)
        for s in wanted:
            examples = splits[s]
            journal(run_dir, "eval_started", split=s, n=len(examples))
            res = evaluate(ctx, name=s, worktree=target, target_subdir="", split=s, examples=examples,
                           out_dir=run_dir / "evals" / s,
                           progress=lambda done, total, s=s: progress.event("eval_progress", task=f"eval {s}",
                                                                            done=done, total=total))
            summaries[s], evals[s] = res.summary, res.out_dir
            if res.boundary.unrouted:
                raise UsageError(f"eval {s}: {res.boundary.unrouted} (details: {res.out_dir}/outcome.json)")
            for w in res.boundary.warnings:
                warnings.append(f"{s}: {w}")
                progress.event("warning", text=f"{s}: {w}")
            journal(run_dir, "eval_done", split=s, score=res.score, n=res.summary.get("n"),
                    sandbox_error=res.outcome.error, returncode=res.outcome.returncode)
            if res.failed_systemically and examples:
                o = res.outcome
                why = o.error or (o.stderr_tail.strip().splitlines() or [f"exit code {o.returncode}"])[-1]
                dead.append(f"{s}: {why}")
    finally:
        if executor is not None:
            executor.close()
        gateway.stop()
        if judge is not None:
            judge.close()
    primary, per_split = diagnose_run(run_dir, evals, frozen, thresholds)
    journal(run_dir, "diagnosis", split=primary_split(list(evals)), **primary.brief())
    return EvalRun(run_dir=run_dir, summaries=summaries, diagnosis=primary, per_split=per_split, dead=dead,
                   warnings=warnings)

"""The ``pipemend`` command line: a thin typer + rich layer over the library.

Exit codes: 0 done, 1 the run failed (``RunFailed``), 2 bad usage, config or
input (``UsageError``/``ConfigError``: the message says what and where, no
traceback). Progress and tables go to stderr/stdout for people; ``--json``
prints exactly one JSON object on stdout and nothing else there.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import PipemendError, RunFailed, SandboxUnavailable, UsageError

app = typer.Typer(
    name="pipemend",
    help="Optimize whole LLM pipelines: every accepted change is a reviewable git branch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SPLIT_CHOICES = ("train", "val", "test", "all")
SANDBOX_CHOICES = ("auto", "docker", "bwrap", "process")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def cli_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map pipemend's errors to exit codes without a traceback.

    ``UsageError``/``ConfigError`` and ``SandboxUnavailable`` → 2; ``RunFailed``
    and any other ``PipemendError`` (``BudgetExhausted``...) → 1. A bug still shows its traceback.

    The lead wraps the commands of ``cli_optimize.py``/``cli_review.py`` with it too.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UsageError, SandboxUnavailable) as e:  # SandboxUnavailable's message says how to fix it
            err.print(f"[bold red]error:[/] {escape(str(e))}")
            raise typer.Exit(2) from None
        except PipemendError as e:  # RunFailed, BudgetExhausted, ...
            err.print(f"[bold red]run failed:[/] {escape(str(e))}")
            raise typer.Exit(1) from None

    return wrapper


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    return value


# --------------------------------------------------------------------------- init


@app.command("init")
@cli_command
def init_cmd(directory: Path = typer.Argument(..., help="Folder of an existing pipeline.")) -> None:
    """Write a commented pipemend.yaml skeleton next to an existing pipeline."""
    from .init_template import write_skeleton

    path = write_skeleton(directory)
    err.print(escape(f"wrote {path}: fill in the TODOs, then run `pipemend eval {directory}`"))


# --------------------------------------------------------------------------- eval


def _diag_to_dict(d: Any) -> dict[str, Any]:
    """The diagnosis in its JSON form, whatever object ``diagnose_eval_dir`` returns."""
    for attr in ("to_json", "to_dict", "model_dump"):
        if hasattr(d, attr):
            return getattr(d, attr)()
    if isinstance(d, dict):
        return d
    import dataclasses

    if dataclasses.is_dataclass(d):
        return dataclasses.asdict(d)
    raise RunFailed(f"diagnosis of type {type(d).__name__} has no JSON form")


def _diag_brief(d: Any) -> dict[str, Any]:
    d = _diag_to_dict(d)
    counts = d.get("counts") or {}
    return {"counts": {r: int(counts.get(r, 0)) for r in ("prompt", "retrieval", "context", "model")},
            "recommended": d.get("recommended")}


def _primary_split(splits: list[str]) -> str:
    """The split whose diagnosis is the run's: val when evaluated (the split the gate optimizes), else the first."""
    return "val" if "val" in splits else splits[0]


# The ladder's thresholds, shared by `eval` and `diagnose`.
ThresholdsFile = Annotated[Optional[Path], typer.Option(
    "--thresholds", help="YAML/JSON file of ladder thresholds (keys of pipemend.diagnose.LadderThresholds).")]
PassThreshold = Annotated[Optional[float], typer.Option(
    "--pass-threshold", help="Score at or above which an example passes.")]
MinShare = Annotated[Optional[float], typer.Option(
    "--min-share", help="Share of failures a rung needs to be recommended.")]


def _thresholds(path: Path | None, pass_threshold: float | None, min_share: float | None) -> Any:
    """The ladder's thresholds from ``--thresholds FILE`` and the two common overrides (bad values exit 2)."""
    from .diagnose import load_thresholds

    return load_thresholds(path, pass_threshold=pass_threshold, min_share=min_share)


def diagnose_run(run_dir: Path, evals: dict[str, Path], frozen: Any, thresholds: Any = None) -> tuple[Any, dict[str, Any]]:
    """Diagnose each split's eval dir on its own; write ``evals/<x>/diagnosis.json`` and the run's ``diagnosis.json``.

    Per split, because the failure mix differs between splits and the ladder's
    recommendation is read against the split one optimizes on: the run-level
    ``diagnosis.json`` (and ``--json``'s ``diagnosis``) is val's, or the only split's.
    Returns ``(diagnosis of the primary split, {split: diagnosis})``.
    """
    from .diagnose import diagnose_eval_dir
    from .fsutil import atomic_write_json, read_jsonl

    by_id = frozen.examples_by_id()
    per_split: dict[str, Any] = {}
    for split, eval_dir in evals.items():
        ids = [r["id"] for r in read_jsonl(eval_dir / "inputs.jsonl")]
        examples = [by_id[i] for i in ids if i in by_id]
        d = diagnose_eval_dir(eval_dir, examples, thresholds)
        atomic_write_json(eval_dir / "diagnosis.json", _diag_to_dict(d))
        per_split[split] = d
    primary = per_split[_primary_split(list(per_split))]
    atomic_write_json(run_dir / "diagnosis.json", _diag_to_dict(primary))
    return primary, per_split


def _print_scores(summaries: dict[str, dict[str, Any]]) -> None:
    table = Table(title="scores")
    for col in ("split", "score", "95% CI", "n", "errors", "cost", "mean latency"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, s in summaries.items():
        table.add_row(
            split, f"{s.get('score', 0):.3f}", f"{s.get('ci_low', 0):.3f} – {s.get('ci_high', 0):.3f}",
            str(s.get("n", 0)), str(s.get("errors", 0)), f"${s.get('cost_usd', 0) or 0:.4f}",
            f"{s.get('latency_s_mean') or 0:.2f}s",
        )
    out.print(table)


def _print_diagnoses(per_split: dict[str, Any]) -> None:
    from .diagnose import render_diagnosis

    for split, d in per_split.items():
        out.rule(f"diagnosis: {split}")
        out.print(render_diagnosis(d))


def _split_json(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s.get(k) for k in ("score", "n", "ci_low", "ci_high", "errors")}


@app.command("eval")
@cli_command
def eval_cmd(
    target: Path = typer.Argument(..., help="Folder holding pipemend.yaml."),
    split: str = typer.Option("val", "--split", help="train, val, test or all."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N examples of each split."),
    model: Optional[str] = typer.Option(None, "--model", help="PIPEMEND_MODEL for the pipeline (default: the manifest's llm.model)."),
    sandbox: str = typer.Option("auto", "--sandbox", help="auto, docker, bwrap, process or package.module:Class."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: eval-YYYYMMDD-HHMMSS-xxxx)."),
    reports_dir: Path = typer.Option(Path("reports"), "--reports-dir", help="Where run directories go."),
    thresholds: ThresholdsFile = None,
    pass_threshold: PassThreshold = None,
    min_share: MinShare = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
) -> None:
    """Evaluate a target on a split (default val): scores, CI, cost, latency and the failure diagnosis."""
    from .dataset import load_splits
    from .manifest import load_manifest
    from .rundir import create_run_dir, finish_run, new_run_id

    _choice(split, SPLIT_CHOICES, "--split")
    if ":" not in sandbox:  # a dotted path `package.module:Class` is a plugin sandbox
        _choice(sandbox, SANDBOX_CHOICES, "--sandbox")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: expected a positive number of examples")
    ladder = _thresholds(thresholds, pass_threshold, min_share)
    manifest = load_manifest(target)
    load_splits(manifest, target)  # bad data is a usage error before any run directory exists
    model = model or manifest.llm.model
    target, reports_dir = target.resolve(), reports_dir.resolve()  # sandboxes run elsewhere: absolute paths only
    run_dir = create_run_dir(reports_dir, run_id or new_run_id("eval"), kind="eval", target=target, config={
        "split": split, "limit": limit, "model": model, "sandbox": sandbox})
    try:
        result = _eval_run(target, manifest, run_dir, split=split, limit=limit, model=model,
                           sandbox_kind=sandbox, show_progress=not as_json, thresholds=ladder)
    except BaseException as e:
        finish_run(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finish_run(run_dir, "failed" if result["dead"] else "done",
               scores={s: v.get("score") for s, v in result["summaries"].items()},
               **({"error": "; ".join(result["dead"])} if result["dead"] else {}))

    if as_json:
        sys.stdout.write(json.dumps({
            "run_dir": str(run_dir),
            "splits": {s: _split_json(v) for s, v in result["summaries"].items()},
            "diagnosis": _diag_brief(result["diagnosis"]),
        }) + "\n")
    else:
        _print_scores(result["summaries"])
        _print_diagnoses(result["per_split"])
        err.print(escape(f"run directory: {run_dir}"))
    if result["dead"]:
        raise RunFailed("the sandbox failed on " + "; ".join(result["dead"]) + f" (details: {run_dir}/evals/<split>/outcome.json)")


def _socket_path(run_dir: Path) -> Path:
    """The gateway's unix socket (mounted into isolated sandboxes); a short temp path when the run dir's is too long."""
    path = (run_dir / "gateway" / "gw.sock").resolve()
    if len(str(path)) < 100:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    import tempfile

    return Path(tempfile.mkdtemp(prefix="pipemend-gw-")) / "gw.sock"


def _eval_run(target: Path, manifest: Any, run_dir: Path, *, split: str, limit: int | None, model: str,
              sandbox_kind: str, show_progress: bool, thresholds: Any = None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .dataset import freeze_target, limit_splits
    from .evaluate import EvalContext, evaluate
    from .gateway import Gateway, GatewayConfig
    from .rundir import journal
    from .sandbox import get_sandbox

    frozen = freeze_target(target, manifest, run_dir)
    splits_all = frozen.splits()
    journal(run_dir, "frozen", dir=str(frozen.dir), sizes={k: len(v) for k, v in splits_all.items()})
    splits = limit_splits(splits_all, limit)
    wanted = ["train", "val", "test"] if split == "all" else [split]
    box = get_sandbox(sandbox_kind, announce=lambda msg: err.print(escape(str(msg))))  # stdout stays clean for --json
    err.print(escape(f"model: {model} (sandbox {box.name})"))
    gateway = Gateway(GatewayConfig(run_dir=run_dir, socket_path=_socket_path(run_dir)))
    gateway.start()
    journal(run_dir, "gateway_started", url=gateway.url)
    summaries: dict[str, dict[str, Any]] = {}
    evals: dict[str, Path] = {}
    dead: list[str] = []
    try:
        ctx = EvalContext(run_dir=run_dir, frozen=frozen, sandbox=box, gateway=gateway, model=model)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=not show_progress, transient=False) as bar:
            for s in wanted:
                examples = splits[s]
                task = bar.add_task(f"eval {s}", total=len(examples))
                journal(run_dir, "eval_started", split=s, n=len(examples))
                res = evaluate(ctx, name=s, worktree=target, target_subdir="", split=s, examples=examples,
                               out_dir=run_dir / "evals" / s,
                               progress=lambda done, total, t=task: bar.update(t, completed=done, total=total))
                summaries[s], evals[s] = res.summary, res.out_dir
                journal(run_dir, "eval_done", split=s, score=res.score, n=res.summary.get("n"),
                        sandbox_error=res.outcome.error, returncode=res.outcome.returncode)
                if res.failed_systemically and examples:
                    why = res.outcome.error or (res.outcome.stderr_tail.strip().splitlines() or ["exit code %s" % res.outcome.returncode])[-1]
                    dead.append(f"{s}: {why}")
    finally:
        gateway.stop()
    primary, per_split = diagnose_run(run_dir, evals, frozen, thresholds)
    journal(run_dir, "diagnosis", split=_primary_split(list(evals)), **_diag_brief(primary))
    return {"summaries": summaries, "diagnosis": primary, "per_split": per_split, "dead": dead}


# --------------------------------------------------------------------------- diagnose


@app.command("diagnose")
@cli_command
def diagnose_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (reports/<run-id>)."),
    thresholds: ThresholdsFile = None,
    pass_threshold: PassThreshold = None,
    min_share: MinShare = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
) -> None:
    """Re-diagnose an existing run from its frozen labels and its eval traces."""
    from .dataset import FrozenTarget
    from .fsutil import read_json

    ladder = _thresholds(thresholds, pass_threshold, min_share)
    frozen = FrozenTarget.open(run_dir)
    evals: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for eval_dir in sorted((run_dir / "evals").glob("*/")):
        if not (eval_dir / "summary.json").is_file():
            continue
        summary = read_json(eval_dir / "summary.json")
        s = summary.get("split") or eval_dir.name
        if s not in evals:  # one eval per split: the first by name (e.g. baseline-val)
            evals[s], summaries[s] = eval_dir, summary
    if not evals:
        raise UsageError(f"{run_dir}: no scored evaluations under evals/ (run `pipemend eval` first)")
    primary, per_split = diagnose_run(run_dir, evals, frozen, ladder)
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir),
                                     "splits": {s: _split_json(v) for s, v in summaries.items()},
                                     "diagnosis": _diag_brief(primary)}) + "\n")
    else:
        _print_diagnoses(per_split)


# --------------------------------------------------------------------------- gateway, doctor


@app.command("gateway")
@cli_command
def gateway_cmd(
    port: int = typer.Option(8787, "--port", help="Port on 127.0.0.1."),
    run_dir: Path = typer.Option(Path("reports/gateway"), "--run-dir", help="Where the call log and cache go."),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="Stop answering past this spend."),
) -> None:
    """Serve the Anthropic-compatible gateway in the foreground (Ctrl-C stops it)."""
    from .gateway import serve_forever_cli

    serve_forever_cli(port=port, run_dir=run_dir, budget_usd=budget_usd)


def _field(check: Any, name: str) -> Any:
    return check.get(name) if isinstance(check, dict) else getattr(check, name, None)


@app.command("doctor")
@cli_command
def doctor_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """Check what this machine can run: Docker, bubblewrap, the sandbox image, the local model, API keys."""
    from .doctor import check_all

    checks = list(check_all())
    rows = [{k: _field(c, k) for k in ("name", "ok", "detail", "fix")} for c in checks]
    if as_json:
        sys.stdout.write(json.dumps({"checks": rows}) + "\n")
        return
    table = Table(title="pipemend doctor")
    for col in ("check", "ok", "detail", "fix"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(str(r["name"])), "[green]ok[/]" if r["ok"] else "[red]no[/]",
                      escape(str(r["detail"] or "")), escape(str(r["fix"] or "")))
    out.print(table)


# --------------------------------------------------------------------------- the optimize and review commands
# Plain functions in cli_optimize.py and cli_review.py, given the same error handling as the commands above.
from . import cli_optimize, cli_review  # noqa: E402

app.command("optimize")(cli_command(cli_optimize.optimize))
app.command("resume")(cli_command(cli_optimize.resume))
app.command("report")(cli_command(cli_review.report))
app.command("branches")(cli_command(cli_review.branches))
app.command("apply")(cli_command(cli_review.apply))


def main() -> None:  # pragma: no cover - `python -m pipemend.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

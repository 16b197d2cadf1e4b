"""``pipemend eval`` and ``pipemend diagnose``: the library's ``run_eval`` / ``rediagnose``, presented."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ..diagnose import Diagnosis, LadderThresholds, load_thresholds, rediagnose
from ..errors import RunFailed
from ..evaluate import run_eval
from ..judges.agreement import Agreement, check_judge, judge_agreement
from .common import (EXECUTOR_HELP, GATEWAY_HOST_HELP, GATEWAY_PORT_HELP, RAY_ADDRESS_HELP, RAY_TASK_CPUS_HELP,
                     err, executor_options, out)
from .progress import RichProgress
from .render import agreement_lines, judge_line, render_diagnosis, scores_table

# The ladder's thresholds, shared by `eval` and `diagnose`.
ThresholdsFile = Annotated[Optional[Path], typer.Option(
    "--thresholds", help="YAML/JSON file of ladder thresholds (keys of pipemend.diagnose.LadderThresholds).")]
PassThreshold = Annotated[Optional[float], typer.Option(
    "--pass-threshold", help="Score at or above which an example passes.")]
MinShare = Annotated[Optional[float], typer.Option(
    "--min-share", help="Share of failures a rung needs to be recommended.")]


def _thresholds(path: Path | None, pass_threshold: float | None, min_share: float | None) -> LadderThresholds:
    """The ladder's thresholds from ``--thresholds FILE`` and the two common overrides (bad values exit 2)."""
    return load_thresholds(path, pass_threshold=pass_threshold, min_share=min_share)


def _split_json(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s.get(k) for k in ("score", "n", "ci_low", "ci_high", "errors")}


def _print_diagnoses(per_split: dict[str, Diagnosis]) -> None:
    for split, d in per_split.items():
        out.rule(f"diagnosis: {split}")
        out.print(render_diagnosis(d))


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
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help=(
        "Model of the judge metrics (default: the manifest's judge.model, else its llm.model).")),
    agreement: bool = typer.Option(False, "--judge-agreement", help=(
        "Also judge the labelled examples with --judge and print its agreement with the exact metric "
        "(share agreeing, Cohen's kappa, confusion counts) and whether to trust it.")),
    judge: str = typer.Option("judge:correctness", "--judge", help=(
        "The judge --judge-agreement checks: judge:correctness, judge:faithfulness or judge:relevance.")),
    executor: Optional[str] = typer.Option(None, "--executor", help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_task_cpus: Optional[float] = typer.Option(None, "--ray-task-cpus", help=RAY_TASK_CPUS_HELP),
    gateway_host: str = typer.Option("127.0.0.1", "--gateway-host", help=GATEWAY_HOST_HELP),
    gateway_port: int = typer.Option(0, "--gateway-port", min=0, max=65535, help=GATEWAY_PORT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
) -> None:
    """Evaluate a target on a split (default val): scores, CI, cost, latency and the failure diagnosis."""
    ladder = _thresholds(thresholds, pass_threshold, min_share)
    where = executor_options(executor, ray_address, ray_task_cpus)
    if agreement:
        check_judge(judge)
    # stdout stays clean for --json: progress and notes go to stderr
    with RichProgress(err, counts="off" if as_json else "bars", timestamps=False) as progress:
        result = run_eval(target, split=split, limit=limit, model=model, sandbox=sandbox, run_id=run_id,
                          reports_dir=reports_dir, thresholds=ladder, progress=progress, judge_model=judge_model,
                          gateway_host=gateway_host, gateway_port=gateway_port, **where)
        checked: Agreement | None = None
        if agreement and not result.dead:
            progress.log(f"judging the labelled examples with {judge} for --judge-agreement")
            checked = judge_agreement(result.run_dir, judge=judge, model=judge_model)
    if as_json:
        payload: dict[str, Any] = {
            "run_dir": str(result.run_dir),
            "splits": {s: _split_json(v) for s, v in result.summaries.items()},
            "diagnosis": result.diagnosis.brief(),
            "warnings": result.warnings,
        }
        judged = {s: {k: v for k, v in summary.items() if k.startswith("judge_")}
                  for s, summary in result.summaries.items() if "judge_calls" in summary}
        if judged:
            payload["judge"] = judged
        if checked is not None:
            payload["judge_agreement"] = checked.to_json()
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        out.print(scores_table(result.summaries))
        for s, summary in result.summaries.items():
            if "judge_calls" in summary:
                out.print(escape(f"{s}: {judge_line(summary)}"))
        _print_diagnoses(result.per_split)
        if checked is not None:
            out.rule(f"judge agreement: {checked.judge} vs {checked.reference}")
            for line in agreement_lines(checked.to_json()):
                out.print(escape(line))
        err.print(escape(f"run directory: {result.run_dir}"))
    if result.dead:
        raise RunFailed("the sandbox failed on " + "; ".join(result.dead)
                        + f" (details: {result.run_dir}/evals/<split>/outcome.json)")


def diagnose_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (reports/<run-id>)."),
    thresholds: ThresholdsFile = None,
    pass_threshold: PassThreshold = None,
    min_share: MinShare = None,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout, nothing else."),
) -> None:
    """Re-diagnose an existing run from its frozen labels and its eval traces."""
    found = rediagnose(run_dir, _thresholds(thresholds, pass_threshold, min_share))
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir),
                                     "splits": {s: _split_json(v) for s, v in found.summaries.items()},
                                     "diagnosis": found.diagnosis.brief()}) + "\n")
    else:
        _print_diagnoses(found.per_split)

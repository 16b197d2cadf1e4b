"""``pipemend init``, ``gateway`` and ``doctor``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from ..doctor import check_all
from ..gateway import serve_forever_cli
from ..errors import UsageError
from ..importers import import_dataset, reimport
from ..init_template import write_skeleton
from ..sandbox.reap import reap
from .common import err, out
from .render import checks_table


def init_cmd(
    directory: Path = typer.Argument(..., help="Folder of an existing pipeline."),
    source: Optional[Path] = typer.Argument(None, help="With --from: the dataset file (a BEIR folder) to convert."),
    from_format: Optional[str] = typer.Option(
        None, "--from", help="Convert a dataset as it comes: hotpotqa, musique, beir, csv or jsonl (then give FILE)."),
    mapping: Optional[list[str]] = typer.Option(
        None, "--map", help="SOURCE=TARGET[,...]: a source field to a row field (id, inputs.NAME, expected, evidence, "
                            "evidence_text, split); -=TARGET leaves one out. Default: the format's, or inferred."),
    out_file: str = typer.Option("data.jsonl", "--out", help="The converted rows (per split: data.train.jsonl, ...)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split shuffle when the source has no splits."),
    reimport_: bool = typer.Option(False, "--reimport", help="Convert again from the manifest's dataset.source."),
    force: bool = typer.Option(False, "--force", help="Replace dataset files that exist and would change."),
) -> None:
    """Write a commented pipemend.yaml skeleton next to an existing pipeline; --from also converts its dataset."""
    if reimport_ or from_format is not None:
        if reimport_ and (from_format is not None or source is not None):
            raise UsageError("--reimport converts from the manifest's dataset.source: give no --from or FILE")
        if from_format is not None and source is None:
            raise UsageError(f"--from {from_format}: give the FILE to convert (pipemend init DIR --from FORMAT FILE)")
        result = reimport(directory, force=force) if reimport_ else import_dataset(
            directory, from_format or "", source or Path(), mapping, out=out_file, seed=seed, force=force)
        for line in result.lines():
            out.print(escape(line))
        return
    if source is not None or mapping:
        raise UsageError("FILE and --map go with --from FORMAT")
    path = write_skeleton(directory)
    err.print(escape(f"wrote {path}: fill in the TODOs, then run `pipemend eval {directory}`"))


def gateway_cmd(
    port: int = typer.Option(8787, "--port", help="Port on 127.0.0.1."),
    run_dir: Path = typer.Option(Path("reports/gateway"), "--run-dir", help="Where the call log and cache go."),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="Stop answering past this spend."),
    models: Optional[list[str]] = typer.Option(
        None, "--model",
        help="A model to serve (repeat). Default: claude-* and the local model; scripted:PATH, simulated/* and "
             "package.module:Class only when listed."),
) -> None:
    """Serve the Anthropic-compatible gateway in the foreground (Ctrl-C stops it)."""
    serve_forever_cli(port=port, run_dir=run_dir, budget_usd=budget_usd, models=models or None)


def _field(check: Any, name: str) -> Any:
    return check.get(name) if isinstance(check, dict) else getattr(check, name, None)


def doctor_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
               clean: bool = typer.Option(False, "--clean", help="First remove the containers, processes and scratch "
                                          "folders that killed pipemend runs left behind.")) -> None:
    """Check what this machine can run: Docker, bubblewrap, the sandbox image, the local model, API keys."""
    if clean:
        report = reap(None)
        (sys.stderr.write(report.summary() + "\n") if as_json else out.print(report.summary()))
    rows = [{k: _field(c, k) for k in ("name", "ok", "detail", "fix")} for c in check_all()]
    if as_json:
        sys.stdout.write(json.dumps({"checks": rows}) + "\n")
        return
    out.print(checks_table(rows))

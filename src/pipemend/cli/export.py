"""``pipemend export``: a run's evaluated examples as OpenTelemetry spans, to a file and/or an OTLP collector."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from ..export.otlp import request_traces, run_requests, split_request
from ..export.otlp_push import ENCODINGS, check_url, otlp_encoding_from_env, otlp_headers_from_env, post_traces
from ..fsutil import atomic_writer
from ..report.load import resolve_run_dir
from .common import out


def find_run(run: Path, reports_dir: Path) -> Path:
    """A run directory given as a path, or as a run id under ``reports_dir``."""
    if (run / "run.json").is_file() or not (reports_dir / run / "run.json").is_file():
        return resolve_run_dir(run)
    return resolve_run_dir(reports_dir / run)


def export_cmd(
    run: Path = typer.Argument(..., help="A run directory (reports/<run-id>) or a run id under --reports-dir."),
    otlp: Optional[Path] = typer.Option(
        None, "--otlp", help="Write OTLP/JSON lines here: one ExportTraceServiceRequest per evaluation."),
    otlp_endpoint: Optional[str] = typer.Option(
        None, "--otlp-endpoint", help="Also POST them to this OTLP/HTTP traces URL (http://host:4318/v1/traces; "
                                      "headers from OTEL_EXPORTER_OTLP_HEADERS)."),
    otlp_encoding: Optional[str] = typer.Option(
        None, "--otlp-encoding", help="json or protobuf (needs opentelemetry-proto; MLflow's /v1/traces takes only "
                                      "protobuf); default: OTEL_EXPORTER_OTLP_PROTOCOL (http/json, http/protobuf), "
                                      "else json."),
    include_messages: bool = typer.Option(
        False, "--include-messages", help="Add each LLM call's prompt and answer (gen_ai.input.messages / "
                                          "gen_ai.output.messages) from the gateway's call log."),
    reports_dir: Path = typer.Option(Path("reports"), "--reports-dir", help="Folder holding run directories."),
) -> None:
    """Export every evaluated example of a run (baseline and each candidate) as OpenTelemetry traces."""
    if otlp is None and otlp_endpoint is None:
        raise UsageError("export: give --otlp FILE.jsonl and/or --otlp-endpoint URL")
    otlp_encoding = otlp_encoding or otlp_encoding_from_env()
    if otlp_encoding not in ENCODINGS:
        raise UsageError(f"--otlp-encoding {otlp_encoding!r}: expected one of {', '.join(ENCODINGS)}")
    if otlp_endpoint is not None:
        check_url(otlp_endpoint)
    run_dir = find_run(run, reports_dir)
    headers = otlp_headers_from_env()
    evaluations = traces = 0
    with ExitStack() as stack:
        f = stack.enter_context(atomic_writer(otlp)) if otlp is not None else None
        for _, _, request in run_requests(run_dir, include_messages=include_messages):
            evaluations += 1
            traces += len(request_traces(request))
            if f is not None:
                f.write(json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            if otlp_endpoint is not None:
                for part in split_request(request):
                    post_traces(otlp_endpoint, part, headers=headers, encoding=otlp_encoding)  # type: ignore[arg-type]
    what = f"{evaluations} evaluation(s), {traces} trace(s)"
    if otlp is not None:
        out.print(f"wrote {what} to {otlp}", markup=False)
    if otlp_endpoint is not None:
        out.print(f"sent {what} to {otlp_endpoint}", markup=False)
    if not evaluations:
        out.print(f"{run_dir}: no finished evaluation to export yet", markup=False)

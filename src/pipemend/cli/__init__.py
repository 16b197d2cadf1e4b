"""The ``pipemend`` command line: typer and rich over the library, and the only place either is imported.

    common.py    consoles; the one mapping from errors to exit codes (0 done, 1 failed, 2 bad usage)
    evaluate.py  eval, diagnose          optimize.py  optimize, resume
    review.py    report, branches, apply system.py    init, gateway, doctor
    export.py    export (OTLP file or endpoint)
    progress.py  RichProgress (the library's ``Progress``)   render.py  tables and lines

Progress and tables go to stderr/stdout for people; ``--json`` prints exactly
one JSON object on stdout and nothing else there.
"""

from __future__ import annotations

import typer

from . import ci, evaluate, export, optimize, review, system
from .common import cli_command, exit_code

__all__ = ["app", "cli_command", "exit_code", "main"]

app = typer.Typer(
    name="pipemend",
    help="Optimize whole LLM pipelines: every accepted change is a reviewable git branch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name, _command in (
    ("init", system.init_cmd),
    ("eval", evaluate.eval_cmd),
    ("diagnose", evaluate.diagnose_cmd),
    ("gateway", system.gateway_cmd),
    ("doctor", system.doctor_cmd),
    ("optimize", optimize.optimize),
    ("resume", optimize.resume_cmd),
    ("report", review.report),
    ("branches", review.branches),
    ("apply", review.apply),
    ("export", export.export_cmd),
):
    app.command(_name)(cli_command(_command))
app.add_typer(ci.app, name="ci")


def main() -> None:  # pragma: no cover - `python -m pipemend.cli`
    app()

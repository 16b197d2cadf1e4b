"""Run directory helpers: run ids, ``run.json`` and the append-only ``journal.jsonl``.

``run.json`` is rewritten atomically on every status change; the journal only
ever grows. Layout and shapes are in AGENTS.md ("Run directory").
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fsutil import append_jsonl, atomic_write_json, atomic_write_text, read_json

RUN_FORMAT = "pipemend-run-1"
JOURNAL_FORMAT = "pipemend-journal-1"
RUN_JSON = "run.json"
JOURNAL = "journal.jsonl"
REPORTS_GITIGNORE = "# Created by pipemend: run directories are not part of your project.\n*\n"


def new_run_id(kind: str = "eval", *, now: datetime | None = None) -> str:
    """``<kind>-YYYYMMDD-HHMMSS-xxxx``, e.g. ``eval-20261121-235959-ab12`` (local time, 4 random hex digits)."""
    now = now or datetime.now()
    return f"{kind}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    ok = run_id and len(run_id) <= 100 and all(c.isalnum() or c in "-_." for c in run_id) and run_id[0].isalnum()
    if not ok:
        raise UsageError(f"--run-id {run_id!r}: expected letters, digits, '-', '_' or '.', starting with a letter or digit")
    return run_id


def create_run_dir(reports_dir: str | Path, run_id: str, *, kind: str, target: str | Path, config: dict[str, Any]) -> Path:
    """Make ``reports_dir/run_id/`` (refusing an existing one), write ``run.json`` and journal ``run_started``.

    A reports folder this makes ignores itself (a ``.gitignore`` holding ``*``, as pytest does for its
    cache), so ``pipemend eval .`` leaves no untracked folder in the user's repo."""
    run_dir = Path(reports_dir) / check_run_id(run_id)
    if run_dir.exists():
        raise UsageError(f"{run_dir}: a run with id {run_id!r} already exists (choose another --run-id)")
    ensure_reports_dir(reports_dir)
    run_dir.mkdir(mode=0o700)  # frozen labels and scores: out of reach of a sandbox's unprivileged user
    os.chmod(run_dir, 0o700)  # whatever the umask
    atomic_write_json(run_dir / RUN_JSON, {
        "format": RUN_FORMAT, "run_id": run_id, "kind": kind, "target": str(Path(target).resolve()),
        "status": "running", "config": config, "started_at": time.time(), "ended_at": None,
    })
    journal(run_dir, "run_started", kind=kind, run_id=run_id)
    return run_dir


def ensure_reports_dir(reports_dir: str | Path) -> Path:
    """Create ``reports_dir`` if missing, with a ``.gitignore`` of ``*`` in it; an existing folder is left as is
    (it may be the user's own, tracked folder)."""
    path = Path(reports_dir)
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:  # made meanwhile by a concurrent run, which writes the .gitignore itself
        if path.is_dir():
            return path
        raise UsageError(f"{path}: exists and is not a folder (give another --reports-dir)") from None
    atomic_write_text(path / ".gitignore", REPORTS_GITIGNORE)
    return path


def read_run(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a pipemend run directory (no {RUN_JSON})")
    return read_json(path)


def update_run(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``run.json`` (atomically) and return the new content."""
    run = read_run(run_dir)
    run.update(fields)
    atomic_write_json(Path(run_dir) / RUN_JSON, run)
    return run


def finish_run(run_dir: str | Path, status: str, **fields: Any) -> dict[str, Any]:
    """Mark the run ``done`` or ``failed`` and journal it."""
    if status not in ("done", "failed"):
        raise ValueError(f"status {status!r}: expected done or failed")
    run = update_run(run_dir, status=status, ended_at=time.time(), **fields)
    journal(run_dir, f"run_{status}", **fields)
    return run


def journal(run_dir: str | Path, event: str, **data: Any) -> None:
    """Append one event to ``journal.jsonl``."""
    append_jsonl(Path(run_dir) / JOURNAL, {"format": JOURNAL_FORMAT, "t": time.time(), "event": event, **data})

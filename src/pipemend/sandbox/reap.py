"""Reap what a killed pipemend left behind: its sandbox containers, process groups and scratch folders.

Everything a sandbox run makes carries its run id and its owner (the pipemend
process that drives it, as ``<pid>.<start time>`` so a reused pid is not taken
for it): Docker containers by the labels ``pipemend.run`` / ``pipemend.owner``,
scratch folders by their name ``pipemend-scratch-<run>-<owner>-<random>``, and
the process group of a bwrap/process sandbox by ``process.json`` in its
scratch folder (outside what the sandbox can write). ``reap`` removes the
things whose owner is gone, so it is safe to call while other runs are live:
``resume`` calls ``reap(run_id)`` before it starts (the run's previous driver is
dead: the run lock says so), ``pipemend doctor --clean`` calls ``reap(None)``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SandboxUnavailable
from .ingest import (PROCESS_RECORD, SCRATCH_PREFIX, open_dir, owner_alive, process_start_time, read_regular,
                     safe_run_id)
from .limited import Cgroup
from .process import sweep_stale_copies



@dataclass
class ReapReport:
    """What ``reap`` removed; ``notes`` says what it could not look at (e.g. no Docker engine)."""

    containers: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def total(self) -> int:
        return len(self.containers) + len(self.processes) + len(self.folders)

    def summary(self) -> str:
        return (f"reaped {len(self.containers)} container(s), {len(self.processes)} process group(s), "
                f"{len(self.folders)} scratch folder(s)" + (f" ({'; '.join(self.notes)})" if self.notes else ""))




def scratch_roots() -> list[Path]:
    """Folders that may hold scratch folders: ``$PIPEMEND_SCRATCH`` and the temp folder."""
    roots = [Path(tempfile.gettempdir())]
    if os.environ.get("PIPEMEND_SCRATCH"):
        roots.insert(0, Path(os.environ["PIPEMEND_SCRATCH"]))
    return list(dict.fromkeys(roots))


def _parse(name: str) -> tuple[str, str] | None:
    """``(run, owner)`` of a scratch folder's name, or None."""
    parts = name[len(SCRATCH_PREFIX):].split("-")
    return (parts[0], parts[1]) if name.startswith(SCRATCH_PREFIX) and len(parts) == 3 else None


def reap(run_id: str | None = None) -> ReapReport:
    """Remove the containers, process groups and scratch folders of ``run_id`` (every run: None) whose owner is gone."""
    report = ReapReport()
    try:
        report.containers = reap_containers(run_id)
    except SandboxUnavailable as e:
        report.notes.append(f"docker not checked: {str(e).split(';')[0]}")
    for root in scratch_roots():
        for d in sorted(root.glob(f"{SCRATCH_PREFIX}*")):
            parsed = _parse(d.name)
            if parsed is None or (run_id is not None and parsed[0] != safe_run_id(run_id)):
                continue
            if owner_alive(parsed[1]) or d.is_symlink() or not d.is_dir():
                continue
            pgid = _kill_recorded(d)
            if pgid is not None:
                report.processes.append(pgid)
            shutil.rmtree(d, ignore_errors=True)
            report.folders.append(str(d))

    sweep_stale_copies()
    Cgroup.sweep()
    return report


def _kill_recorded(scratch_root: Path) -> int | None:
    """Kill what is left of the process group recorded in a scratch folder; its id, or None if nothing was.

    The group's leader (the sandbox's first process) may be gone while members
    live on; a pid used as a group id is never handed out again while the group
    has members, so a group without a leader is still ours.
    """
    try:
        fd = open_dir(scratch_root)
        try:
            record: Any = json.loads(read_regular(fd, PROCESS_RECORD, 4096))
        finally:
            os.close(fd)
        pgid, start = int(record["pgid"]), record.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    leader = process_start_time(pgid)
    if start is None or (leader is not None and leader != start):
        return None  # the id now names another process: ours is gone (the kernel never reuses a live group's id)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return None
    return pgid


def reap_containers(run_id: str | None) -> list[str]:
    """Remove the sandbox containers of ``run_id`` (every run: None) whose owner is gone; their names.

    Raises ``SandboxUnavailable`` when no Docker engine answers.
    """
    from .docker import LABEL, OWNER_LABEL, RUN_LABEL, _remove, docker_client

    client = docker_client()
    labels = [LABEL] + ([f"{RUN_LABEL}={safe_run_id(run_id)}"] if run_id is not None else [])
    removed = []
    for c in client.containers.list(all=True, filters={"label": labels}):
        owner = (c.labels or {}).get(OWNER_LABEL, "")
        if owner and owner_alive(owner):
            continue
        _remove(client, c.id)
        removed.append(c.name)
    return removed

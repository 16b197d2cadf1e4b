"""The last resort: the runner as a plain subprocess with resource limits. Nothing isolates it.

Limits: address space (or a memory cgroup when root), processes (RLIMIT_NPROC,
or a pids cgroup when root), CPU seconds, file size, wall clock. The pipeline
can read and write whatever pipemend's user can, and reach the network: every
use says so, loudly.

It cannot mask a job's hidden paths (the files with labels), so when the target
folder holds any, the target runs from a temporary copy of its folder that
leaves them out (and ``.git``, ``.venv``, ``__pycache__``); symlinks are copied
as symlinks, and one that leads to a hidden file is left out too. That keeps a
pipeline from reading its labels by accident (opening its own dataset file); a
hostile one can still reach the originals by their absolute paths. What a job
writes into its target folder lands in the copy and is discarded with it, even
for a writable job. The copy holds only the target folder: a pipeline that
reaches into the rest of its worktree (``../``) finds nothing there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..protocols import SandboxJob, SandboxOutcome
from .common import SandboxLimits, check_job, masked_paths, pipeline_env, pipemend_package_dir, runner_command, target_dir
from .limited import describe, run_limited
from .venvs import target_python

WARNING = (
    "WARNING: the 'process' sandbox does NOT isolate the pipeline: it runs as your user, with your files "
    "and your network, under resource limits only. Use docker or bwrap (see `pipemend doctor`)."
)
COPY_NOTE = (
    "sandbox process: it cannot mask files, so the target runs from a temporary copy of its folder without "
    "its dataset files (labels); what the pipeline writes into its folder there is discarded"
)
COPY_PREFIX = "pipemend-target-"
SKIP_NAMES = frozenset({".git", ".venv", "__pycache__"})
"""Never copied: big, and nothing a pipeline needs to run."""


def _hidden_paths(job: SandboxJob) -> set[Path]:
    """Host paths to leave out of the copy: each hidden path's real path, and the hidden path itself if a symlink."""
    target = target_dir(job).resolve()
    root = job.worktree.resolve()
    return {root / m.rel for m in masked_paths(job)} | {target / rel for rel in job.hidden if (target / rel).is_symlink()}


def sweep_stale_copies(root: Path | None = None) -> int:
    """Remove copies left by a pipemend that was killed mid-run (their pid is in the name); returns how many."""
    n = 0
    for d in Path(root or tempfile.gettempdir()).glob(f"{COPY_PREFIX}*"):
        pid = d.name[len(COPY_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        except PermissionError:  # alive, someone else's
            pass
    return n


@contextmanager
def target_copy(job: SandboxJob) -> Iterator[Path | None]:
    """A temporary copy of the target folder without its hidden paths, removed afterwards; None if nothing to hide."""
    hidden = _hidden_paths(job)
    if not hidden:
        yield None
        return
    src = target_dir(job).resolve()

    def ignore(folder: str, names: list[str]) -> list[str]:
        left_out = []
        for name in names:
            p = Path(folder) / name
            if name in SKIP_NAMES or p in hidden:
                left_out.append(name)
            elif p.is_symlink():
                real = p.resolve()
                if real in hidden or any(h in real.parents for h in hidden):
                    left_out.append(name)
        return left_out

    sweep_stale_copies()
    tmp = Path(tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-"))
    try:
        dst = tmp / src.name
        shutil.copytree(src, dst, symlinks=True, ignore=ignore)
        yield dst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ProcessSandbox:
    name = "process"

    def __init__(self, limits: SandboxLimits | None = None, announce: Callable[[str], None] = print):
        self.limits = limits or SandboxLimits()
        self.announce = announce
        self._warned = False
        self._noted_copy = False

    def run(self, job: SandboxJob) -> SandboxOutcome:
        check_job(job)
        if not self._warned:
            self.announce(WARNING)
            self._warned = True
        python = target_python(job.requirements, self.announce)
        job.out_dir.mkdir(parents=True, exist_ok=True)
        with target_copy(job) as copy:
            if copy is None:
                cmd = runner_command(job, python=str(python), work=str(job.worktree.resolve()),
                                     out=str(job.out_dir.resolve()), inputs=str(job.inputs_file.resolve()), socket=None)
            else:
                if not self._noted_copy:
                    self.announce(COPY_NOTE)
                    self._noted_copy = True
                cmd = runner_command(dataclasses.replace(job, target_subdir=""), python=str(python), work=str(copy),
                                     out=str(job.out_dir.resolve()), inputs=str(job.inputs_file.resolve()), socket=None)
            env = pipeline_env(
                job,
                PATH=os.environ.get("PATH", "/usr/bin:/bin"),
                HOME=os.environ.get("HOME", "/tmp"),
                PYTHONPATH=str(pipemend_package_dir().parent),
            )
            f = run_limited(cmd, env=env, cwd=job.out_dir, limits=self.limits, wall_timeout_s=job.wall_timeout_s)
        return SandboxOutcome(sandbox=self.name, returncode=f.returncode, timed_out=f.timed_out,
                              error=describe(f, self.limits, job.wall_timeout_s), stdout_tail=f.stdout,
                              stderr_tail=f.stderr, startup_s=f.startup_s, wall_s=f.wall_s)

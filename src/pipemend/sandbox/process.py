"""The unsafe opt-in: the runner as a plain subprocess with resource limits. Nothing isolates it.

Never chosen by ``auto``: only ``--sandbox process`` runs it, with a loud warning.
When pipemend runs as root, the pipeline runs as uid/gid 65534 from a copy of
its target folder and inputs in a scratch folder outside the run directory
(``scratch/out`` owned by 65534, the rest read-only to it), so a run directory
made 0700 is out of its reach, provided uid 65534 can run the interpreter (a
Python under /root cannot be: then it runs as root and says loudly that it
cannot hide the run directory). As any other user it runs as that user and can
read (and rewrite) everything that user can, the run directory included: every
use then says so.

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
from .common import (
    NOBODY,
    SandboxLimits,
    check_job,
    chown_tree,
    masked_paths,
    pipeline_env,
    pipemend_package_dir,
    readable_by_all,
    runner_command,
    target_dir,
)
from .confine import confiner
from .ingest import Scratch, noted, run_dir_of, sandbox_output
from .limited import describe, run_limited
from .ingest import record_process
from .venvs import target_python

WARNING = (
    "WARNING: the 'process' sandbox does NOT isolate the pipeline: no namespaces, your network, "
    "resource limits only. Use docker or bwrap (see `pipemend doctor`)."
)
CONFINED_NOTE = (
    "sandbox process: {why}, so the pipeline runs as root without any capability, in a mount namespace where the "
    "run directories are covered (empty, mode 0000); it can still write what root owns elsewhere: prefer docker "
    "or bwrap"
)
WARNING_NOT_ROOT = (
    "WARNING: pipemend is not root, so the 'process' sandbox runs the pipeline as your own user: it CANNOT hide "
    "the run directory, which holds the frozen labels and the scores. A hostile pipeline can read its labels "
    "and rewrite the base's results. Use docker or bwrap for anything you did not write yourself."
)
COPY_NOTE = (
    "sandbox process: it cannot mask files, so the target runs from a temporary copy of its folder without "
    "its dataset files (labels); what the pipeline writes into its folder there is discarded"
)
NOBODY_NOTE = (
    f"sandbox process: running the pipeline as uid {NOBODY} from a temporary copy of its target folder (without "
    "its dataset files) outside the run directory; what it writes into its folder there is discarded"
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


def _ignore_for(job: SandboxJob):
    hidden = _hidden_paths(job)

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

    return ignore


def copy_target(job: SandboxJob, dest: Path) -> Path:
    """Copy the target folder into ``dest`` without its hidden paths; returns the copy's path."""
    src = target_dir(job).resolve()
    dst = dest / src.name
    shutil.copytree(src, dst, symlinks=True, ignore=_ignore_for(job))
    return dst


@contextmanager
def target_copy(job: SandboxJob) -> Iterator[Path | None]:
    """A temporary copy of the target folder without its hidden paths, removed afterwards; None if nothing to hide."""
    if not _hidden_paths(job):
        yield None
        return
    sweep_stale_copies()
    tmp = Path(tempfile.mkdtemp(prefix=f"{COPY_PREFIX}{os.getpid()}-"))
    try:
        yield copy_target(job, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ProcessSandbox:
    name = "process"

    def __init__(self, limits: SandboxLimits | None = None, announce: Callable[[str], None] = print):
        self.limits = limits or SandboxLimits()
        self.announce = announce
        self._warned = False
        self._noted_copy = False
        self._warned_blocked = False

    def run(self, job: SandboxJob) -> SandboxOutcome:
        check_job(job)
        if not self._warned:
            self.announce(WARNING)
            if os.geteuid() != 0:
                self.announce(WARNING_NOT_ROOT)
            self._warned = True
        python = target_python(job.requirements, self.announce)
        blocked = unreachable_by_nobody(python) if os.geteuid() == 0 else None
        if blocked and not self._warned_blocked:
            self.announce(CONFINED_NOTE.format(why=blocked))
            self._warned_blocked = True
        with sandbox_output(job) as scratch:
            if os.geteuid() == 0:
                outcome = self._run_as_root(job, python, scratch, confined=bool(blocked))
            else:
                outcome = self._run_as_us(job, python, scratch)
        return noted(outcome, scratch.report)

    def _run_as_us(self, job: SandboxJob, python: Path, scratch: Scratch) -> SandboxOutcome:
        with target_copy(job) as copy:
            if copy is not None and not self._noted_copy:
                self.announce(COPY_NOTE)
                self._noted_copy = True
            work, sub = (str(job.worktree.resolve()), job.target_subdir) if copy is None else (str(copy), "")
            return self._launch(job, python, scratch, work, sub, job.inputs_file.resolve(), user=None)

    def _run_as_root(self, job: SandboxJob, python: Path, scratch: Scratch, confined: bool) -> SandboxOutcome:
        """As root: the pipeline runs from copies in the scratch folder, as 65534 (the run directory is 0700).

        ``confined``: 65534 cannot run the interpreter, so the pipeline stays uid 0
        without any capability, in a mount namespace where the run directories
        are covered (``confine``).
        """
        if not self._noted_copy:
            self.announce(NOBODY_NOTE)
            self._noted_copy = True
        (scratch.root / "work").mkdir(mode=0o755)
        copy = copy_target(job, scratch.root / "work")
        inputs = scratch.root / "inputs.jsonl"
        shutil.copyfile(job.inputs_file, inputs)
        os.chmod(inputs, 0o644)
        if confined:
            cover = confiner(run_folders(job.out_dir, keep=[python, pipemend_package_dir(), scratch.root]))
            return self._launch(job, python, scratch, str(copy), "", inputs, user=None, confine=cover)
        os.chown(scratch.out, NOBODY, NOBODY)
        readable_by_all(copy)
        if job.writable:
            chown_tree(copy, NOBODY, NOBODY)
        return self._launch(job, python, scratch, str(copy), "", inputs, user=NOBODY)

    def _launch(self, job: SandboxJob, python: Path, scratch: Scratch, work: str, subdir: str, inputs: Path,
                user: int | None, confine: Callable[[], None] | None = None) -> SandboxOutcome:
        cmd = runner_command(dataclasses.replace(job, target_subdir=subdir), python=str(python), work=work,
                             out=str(scratch.out), inputs=str(inputs), socket=None)
        env = pipeline_env(
            job,
            PATH=os.environ.get("PATH", "/usr/bin:/bin"),
            HOME=str(scratch.out) if os.geteuid() == 0 else os.environ.get("HOME", "/tmp"),
            PYTHONPATH=str(pipemend_package_dir().parent),
        )
        f = run_limited(cmd, env=env, cwd=scratch.out, limits=self.limits, wall_timeout_s=job.wall_timeout_s,
                        user=user, confine=confine, on_start=lambda pid: record_process(scratch, pid))
        return SandboxOutcome(sandbox=self.name, returncode=f.returncode, timed_out=f.timed_out,
                              error=describe(f, self.limits, job.wall_timeout_s), stdout_tail=f.stdout,
                              stderr_tail=f.stderr, startup_s=f.startup_s, wall_s=f.wall_s)


def run_folders(out_dir: Path, keep: list[Path]) -> list[str]:
    """What to cover for a confined pipeline: the run's reports folder (every run in it), or the run alone.

    The reports folder is covered only when nothing the pipeline needs (``keep``)
    lies inside it; a job with no run directory covers nothing.
    """
    run_dir = run_dir_of(out_dir)
    if run_dir is None:
        return []
    reports = run_dir.parent
    needed = [Path(k).resolve() for k in keep]
    if any(reports == k or reports in k.parents for k in needed):
        return [str(run_dir)]
    return [str(reports)]


def unreachable_by_nobody(python: Path) -> str | None:
    """Why uid 65534 could not run ``python`` with pipemend's runner source (a folder it cannot enter), or None."""
    for path in (python.parent.parent, python.resolve().parent.parent, pipemend_package_dir()):
        for p in [path, *path.parents]:
            try:
                mode = p.stat().st_mode
            except OSError:
                continue
            if p.is_dir() and not mode & 0o001:
                return f"uid {NOBODY} cannot enter {p} (mode {mode & 0o777:o}) on the way to {path}"
    return None

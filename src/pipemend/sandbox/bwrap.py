"""The bubblewrap sandbox: the runner in fresh namespaces, for hosts without a Docker engine.

``--unshare-all`` (no network: the gateway's unix socket is bound in and the
runner's forwarder serves it on the sandbox's loopback), ``--cap-drop ALL``,
uid/gid 65534, ``--die-with-parent``, ``--new-session``, a read-only root with a
fresh /tmp, /run and /dev, read-only binds of /usr and of the Python that runs the target (pipemend's
interpreter and venv, or the target's cached venv). Only a fresh scratch folder
outside the run directory (``ingest`` takes the expected files from it afterwards)
and the worktree, when the job is writable, can be written; the run directory is
not mounted; the job's hidden paths (the
files with labels) are masked inside the worktree: a file by /dev/null, a
folder by an empty read-only tmpfs. Nothing else of the host is
visible: no home folder, no /etc beyond a few harmless files, no Docker socket.
Limits come from ``limited.run_limited`` (cgroup when root, rlimits otherwise).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..errors import SandboxUnavailable
from ..protocols import SandboxJob, SandboxOutcome
from .common import (
    IN_INPUTS,
    IN_OUT,
    IN_SOCKET,
    IN_WORK,
    NOBODY,
    SandboxLimits,
    check_job,
    masked_paths,
    pipeline_env,
    pipemend_package_dir,
    runner_command,
    socket_reachable_by_all,
)
from .ingest import Scratch, noted, sandbox_output
from .limited import describe, run_limited
from .ingest import record_process
from .venvs import target_python

_ETC = ["/etc/ld.so.cache", "/etc/localtime", "/etc/ssl/certs", "/etc/nsswitch.conf", "/etc/alternatives"]
_PIPEMEND = "/opt/pipemend"


def bwrap_binary() -> str:
    path = shutil.which("bwrap")
    if not path:
        raise SandboxUnavailable("bubblewrap is not installed (apt-get install bubblewrap)")
    return path


def probe() -> None:
    """Start a trivial sandbox with the same namespaces; raise ``SandboxUnavailable`` with the reason if not."""
    cmd = [bwrap_binary(), "--unshare-all", "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL",
           "--die-with-parent", *system_binds(), "--proc", "/proc", "--dev", "/dev", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        msg = proc.stderr.strip()
        hint = ""
        if "namespace" in msg or "Operation not permitted" in msg or "uid map" in msg:
            hint = (" — unprivileged user namespaces look disabled: `sysctl -w kernel.unprivileged_userns_clone=1`"
                    " / `sysctl -w user.max_user_namespaces=15000`, or on Ubuntu 24.04+"
                    " `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`")
        raise SandboxUnavailable(f"bwrap cannot create a sandbox here: {msg}{hint}")


def system_binds() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        p = Path(top)
        if p.is_symlink():
            args += ["--symlink", str(p.readlink()), top]
        elif p.is_dir():
            args += ["--ro-bind", top, top]
    for f in _ETC:
        args += ["--ro-bind-try", f, f]
    return args


def python_binds(python: Path) -> list[str]:
    """Read-only binds for an interpreter: its venv (if any) and its base install.

    A target's cached venv stands on its own (``venvs``), so pipemend's own
    environment is bound only when it is the interpreter (a target without
    requirements runs on pipemend's env: that layer is then bound, whichever
    install runs).
    """
    roots = {Path(sys.base_prefix).resolve(), python.resolve().parent.parent}
    if python == Path(sys.executable):
        roots |= {Path(sys.prefix).resolve(), Path(sys.exec_prefix).resolve()}
    venv = python.parent.parent
    if (venv / "pyvenv.cfg").exists():
        roots.add(venv.resolve())
    roots.add(python.resolve().parent.parent)
    args: list[str] = []
    for r in sorted(roots, key=lambda p: len(p.parts)):
        if str(r) in ("/", "/usr") or str(r).startswith("/usr/"):
            continue
        args += ["--ro-bind", str(r), str(r)]
    return args


def _masks(job: SandboxJob) -> list[str]:
    """Arguments that hide ``job.hidden``; they must follow the worktree's bind."""
    args: list[str] = []
    for m in masked_paths(job):
        where = f"{IN_WORK}/{m.rel}"
        args += ["--tmpfs", where, "--remount-ro", where] if m.is_dir else ["--ro-bind", "/dev/null", where]
    return args


class BwrapSandbox:
    name = "bwrap"

    def __init__(self, limits: SandboxLimits | None = None, announce: Callable[[str], None] = print):
        self.limits = limits or SandboxLimits()
        self.announce = announce
        self.bwrap = bwrap_binary()

    def run(self, job: SandboxJob) -> SandboxOutcome:
        check_job(job)
        python = target_python(job.requirements, self.announce)
        socket_reachable_by_all(job.gateway_socket)
        with sandbox_output(job) as scratch:
            outcome = self._run(job, python, scratch)
        return noted(outcome, scratch.report)

    def _run(self, job: SandboxJob, python: Path, scratch: Scratch) -> SandboxOutcome:
        work_mode = "--bind" if job.writable else "--ro-bind"
        args = [
            self.bwrap,
            "--unshare-all", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--cap-drop", "ALL", "--die-with-parent", "--new-session",
            *system_binds(),
            "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", "/run/pipemend", "--dir", "/sandbox/in",
            *python_binds(python),
            "--ro-bind", str(pipemend_package_dir()), f"{_PIPEMEND}/pipemend",
            work_mode, str(job.worktree.resolve()), IN_WORK,
            *_masks(job),
            "--bind", str(scratch.out), IN_OUT,
            "--ro-bind", str(job.inputs_file.resolve()), IN_INPUTS,
        ]
        if job.gateway_socket is not None:
            args += ["--bind", str(Path(job.gateway_socket).resolve()), IN_SOCKET]
        env = pipeline_env(job, PATH="/usr/bin:/bin", HOME="/tmp", PYTHONPATH=_PIPEMEND)
        args += ["--remount-ro", "/", "--clearenv", "--chdir", "/tmp"]
        for k, v in env.items():
            args += ["--setenv", k, v]
        args += runner_command(job, python=str(python), work=IN_WORK, out=IN_OUT, inputs=IN_INPUTS,
                               socket=IN_SOCKET if job.gateway_socket else None)
        f = run_limited(args, env={"PATH": "/usr/bin:/bin"}, cwd=Path("/"), limits=self.limits,
                        wall_timeout_s=job.wall_timeout_s, on_start=lambda pid: record_process(scratch, pid))
        return SandboxOutcome(sandbox=self.name, returncode=f.returncode, timed_out=f.timed_out,
                              error=describe(f, self.limits, job.wall_timeout_s), stdout_tail=f.stdout,
                              stderr_tail=f.stderr, startup_s=f.startup_s, wall_s=f.wall_s)

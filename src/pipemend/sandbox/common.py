"""What every sandbox shares: limits, the runner's command line, a safe environment, output ownership,
and the paths it must mask (``SandboxJob.hidden``: the files that hold labels).

Paths inside an isolated sandbox (Docker and bubblewrap use the same layout):
``/sandbox/work`` the candidate worktree, ``/sandbox/out`` the out_dir,
``/sandbox/in/inputs.jsonl`` the inputs (a prefix no host path is likely to share), ``/run/pipemend/gateway.sock`` the gateway's unix socket.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

import pipemend

from ..errors import UsageError
from ..protocols import SandboxJob

NOBODY = 65534
IN_WORK = "/sandbox/work"
IN_OUT = "/sandbox/out"
IN_INPUTS = "/sandbox/in/inputs.jsonl"
IN_SOCKET = "/run/pipemend/gateway.sock"
TAIL_CHARS = 4000
# Never handed to a pipeline, whatever job.env says.
_SECRET = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|AWS_|DOCKER_HOST)", re.IGNORECASE)


class SandboxLimits(BaseModel):
    """Resources one candidate evaluation (one SandboxJob) may use."""

    model_config = ConfigDict(extra="forbid")

    memory_mb: int = Field(2048, ge=64, description="Memory for the whole sandbox (container memory / cgroup / RLIMIT_AS).")
    pids: int = Field(256, ge=16, description="Processes and threads at once (fork bombs stop here).")
    cpus: float = Field(2.0, gt=0, description="CPU cores (Docker: nano_cpus). Other sandboxes cap CPU seconds instead.")
    tmp_mb: int = Field(256, ge=16, description="Size of the fresh /tmp (Docker tmpfs).")
    file_mb: int = Field(1024, ge=1, description="Largest file the pipeline may write (RLIMIT_FSIZE, bwrap/process).")


def pipemend_package_dir() -> Path:
    """The folder of the pipemend package whose source the sandboxes mount read-only.

    Inside, only ``pipemend/__init__.py``, ``trace.py`` and ``runtime/`` are
    imported (standard library only), so any Python the sandbox has can run it.
    """
    return Path(pipemend.__file__).resolve().parent


def runner_command(
    job: SandboxJob, *, python: str, work: str, out: str, inputs: str, socket: str | None
) -> list[str]:
    """``python -m pipemend.runtime.runner ...`` for a job, with paths as the sandbox sees them."""
    target = work if not job.target_subdir else f"{work}/{job.target_subdir}"
    cmd = [
        python, "-m", "pipemend.runtime.runner",
        "--target", target,
        "--entrypoint", job.entrypoint,
        "--inputs", inputs,
        "--out", out,
        "--concurrency", str(job.concurrency),
        "--timeout", str(job.example_timeout_s),
        "--model", job.model,
    ]
    cmd += ["--gateway-socket", socket] if socket else ["--gateway-url", job.gateway_url]
    return cmd


def pipeline_env(job: SandboxJob, **base: str) -> dict[str, str]:
    """The environment a pipeline gets: ``base`` plus ``job.env`` minus anything that looks like a secret."""
    env = {"LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **base}
    for k, v in job.env.items():
        if not _SECRET.search(k):
            env[k] = v
    return env


def tail(data: bytes | str | None, n: int = TAIL_CHARS) -> str:
    if not data:
        return ""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text[-n:]


def target_dir(job: SandboxJob) -> Path:
    """The target's folder on the host."""
    return job.worktree / job.target_subdir if job.target_subdir else job.worktree


def check_job(job: SandboxJob) -> None:
    """Fail early, with the path, when a job points at something missing."""

    target = target_dir(job)
    if not target.is_dir():
        raise UsageError(f"sandbox job: target folder {target} does not exist")
    for rel in job.hidden:
        if not rel.strip() or Path(rel).is_absolute():
            raise UsageError(f"sandbox job: hidden path {rel!r} must be relative to the target folder {target}")
    if not job.inputs_file.is_file():
        raise UsageError(f"sandbox job: inputs file {job.inputs_file} does not exist")
    if job.gateway_socket is not None and not Path(job.gateway_socket).exists():
        raise UsageError(f"sandbox job: gateway socket {job.gateway_socket} does not exist")


@dataclass(frozen=True)
class Masked:
    """One hidden path as it must be masked: ``rel`` to the worktree root (POSIX), and whether it is a folder."""

    rel: str
    is_dir: bool


def masked_paths(job: SandboxJob) -> list[Masked]:
    """What of ``job.hidden`` is visible inside the worktree and so must be masked, outermost first.

    Each path is resolved on the host with symlinks followed, so the *real* file
    is masked (a symlink to it, inside the sandbox, then reaches the mask too).
    A path that does not exist, or whose real path lies outside the worktree (a
    sandbox mounts only the worktree, so it cannot be read there), needs no
    mask; one inside an already masked folder is covered by that folder's mask.
    """
    root = job.worktree.resolve()
    target = target_dir(job)
    found: dict[Path, bool] = {}
    for rel in job.hidden:
        real = (target / rel).resolve()
        if real.exists() and real != root and root in real.parents:
            found[real] = real.is_dir()
    out: list[Masked] = []
    for real in sorted(found, key=lambda r: (len(r.parts), str(r))):
        if any(m.is_dir and root / m.rel in real.parents for m in out):
            continue
        out.append(Masked(real.relative_to(root).as_posix(), found[real]))
    return out


@contextmanager
def owned_by(uid: int, paths: list[Path]) -> Iterator[None]:
    """While running as root, hand ``paths`` (recursively) to ``uid`` and give them back afterwards.

    The sandboxed pipeline runs as an unprivileged user; this is how it may write
    its out_dir (and a writable worktree) without making them world-writable.
    Does nothing when pipemend itself is not root (the sandbox then runs as us).
    """
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    owners = {p: (p.stat().st_uid, p.stat().st_gid) for p in paths}
    for p in paths:
        chown_tree(p, uid, uid)
    try:
        yield
    finally:
        for p, (u, g) in owners.items():
            if p.exists():
                chown_tree(p, u, g)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """``chown -R`` without following links."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
            except FileNotFoundError:
                pass


def readable_by_all(root: Path) -> None:
    """``chmod -R a+rX`` without following links: the sandbox user (65534) must read (and run) the tree."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                mode = os.stat(p).st_mode
                os.chmod(p, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def socket_reachable_by_all(sock: Path | None) -> None:
    """The sandbox user must be able to connect to the gateway's socket (connect needs write permission)."""
    if sock is None:
        return
    mode = Path(sock).stat().st_mode & 0o777
    if mode & 0o006 != 0o006 and os.access(sock, os.W_OK):
        try:
            os.chmod(sock, mode | 0o666)
        except PermissionError:
            pass

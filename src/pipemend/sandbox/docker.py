"""The Docker sandbox: one locked-down container per candidate evaluation (docker SDK).

The container runs ``python -m pipemend.runner`` from the image built by
``sandboxes/build``; pipemend's own source is mounted read-only on PYTHONPATH
(so changing pipemend never rebuilds the image). No network at all
(``network_mode="none"``): the gateway's unix socket is mounted and the
runner's forwarder serves it on the container's loopback. Read-only root,
tmpfs /tmp, no capabilities, no-new-privileges, uid 65534, memory / pid / CPU
limits and a wall-clock limit; no Docker socket, no host environment. Each
hidden path of the job (the files with labels) is masked: a file by a read-only
bind of /dev/null over it, a folder by an empty read-only tmpfs.

The container sees only the worktree, a fresh scratch folder for its output
(outside the run directory; ``ingest`` takes the expected files from it
afterwards), the inputs file, pipemend's runner source and the gateway socket.
Each container is labelled with its run (``pipemend.run``) and the pipemend
process that drives it (``pipemend.owner``), so ``reap`` can remove what a
killed pipemend left behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import docker
import docker.errors
from docker.types import Mount

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
    owned_by,
    pipeline_env,
    pipemend_package_dir,
    runner_command,
    socket_reachable_by_all,
    tail,
)
from .ingest import noted, owner_token, sandbox_output

LABEL = "pipemend.sandbox"
RUN_LABEL = "pipemend.run"
OWNER_LABEL = "pipemend.owner"
_IMAGE_CACHE: dict[str, str] = {}
_IMAGE_LOCK = threading.Lock()


def sandboxes_dir() -> Path:
    """``sandboxes/`` of this checkout (``PIPEMEND_SANDBOXES_DIR`` overrides)."""
    env = os.environ.get("PIPEMEND_SANDBOXES_DIR")
    return Path(env) if env else pipemend_package_dir().parent.parent / "sandboxes"


def docker_client() -> Any:
    """A connected docker SDK client, or ``SandboxUnavailable`` saying why and how to fix it."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception as e:
        raise SandboxUnavailable(
            f"no Docker engine answers ({type(e).__name__}: {e}); start it "
            "(`dockerd &` or `systemctl start docker`) or run `sandboxes/ci-setup.sh start`"
        ) from e


def image_tag(requirements: Path | None = None) -> str:
    """The tag ``sandboxes/build`` gives the current inputs (no build)."""
    return _build(["--print-tag"], requirements, capture=True).strip().splitlines()[-1]


def ensure_image(requirements: Path | None = None, announce: Callable[[str], None] = print) -> str:
    """The sandbox image (with a layer for ``requirements``), built on first use; returns its tag."""
    key = str(Path(requirements).resolve()) + ":" + _file_digest(requirements) if requirements else ""
    with _IMAGE_LOCK:
        if key in _IMAGE_CACHE:
            return _IMAGE_CACHE[key]
        tag = image_tag(requirements)
        client = docker_client()
        try:
            client.images.get(tag)
        except Exception:
            announce(f"building sandbox image {tag} (first use; debootstrap + offline wheels, a few minutes)")
            _build([], requirements, capture=False)
        _IMAGE_CACHE[key] = tag
        return tag


def _file_digest(path: Path | None) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def _build(args: list[str], requirements: Path | None, *, capture: bool) -> str:
    script = sandboxes_dir() / "build"
    if not script.is_file():
        raise SandboxUnavailable(f"{script} not found (set PIPEMEND_SANDBOXES_DIR to pipemend's sandboxes/ folder)")
    cmd = [os.environ.get("PIPEMEND_BUILD_PYTHON", "python3"), str(script), *args]
    if requirements:
        cmd += ["--requirements", str(requirements)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SandboxUnavailable(f"sandboxes/build failed ({proc.returncode}): {tail(proc.stderr, 2000)}")
    return proc.stdout


class DockerSandbox:
    """Runs each SandboxJob in a fresh container, removed afterwards whatever happens."""

    name = "docker"

    def __init__(self, limits: SandboxLimits | None = None, image: str | None = None,
                 announce: Callable[[str], None] = print):
        self.limits = limits or SandboxLimits()
        self.image = image
        self.announce = announce
        self.client = docker_client()

    def run(self, job: SandboxJob) -> SandboxOutcome:
        check_job(job)
        t0 = time.monotonic()
        image = self.image or ensure_image(job.requirements, self.announce)
        socket_reachable_by_all(job.gateway_socket)
        with sandbox_output(job) as scratch:
            if os.geteuid() == 0:
                os.chown(scratch.out, NOBODY, NOBODY)
            with owned_by(NOBODY, [job.worktree] if job.writable else []):
                outcome = self._run(job, image, t0, scratch.out, scratch.run_id)
        return noted(outcome, scratch.report)

    def _run(self, job: SandboxJob, image: str, t0: float, out: Path, run_id: str) -> SandboxOutcome:
        lim = self.limits
        volumes = {
            str(job.worktree.resolve()): {"bind": IN_WORK, "mode": "rw" if job.writable else "ro"},
            str(out): {"bind": IN_OUT, "mode": "rw"},
            str(job.inputs_file.resolve()): {"bind": IN_INPUTS, "mode": "ro"},
            str(pipemend_package_dir()): {"bind": "/opt/pipemend/pipemend", "mode": "ro"},
        }
        if job.gateway_socket is not None:
            volumes[str(Path(job.gateway_socket).resolve())] = {"bind": IN_SOCKET, "mode": "rw"}
        mounts = _masks(job)
        cmd = runner_command(job, python="python3", work=IN_WORK, out=IN_OUT, inputs=IN_INPUTS,
                             socket=IN_SOCKET if job.gateway_socket else None)
        # A backstop if pipemend itself dies (kill -9) while the container runs: it ends on its own.
        cmd = ["timeout", "-s", "KILL", str(int(job.wall_timeout_s) + 30), *cmd]
        env = pipeline_env(job, HOME="/tmp", PYTHONPATH="/opt/pipemend", PATH="/opt/venv/bin:/usr/bin:/bin")
        container = None
        try:
            container = self.client.containers.create(
                image,
                cmd,
                name=f"pipemend-{run_id}-{uuid.uuid4().hex[:12]}",
                labels={LABEL: "1", RUN_LABEL: run_id, OWNER_LABEL: owner_token()},
                user=f"{NOBODY}:{NOBODY}",
                environment=env,
                working_dir="/tmp",
                volumes=volumes,
                mounts=mounts,
                network_mode="none",
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={lim.tmp_mb}m", "/run": "rw,nosuid,nodev,size=1m"},
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                mem_limit=f"{lim.memory_mb}m",
                memswap_limit=f"{lim.memory_mb}m",
                pids_limit=lim.pids,
                nano_cpus=int(lim.cpus * 1e9),
                ipc_mode="private",
                init=True,
                detach=True,
            )
            container.start()
            startup = time.monotonic() - t0
            done = threading.Event()
            watch = threading.Thread(target=_watch_pids, args=(container.id, done, hits := []), daemon=True)
            watch.start()
            timed_out = False
            try:
                status = container.wait(timeout=job.wall_timeout_s)
            except Exception:  # requests' ReadTimeout / ConnectionError: the wall-clock limit
                timed_out = True
                _quietly(container.kill)
                status = container.wait(timeout=60)
            state = self.client.api.inspect_container(container.id)["State"]
            done.set()
            watch.join(timeout=2)
            pids_hit = bool(hits) or _pids_limit_hit(container.id)
            stdout = container.logs(stdout=True, stderr=False)
            stderr = container.logs(stdout=False, stderr=True)
            code = status.get("StatusCode")
            return SandboxOutcome(
                sandbox=self.name,
                returncode=code,
                timed_out=timed_out,
                error=_why(code, timed_out, state, stderr, self.limits, job, pids_hit),
                stdout_tail=tail(stdout),
                stderr_tail=tail(stderr),
                startup_s=startup,
                wall_s=time.monotonic() - t0,
            )
        except SandboxUnavailable:
            raise
        except Exception as e:  # the engine failed this candidate: the run goes on
            return SandboxOutcome(sandbox=self.name, returncode=None, error=f"docker: {type(e).__name__}: {e}",
                                  wall_s=time.monotonic() - t0)
        finally:
            if container is not None:
                _remove(self.client, container.id)


def _masks(job: SandboxJob) -> list[Any]:
    """Mounts that hide ``job.hidden`` inside the worktree mount (the engine mounts them after it: deeper path)."""
    out = []
    for m in masked_paths(job):
        where = f"{IN_WORK}/{m.rel}"
        if m.is_dir:
            out.append(Mount(where, None, type="tmpfs", read_only=True, tmpfs_size=4096))
        else:
            out.append(Mount(where, "/dev/null", type="bind", read_only=True))
    return out


def _pids_limit_hit(container_id: str) -> bool:
    """Whether the container's pids cgroup refused a fork (cgroup v1 or v2, cgroupfs or systemd driver)."""
    root = Path("/sys/fs/cgroup")
    for d in (root / "pids" / "docker" / container_id, root / "docker" / container_id,
              root / "system.slice" / f"docker-{container_id}.scope"):
        try:
            for line in (d / "pids.events").read_text().splitlines():
                if line.startswith("max ") and int(line.split()[1]) > 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def _watch_pids(container_id: str, done: threading.Event, hits: list[bool]) -> None:
    """Docker drops a container's cgroup when it stops, so look at pids.events while it runs."""
    while not done.wait(0.25):
        if _pids_limit_hit(container_id):
            hits.append(True)
            return


def _why(code: int | None, timed_out: bool, state: dict, stderr: bytes, lim: SandboxLimits,
         job: SandboxJob, pids_hit: bool = False) -> str | None:
    """A sentence for a batch that did not end normally or hit a limit, or None."""
    if timed_out:
        return f"killed: wall-time limit of {job.wall_timeout_s:g}s reached"
    if state.get("OOMKilled"):
        return f"killed: out of memory (limit {lim.memory_mb} MB)"
    if pids_hit:
        return f"process limit of {lim.pids} reached (exit {code}); examples without a result score 0"
    if code == 0:
        return None
    err = stderr.decode("utf-8", "replace")
    if "Resource temporarily unavailable" in err or "can't start new thread" in err:
        return f"failed: process limit of {lim.pids} reached (exit {code})"
    if code == 137:
        return "killed: SIGKILL (out of memory or killed from outside)"
    return f"runner exited with {code}"


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass


def _remove(client: Any, container_id: str, wait_s: float = 30.0) -> None:
    """Force-remove a container and wait until the engine no longer lists it."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            return
        except Exception:  # "removal already in progress", a busy cgroup...: try again
            pass
        try:
            client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return
        time.sleep(0.2)


"""Run a command with resource limits, for the bwrap and process sandboxes.

Two mechanisms, both applied when available:
- ``setrlimit`` in the child (address space, processes, CPU seconds, file size,
  no core dumps). RLIMIT_NPROC is not enforced for host root, so when pipemend
  runs as root it also needs:
- a cgroup (v1 or v2) with ``pids`` and ``memory`` limits, which also lets us
  kill every process of the sandbox at the end and tell an OOM or a pid-limit
  hit from an ordinary failure.
The wall-clock limit kills the whole process group (and the cgroup).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .common import SandboxLimits, tail

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Finished:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    oom: bool
    pids_hit: bool
    startup_s: float
    wall_s: float


class Cgroup:
    """A throwaway cgroup with pids + memory limits (v2 unified, or v1 pids/memory hierarchies)."""

    def __init__(self, limits: SandboxLimits):
        self.name = f"pipemend-{uuid.uuid4().hex[:12]}"
        self.dirs: list[Path] = []
        self.v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        mem = str(limits.memory_mb * 1024 * 1024)
        if self.v2:
            parent = CGROUP_ROOT / "pipemend"
            parent.mkdir(exist_ok=True)
            for ctl in (CGROUP_ROOT / "cgroup.subtree_control", parent / "cgroup.subtree_control"):
                ctl.write_text("+pids +memory")
            d = parent / self.name
            d.mkdir()
            self.dirs = [d]
            (d / "pids.max").write_text(str(limits.pids))
            (d / "memory.max").write_text(mem)
            _try_write(d / "memory.swap.max", "0")
        else:
            pd, md = CGROUP_ROOT / "pids" / self.name, CGROUP_ROOT / "memory" / self.name
            pd.mkdir()
            self.dirs = [pd]
            md.mkdir()
            self.dirs.append(md)
            (pd / "pids.max").write_text(str(limits.pids))
            (md / "memory.limit_in_bytes").write_text(mem)
            _try_write(md / "memory.memsw.limit_in_bytes", mem)

    @classmethod
    def try_make(cls, limits: SandboxLimits) -> "Cgroup | None":
        if os.geteuid() != 0:
            return None
        cls.sweep()
        try:
            return cls(limits)
        except OSError:
            return None

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom(self) -> bool:
        d = self.dirs[-1]
        if self.v2:
            return _event(d / "memory.events", "oom_kill") > 0
        return _event(d / "memory.oom_control", "oom_kill") > 0

    def pids_hit(self) -> bool:
        return _event(self.dirs[0] / "pids.events", "max") > 0

    def kill_all(self) -> None:
        for _ in range(50):
            pids = set()
            for f in self.procs_files():
                try:
                    pids |= {int(x) for x in Path(f).read_text().split()}
                except OSError:
                    pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def remove(self, wait_s: float = 15.0) -> None:
        """Kill what is left and remove the cgroup (a fork bomb's processes can take a while to go)."""
        deadline = time.monotonic() + wait_s
        for d in self.dirs:
            while True:
                self.kill_all()
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)

    @staticmethod
    def sweep() -> None:
        """Remove empty cgroups (older than a minute: not one being set up) an earlier pipemend left behind."""
        now = time.time()
        for d in [*CGROUP_ROOT.glob("pipemend/pipemend-*"), *CGROUP_ROOT.glob("*/pipemend-*")]:
            try:
                old = now - d.stat().st_mtime > 60
                if old and d.is_dir() and not (d / "cgroup.procs").read_text().strip():
                    d.rmdir()
            except OSError:
                pass


def _try_write(p: Path, v: str) -> None:
    try:
        p.write_text(v)
    except OSError:
        pass


def _read_int(p: Path) -> int:
    try:
        return int(p.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _event(p: Path, key: str) -> int:
    try:
        for line in p.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _user_tasks(uid: int) -> int:
    """Threads the user runs now (RLIMIT_NPROC counts all of them, not only the sandbox's)."""
    n = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            n += int(fields.get("Threads", "1").strip() or 1)
    return n


def _pdeathsig_setter():
    """PR_SET_PDEATHSIG, looked up in the parent (no dlopen after fork): the sandbox dies if pipemend is killed."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        return lambda: prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return lambda: None


def _preexec(limits: SandboxLimits, cpu_seconds: int, procs_files: list[str], as_limit: bool, nproc: int | None,
             user: int | None = None, confine: Callable[[], None] | None = None):
    die_with_parent = _pdeathsig_setter()

    def setup() -> None:
        die_with_parent()
        pid = str(os.getpid())
        for f in procs_files:  # join the cgroup before anything else runs
            with open(f, "w") as fh:
                fh.write(pid)
        mem = limits.memory_mb * 1024 * 1024
        if as_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        fsize = limits.file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if user is not None:  # last: joining the cgroup and the limits need root
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
            die_with_parent()  # a change of credentials clears the parent-death signal
        if confine is not None:
            confine()
            die_with_parent()

    return setup


def run_limited(cmd: list[str], *, env: dict[str, str], cwd: Path, limits: SandboxLimits,
                wall_timeout_s: float, user: int | None = None, confine: Callable[[], None] | None = None,
                on_start: Callable[[int], None] | None = None) -> Finished:
    """Run ``cmd`` in its own session under the limits; kill everything of it on timeout or at the end.

    ``user``: a uid (and gid) to drop to (pipemend must be root); ``confine``: a
    last step in the child (``confine.confiner``). ``on_start(pid)``
    is called once the process runs: its pid is also its process group id (what
    ``reap`` kills if pipemend dies first).
    """
    t0 = time.monotonic()
    cg = Cgroup.try_make(limits)
    # With a memory cgroup, RLIMIT_AS is left off: it counts reserved (not used) memory and trips threads early.
    cpu_seconds = max(10, int(wall_timeout_s * max(1.0, limits.cpus)) + 10)
    # RLIMIT_NPROC counts every task of the user (and is ignored for root, where the cgroup's pids.max acts).
    if user is not None:
        nproc: int | None = limits.pids + _user_tasks(user)
    else:
        nproc = None if os.geteuid() == 0 else limits.pids + _user_tasks(os.geteuid())
    preexec = _preexec(limits, cpu_seconds, cg.procs_files() if cg else [], as_limit=cg is None, nproc=nproc,
                       user=user, confine=confine)
    timed_out = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, preexec_fn=preexec)
            startup = time.monotonic() - t0
            if on_start is not None:
                on_start(proc.pid)
            try:
                code: int | None = proc.wait(timeout=wall_timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                if cg:
                    cg.kill_all()
                code = proc.wait()
            _kill_group(proc.pid)  # stragglers a pipeline left running
            oom, pids_hit = (cg.oom(), cg.pids_hit()) if cg else (False, False)
        finally:
            if cg:
                cg.remove()
        out.seek(0)
        err.seek(0)
        return Finished(code, tail(out.read()), tail(err.read()), timed_out, oom, pids_hit, startup,
                        time.monotonic() - t0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe(f: Finished, limits: SandboxLimits, wall_timeout_s: float) -> str | None:
    """Why a batch ended badly, or None."""
    if f.timed_out:
        return f"killed: wall-time limit of {wall_timeout_s:g}s reached"
    if f.oom:
        return f"killed: out of memory (limit {limits.memory_mb} MB)"
    if f.pids_hit:
        return f"process limit of {limits.pids} reached (exit {f.returncode}); examples without a result score 0"
    if f.returncode == 0:
        return None
    if "Resource temporarily unavailable" in f.stderr or "can't start new thread" in f.stderr:
        return f"failed: process limit of {limits.pids} reached (exit {f.returncode})"
    if f.returncode is not None and f.returncode < 0:
        sig = signal.Signals(-f.returncode).name if -f.returncode in signal.Signals._value2member_map_ else ""
        if sig == "SIGXCPU":
            return "killed: CPU-time limit reached"
        return f"killed by {sig or -f.returncode}"
    if "MemoryError" in f.stderr:
        return f"failed: out of memory (limit {limits.memory_mb} MB)"
    return f"runner exited with {f.returncode}"

"""The Python a target runs with outside Docker: pipemend's own, or a venv for its ``requirements``.

A target's venv is cached under ``$PIPEMEND_CACHE/venvs/<hash of the file>``. It
is layered on pipemend's environment: a ``.pth`` file adds pipemend's
site-packages *after* the venv's own, so the runner's dependencies (and
pipemend itself) are there, while anything the target pins is installed into
the venv and wins. (``--system-site-packages`` alone would not do: from inside a
venv it points at the base interpreter, not at pipemend's venv.) pip then
installs only what pipemend's environment lacks.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable

from ..errors import SandboxUnavailable


def cache_dir() -> Path:
    return Path(os.environ.get("PIPEMEND_CACHE") or Path.home() / ".cache" / "pipemend")


def target_python(requirements: Path | None, announce: Callable[[str], None] = print) -> Path:
    """The interpreter for a target: ``sys.executable``, or the cached venv built from ``requirements``."""
    if requirements is None:
        return Path(sys.executable)
    data = Path(requirements).read_bytes()
    digest = hashlib.sha256(data + sys.version.encode()).hexdigest()[:16]
    root = cache_dir() / "venvs"
    root.mkdir(parents=True, exist_ok=True)
    venv = root / digest
    python = venv / "bin" / "python"
    if python.exists():
        return python
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists():
            return python
        announce(f"making a venv for {requirements} (cached as {venv})")
        tmp = root / f"{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir := tmp)], check=True,
                           capture_output=True)
            purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv_dir), "platbase": str(venv_dir)}))
            parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
            (purelib / "_pipemend_parent_env.pth").write_text(
                "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n"
            )
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "--python", str(venv_dir / "bin" / "python"), "install",
                 "--quiet", "--disable-pip-version-check", "-r", str(Path(requirements).resolve())],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise SandboxUnavailable(f"installing {requirements} into a venv failed: {proc.stderr[-2000:]}")
            os.replace(tmp, venv)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python

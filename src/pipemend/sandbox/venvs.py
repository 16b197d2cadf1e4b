"""The Python a target runs with outside Docker: pipemend's own, or a venv of its own for its ``requirements``.

A target's venv stands on its own: it is made from the base interpreter (not
layered on the pipemend install that built it) and holds the target's
requirements plus what the in-sandbox runner needs (``RUNNER_REQUIREMENTS``:
nothing beyond the standard library today; the runner's code is mounted from
pipemend's package folder). So a second pipemend install, or one that was
moved or deleted, never breaks it, and bubblewrap needs to bind only the venv
and the base interpreter.

Its cache key is everything it depends on: the requirements' bytes, the base
interpreter's real path and version, the runner's requirements and
``LAYOUT`` (bumped when the way venvs are made changes). It is built in a
temporary folder next to its final place and renamed into place once complete
(a ``pipemend-venv.json`` marker last): a crash or a concurrent builder never
leaves a half venv under the final name, and builders of one key take turns
(``flock``). Files are made readable by everyone (the sandbox user is 65534).

Why pip from the package index (with the machine's own pip configuration, so a
local mirror or ``find-links`` is used when configured) rather than copying
wheels out of pipemend's env: a target's requirements are its own and need not
be in pipemend's env at all; pip's wheel cache makes a rebuild cheap, and it
works the same on a fresh machine, in CI and for a pipx install.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import SandboxUnavailable
from .common import readable_by_all

LAYOUT = "standalone-1"
"""How a venv is made; part of the key."""
RUNNER_REQUIREMENTS: tuple[str, ...] = ()
"""What the in-sandbox runner imports beyond the standard library (its code comes from pipemend's package dir)."""
MARKER = "pipemend-venv.json"


def cache_dir() -> Path:
    return Path(os.environ.get("PIPEMEND_CACHE") or Path.home() / ".cache" / "pipemend")


def venvs_root() -> Path:
    """Where target venvs are cached: ``$PIPEMEND_VENVS``, else ``<cache>/venvs``.

    As root with no ``PIPEMEND_CACHE`` set, ``/var/cache/pipemend/venvs``: root's
    home is not readable by the sandbox user (65534) that runs the process sandbox.
    """
    if os.environ.get("PIPEMEND_VENVS"):
        return Path(os.environ["PIPEMEND_VENVS"])
    if os.geteuid() == 0 and not os.environ.get("PIPEMEND_CACHE"):
        return Path("/var/cache/pipemend/venvs")
    return cache_dir() / "venvs"


def base_python() -> Path:
    """The base interpreter under pipemend's own venv (what a target venv is made from)."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def venv_key(requirements: Path) -> str:
    """Hash of everything a target venv depends on."""
    h = hashlib.sha256()
    for part in (LAYOUT, str(base_python()), sys.version, "\n".join(RUNNER_REQUIREMENTS),
                 Path(requirements).read_bytes()):
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def target_python(requirements: Path | None, announce: Callable[[str], None] = print) -> Path:
    """The interpreter for a target: ``sys.executable``, or the cached venv built from ``requirements``."""
    if requirements is None:
        return Path(sys.executable)
    key = venv_key(requirements)
    root = venvs_root()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    venv = root / key
    python = venv / "bin" / "python"
    if (venv / MARKER).is_file():
        return python
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / MARKER).is_file():
            return python
        announce(f"making a venv for {requirements} (cached as {venv})")
        if venv.exists():  # not ours, not complete: an older layout or a foreign folder
            shutil.rmtree(venv, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.build-", dir=root))
        try:
            _build(tmp, Path(requirements))
            os.replace(tmp, venv)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return python


def _build(venv: Path, requirements: Path) -> None:
    made = subprocess.run([str(base_python()), "-m", "venv", "--without-pip", "--clear", str(venv)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SandboxUnavailable(f"making a venv with {base_python()} failed: {made.stderr[-2000:]}")
    req_args = ["-r", str(requirements.resolve()), *RUNNER_REQUIREMENTS]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--disable-pip-version-check", "--no-warn-script-location", *req_args],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SandboxUnavailable(f"installing {requirements} into a venv failed: {proc.stderr[-2000:]}")
    readable_by_all(venv)
    (venv / MARKER).write_text(json.dumps({
        "format": "pipemend-venv-1", "layout": LAYOUT, "base_python": str(base_python()),
        "python_version": sys.version, "requirements": requirements.read_text(errors="replace"),
        "runner_requirements": list(RUNNER_REQUIREMENTS),
    }, indent=2) + "\n")
    os.chmod(venv / MARKER, 0o644)
    os.chmod(venv, 0o755)


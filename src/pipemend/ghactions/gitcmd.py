"""``git`` as a subprocess for the CI jobs: a failure is a ``RunFailed`` quoting git's own words."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import RunFailed


def git_bytes(repo: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
        raise RunFailed(f"git {' '.join(args[:2])} in {repo}: {why}")
    return proc.stdout


def git(repo: Path, *args: str) -> str:
    return git_bytes(repo, *args).decode("utf-8", "replace")

"""Shared by the sandbox tests: the three sandbox kinds as parameters, and a scratch folder the test can watch."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipemend.errors import SandboxUnavailable
from pipemend.sandbox import get_sandbox

SANDBOXES = [pytest.param("docker", marks=pytest.mark.docker), pytest.param("bwrap", marks=pytest.mark.bwrap),
             "process"]


def sandbox_or_skip(name: str):
    """The named sandbox (the Docker image built on first use), or a skip saying why it cannot run here."""
    if name == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    try:
        sb = get_sandbox(name, announce=lambda m: None)
    except SandboxUnavailable as e:
        pytest.skip(f"{name} unavailable: {e}")
    if name == "docker":
        from pipemend.sandbox.docker import ensure_image

        ensure_image()
    return sb


@pytest.fixture
def scratch_base(monkeypatch):
    """Scratch folders go here (a folder uid 65534 may pass through), so a test can see what is left behind."""
    base = Path(tempfile.mkdtemp(prefix="pipemend-test-scratchbase-"))
    os.chmod(base, 0o755)
    monkeypatch.setenv("PIPEMEND_SCRATCH", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)

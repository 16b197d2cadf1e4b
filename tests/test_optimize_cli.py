"""``pipemend optimize`` / ``resume`` as commands: exit codes and the JSON summary."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import optimize_harness

from pipemend.cli import app

pytestmark = pytest.mark.timeout(300)


def _app():
    return app


def test_bad_usage_exits_2_with_what_and_where(tmp_path):
    runner = CliRunner()
    r = runner.invoke(_app(), ["optimize", str(tmp_path / "missing"), "--reports-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "pipemend.yaml" in r.output
    target = optimize_harness.make_repo(tmp_path / "repo")
    r = runner.invoke(_app(), ["optimize", str(target), "--budget-usd", "-1", "--reports-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--budget-usd" in r.output
    r = runner.invoke(_app(), ["optimize", str(target), "--proposer", "nosuch", "--reports-dir", str(tmp_path / "r"),
                               "--sandbox", "process"])
    assert r.exit_code == 2 and "unknown proposer" in r.output
    r = runner.invoke(_app(), ["resume", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a pipemend run directory" in r.output


def test_optimize_prints_a_json_summary(tmp_path):
    target = optimize_harness.make_repo(tmp_path / "repo")
    r = CliRunner().invoke(_app(), ["optimize", str(target), "--proposer", "optimize_plugins:Script",
                                    "--max-candidates", "0", "--sandbox", "process", "--run-id", "c1",
                                    "--reports-dir", str(tmp_path / "r"), "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["format"] == "pipemend-optimize-summary-1" and summary["stop_reason"].startswith("candidate limit")
    assert summary["baseline"] == {"train": 0.0, "val": 0.0, "test": 0.0}


def test_one_mapping_from_errors_to_exit_codes():
    from pipemend.cli import exit_code
    from pipemend.errors import BudgetExhausted, ConfigError, RunFailed, SandboxUnavailable, UsageError

    assert exit_code(UsageError("x")) == exit_code(ConfigError("f", "k", "bad")) == 2
    assert exit_code(SandboxUnavailable("no docker")) == 2
    assert exit_code(RunFailed("x")) == exit_code(BudgetExhausted("spent")) == 1
    assert exit_code(ValueError("a bug")) is None  # a bug keeps its traceback

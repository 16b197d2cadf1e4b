"""`pipemend init DIR --from FORMAT FILE` through the CLI, then `pipemend eval` on the converted rows.

Real parts: the CLI, the converted files, the gateway (`simulated/echo`), the process sandbox and runner.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipemend.cli import app

TARGETS = Path(__file__).parent / "fixtures" / "targets"
FIXTURES = Path(__file__).parent / "fixtures" / "importers"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the gateway's response cache
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def echo_pipeline(tmp_path: Path) -> Path:
    d = tmp_path / "echo"
    d.mkdir()
    shutil.copy(TARGETS / "echo_qa" / "pipeline.py", d / "pipeline.py")
    return d


def test_init_from_csv_prints_the_mapping_and_eval_runs_on_the_rows(tmp_path: Path) -> None:
    src = tmp_path / "echo.csv"
    src.write_text("question,answer\n" + "".join(f"say {w},say {w}\n" for w in "abcdefghij"))
    d = echo_pipeline(tmp_path)
    res = run_cli("init", str(d), "--from", "csv", str(src))
    assert res.exit_code == 0, res.output
    assert "inputs.question <- question" in res.stdout and "expected        <- answer" in res.stdout
    assert "id              <- #row   (the record's number)" in res.stdout
    res = run_cli("eval", str(d), "--limit", "2", "--sandbox", "process", "--model", "simulated/echo", "--json",
                  "--reports-dir", str(tmp_path / "reports"), "--run-id", "e1")
    assert res.exit_code == 0, res.output
    val = json.loads(res.stdout)["splits"]["val"]
    assert (val["n"], val["score"], val["errors"]) == (2, 1.0, 0)  # the echo is right: inputs and expected lined up


def test_reimport_through_the_cli_leaves_identical_rows_alone(tmp_path: Path) -> None:
    d = echo_pipeline(tmp_path)
    assert run_cli("init", str(d), "--from", "jsonl", str(FIXTURES / "qa.jsonl"), "--map", "meta.answer=expected").exit_code == 0
    res = run_cli("init", str(d), "--reimport")
    assert res.exit_code == 0, res.output
    assert f"unchanged {d / 'data.jsonl'}" in " ".join(res.stdout.split())


@pytest.mark.parametrize("args, says", [
    (["--from", "squad", "x.json"], "unknown format"),
    (["--from", "csv"], "give the FILE to convert"),
    (["--reimport", "--from", "csv", "x.csv"], "give no --from or FILE"),
    (["x.csv"], "FILE and --map go with --from FORMAT"),
])
def test_bad_usage_exits_2_with_a_message(tmp_path: Path, args: list[str], says: str) -> None:
    res = run_cli("init", str(echo_pipeline(tmp_path)), *args)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert says in " ".join(res.output.split())


def test_malformed_input_exits_2_naming_file_and_line_without_a_traceback(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "a"}\n{"question": \n')
    d = echo_pipeline(tmp_path)
    res = run_cli("init", str(d), "--from", "jsonl", str(src))
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert f"{src}: line 2: not valid JSON" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (d / "pipemend.yaml").exists() and not (d / "data.jsonl").exists()

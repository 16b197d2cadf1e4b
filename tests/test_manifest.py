"""Manifest cross-file checks: each problem exits 2 through the CLI, naming the file, the key and what was expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.errors import ConfigError
from pipemend.manifest import load_manifest
from pipemend.manifest_checks import glob_files

FIXTURE = Path(__file__).parent / "fixtures" / "targets" / "echo_qa"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    dst = tmp_path / "echo_qa"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def edit_manifest(target: Path, **changes) -> None:
    path = target / "pipemend.yaml"
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        cur = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur[k]
        cur[keys[-1]] = value
    path.write_text(yaml.safe_dump(data))


def eval_exit(target: Path, tmp_path: Path):
    res = CliRunner().invoke(app, ["eval", str(target), "--reports-dir", str(tmp_path / "reports"), "--json"])
    return res


def test_fixture_manifest_is_valid(target: Path) -> None:
    m = load_manifest(target)
    assert m.entrypoint == "pipeline:run"
    assert m.knobs["style"].key == "prompt.style"


CASES = {
    # id: (changes, extra file setup, substrings the message must hold)
    "module missing": ({"entrypoint": "nomod:run"}, None, ["entrypoint", "module 'nomod' not found", "importable from the target folder"]),
    "function missing": ({"entrypoint": "pipeline:nope"}, None, ["entrypoint", "defines no 'nope'", "a function nope(inputs)"]),
    "unknown metric": ({"metric": "bleu"}, None, ["metric", "unknown metric 'bleu'", "exact_match", "file.py:function"]),
    "metric file missing": ({"metric": "scorer.py:score"}, None, ["metric", "file not found", "scorer.py"]),
    "metric function missing": ({"metric": "scorer.py:score"}, ("scorer.py", "def other(o, e):\n    return 1.0\n"),
                                ["metric", "defines no top-level 'score'", "a function score in scorer.py"]),
    "dataset missing": ({"dataset__path": "nope.jsonl"}, None, ["dataset.path", "file not found", "nope.jsonl", "JSONL"]),
    "dataset outside": ({"dataset__path": "../elsewhere.jsonl"}, None, ["dataset.path", "outside the target folder", "without '..'"]),
    "protected matches nothing": ({"protected": ["tests/*.py", "secret/*.txt"]}, None,
                                  ["protected[1]", "'secret/*.txt' matches no file", "at least one file"]),
    "editable overlaps protected": ({"editable": ["pipeline.py", "tests/**"]}, None,
                                    ["editable[1]", "tests/test_pipeline.py", "protected by 'tests/*.py'", "share no file"]),
    "editable overlaps data": ({"editable": ["pipeline.py", "*.jsonl"]}, None,
                               ["editable[1]", "data.jsonl", "always protected"]),
    "knob file missing": ({"knobs__style__file": "nope.yaml"}, None, ["knobs.style.file", "file not found", "YAML, JSON or TOML"]),
    "knob key missing": ({"knobs__style__key": "prompt.tone"}, None, ["knobs.style.key", "'prompt.tone' not found in config.yaml", "dotted key path"]),
    "requirements missing": ({"requirements": "requirements.txt"}, None, ["requirements", "file not found", "pip requirements"]),
    "split sum": ({"dataset__split": {"train": 0.5, "val": 0.5, "test": 0.5, "seed": 0}}, None, ["dataset.split", "sum to 1.5"]),
    "unknown key": ({"llm__temperature": 0.2}, None, ["llm.temperature", "unknown key"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_error_exits_2_with_file_key_and_expectation(case: str, target: Path, tmp_path: Path) -> None:
    changes, extra, wants = CASES[case]
    if extra:
        (target / extra[0]).write_text(extra[1])
    edit_manifest(target, **changes)
    res = eval_exit(target, tmp_path)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""  # --json: nothing on stdout when it fails
    msg = " ".join(res.stderr.split())
    assert str(target / "pipemend.yaml") in msg or "scorer.py" in msg
    for want in wants:
        assert want in msg, (want, msg)
    assert "Traceback" not in res.output
    assert not (tmp_path / "reports").exists()  # a bad manifest creates no run directory


def test_unimportable_entrypoint_names_module_file_and_import_error(target: Path, tmp_path: Path) -> None:
    (target / "pipeline.py").write_text("import definitely_not_a_module_xyz\n\ndef run(inputs):\n    return ''\n")
    res = eval_exit(target, tmp_path)
    assert res.exit_code == 2
    msg = " ".join(res.stderr.split())
    assert "entrypoint" in msg and str(target / "pipeline.py") in msg
    assert "ModuleNotFoundError" in msg and "definitely_not_a_module_xyz" in msg


def test_import_error_of_a_declared_requirement_is_left_to_the_sandbox(target: Path) -> None:
    (target / "pipeline.py").write_text("import some_pip_only_dependency\n\ndef run(inputs):\n    return ''\n")
    (target / "requirements.txt").write_text("some-pip-only-dependency==1.0\n")
    edit_manifest(target, requirements="requirements.txt")
    load_manifest(target)  # no error: the sandbox installs it


def test_syntax_error_in_entrypoint_names_the_line(target: Path) -> None:
    (target / "pipeline.py").write_text("def run(inputs):\n    return (\n")
    with pytest.raises(ConfigError) as e:
        load_manifest(target)
    assert e.value.where == "entrypoint"
    assert "syntax error" in e.value.problem and str(target / "pipeline.py") + " line 2" in e.value.problem


def test_the_import_check_does_not_pollute_this_process(target: Path) -> None:
    import sys

    (target / "pipeline.py").write_text("import os\nos.environ['PIPEMEND_POLLUTED'] = '1'\n\ndef run(inputs):\n    return ''\n")
    load_manifest(target)
    assert "pipeline" not in sys.modules and "PIPEMEND_POLLUTED" not in __import__("os").environ


def test_custom_metric_and_knob_file_types(target: Path) -> None:
    (target / "scorer.py").write_text("def score(output, expected):\n    return float(output == expected)\n")
    (target / "knobs.toml").write_text("[retrieval]\ntop_k = [3, 5]\n")
    edit_manifest(target, metric="scorer.py:score",
                  knobs={"k": {"file": "knobs.toml", "key": "retrieval.top_k.1", "rung": "retrieval", "values": [3]}})
    m = load_manifest(target)
    assert "scorer.py" in m.all_protected()


def test_glob_files_expands_folders_and_double_star(target: Path) -> None:
    assert glob_files(target, "**/*.py") >= {"pipeline.py", "tests/test_pipeline.py"}
    assert glob_files(target, "prompts") == {"prompts/answer.txt"}
    assert glob_files(target, "../*") == set()

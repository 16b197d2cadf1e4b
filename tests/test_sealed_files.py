"""The label seal's file list: ``Manifest.sealed_paths`` (rules in ``pipemend.sealing``).

Real target folders on disk (files, symlinks, hard links); no fakes.
"""

from __future__ import annotations

import json
import os
import py_compile
from pathlib import Path

import pytest
import yaml

from pipemend.errors import ConfigError
from pipemend.manifest import MANIFEST_NAME, load_manifest

BUNDLED = Path(__file__).resolve().parents[1] / "target_pipelines" / "multihop_qa"

GENERATOR = '''import json, random
from pathlib import Path

def main():
    rng = random.Random(7)
    rows = [{"id": f"q{i}", "inputs": {"q": str(i)}, "expected": str(rng.randint(0, 9))} for i in range(4)]
    Path("data/questions.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
'''


def make_target(root: Path, **manifest_extra) -> Path:
    """A small target: a pipeline, a prompt, data/questions.jsonl (labels) and data/corpus.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.py").write_text("def run(inputs):\n    return 'x'\n")
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts" / "answer.txt").write_text("Answer briefly.\n")
    (root / "data").mkdir(exist_ok=True)
    rows = [{"id": f"q{i}", "inputs": {"q": str(i)}, "expected": str(i)} for i in range(4)]
    (root / "data" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "data" / "corpus.jsonl").write_text('{"id": "d1", "text": "Paris is in France."}\n')
    manifest = {
        "name": "t", "entrypoint": "pipeline:run",
        "dataset": {"path": "data/questions.jsonl", "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "metric": "exact_match", "editable": ["pipeline.py", "prompts/**"], "protected": ["data/**"],
        "llm": {"model": "simulated/echo"}, **manifest_extra,
    }
    (root / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


def sealed(root: Path) -> list[str]:
    return load_manifest(root, check_files=False).sealed_paths(root)


def reasons(root: Path) -> dict[str, tuple[str, bool]]:
    return {s.path: (s.reason, s.declared) for s in load_manifest(root, check_files=False).seal_plan(root)}


def config_error(root: Path) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        sealed(root)
    return e.value


# --------------------------------------------------------------------------- parsing the keys


def test_sealed_and_runtime_keys_parse_and_default_to_empty(tmp_path):
    root = make_target(tmp_path / "t", sealed=["notes/**"], runtime=["data/corpus.jsonl"])
    (root / "notes").mkdir()
    (root / "notes" / "answers.md").write_text("q0: 0\n")
    m = load_manifest(root, check_files=False)
    assert m.sealed == ["notes/**"] and m.runtime == ["data/corpus.jsonl"]
    plain = load_manifest(make_target(tmp_path / "plain"), check_files=False)
    assert plain.sealed == [] and plain.runtime == []
    assert "sealed" in type(m).model_fields and type(m).model_fields["sealed"].description
    assert "runtime" in type(m).model_fields and type(m).model_fields["runtime"].description


@pytest.mark.parametrize("key, value, problem", [
    ("sealed", ["/etc/passwd"], "absolute or climbs out"),
    ("runtime", ["../elsewhere/*.bin"], "absolute or climbs out"),
    ("sealed", [""], "empty"),
    ("sealed", "notes/**", "valid list"),
    ("runtime", [3], "valid string"),
])
def test_bad_sealed_or_runtime_values_name_the_file_the_key_and_what_was_expected(tmp_path, key, value, problem):
    root = make_target(tmp_path / "t", **{key: value})
    with pytest.raises(ConfigError) as e:
        load_manifest(root, check_files=False)
    assert e.value.file == str(root / MANIFEST_NAME)
    assert e.value.where is not None and e.value.where.startswith(key)
    assert problem in e.value.problem


def test_a_misspelt_seal_key_is_an_unknown_key(tmp_path):
    root = make_target(tmp_path / "t", seal=["x"])
    with pytest.raises(ConfigError) as e:
        load_manifest(root, check_files=False)
    assert e.value.where == "seal" and "unknown key" in e.value.problem


@pytest.mark.parametrize("key", ["sealed", "runtime"])
def test_a_glob_that_matches_nothing_is_refused(tmp_path, key):
    err = config_error(make_target(tmp_path / "t", **{key: ["secrets/*.txt"]}))
    assert err.where == f"{key}[0]" and "matches no file" in err.problem


def test_runtime_may_not_reach_the_dataset_or_the_metric(tmp_path):
    err = config_error(make_target(tmp_path / "t", runtime=["data/**"]))
    assert err.where == "runtime[0]" and "data/questions.jsonl" in err.problem and "always sealed" in err.problem
    root = make_target(tmp_path / "m", metric="score.py:score", runtime=["*.py"])
    (root / "score.py").write_text("def score(output, expected):\n    return float(output == expected)\n")
    err = config_error(root)
    assert err.where == "runtime[0]" and "score.py" in err.problem and "metric" in err.problem


def test_a_file_both_sealed_and_runtime_is_refused(tmp_path):
    err = config_error(make_target(tmp_path / "t", sealed=["data/corpus.jsonl"], runtime=["data/corpus.jsonl"]))
    assert err.where == "sealed[0]" and "data/corpus.jsonl" in err.problem


def test_a_sealed_file_may_not_be_editable_or_the_entrypoint(tmp_path):
    err = config_error(make_target(tmp_path / "t", sealed=["prompts/answer.txt"]))
    assert err.where == "editable[1]" and "prompts/answer.txt" in err.problem and "runtime" in err.expected
    root = make_target(tmp_path / "e", editable=["prompts/**"])
    (root / "pipeline.py").write_text("# reads data/questions.jsonl\ndef run(inputs):\n    return 'x'\n")
    err = config_error(root)
    assert err.where == "entrypoint" and "pipeline.py" in err.problem


# --------------------------------------------------------------------------- sealed by default


def test_the_dataset_and_a_custom_metric_are_always_sealed(tmp_path):
    root = make_target(tmp_path / "t", metric="score.py:score", runtime=["data/corpus.jsonl"])
    (root / "score.py").write_text("def score(output, expected):\n    return float(output == expected)\n")
    got = reasons(root)
    assert set(got) == {"data/questions.jsonl", "score.py"}
    assert got["data/questions.jsonl"][1] is True and got["score.py"][1] is True


def test_explicit_split_files_are_all_sealed(tmp_path):
    root = make_target(tmp_path / "t", dataset={"files": {"train": "train.jsonl", "val": "splits/val.jsonl",
                                                           "test": "splits/test.jsonl"}})
    for rel in ("train.jsonl", "splits/val.jsonl", "splits/test.jsonl"):
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_text('{"id": "a", "inputs": {}, "expected": "1"}\n')
    got = sealed(root)
    assert {"train.jsonl", "splits/val.jsonl", "splits/test.jsonl"} <= set(got)


def test_an_undeclared_generator_is_sealed_and_flagged(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    (root / "make_data.py").write_text(GENERATOR)
    (root / "tools").mkdir()
    (root / "tools" / "regen.sh").write_text("python -c 'import make_data' > data/questions.jsonl\n")
    got = reasons(root)
    assert "make_data.py" in got and "tools/regen.sh" in got
    reason, declared = got["make_data.py"]
    assert declared is False and "questions.jsonl" in reason


def test_a_compiled_generator_left_in_pycache_is_sealed(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    src = tmp_path / "make_data.py"
    src.write_text(GENERATOR)
    (root / "__pycache__").mkdir()
    py_compile.compile(str(src), cfile=str(root / "__pycache__" / "make_data.cpython-311.pyc"))
    assert "__pycache__/make_data.cpython-311.pyc" in sealed(root)


def test_everything_beside_the_dataset_is_sealed_unless_declared_runtime(tmp_path):
    root = make_target(tmp_path / "t")
    (root / "data" / "raw").mkdir()
    (root / "data" / "raw" / "answers.csv").write_text("q0,0\n")
    got = reasons(root)
    assert {"data/corpus.jsonl", "data/raw/answers.csv"} <= set(got)
    assert got["data/corpus.jsonl"] == ("inside the dataset's folder data/", False)


def test_a_declared_runtime_corpus_stays_readable(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    got = sealed(root)
    assert got == ["data/questions.jsonl"]
    assert "data/corpus.jsonl" not in got and "pipeline.py" not in got and "prompts/answer.txt" not in got


def test_copies_of_the_dataset_are_sealed_by_name_or_content(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    (root / "old").mkdir()
    (root / "old" / "questions.jsonl").write_text("{}\n")  # same name
    (root / "backup.dat").write_bytes((root / "data" / "questions.jsonl").read_bytes())  # same bytes
    got = reasons(root)
    assert "old/questions.jsonl" in got and "backup.dat" in got
    assert "content" in got["backup.dat"][0]


def test_the_manifest_itself_is_not_sealed(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    assert MANIFEST_NAME not in sealed(root)


# --------------------------------------------------------------------------- links


def test_a_symlink_to_a_sealed_file_is_sealed(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    os.symlink("data/questions.jsonl", root / "q.jsonl.txt")
    (root / "docs").mkdir()
    os.symlink("../data/questions.jsonl", root / "docs" / "examples.txt")
    got = reasons(root)
    assert "q.jsonl.txt" in got and "docs/examples.txt" in got
    assert "symlink" in got["q.jsonl.txt"][0] and got["q.jsonl.txt"][1] is False


def test_a_symlink_to_a_sealed_file_among_editable_files_is_refused(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    os.symlink("../data/questions.jsonl", root / "prompts" / "examples.txt")
    err = config_error(root)
    assert err.where == "editable[1]" and "prompts/examples.txt" in err.problem and "symlink" in err.problem


def test_a_link_chain_and_a_folder_link_are_sealed(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    os.symlink("data/questions.jsonl", root / "a")
    os.symlink("a", root / "b")
    os.symlink("data", root / "stuff")
    got = sealed(root)
    assert {"a", "b", "stuff"} <= set(got)


def test_a_symlink_leaving_the_target_is_sealed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    os.symlink(outside, root / "model.bin")
    assert "model.bin" in sealed(root)


def test_a_runtime_link_to_a_sealed_file_is_refused(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl", "index.bin"])
    os.symlink("data/questions.jsonl", root / "index.bin")
    err = config_error(root)
    assert err.where == "runtime[1]" and "index.bin" in err.problem


def test_a_hard_link_to_the_dataset_is_sealed(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    os.link(root / "data" / "questions.jsonl", root / "notes.txt")
    assert "notes.txt" in sealed(root)


def test_the_file_a_sealed_dataset_link_points_at_is_sealed(tmp_path):
    root = make_target(tmp_path / "t", runtime=["data/corpus.jsonl"])
    (root / "private").mkdir()
    (root / "data" / "questions.jsonl").rename(root / "private" / "labels.txt")
    os.symlink("../private/labels.txt", root / "data" / "questions.jsonl")
    got = reasons(root)
    assert "private/labels.txt" in got and "data/questions.jsonl" in got


# --------------------------------------------------------------------------- the bundled target


def test_the_bundled_target_seals_its_labels_and_keeps_its_corpus_readable():
    m = load_manifest(BUNDLED, check_files=False)
    got = m.sealed_paths(BUNDLED)
    assert "data/questions.jsonl" in got and "README.md" in got
    assert "data/corpus.jsonl" not in got
    assert not any(p.endswith(".py") and not p.startswith("__pycache__/") for p in got)
    # no generator inside the target: only the manifest and the sealed files name the labels file
    for path in BUNDLED.rglob("*"):
        rel = path.relative_to(BUNDLED).as_posix()
        if path.is_file() and "__pycache__" not in path.parts and rel not in got and rel != MANIFEST_NAME:
            assert b"questions.jsonl" not in path.read_bytes(), rel
    assert not (BUNDLED / "generate_data.py").exists()

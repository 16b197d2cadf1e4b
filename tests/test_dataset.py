"""Dataset rows, splits and the frozen copy: errors name file and line; splits are stable and disjoint."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.dataset import FrozenTarget, freeze_target, limit_splits, load_rows, load_splits, split_ids
from pipemend.errors import ConfigError, UsageError
from pipemend.manifest import load_manifest

FIXTURE = Path(__file__).parent / "fixtures" / "targets" / "echo_qa"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    dst = tmp_path / "echo_qa"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = '{"id": "a", "inputs": {"q": 1}, "expected": "x"}'

ROW_ERRORS = {
    "not json": (["{oops"], "line 2", "not valid JSON", "one JSON object per line"),
    "not an object": (["[1, 2]"], "line 2", "a JSON list, not an object", "an object"),
    "no id": (['{"inputs": {}}'], "line 2", "row has no `id`", None),
    "no inputs": (['{"id": "b"}'], "line 2", "row has no `inputs`", None),
    "inputs not object": (['{"id": "b", "inputs": "hello"}'], "line 2", "`inputs` is a str", "JSON object"),
    "unknown key": (['{"id": "b", "inputs": {}, "label": 1}'], "line 2", "unknown key(s) 'label'", "only id, inputs, expected, evidence, evidence_text"),
    "duplicate id": (['{"id": "a", "inputs": {}}'], "line 2", "duplicate id 'a' (first on line 1)", "unique ids"),
    "id with slash": (['{"id": "../x", "inputs": {}}'], "line 2", "cannot name a trace file", None),
    "bad evidence": (['{"id": "b", "inputs": {}, "evidence": "d1"}'], "line 2", "`evidence` is not a list", None),
    "evidence_text not a list": (['{"id": "b", "inputs": {}, "evidence_text": "Paris is..."}'], "line 2",
                                 "`evidence_text` is a str", "a list of strings"),
    "evidence_text of numbers": (['{"id": "b", "inputs": {}, "evidence_text": ["ok", 3]}'], "line 2",
                                 "`evidence_text` is a list holding int", "a list of strings"),
    "reserved id": (['{"id": "<startup>", "inputs": {}}'], "line 2", "`id` '<startup>' is reserved", "not of the form <name>"),
}


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_row_errors_name_file_and_line(case: str, tmp_path: Path) -> None:
    lines, where, problem, expected = ROW_ERRORS[case]
    path = write_lines(tmp_path / "rows.jsonl", [GOOD, *lines])
    with pytest.raises(ConfigError) as e:
        load_rows(path)
    assert e.value.file == str(path) and e.value.where == where
    assert problem in e.value.problem
    if expected:
        assert expected in (e.value.expected or "")
    assert str(e.value).startswith(f"{path}: {where}: ")


def test_rows_load_with_labels_and_integer_ids(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rows.jsonl", [GOOD, "", '{"id": 7, "inputs": {}, "evidence": ["d1", 2]}'])
    rows = load_rows(path)
    assert [r.id for r in rows] == ["a", "7"]
    assert rows[1].evidence == ["d1", "2"] and rows[0].expected == "x"
    assert rows[0].sealed() == {"id": "a", "inputs": {"q": 1}}


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no rows"):
        load_rows(write_lines(tmp_path / "rows.jsonl", [""]))


def test_dataset_error_exits_2_through_the_cli(target: Path, tmp_path: Path) -> None:
    with open(target / "data.jsonl", "a") as f:
        f.write('{"id": "q-01", "inputs": {"question": "again"}}\n')
    res = CliRunner().invoke(app, ["eval", str(target), "--reports-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    msg = " ".join(res.stderr.split())
    assert f"{target / 'data.jsonl'}: line 16: duplicate id 'q-01' (first on line 1)" in msg
    assert not (tmp_path / "r").exists()


def test_fraction_splits_are_disjoint_complete_and_sized(target: Path) -> None:
    m = load_manifest(target, check_files=False)
    splits = load_splits(m, target)
    ids = [set(ex.id for ex in splits[s]) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == {r.id for r in load_rows(target / "data.jsonl")}
    assert [len(x) for x in ids] == [6, 6, 3]  # 15 rows at 0.4 / 0.4 / 0.2
    assert all(ex.split == s for s in splits for ex in splits[s])
    order = [r.id for r in load_rows(target / "data.jsonl")]
    assert [ex.id for ex in splits["val"]] == [i for i in order if i in ids[1]]  # file order within a split


def test_splits_are_stable_across_calls_and_row_order_but_follow_the_seed(target: Path) -> None:
    m = load_manifest(target, check_files=False)
    first = {s: {ex.id for ex in v} for s, v in load_splits(m, target).items()}
    lines = (target / "data.jsonl").read_text().splitlines()
    random.Random(3).shuffle(lines)
    write_lines(target / "data.jsonl", lines)
    again = {s: {ex.id for ex in v} for s, v in load_splits(m, target).items()}
    assert again == first
    ids = [f"x{i}" for i in range(50)]
    assert split_ids(ids, 0.4, 0.4, seed=1) != split_ids(ids, 0.4, 0.4, seed=2)
    assert split_ids(ids, 0.4, 0.4, seed=1) == split_ids(list(reversed(ids)), 0.4, 0.4, seed=1)
    assert split_ids(ids, 0.0, 1.0, seed=1)["val"] == set(ids)


def test_explicit_split_files(target: Path) -> None:
    rows = (target / "data.jsonl").read_text().splitlines()
    write_lines(target / "tr.jsonl", rows[:5])
    write_lines(target / "va.jsonl", rows[5:10])
    write_lines(target / "te.jsonl", rows[10:])
    data = yaml.safe_load((target / "pipemend.yaml").read_text())
    data["dataset"] = {"files": {"train": "tr.jsonl", "val": "va.jsonl", "test": "te.jsonl"}}
    (target / "pipemend.yaml").write_text(yaml.safe_dump(data))
    m = load_manifest(target, check_files=False)
    splits = load_splits(m, target)
    assert [ex.id for ex in splits["val"]] == [json.loads(r)["id"] for r in rows[5:10]]
    write_lines(target / "te.jsonl", rows[10:] + [rows[0]])
    with pytest.raises(ConfigError) as e:
        load_splits(m, target)
    assert e.value.file == str(target / "te.jsonl") and "also in the train split (tr.jsonl)" in e.value.problem


def test_limit_takes_the_first_n_of_each_split(target: Path) -> None:
    splits = load_splits(load_manifest(target, check_files=False), target)
    limited = limit_splits(splits, 2)
    assert {s: [e.id for e in v] for s, v in limited.items()} == {s: [e.id for e in v[:2]] for s, v in splits.items()}
    assert limit_splits(splits, None) == splits
    with pytest.raises(UsageError):
        limit_splits(splits, 0)


def test_frozen_copy_is_what_scores_even_after_the_target_changes(target: Path, tmp_path: Path) -> None:
    (target / "scorer.py").write_text("def score(output, expected):\n    return 1.0 if output == expected else 0.0\n")
    data = yaml.safe_load((target / "pipemend.yaml").read_text())
    data["metric"] = "scorer.py:score"
    (target / "pipemend.yaml").write_text(yaml.safe_dump(data))
    m = load_manifest(target)
    run_dir = tmp_path / "run"
    frozen = freeze_target(target, m, run_dir)
    assert sorted(p.relative_to(frozen.dir).as_posix() for p in frozen.dir.rglob("*") if p.is_file()) == [
        "data.jsonl", "frozen.json", "pipemend.yaml", "scorer.py"]

    # A candidate rewrites its labels and its metric: the frozen copy does not move.
    (target / "scorer.py").write_text("def score(output, expected):\n    return 1.0\n")
    (target / "data.jsonl").write_text((target / "data.jsonl").read_text().replace('"expected": "6"', '"expected": "cheat"'))
    reopened = FrozenTarget.open(run_dir)
    assert reopened.metric()("a", "b", {}) == 0.0
    assert reopened.metric().safe("a", "b", {})[0] == 0.0
    by_id = reopened.examples_by_id()
    assert by_id["q-03"].expected == "6"
    meta = json.loads((frozen.dir / "frozen.json").read_text())
    assert meta["format"] == "pipemend-frozen-1"
    assert set(meta["splits"]["val"]) == {e.id for e in reopened.splits()["val"]}


def test_tampered_frozen_file_is_refused(target: Path, tmp_path: Path) -> None:
    frozen = freeze_target(target, load_manifest(target), tmp_path / "run")
    p = frozen.dir / "data.jsonl"
    p.chmod(0o644)
    p.write_text(p.read_text().replace("q-01", "q-99"))
    with pytest.raises(ConfigError, match="changed after the run started"):
        FrozenTarget.open(tmp_path / "run")
    with pytest.raises(UsageError, match="not a pipemend run directory"):
        FrozenTarget.open(tmp_path / "nowhere")


# --------------------------------------------------------------------------- gold evidence text: rows and a corpus


def test_rows_carry_evidence_text_beside_evidence_and_never_seal_it_in(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rows.jsonl", [
        '{"id": "a", "inputs": {"q": 1}, "evidence": ["d1"], "evidence_text": ["Paris is the capital."]}'])
    [row] = load_rows(path)
    assert row.evidence == ["d1"] and row.evidence_text == ["Paris is the capital."]
    assert row.sealed() == {"id": "a", "inputs": {"q": 1}}


def with_corpus(target: Path, corpus_lines: list[str], rel: str = "corpus.jsonl") -> Path:
    """echo_qa with evidence ids on its first two rows and a corpus file named in the manifest."""
    rows = [json.loads(line) for line in (target / "data.jsonl").read_text().splitlines()]
    rows[0]["evidence"], rows[1]["evidence"] = ["d1", "d2"], ["d2"]
    rows[1]["evidence_text"] = ["the row's own text wins"]
    (target / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_lines(target / rel, corpus_lines)
    data = yaml.safe_load((target / "pipemend.yaml").read_text())
    data["dataset"]["corpus"] = rel
    (target / "pipemend.yaml").write_text(yaml.safe_dump(data))
    return target / rel


CORPUS = ['{"id": "d1", "text": "one"}', '{"id": "d2", "text": "two", "title": "Two"}', '{"id": 3, "text": "three"}']


def test_a_corpus_fills_evidence_text_of_rows_that_have_none_and_is_frozen(target: Path, tmp_path: Path) -> None:
    with_corpus(target, CORPUS)
    by_id = {ex.id: ex for rows in load_splits(load_manifest(target), target).values() for ex in rows}
    assert by_id["q-01"].evidence_text == ["one", "two"]
    assert by_id["q-02"].evidence_text == ["the row's own text wins"]
    assert by_id["q-03"].evidence_text is None
    frozen = freeze_target(target, load_manifest(target), tmp_path / "run")
    assert (frozen.dir / "corpus.jsonl").is_file()
    (target / "corpus.jsonl").write_text('{"id": "d1", "text": "moved"}\n')
    assert FrozenTarget.open(tmp_path / "run").examples_by_id()["q-01"].evidence_text == ["one", "two"]


CORPUS_ERRORS = {
    "no text": (['{"id": "d1"}'], "line 1", "`text` is NoneType", "the document's text"),
    "text not a string": (['{"id": "d1", "text": ["x"]}'], "line 1", "`text` is list", None),
    "bad id": (['{"id": true, "text": "x"}'], "line 1", "`id` is bool", None),
    "unknown key": (['{"id": "d1", "text": "x", "body": "y"}'], "line 1", "unknown key(s) 'body'", "only id, text, title"),
    "duplicate": ([*CORPUS, '{"id": "d1", "text": "again"}'], "line 4", "duplicate id 'd1'", None),
    "not json": ([*CORPUS, "{oops"], "line 4", "not valid JSON", None),
    "gold id missing": (['{"id": "d1", "text": "one"}'], "id 'd2'", "evidence id of example 'q-01' is not in the corpus", None),
}


@pytest.mark.parametrize("case", list(CORPUS_ERRORS))
def test_corpus_errors_name_the_file_and_the_line_or_id(case: str, target: Path) -> None:
    lines, where, problem, expected = CORPUS_ERRORS[case]
    corpus = with_corpus(target, lines)
    with pytest.raises(ConfigError) as e:
        load_splits(load_manifest(target), target)
    assert (e.value.file, e.value.where) == (str(corpus), where)
    assert problem in e.value.problem
    if expected:
        assert expected in (e.value.expected or "")


@pytest.mark.parametrize("corpus, problem", [
    ("../outside.jsonl", "expected a file path relative to the target folder"),
    ("/etc/passwd", "expected a file path relative to the target folder"),
    ("docs/*.jsonl", "no glob"),
    ("absent.jsonl", "file not found"),
])
def test_a_bad_corpus_path_is_a_manifest_error_at_dataset_corpus(corpus: str, problem: str, target: Path) -> None:
    data = yaml.safe_load((target / "pipemend.yaml").read_text())
    data["dataset"]["corpus"] = corpus
    (target / "pipemend.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_manifest(target)
    assert e.value.file == str(target / "pipemend.yaml") and e.value.where == "dataset.corpus"
    assert problem in e.value.problem or problem in (e.value.expected or "")

"""`pipemend init DIR --from FORMAT FILE`: datasets as they come, converted into rows `dataset.py` loads.

Real parts: the HotpotQA and MuSiQue excerpts (real records), a hand-made BEIR folder, CSV and JSONL
files, the manifest and dataset loaders. Each test converts a fixture into a fresh folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import pytest
import yaml

from pipemend.dataset import load_splits
from pipemend.errors import ConfigError, UsageError
from pipemend.importers import FORMATS, import_dataset, reimport
from pipemend.init_template import write_skeleton
from pipemend.manifest import SOURCE_FORMATS, DatasetSource, load_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "importers"


def pipeline_dir(tmp_path: Path, name: str = "pipe") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "pipeline.py").write_text("def run(inputs):\n    return inputs['question']\n")
    return d


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def source_block(d: Path) -> dict:
    return yaml.safe_load((d / "pipemend.yaml").read_text())["dataset"]["source"]


def test_the_manifest_and_the_importers_name_the_same_formats() -> None:
    assert tuple(FORMATS) == SOURCE_FORMATS == get_args(DatasetSource.model_fields["format"].annotation)


# --------------------------------------------------------------------------- each format


def test_hotpotqa_supporting_facts_become_evidence_titles_and_paragraph_texts(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    result = import_dataset(d, "hotpotqa", FIXTURES / "hotpotqa.json")
    manifest = load_manifest(d)  # validates, files and entrypoint included
    splits = load_splits(manifest, d)
    assert sum(len(v) for v in splits.values()) == 3
    first = rows_of(d / "data.jsonl")[0]
    source = json.loads((FIXTURES / "hotpotqa.json").read_text())[0]
    paragraphs = {title: "".join(sentences) for title, sentences in source["context"]}
    assert first["id"] == "5a77ec115542992a6e59dff7"
    assert first["inputs"] == {"question": "If Gallu is a demon Lilu is what?"}
    assert first["expected"] == "a spirit"
    assert first["evidence"] == ["Alû", "Lilu (mythology)"]
    assert first["evidence_text"] == [paragraphs["Alû"], paragraphs["Lilu (mythology)"]]
    assert source_block(d)["fields"] == {"id": "_id", "inputs.question": "question", "expected": "answer",
                                         "evidence": "supporting_titles", "evidence_text": "supporting_texts"}
    assert manifest.dataset.split is not None and manifest.dataset.split.seed == 0
    assert "  evidence_text   <- supporting_texts   (the text of each supporting paragraph)" in result.lines()


def test_musique_paragraphs_flagged_supporting_become_evidence_in_order(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    import_dataset(d, "musique", FIXTURES / "musique.jsonl", seed=5)
    manifest = load_manifest(d)
    assert manifest.dataset.split.seed == 5
    load_splits(manifest, d)
    rows = {r["id"]: r for r in rows_of(d / "data.jsonl")}
    row = rows["4hop1__709382_146811_31223_91015"]
    source = next(json.loads(ln) for ln in (FIXTURES / "musique.jsonl").read_text().splitlines()
                  if json.loads(ln)["id"] == row["id"])
    supporting = [p for p in source["paragraphs"] if p["is_supporting"]]
    assert row["evidence"] == ["Tennessee", "Hank Snow", "Hello Love (song)", "Publix"]
    assert row["evidence_text"] == [p["paragraph_text"] for p in supporting]
    assert row["expected"] == "35"


def _beir(tmp_path: Path, keep: tuple[str, ...] = ("train", "dev", "test")) -> Path:
    src = tmp_path / "beir-src"
    shutil.copytree(FIXTURES / "beir", src)
    for name in ("train", "dev", "test"):
        if name not in keep:
            (src / "qrels" / f"{name}.tsv").unlink()
    return src


def test_beir_qrels_files_give_the_splits_and_the_corpus_becomes_id_text_rows(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    import_dataset(d, "beir", _beir(tmp_path))
    manifest = load_manifest(d)
    assert manifest.dataset.files is not None and manifest.dataset.corpus == "corpus.jsonl"
    splits = load_splits(manifest, d)
    assert {k: [ex.id for ex in v] for k, v in splits.items()} == {
        "train": ["q1", "q2"], "val": ["q3", "q4"], "test": ["q5", "q6"]}  # q7 is in no qrels file
    train = rows_of(d / "data.train.jsonl")
    assert train[1] == {"id": "q2", "inputs": {"question": "largest lake in Africa"},
                        "expected": ["d2"], "evidence": ["d2"]}  # d5 scores 0: not relevant
    assert rows_of(d / "data.test.jsonl")[1]["evidence"] == ["d6", "d3"]
    corpus = rows_of(d / "corpus.jsonl")
    assert corpus[0] == {"id": "d1", "text": "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest "
                                             "mountain in Africa."}
    assert len(corpus) == 6


def test_beir_with_only_test_qrels_is_split_by_seed(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    import_dataset(d, "beir", _beir(tmp_path, keep=("test",)), seed=3)
    manifest = load_manifest(d)
    assert manifest.dataset.path == "data.jsonl" and manifest.dataset.split.seed == 3
    assert "split" not in source_block(d)["fields"]
    assert [r["id"] for r in rows_of(d / "data.jsonl")] == ["q5", "q6"]


def test_csv_columns_are_inferred_printed_and_recorded(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    result = import_dataset(d, "csv", FIXTURES / "qa.csv")
    fields = {"id": "qid", "inputs.question": "question", "expected": "answer", "evidence": "evidence"}
    assert source_block(d) == {"format": "csv", "file": str((FIXTURES / "qa.csv").resolve()), "fields": fields}
    text = "\n".join(result.lines())
    for target, source in fields.items():
        assert f"{target} <- {source}" in " ".join(text.split())
    load_splits(load_manifest(d), d)
    rows = rows_of(d / "data.jsonl")
    assert rows[0] == {"id": "c1", "inputs": {"question": "What is the capital of France, in one word?"},
                       "expected": "Paris", "evidence": ["geo-france", "geo-paris"]}
    assert rows[2]["evidence"] == []


def test_jsonl_nested_fields_by_map(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    import_dataset(d, "jsonl", FIXTURES / "qa.jsonl",
                   ["uid=id,query=inputs.question", "meta.answer=expected", "meta.docs=evidence"])
    load_splits(load_manifest(d), d)
    assert rows_of(d / "data.jsonl")[1] == {"id": "j2", "inputs": {"question": "What do bees make?"},
                                            "expected": "honey", "evidence": ["bee-1", "bee-2"]}
    assert source_block(d)["fields"] == {"id": "uid", "inputs.question": "query", "expected": "meta.answer",
                                         "evidence": "meta.docs"}


def test_a_split_column_gives_per_split_files(tmp_path: Path) -> None:
    src = tmp_path / "split.csv"
    src.write_text("question,answer,split\n" + "".join(f"q{i},a{i},{s}\n" for i, s in
                                                        enumerate(["train", "dev", "test", "train", "validation"])))
    d = pipeline_dir(tmp_path)
    import_dataset(d, "csv", src)
    manifest = load_manifest(d)
    splits = load_splits(manifest, d)
    assert {k: [ex.inputs["question"] for ex in v] for k, v in splits.items()} == {
        "train": ["q0", "q3"], "val": ["q1", "q4"], "test": ["q2"]}
    assert [r["id"] for r in rows_of(d / manifest.dataset.files.val)] == ["2", "5"]  # no id column: the row number


def test_a_split_column_missing_a_split_says_how_to_split_by_seed(tmp_path: Path) -> None:
    src = tmp_path / "split.csv"
    src.write_text("question,answer,split\nq1,a1,train\nq2,a2,test\n")
    d = pipeline_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"fields\.split.*no rows for val.*--map -=split"):
        import_dataset(d, "csv", src)
    assert not (d / "pipemend.yaml").exists()
    import_dataset(d, "csv", src, ["-=split"])
    assert load_manifest(d).dataset.split is not None


def test_a_source_inside_the_target_is_sealed(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    (d / "raw").mkdir()
    shutil.copy(FIXTURES / "qa.csv", d / "raw" / "qa.csv")
    import_dataset(d, "csv", d / "raw" / "qa.csv")
    manifest = load_manifest(d)
    assert source_block(d)["file"] == "raw/qa.csv"
    assert "raw/qa.csv" in manifest.sealed_paths(d)


# --------------------------------------------------------------------------- re-running from the manifest


@pytest.mark.parametrize("fmt, source", [
    ("hotpotqa", "hotpotqa.json"),
    ("musique", "musique.jsonl"),
    ("beir", "beir"),
    ("csv", "qa.csv"),
    ("jsonl", "qa.jsonl"),
])
def test_a_reimport_from_the_recorded_mapping_is_byte_identical(tmp_path: Path, fmt: str, source: str) -> None:
    d = pipeline_dir(tmp_path)
    first = import_dataset(d, fmt, FIXTURES / source)
    data = {p: p.read_bytes() for p in first.written if p.name != "pipemend.yaml"}
    manifest_bytes = (d / "pipemend.yaml").read_bytes()
    for p in data:
        p.unlink()
    again = reimport(d)
    assert sorted(again.written) == sorted(data)
    assert {p: p.read_bytes() for p in data} == data
    assert (d / "pipemend.yaml").read_bytes() == manifest_bytes
    assert sorted(reimport(d).unchanged) == sorted(data)  # identical: left alone, no --force needed


def test_an_edited_mapping_reconverts_only_with_force(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    import_dataset(d, "csv", FIXTURES / "qa.csv")
    before = (d / "data.jsonl").read_bytes()
    mpath = d / "pipemend.yaml"
    mpath.write_text(mpath.read_text().replace('"expected": "answer"', '"expected": "notes"'))
    with pytest.raises(UsageError, match=r"data\.jsonl.*--force"):
        reimport(d)
    assert (d / "data.jsonl").read_bytes() == before
    reimport(d, force=True)
    assert [r["expected"] for r in rows_of(d / "data.jsonl")] == ["first", 'a note with "quotes"', "none", ""]


def test_reimport_without_a_recorded_source_names_the_key(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    (d / "data.jsonl").write_text('{"id": "1", "inputs": {"question": "q"}}\n')
    write_skeleton(d)
    with pytest.raises(ConfigError, match=r"dataset\.source: no source recorded"):
        reimport(d)


# --------------------------------------------------------------------------- bad input


def test_an_existing_dataset_is_never_overwritten_without_force(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    (d / "data.jsonl").write_text('{"id": "mine", "inputs": {"question": "keep me"}}\n')
    with pytest.raises(UsageError, match=r"data\.jsonl: a dataset file already exists.*--force"):
        import_dataset(d, "csv", FIXTURES / "qa.csv")
    assert (d / "data.jsonl").read_text() == '{"id": "mine", "inputs": {"question": "keep me"}}\n'
    assert not (d / "pipemend.yaml").exists()
    import_dataset(d, "csv", FIXTURES / "qa.csv", force=True)
    assert rows_of(d / "data.jsonl")[0]["id"] == "c1"


def test_an_existing_manifest_points_at_reimport(tmp_path: Path) -> None:
    d = pipeline_dir(tmp_path)
    import_dataset(d, "csv", FIXTURES / "qa.csv")
    with pytest.raises(UsageError, match="a manifest already exists"):
        import_dataset(d, "csv", FIXTURES / "qa.csv")


def test_malformed_json_names_the_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": \n')
    with pytest.raises(ConfigError) as e:
        import_dataset(pipeline_dir(tmp_path), "jsonl", src)
    assert (e.value.file, e.value.where) == (str(src), "line 3")
    assert "not valid JSON" in e.value.problem


def test_a_malformed_hotpotqa_array_names_its_line(tmp_path: Path) -> None:
    src = tmp_path / "hotpot.json"
    src.write_text('[\n {"_id": "x",\n  "question": oops}\n]\n')
    with pytest.raises(ConfigError, match=r"hotpot\.json: line 3: not valid JSON"):
        import_dataset(pipeline_dir(tmp_path), "hotpotqa", src)


def test_a_missing_column_names_the_field_the_line_and_the_columns(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        import_dataset(pipeline_dir(tmp_path), "csv", FIXTURES / "qa.csv", ["prompt=inputs.question"])
    assert e.value.where == "line 2"
    assert "no field 'prompt' (mapped to inputs.question)" in e.value.problem
    assert "answer, evidence, notes, qid, question" in (e.value.expected or "")


def test_a_csv_row_with_the_wrong_number_of_cells_names_its_line(tmp_path: Path) -> None:
    src = tmp_path / "bad.csv"
    src.write_text("question,answer\nq1,a1\nq2,a2,extra\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: line 3: 3 column\(s\), the header has 2"):
        import_dataset(pipeline_dir(tmp_path), "csv", src)


def test_a_bad_row_is_reported_at_its_source_record(tmp_path: Path) -> None:
    src = tmp_path / "dupes.csv"
    src.write_text("id,question\na,q1\nb,q2\na,q3\n")
    with pytest.raises(ConfigError) as e:
        import_dataset(pipeline_dir(tmp_path), "csv", src)
    assert (e.value.file, e.value.where) == (str(src), "line 4")
    assert "duplicate id 'a'" in e.value.problem


def test_no_input_column_asks_for_a_map(tmp_path: Path) -> None:
    src = tmp_path / "odd.jsonl"
    src.write_text('{"k": "1", "ask": "q", "reply": "a"}\n')
    with pytest.raises(UsageError, match=r"no column looks like the pipeline's input \(columns: k, ask, reply\).*--map"):
        import_dataset(pipeline_dir(tmp_path), "jsonl", src)


def test_unknown_format_and_row_field_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--from 'squad': unknown format \(expected one of hotpotqa, musique, beir, csv, jsonl\)"):
        import_dataset(pipeline_dir(tmp_path), "squad", FIXTURES / "qa.csv")
    with pytest.raises(UsageError, match=r"--map: 'answer_key' is not a row field"):
        import_dataset(pipeline_dir(tmp_path, "p2"), "csv", FIXTURES / "qa.csv", ["answer=answer_key"])
    with pytest.raises(UsageError, match="expected SOURCE=TARGET"):
        import_dataset(pipeline_dir(tmp_path, "p3"), "csv", FIXTURES / "qa.csv", ["answer"])


def test_beir_qrels_naming_an_unknown_document_names_the_line(tmp_path: Path) -> None:
    src = _beir(tmp_path)
    with open(src / "qrels" / "dev.tsv", "a") as f:
        f.write("q4\tnope\t1\n")
    with pytest.raises(ConfigError) as e:
        import_dataset(pipeline_dir(tmp_path), "beir", src)
    assert (e.value.file, e.value.where) == (str(src / "qrels" / "dev.tsv"), "line 4")
    assert "document 'nope' is not in corpus.jsonl" in e.value.problem


def test_hotpotqa_in_its_column_form_reads_the_same_evidence(tmp_path: Path) -> None:
    record = json.loads((FIXTURES / "hotpotqa.json").read_text())[0]
    columns = {**record,
               "supporting_facts": {"title": [t for t, _ in record["supporting_facts"]],
                                    "sent_id": [i for _, i in record["supporting_facts"]]},
               "context": {"title": [t for t, _ in record["context"]], "sentences": [s for _, s in record["context"]]}}
    src = tmp_path / "hf.jsonl"
    src.write_text(json.dumps(columns) + "\n")
    d = pipeline_dir(tmp_path)
    import_dataset(d, "hotpotqa", src, ["-=evidence_text"])
    assert rows_of(d / "data.jsonl")[0]["evidence"] == ["Alû", "Lilu (mythology)"]


def test_gold_passages_without_ids_become_evidence_text_and_a_mismatch_with_ids_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "gold.jsonl"
    src.write_text('{"qid": "g1", "question": "Who keeps the Vell light?", "answer": "Ada", '
                   '"gold_passages": ["Ada keeps the Vell light.", "The light is on the quay."]}\n')
    d = pipeline_dir(tmp_path)
    import_dataset(d, "jsonl", src)
    splits = load_splits(load_manifest(d), d)
    (row,) = [ex for split in splits.values() for ex in split]
    assert row.evidence is None and row.evidence_text == ["Ada keeps the Vell light.", "The light is on the quay."]
    src.write_text('{"qid": "g1", "question": "q", "answer": "a", "doc_ids": ["d1"], "gold_passages": ["t1", "t2"]}\n')
    with pytest.raises(ConfigError, match="2 evidence text.s. for 1 evidence id"):
        import_dataset(pipeline_dir(tmp_path, "other"), "jsonl", src)

"""``pipemend init`` writes gate defaults that can accept a real improvement on a few hundred val examples
(issue 12's contract), each line with a comment that says what it does, and they validate as a manifest."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipemend.init_template import write_skeleton
from pipemend.manifest import load_manifest

CONTRACT = {"objective": "score", "min_delta": 0.01, "test": "sign", "confidence": 0.9, "confirm_runs": 2,
            "max_regressions": "5%", "racing": [0.25, 0.5, 1.0], "non_inferiority_margin": 0.01, "min_saving": 0.2,
            "max_cost_ratio": 1.5, "max_latency_ratio": 1.5}


def _pipeline(d: Path) -> None:
    d.mkdir()
    (d / "pipeline.py").write_text("def run(inputs):\n    return inputs['q']\n")
    (d / "rows.jsonl").write_text('{"id": "1", "inputs": {"q": "a"}, "expected": "a"}\n')


def _gates_block(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("gates:")
    block = []
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return [ln for ln in block if ln.strip()]


def test_init_writes_the_contracts_gate_defaults_with_a_comment_on_every_line(tmp_path: Path) -> None:
    d = tmp_path / "pipe"
    _pipeline(d)
    text = write_skeleton(d).read_text()
    assert yaml.safe_load(text)["gates"] == CONTRACT
    block = _gates_block(text)
    keys = [ln for ln in block if not ln.strip().startswith("#")]
    assert len(keys) == len(CONTRACT)
    for line in keys:
        key, _, rest = line.strip().partition(":")
        assert re.search(r"\s#\s\S", rest), f"gates.{key} has no comment"
    assert "max_regressions: 0" not in text  # the old default that refused every real change at n = 300
    assert any("must_pass" in ln for ln in block if ln.strip().startswith("#"))  # shown, not set


def test_the_written_gates_validate_as_the_manifests_gates(tmp_path: Path) -> None:
    d = tmp_path / "pipe"
    _pipeline(d)
    write_skeleton(d)
    gates = load_manifest(d).gates
    for key, value in CONTRACT.items():
        assert getattr(gates, key) == value, key


def test_a_requirements_file_is_named_and_retrieval_sizes_in_config_files_become_knobs(tmp_path: Path) -> None:
    d = tmp_path / "pipe"
    _pipeline(d)
    (d / "requirements.txt").write_text("openai>=1.40\n")
    (d / "config.json").write_text('{"top_k": 2, "retrieval": {"max_docs": 5, "k": true}, "temperature": 0}\n')
    (d / "settings.yaml").write_text("search:\n  n_results: 3\n  top_k: 0\n")
    (d / "notes.json").write_text('{"top_k": 9}\n')  # not a config file by name
    write_skeleton(d)
    m = load_manifest(d)
    assert m.requirements == "requirements.txt"
    assert {name: (k.file, k.key, k.rung, k.values) for name, k in m.knobs.items()} == {
        "top_k": ("config.json", "top_k", "retrieval", [4, 8]),
        "retrieval_max_docs": ("config.json", "retrieval.max_docs", "retrieval", [10, 20]),
        "search_n_results": ("settings.yaml", "search.n_results", "retrieval", [6, 12]),
    }  # a bool `k` and a zero `top_k` are no sizes
    assert {"pipeline.py", "config.json", "settings.yaml"} <= set(m.editable) and "notes.json" not in m.editable


def test_without_requirements_or_config_the_examples_stay_comments(tmp_path: Path) -> None:
    d = tmp_path / "pipe"
    _pipeline(d)
    text = write_skeleton(d).read_text()
    m = load_manifest(d)
    assert m.requirements is None and m.knobs == {}
    assert "# requirements: requirements.txt" in text and "# knobs:" in text


def test_a_small_imported_dataset_gets_gates_that_can_pass_a_real_fix(tmp_path: Path) -> None:
    from pipemend.importers import import_dataset

    small, large = tmp_path / "small", tmp_path / "large"
    for d, n in ((small, 30), (large, 600)):
        d.mkdir()
        (d / "pipeline.py").write_text("def run(inputs):\n    return inputs['question']\n")
        src = tmp_path / f"{d.name}.jsonl"
        src.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(n)))
        import_dataset(d, "jsonl", src)
    gates = load_manifest(small).gates
    assert (gates.confidence, gates.racing, gates.max_regressions, gates.min_delta) == (0.75, [1.0], "10%", 0.02)
    assert "only about 12 examples" in (small / "pipemend.yaml").read_text()
    big = load_manifest(large).gates
    for key, value in CONTRACT.items():
        assert getattr(big, key) == value, key

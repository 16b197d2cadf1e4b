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

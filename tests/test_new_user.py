"""Issue 13 as a new user meets it (slow: the real local model): a RAG pipeline written with the ``openai``
SDK and no pipemend import, a JSONL file of questions with their gold passages' text, ``pipemend init
--from jsonl`` and then ``pipemend optimize --proposer ladder`` on the local model.

The fixture (``fixtures/newuser_rag``): ``rag/`` retrieves ``config.json``'s ``top_k`` (1) documents by
keyword overlap; for two questions in three a distractor ties with the gold document on every keyword and
sorts first, so the model never sees the answer. ``init`` must turn ``top_k`` into a retrieval knob and pick
gates a 12-example val split can pass; the diagnosis must find the misses from the passages' text alone
(no markers, no evidence ids); the ladder must keep the knob change as a branch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from local_model_support import local_model_or_skip

FIXTURE = Path(__file__).parent / "fixtures" / "newuser_rag"
LOCAL = "local/qwen2.5-coder-1.5b-instruct"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _pipemend(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_"))}
    return subprocess.run([sys.executable, "-m", "pipemend.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_an_openai_rag_pipeline_gets_its_retrieval_misses_named_and_fixed_on_a_branch(tmp_path: Path) -> None:
    local_model_or_skip()
    work = tmp_path / "work"
    shutil.copytree(FIXTURE, work, ignore=shutil.ignore_patterns("__pycache__"))
    rag = work / "rag"

    init = _pipemend("init", "rag", "--from", "jsonl", "source/questions.jsonl", cwd=work, timeout=120)
    assert init.returncode == 0, init.stderr
    assert "evidence_text   <- gold_passages" in init.stdout
    manifest = yaml.safe_load((rag / "pipemend.yaml").read_text())
    assert manifest["requirements"] == "requirements.txt"
    assert manifest["knobs"] == {"top_k": {"file": "config.json", "key": "top_k", "rung": "retrieval", "values": [2, 4]}}
    assert manifest["gates"]["confidence"] == 0.75 and manifest["gates"]["racing"] == [1.0]

    _git(work, "init", "-q", "-b", "main", str(rag))
    _git(rag, "add", "-A")
    _git(rag, "commit", "-qm", "my pipeline")
    reports = tmp_path / "reports"
    res = _pipemend("optimize", ".", "--proposer", "ladder", "--model", LOCAL, "--max-candidates", "1",
                    "--reports-dir", str(reports), "--json", cwd=rag, timeout=2200)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout)
    run_dir = Path(summary["run_dir"])

    # the baseline's failures are the tied questions, each a retrieval miss found from the passages' text
    diagnosis = json.loads((run_dir / "diagnosis.json").read_text())
    failed = {i for ids in diagnosis["ids"].values() for i in ids}
    assert failed and diagnosis["counts"]["retrieval"] == len(failed) == diagnosis["n_failed"]
    assert all(int(i.removeprefix("q")) % 3 != 0 for i in failed)
    assert {d["rule"] for d in diagnosis["details"].values()} == {"gold_text_missing"}
    assert diagnosis["recommended"] == "retrieval"

    # the ladder's first candidate raises top_k; the gate keeps it as a branch of the user's repo
    (cand,) = summary["candidates"]
    assert cand["accepted"] and cand["delta"] > 0, cand
    assert summary["best"]["val"] > summary["baseline"]["val"]
    branch = summary["best"]["branch"]
    assert _git(rag, "diff", "--name-only", "main", branch) == "config.json"
    assert json.loads(_git(rag, "show", f"{branch}:config.json")) == {"top_k": 2}
    assert summary["status"] == "done"

"""The gate: static diff checks on real git worktrees, and the paired statistics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipemend import evidence, gate
from pipemend.dataset import Example, load_splits
from pipemend.manifest import Gates, load_manifest
from pipemend.metrics import metric_fingerprint
from pipemend.sandbox.worktrees import snapshot_target

FIXTURE = Path(__file__).parent / "fixtures" / "targets" / "tinyqa"


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    return out.removesuffix("\n")


def _rows(scores, cost=0.0, latency=1.0, prefix="v"):
    return [{"id": f"{prefix}{i}", "score": s, "cost_usd": cost, "latency_s": latency} for i, s in enumerate(scores)]


def _compare(base, cand, gates, alpha=0.1):
    """The statistics half (``pipemend.evidence``), first looks only; tests/test_evidence.py has the rules."""
    return evidence.compare(evidence.Evidence(base=base, cand=cand), gates, alpha=alpha)


# --------------------------------------------------------------------------- the label-leak rule


def _ex(i, expected, split):
    return Example(id=i, inputs={}, expected=expected, split=split)


def test_sealed_answers_follow_the_documented_rule():
    splits = {
        "train": [_ex("t-1", "yes", "train"), _ex("t-2", "Paris", "train")],
        "val": [_ex("v-1", "yes", "val"), _ex("v-2", "1887", "val"), _ex("v-3", "No", "val"),
                _ex("v-4", "42", "val"), _ex("v-5", ["The Nile", "Nile River"], "val")],
        "test": [_ex("x-1", {"answer": "Ada Lovelace"}, "test"), _ex("x-2", "Paris", "test")],
    }
    sealed = gate.Sealed.from_splits(splits)
    assert set(sealed.answers) == {"1887", "42", "nile", "nile river", "ada lovelace"}
    assert sealed.ids == {"v-1", "v-2", "v-3", "v-4", "v-5", "x-1", "x-2"}


# --------------------------------------------------------------------------- static checks on real diffs


@pytest.fixture()
def repo_target(tmp_path):
    """The tinyqa fixture inside a real git repo (targets/tinyqa), snapshotted, with a candidate worktree."""
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURE, repo / "targets" / "tinyqa")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    snap = snapshot_target(repo / "targets" / "tinyqa", "gate-test", tmp_path / "run")
    wt = snap.add_worktree("cand-1", snap.base_branch)
    return snap, wt, wt / "targets" / "tinyqa"


def _check(snap, wt):
    target = Path(snap.repo) / snap.target_subdir
    manifest = load_manifest(target, check_files=False)
    tree = snap.build_candidate(wt, snap.resolve(snap.base_branch), message="judged\n", is_editable=lambda _path: True,
                                sealed=())
    refused = [gate.Reason(f"refused_{r.code}", str(r)) for r in tree.refusals]
    diff, changed = tree.diff, tree.changed

    def base_text(path):
        try:
            return git(snap.repo, "show", f"{snap.base_branch}:{path}")
        except Exception:
            return ""

    return refused + gate.check_diff(
        diff=diff, changed=changed, worktree=wt, target_subdir=snap.target_subdir, editable=manifest.editable,
        protected=manifest.all_protected(), sealed=gate.Sealed.from_splits(load_splits(manifest, target)),
        base_text=base_text, metric_lines=metric_fingerprint(manifest.metric, target))


def test_a_clean_config_change_passes(repo_target):
    snap, wt, t = repo_target
    (t / "config.yaml").write_text((t / "config.yaml").read_text().replace("style: sentence", "style: short"))
    assert _check(snap, wt) == []


@pytest.mark.parametrize("attack, reason", [
    ("metric", "metric.py: protected file"),
    ("data", "data/val.jsonl: protected file"),
    ("corpus", "corpus.json: protected file"),
    ("manifest", "pipemend.yaml: protected file"),
    ("dotdot", "outside the target folder"),
    ("symlink", "symlinks are refused"),
    ("not_editable", "notes.md: not an editable path"),
    ("paste", "label leak"),
    ("hardcode", "label leak"),
    ("ids", "val/test example id(s) (hard-coded outputs): val-greece"),
    ("copy_metric", "copies the metric's logic"),
])
def test_adversarial_diffs_are_refused(repo_target, attack, reason):
    snap, wt, t = repo_target
    if attack == "metric":
        (t / "metric.py").write_text("def score(output, expected):\n    return 1.0\n")
    elif attack == "data":
        (t / "data" / "val.jsonl").write_text('{"id": "x", "inputs": {}, "expected": "x"}\n')
    elif attack == "corpus":
        (t / "corpus.json").write_text("{}\n")
    elif attack == "manifest":
        (t / "pipemend.yaml").write_text((t / "pipemend.yaml").read_text().replace("min_delta: 0.05", "min_delta: 0"))
    elif attack == "dotdot":
        (t / ".." / "escape.py").write_text("x = 1\n")
    elif attack == "symlink":
        os.symlink("../corpus.json", t / "prompts" / "facts.txt")
    elif attack == "not_editable":
        (t / "notes.md").write_text("hello\n")
    elif attack == "paste":
        (t / "prompts" / "sentence.txt").write_text("Capitals you know: Athens, Warsaw. Fact: {fact}\n")
    elif attack == "hardcode":
        (t / "pipeline.py").write_text((t / "pipeline.py").read_text() + '\nANSWERS = {"greece": "Athens"}\n')
    elif attack == "ids":
        (t / "pipeline.py").write_text((t / "pipeline.py").read_text() + '\nSKIP = ["val-greece"]\n')
    elif attack == "copy_metric":
        (t / "pipeline.py").write_text((t / "pipeline.py").read_text()
                                       + '\n\ndef n(value):\n    return " ".join(str(value).lower().replace(".", " ").split())\n')
    reasons = gate.texts(_check(snap, wt))
    assert any(reason in r for r in reasons), reasons


def test_an_answer_already_in_the_base_file_is_not_a_leak(repo_target):
    snap, wt, t = repo_target
    # "Paris" is a test answer (test-france) but also a train-free word already... put it in the base first:
    base_line = "Example: the capital of France is Paris."
    (t / "prompts" / "sentence.txt").write_text(base_line + "\nReply with a full sentence. Fact: {fact}\n")
    snap2 = snap
    sha = snap2.build_candidate(wt, snap2.resolve(snap2.base_branch), message="base with an example\n",
                                is_editable=lambda _path: True, sealed=()).sha
    snap2.set_branch(snap2.base_branch, sha)
    (t / "prompts" / "sentence.txt").write_text(base_line + "\nReply with one sentence about Paris. Fact: {fact}\n")
    assert _check(snap2, wt) == []


def test_a_content_line_that_looks_like_a_file_header_hides_nothing(repo_target):
    """An added line ``++ /dev/null`` shows in the diff as ``+++ /dev/null``; the gate reads hunks by their
    ranges, so the answers after it are still seen (issue 11, seal 4)."""
    snap, wt, t = repo_target
    (t / "prompts" / "sentence.txt").write_text("++ /dev/null\n-- a/x\nCapitals you know: Athens, Warsaw. Fact: {fact}\n")
    reasons = gate.texts(_check(snap, wt))
    assert any("label leak" in r for r in reasons), reasons


def test_binary_content_and_an_unparsable_diff_are_refused():
    def check(diff):
        return gate.texts(gate.check_diff(diff=diff, changed=["p/x.txt"], worktree=Path("/nonexistent"),
                                          target_subdir="p", editable=["*.txt"], protected=[],
                                          sealed=gate.Sealed(), base_text=lambda path: ""))

    binary = "diff --git a/p/x.txt b/p/x.txt\nindex 1111111..2222222 100644\nBinary files a/p/x.txt and b/p/x.txt differ\n"
    assert any("binary content is refused" in r for r in check(binary))
    torn = "diff --git a/p/x.txt b/p/x.txt\n--- a/p/x.txt\n+++ b/p/x.txt\n@@ -1,5 +1,5 @@\n-old\n"
    assert any("could not be parsed" in r for r in check(torn))


def test_verdict_json_has_its_numbers_and_an_aggregate_view(tmp_path):
    stats = _compare(_rows([1, 0, 0, 0]), _rows([0, 1, 1, 1]), Gates(max_regressions=0))
    v = gate.decide(3, changed=["config.yaml"], static_reasons=[], stats=stats, gates=Gates())
    assert not v.accepted
    v.write(tmp_path / "verdict.json")
    data = json.loads((tmp_path / "verdict.json").read_text())
    assert data["format"] == "pipemend-verdict-2" and data["stats"]["regressions"] == ["v0"]
    assert data["stats"]["fixed"] == ["v1", "v2", "v3"] and data["gates"]["max_regressions"] == "5%"
    agg = v.aggregates()
    assert agg["stats"]["regressions"] == 1 and "v0" not in json.dumps(agg)
    nothing = gate.decide(4, changed=[], static_reasons=[], stats=None, gates=Gates())
    assert gate.texts(nothing.reasons) == ["the proposal changed no file"]
    assert nothing.to_json()["stats"] is None and nothing.aggregates()["stats"] == {}


def test_verdict_json_keeps_the_keys_the_report_reads(tmp_path):
    stats = _compare(_rows([0, 0, 0, 0, 0, 1, 1, 1]), _rows([1, 1, 1, 1, 1, 1, 1, 1]), Gates())
    data = gate.decide(1, changed=["a"], static_reasons=[], stats=stats, gates=Gates()).to_json()
    assert list(data) == ["format", "candidate", "accepted", "reasons", "reason_codes", "changed_files",
                          "static_reasons", "stats", "gates"]
    assert data["accepted"] and data["reasons"] == []
    assert {"n", "evaluated", "base_mean", "cand_mean", "delta", "test", "p_value", "alpha", "regressions", "fixed",
            "noise_flips", "must_pass_broken", "confirm", "racing", "objective", "accepted_as", "saving", "cost",
            "latency", "reasons", "sign_test"} == set(data["stats"])
    boot = _compare(_rows([0] * 8), _rows([1] * 6 + [0] * 2), Gates(test="bootstrap")).to_json()
    assert "bootstrap" in boot and boot["ci_low"] is not None and "sign_test" not in boot


def test_a_reason_keeps_example_ids_apart_from_its_text():
    r = gate.Reason("regressions", "2 regression(s) > max_regressions 0", ("v0", "v7"))
    assert str(r) == "2 regression(s) > max_regressions 0: v0, v7" and "v0" not in r.text
    many = gate.Reason("label_leak", "x.txt: adds 12 val/test expected answer(s) (label leak)",
                       tuple(f"q{i:02d}" for i in range(12)))
    assert str(many).endswith("q09 (+2 more)") and "q10" not in str(many)
    assert str(gate.Reason("cost", "cost ratio 2.00 > max_cost_ratio 1.5")) == "cost ratio 2.00 > max_cost_ratio 1.5"


def test_what_a_proposer_sees_never_names_a_val_example(repo_target):
    """Every reason that names examples (leaks, id tables, regressions) drops them in ``aggregates``."""
    snap, wt, t = repo_target
    (t / "prompts" / "sentence.txt").write_text("Capitals you know: Athens, Warsaw. Fact: {fact}\n")
    (t / "pipeline.py").write_text((t / "pipeline.py").read_text() + '\nSKIP = ["val-greece", "val-poland"]\n')
    static = _check(snap, wt)
    assert {r.code for r in static} >= {"label_leak", "example_ids"}
    assert any("val-greece" in str(r) for r in static), gate.texts(static)
    stats = _compare(_rows([1, 1, 0, 0]), _rows([0, 0, 1, 1]), Gates(max_regressions=0))
    assert any(r.code == "regressions" and r.example_ids == ("v0", "v1") for r in stats.reasons)
    v = gate.decide(5, changed=["targets/tinyqa/pipeline.py"], static_reasons=static, stats=stats, gates=Gates())
    full, seen = json.dumps(v.to_json()), json.dumps(v.aggregates())
    assert "val-greece" in full and '"v0"' in full
    for example_id in ("val-greece", "val-poland", '"v0"', '"v1"'):
        assert example_id not in seen, example_id
    assert "confirmed regression(s) > 0 allowed" in seen and "label leak" in seen

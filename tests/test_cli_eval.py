"""`pipemend init`, `pipemend eval`, `pipemend diagnose` and the evaluate choke point, end to end.

Real parts: the gateway (HTTP, `simulated/echo` backend), the process sandbox and runner,
scoring, diagnosis, files. The pipeline calls the model with the anthropic SDK.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.dataset import freeze_target
from pipemend.evaluate import EvalContext, evaluate
from pipemend.fsutil import read_json, read_jsonl
from pipemend.manifest import load_manifest
from pipemend.protocols import SandboxJob, SandboxOutcome

TARGETS = Path(__file__).parent / "fixtures" / "targets"


class RaisingSandboxStub:
    """A broken sandbox implementation: writes one result, then raises instead of returning an outcome."""

    name = "dead"

    def run(self, job: SandboxJob) -> SandboxOutcome:
        first = json.loads(job.inputs_file.read_text().splitlines()[0])
        with open(job.out_dir / "results.jsonl", "w") as f:
            f.write(json.dumps({"id": first["id"], "output": first["inputs"]["question"], "error": None,
                                "timed_out": False, "duration_s": 0.1}) + "\n")
        raise RuntimeError("container killed (OOM)")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the gateway's response cache
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def copy_target(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(TARGETS / name, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def val_expected_score(target: Path, split: str = "val", limit: int | None = None) -> tuple[float, int]:
    from pipemend.dataset import load_splits

    rows = load_splits(load_manifest(target, check_files=False), target)[split][:limit]
    right = sum(1 for r in rows if r.expected == r.inputs["question"])
    return right / len(rows), len(rows)


# --------------------------------------------------------------------------- eval


def test_eval_json_prints_one_object_of_the_documented_shape(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    reports = tmp_path / "reports"
    res = run_cli("eval", str(target), "--json", "--sandbox", "process", "--reports-dir", str(reports), "--run-id", "e1")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)  # exactly one JSON object, nothing else on stdout
    assert res.stdout.count("\n") == 1
    assert set(payload) == {"run_dir", "splits", "diagnosis", "warnings"}
    assert payload["run_dir"] == str(reports / "e1")
    assert set(payload["splits"]) == {"val"}
    val = payload["splits"]["val"]
    assert set(val) == {"score", "n", "ci_low", "ci_high", "errors"}
    want, n = val_expected_score(target)
    assert val["n"] == n and val["score"] == pytest.approx(want) and val["errors"] == 0
    assert 0.0 <= val["ci_low"] <= val["score"] <= val["ci_high"] <= 1.0
    assert set(payload["diagnosis"]) == {"counts", "errors", "unattributed", "recommended"}
    assert payload["diagnosis"]["errors"] == payload["diagnosis"]["unattributed"] == 0
    assert set(payload["diagnosis"]["counts"]) == {"prompt", "retrieval", "context", "model"}
    assert sum(payload["diagnosis"]["counts"].values()) == round(n * (1 - want))

    run_dir = reports / "e1"
    run = read_json(run_dir / "run.json")
    assert run["format"] == "pipemend-run-1" and run["kind"] == "eval" and run["status"] == "done"
    assert run["config"]["model"] == "simulated/echo"
    events = [e["event"] for e in read_jsonl(run_dir / "journal.jsonl")]
    assert events[0] == "run_started" and events[-1] == "run_done" and "eval_done" in events
    assert (run_dir / "frozen" / "data.jsonl").is_file() and (run_dir / "diagnosis.json").is_file()
    scored = list(read_jsonl(run_dir / "evals" / "val" / "scored.jsonl"))
    assert len(scored) == n and all(r["error"] is None and r["output"].startswith("what is") for r in scored)
    assert len(list(read_jsonl(run_dir / "gateway" / "calls.jsonl"))) == n  # one echo call per example
    assert sorted(p.stem for p in (run_dir / "evals" / "val" / "traces").glob("*.json")) == sorted(r["id"] for r in scored)


def test_eval_ties_every_llm_call_to_its_example(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    res = run_cli("eval", str(target), "--sandbox", "process", "--reports-dir", str(tmp_path / "r"), "--run-id", "t", "--limit", "3")
    assert res.exit_code == 0, res.output
    scored = list(read_jsonl(tmp_path / "r" / "t" / "evals" / "val" / "scored.jsonl"))
    assert all(r["llm_calls"] == 1 and r["input_tokens"] > 0 for r in scored)
    calls = list(read_jsonl(tmp_path / "r" / "t" / "gateway" / "calls.jsonl"))
    assert sorted(c["example_id"] for c in calls) == sorted(r["id"] for r in scored)


def test_eval_limit_and_all_splits_with_human_output(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    res = run_cli("eval", str(target), "--split", "all", "--limit", "2", "--sandbox", "process",
                  "--reports-dir", str(tmp_path / "r"), "--run-id", "lim")
    assert res.exit_code == 0, res.output
    for split in ("train", "val", "test"):
        summary = read_json(tmp_path / "r" / "lim" / "evals" / split / "summary.json")
        assert summary["n"] == 2 and summary["split"] == split
        assert summary["score"] == pytest.approx(val_expected_score(target, split, 2)[0])
        assert (tmp_path / "r" / "lim" / "evals" / split / "diagnosis.json").is_file()
    assert "95% CI" in res.stdout and "mean latency" in res.stdout
    assert "diagnosis: val" in res.stdout and "Failure ladder" in res.stdout
    # the run-level diagnosis is val's
    assert read_json(tmp_path / "r" / "lim" / "diagnosis.json") == read_json(tmp_path / "r" / "lim" / "evals" / "val" / "diagnosis.json")


def test_default_reports_dir_is_relative_to_cwd(tmp_path: Path, monkeypatch) -> None:
    copy_target("echo_qa", tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = run_cli("eval", "../echo_qa", "--json", "--limit", "1", "--sandbox", "process")
    assert res.exit_code == 0, res.output
    run_dir = Path(json.loads(res.stdout)["run_dir"])
    assert run_dir.parent == work / "reports" and run_dir.name.startswith("eval-")
    assert read_json(run_dir / "evals" / "val" / "summary.json")["n"] == 1


def test_labels_never_reach_the_runner(tmp_path: Path) -> None:
    target = copy_target("spy", tmp_path)
    res = run_cli("eval", str(target), "--split", "all", "--json", "--sandbox", "process",
                  "--reports-dir", str(tmp_path / "r"), "--run-id", "spy")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "r" / "spy"
    seen_by_pipeline = []
    for split in ("train", "val", "test"):
        for row in read_jsonl(run_dir / "evals" / split / "results.jsonl"):
            seen = json.loads(row["output"])
            assert "inputs_file" in seen and seen["inputs"]["question"].startswith("question ")
            seen_by_pipeline.append(row["output"])
        seen_by_pipeline.append((run_dir / "evals" / split / "inputs.jsonl").read_text())
        seen_by_pipeline += [p.read_text() for p in (run_dir / "evals" / split / "traces").glob("*.json")]
    blob = "\n".join(seen_by_pipeline)
    assert len(seen_by_pipeline) > 10
    assert "LABEL-SECRET" not in blob and "DOC-SECRET" not in blob and '"expected"' not in blob
    assert json.loads(res.stdout)["splits"]["val"]["score"] == 0.0  # `contains` would find a leaked label


def test_diagnose_rediagnoses_an_existing_run(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    first = run_cli("eval", str(target), "--json", "--sandbox", "process", "--reports-dir", str(tmp_path / "r"), "--run-id", "d")
    assert first.exit_code == 0, first.output
    (tmp_path / "r" / "d" / "diagnosis.json").unlink()
    again = run_cli("diagnose", str(tmp_path / "r" / "d"), "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["diagnosis"] == json.loads(first.stdout)["diagnosis"]
    assert (tmp_path / "r" / "d" / "diagnosis.json").is_file()
    human = run_cli("diagnose", str(tmp_path / "r" / "d"))
    assert human.exit_code == 0 and "Failure ladder" in human.stdout
    assert run_cli("diagnose", str(tmp_path / "nothing")).exit_code == 2


def test_ladder_thresholds_are_configurable(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    first = run_cli("eval", str(target), "--json", "--sandbox", "process", "--reports-dir", str(tmp_path / "r"), "--run-id", "t")
    assert first.exit_code == 0, first.output
    assert sum(json.loads(first.stdout)["diagnosis"]["counts"].values()) > 0
    # every example passes at a pass threshold of 0: nothing is left to diagnose
    lenient = run_cli("diagnose", str(tmp_path / "r" / "t"), "--json", "--pass-threshold", "0")
    assert lenient.exit_code == 0, lenient.output
    assert sum(json.loads(lenient.stdout)["diagnosis"]["counts"].values()) == 0
    bad = tmp_path / "ladder.yaml"
    bad.write_text("diagnosis:\n  context_max_dogs: 3\n")
    res = run_cli("diagnose", str(tmp_path / "r" / "t"), "--thresholds", str(bad))
    assert res.exit_code == 2 and "ladder.yaml" in res.output and "context_max_dogs" in res.output


def test_a_dead_sandbox_scores_zero_and_the_cli_exits_1(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    (target / "pipeline.py").write_text(
        "import os\n_calls = []\n\ndef run(inputs):\n    _calls.append(1)\n"
        "    if len(_calls) > 1:\n        os._exit(137)  # the whole runner dies, as in an OOM kill\n"
        "    return inputs['question']\n")
    text = (target / "pipemend.yaml").read_text().replace("concurrency: 2", "concurrency: 1")
    (target / "pipemend.yaml").write_text(text)
    res = run_cli("eval", str(target), "--json", "--sandbox", "process", "--reports-dir", str(tmp_path / "r"), "--run-id", "dead")
    assert res.exit_code == 1, res.output
    assert "the sandbox failed on val" in " ".join(res.stderr.split())
    payload = json.loads(res.stdout)  # the scores are still reported
    val = payload["splits"]["val"]
    assert val["errors"] == val["n"] - 1
    assert read_json(tmp_path / "r" / "dead" / "run.json")["status"] == "failed"
    outcome = read_json(tmp_path / "r" / "dead" / "evals" / "val" / "outcome.json")
    assert outcome["returncode"] != 0 and outcome["sandbox"] == "process"
    scored = list(read_jsonl(tmp_path / "r" / "dead" / "evals" / "val" / "scored.jsonl"))
    assert [r["error"] for r in scored[1:]] == ["no result"] * (val["n"] - 1)


@pytest.mark.parametrize("args, message", [
    (["--split", "dev"], "--split 'dev': expected one of train, val, test, all"),
    (["--sandbox", "vm"], "--sandbox 'vm': expected one of auto, docker, bwrap, process"),
    (["--limit", "0"], "--limit 0: expected a positive number"),
    (["--run-id", "../x"], "--run-id '../x'"),
])
def test_bad_eval_options_exit_2(args, message, tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    res = run_cli("eval", str(target), "--reports-dir", str(tmp_path / "r"), *args)
    assert res.exit_code == 2 and message in " ".join(res.stderr.split())


def test_missing_manifest_exits_2(tmp_path: Path) -> None:
    res = run_cli("eval", str(tmp_path))
    assert res.exit_code == 2 and "no manifest found" in res.stderr and "pipemend init" in res.stderr


# --------------------------------------------------------------------------- evaluate, directly


class _NoGateway:
    url = "http://127.0.0.1:9"
    socket_path = None


def test_evaluate_scores_with_frozen_labels_and_reports_progress(tmp_path: Path) -> None:
    target = copy_target("echo_qa", tmp_path)
    manifest = load_manifest(target)
    frozen = freeze_target(target, manifest, tmp_path / "run")
    ctx = EvalContext(run_dir=tmp_path / "run", frozen=frozen, sandbox=RaisingSandboxStub(), gateway=_NoGateway(), model="m")
    examples = frozen.splits()["val"]
    forged = [ex.model_copy(update={"expected": ex.inputs["question"]}) for ex in examples]  # a caller's labels
    ticks: list[tuple[int, int]] = []
    res = evaluate(ctx, name="v", worktree=target, target_subdir="", split="val", examples=forged,
                   out_dir=tmp_path / "run" / "evals" / "v", progress=lambda d, t: ticks.append((d, t)))
    first = examples[0]
    assert res.rows[0]["score"] == float(first.expected == first.inputs["question"])  # frozen label, not forged
    assert all(r["score"] == 0.0 and r["error"] == "no result" for r in res.rows[1:])
    assert res.failed_systemically and res.outcome.error
    assert ticks[-1] == (1, len(examples)) and all(t == len(examples) for _, t in ticks)
    sealed = [json.loads(line) for line in (res.out_dir / "inputs.jsonl").read_text().splitlines()]
    assert all(set(row) == {"id", "inputs"} for row in sealed)


# --------------------------------------------------------------------------- init


def test_init_guesses_a_manifest_that_validates(tmp_path: Path) -> None:
    d = tmp_path / "mypipe"
    (d / "prompts").mkdir(parents=True)
    (d / "helpers.py").write_text("def tidy(x):\n    return x\n")
    (d / "pipeline.py").write_text("def run(inputs):\n    return inputs['q']\n")
    (d / "prompts" / "answer.txt").write_text("Answer {q}\n")
    (d / "rows.jsonl").write_text('{"id": "1", "inputs": {"q": "a"}, "expected": "a"}\n')
    res = run_cli("init", str(d))
    assert res.exit_code == 0, res.output
    text = (d / "pipemend.yaml").read_text()
    assert "entrypoint: pipeline:run" in text and "path: rows.jsonl" in text and "TODO" not in text
    m = load_manifest(d)
    assert m.editable == ["pipeline.py", "helpers.py", "prompts/**"]
    again = run_cli("init", str(d))
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert (d / "pipemend.yaml").read_text() == text


def test_init_skeleton_validates_after_filling_in(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    assert run_cli("init", str(d)).exit_code == 0
    text = (d / "pipemend.yaml").read_text()
    assert text.count("TODO") >= 2
    assert run_cli("eval", str(d)).exit_code == 2  # not yet filled in
    (d / "pipeline.py").write_text("def run(inputs):\n    return ''\n")
    (d / "data.jsonl").write_text('{"id": "1", "inputs": {}, "expected": ""}\n')
    m = load_manifest(d)
    assert m.entrypoint == "pipeline:run" and m.dataset.split.val == 0.4
    assert run_cli("init", str(tmp_path / "missing")).exit_code == 2


# --------------------------------------------------------------------------- the command surface


def test_help_lists_the_core_commands() -> None:
    res = run_cli("--help")
    assert res.exit_code == 0
    for cmd in ("init", "eval", "diagnose", "gateway", "doctor"):
        assert cmd in res.stdout
    eval_help = run_cli("eval", "--help").stdout
    for opt in ("--split", "--limit", "--model", "--sandbox", "--run-id", "--reports-dir", "--json"):
        assert opt in eval_help


# `reap(None)` (doctor --clean) removes every dead owner's orphans on the machine: its tests see no Docker engine,
# and under --dist loadgroup this mark keeps them on one worker with the tests that count orphans (tests/conftest.py)
@pytest.mark.xdist_group("reap")
def test_doctor_clean_removes_what_a_dead_run_left_behind(monkeypatch, tmp_path) -> None:
    from pipemend.sandbox.ingest import SCRATCH_PREFIX

    monkeypatch.setenv("PIPEMEND_SCRATCH", str(tmp_path))
    # no engine: `reap(None)` would take every dead owner's containers, orphans other tests count included
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{child.stdout.strip()}.1"  # a pid that has exited (and a start time no live process has)
    orphan = tmp_path / f"{SCRATCH_PREFIX}deadrun-{dead_owner}-x1y2"
    (orphan / "out").mkdir(parents=True)
    alive = tmp_path / f"{SCRATCH_PREFIX}liverun-{os.getpid()}.{_start_time()}-z9"
    alive.mkdir()
    res = run_cli("doctor", "--clean", "--json")
    assert res.exit_code == 0, res.output
    assert not orphan.exists() and alive.exists()  # only what a dead owner left
    assert "scratch folder" in res.output


def _start_time() -> int:
    from pipemend.sandbox.ingest import process_start_time

    return process_start_time(os.getpid()) or 0


def test_doctor_prints_one_row_per_check(monkeypatch) -> None:
    from pipemend import doctor

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    res = run_cli("doctor", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["checks"]
    assert [r["name"] for r in rows] == [c.name for c in doctor.check_all()]
    assert all(set(r) == {"name", "ok", "detail", "fix"} and isinstance(r["ok"], bool) for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert {"docker engine", "bwrap", "process", "local model", "anthropic key", "claude-code proposer"} <= set(by_name)
    assert not by_name["anthropic key"]["ok"] and "ANTHROPIC_API_KEY" in by_name["anthropic key"]["fix"]
    assert by_name["process"]["ok"] and "NOT isolate" in by_name["process"]["detail"]

def test_a_finished_evaluation_is_reused_only_under_its_own_key(tmp_path: Path) -> None:
    from pipemend.dataset import Example
    from pipemend.evaluate import EvalKey, remember, reuse

    exs = [Example(id="a", inputs={}, expected="x"), Example(id="b", inputs={}, expected="y")]
    key = EvalKey.of(sha="abc", diff="", split="val", examples=exs, model="m")
    out = tmp_path / "evals" / "val"
    assert reuse(out, key) is None  # nothing there yet
    out.mkdir(parents=True)
    (out / "scored.jsonl").write_text('{"id": "a", "score": 1}\n{"id": "b", "score": 0}\n')
    (out / "outcome.json").write_text("{}")
    assert reuse(out, key) is None and not out.exists(), "an evaluation never marked finished is cleared"
    out.mkdir(parents=True)
    (out / "scored.jsonl").write_text('{"id": "a", "score": 1}\n')
    (out / "outcome.json").write_text("{}")
    remember(out, key)
    assert reuse(out, key) == [{"id": "a", "score": 1}]
    other = EvalKey.of(sha="abc", diff="+ a change", split="val", examples=exs, model="m")
    assert other != key and reuse(out, other) is None and not out.exists()
    assert not (tmp_path / "evals" / "val.key.json").exists()


def test_the_gateway_socket_path_stays_short(tmp_path: Path) -> None:
    from pipemend.evaluate import gateway_socket_path

    assert gateway_socket_path(tmp_path) == tmp_path / "gateway" / "gateway.sock"
    deep = tmp_path / ("x" * 120)
    long = gateway_socket_path(deep)
    assert len(str(long)) < 100 and long.parent == Path("/tmp") and long == gateway_socket_path(deep)

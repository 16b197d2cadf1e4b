"""The label seal at the file level: a pipeline cannot read its own dataset, metric or pipemend's run folders.

``evaluate`` hands every sandbox the target's data files, custom metric file, git
folder and (when it lies inside the target) the run folders as
``SandboxJob.hidden``; docker and bwrap mask them, process runs a copy without
them. The fixture pipeline (fixtures/targets/label_seal/) opens those files itself and
returns everything it could read; no label, evidence id or metric source may
come back. Real parts throughout: the ``pipemend eval`` CLI, the gateway, git,
the sandboxes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.errors import UsageError
from pipemend.fsutil import read_jsonl
from pipemend.protocols import SandboxJob
from pipemend.sandbox import get_sandbox
from sandbox_support import SANDBOXES, sandbox_or_skip

FIXTURE = Path(__file__).parent / "fixtures" / "targets" / "label_seal"
SECRETS = ("SEAL-ANSWER", "SEAL-EVID", "METRIC-SECRET")
HIDDEN_PROBES = ("data/labels.jsonl", "alias.jsonl", "metric.py")




@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


@pytest.fixture
def thief(tmp_path: Path) -> Path:
    """The fixture target as a git repository's root, with a symlink to its dataset."""
    target = tmp_path / "thief"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "alias.jsonl").symlink_to("data/labels.jsonl")
    git = ["git", "-C", str(target), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "fixture"], check=True)
    return target


def _assert_sealed(outputs: list[dict]) -> None:
    """What the pipeline saw: the control file, and nothing of the hidden ones."""
    assert outputs
    for seen in outputs:
        probes = seen["probes"]
        assert probes["config.txt"] == {"state": "file", "text": "visible-config\n"}  # the probe can read files
        for name in HIDDEN_PROBES:
            p = probes[name]
            assert p["state"] in ("absent", "error") or (p["state"] == "file" and p["text"] == ""), (name, p)
        for name in (".git", "reports"):
            p = probes[name]
            assert p["state"] == "absent" or (p["state"] == "dir" and p["entries"] == []), (name, p)
        assert "config.txt" in seen["walk"] and "pipeline.py" in seen["walk"]


@pytest.mark.parametrize("name", SANDBOXES)
def test_pipeline_cannot_read_its_labels_in_any_sandbox(name: str, thief: Path, tmp_path: Path) -> None:
    sandbox_or_skip(name)
    run_dir = thief / "reports" / "seal"  # the run folders inside the target: masked too
    res = CliRunner().invoke(app, ["eval", str(thief), "--split", "all", "--json", "--sandbox", name,
                                   "--reports-dir", str(thief / "reports"), "--run-id", "seal"])
    assert res.exit_code == 0, res.output
    blob, outputs = [], []
    for split in ("train", "val", "test"):
        ev = run_dir / "evals" / split
        rows = list(read_jsonl(ev / "results.jsonl"))
        assert rows and all(r["error"] is None for r in rows), rows
        outputs += [json.loads(r["output"]) for r in rows]
        blob += [(ev / f).read_text() for f in ("results.jsonl", "scored.jsonl")]
        blob += [p.read_text() for p in (ev / "traces").glob("*.json")]
    _assert_sealed(outputs)
    text = "\n".join(blob)
    assert not [s for s in SECRETS if s in text]
    assert json.loads(res.stdout)["splits"]["val"]["score"] == 0.0  # the metric would find a leaked label
    # the target itself is untouched: the masks hid the files, they did not empty them
    assert "SEAL-ANSWER-01" in (thief / "data" / "labels.jsonl").read_text()
    assert "METRIC-SECRET" in (thief / "metric.py").read_text()


# --------------------------------------------------------------------------- SandboxJob.hidden, directly


class _NoGateway:
    url = "http://127.0.0.1:9"
    socket_path = None


def _job(tmp_path: Path, worktree: Path, subdir: str, hidden: list[str], name: str, **kw) -> SandboxJob:
    inputs = tmp_path / f"{name}-inputs.jsonl"
    inputs.write_text(json.dumps({"id": "x1", "inputs": {"question": "q"}}) + "\n")
    return SandboxJob(worktree=worktree, target_subdir=subdir, entrypoint="pipeline:run", inputs_file=inputs,
                      out_dir=tmp_path / "out" / name, gateway_url=_NoGateway.url, gateway_socket=None,
                      model="simulated/echo", concurrency=1, example_timeout_s=30, wall_timeout_s=120,
                      hidden=hidden, **kw)


def _seen(job: SandboxJob) -> dict:
    rows = list(read_jsonl(job.out_dir / "results.jsonl"))
    assert len(rows) == 1 and rows[0]["error"] is None, rows
    return json.loads(rows[0]["output"])


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    """A worktree whose target sits in ``app/``, with its labels in a folder and a symlink into it."""
    wt = tmp_path / "wt"
    target = wt / "app"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "alias.jsonl").symlink_to("data/labels.jsonl")
    (target / "reports" / "old-run").mkdir(parents=True)
    (target / "reports" / "old-run" / "frozen.jsonl").write_text('{"expected": "SEAL-ANSWER-99"}\n')
    return wt


@pytest.mark.parametrize("name", SANDBOXES)
def test_hidden_files_and_folders_are_masked_in_a_subdir_target(name: str, nested: Path, tmp_path: Path) -> None:
    sb = sandbox_or_skip(name)
    job = _job(tmp_path, nested, "app", ["alias.jsonl", "metric.py", "reports"], name, writable=True)
    outcome = sb.run(job)
    assert outcome.error is None and outcome.returncode == 0, outcome
    seen = _seen(job)
    _assert_sealed([seen])  # alias.jsonl resolves to data/labels.jsonl: the real file is what gets masked
    assert not [s for s in SECRETS if s in json.dumps(seen)]
    assert (nested / "app" / "reports" / "old-run" / "frozen.jsonl").is_file()  # masked, not removed


def test_without_hidden_the_thief_would_succeed(nested: Path, tmp_path: Path) -> None:
    """The control: the same pipeline, nothing hidden, reads the labels (so the tests above can fail)."""
    job = _job(tmp_path, nested, "app", [], "open")
    outcome = get_sandbox("process", announce=lambda m: None).run(job)
    assert outcome.error is None, outcome
    seen = _seen(job)
    assert "SEAL-ANSWER-01" in seen["probes"]["data/labels.jsonl"]["text"]
    assert "SEAL-ANSWER-01" in seen["probes"]["alias.jsonl"]["text"]
    assert "METRIC-SECRET" in seen["walk"]["metric.py"]


def test_process_sandbox_runs_a_copy_and_says_so(nested: Path, tmp_path: Path) -> None:
    said: list[str] = []
    sb = get_sandbox("process", announce=said.append)
    (nested / "app" / "pipeline.py").write_text(
        "import json, os\n\ndef run(inputs):\n"
        "    with open('written.txt', 'w') as f:\n        f.write('x')\n"
        "    return json.dumps({'cwd': os.getcwd(), 'files': sorted(os.listdir('.'))})\n")
    job = _job(tmp_path, nested, "app", ["data/labels.jsonl"], "copy", writable=True)
    assert sb.run(job).error is None
    seen = _seen(job)
    assert Path(seen["cwd"]).resolve() != (nested / "app").resolve()
    assert "pipeline.py" in seen["files"] and "data" in seen["files"] and "written.txt" in seen["files"]
    assert not (nested / "app" / "written.txt").exists()  # a writable job's writes land in the copy and go
    assert not Path(seen["cwd"]).exists()  # the copy is removed afterwards
    assert any("temporary copy" in m for m in said)


def test_copies_left_by_a_killed_pipemend_are_swept(tmp_path: Path) -> None:
    from pipemend.sandbox.process import COPY_PREFIX, sweep_stale_copies

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"{COPY_PREFIX}{dead.pid}-abc" / "t").mkdir(parents=True)
    (tmp_path / f"{COPY_PREFIX}1-def").mkdir()  # pid 1 is alive
    (tmp_path / f"{COPY_PREFIX}{os.getpid()}-ghi").mkdir()  # ours, in use
    assert sweep_stale_copies(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{COPY_PREFIX}1-def", f"{COPY_PREFIX}{os.getpid()}-ghi"]


def test_an_absolute_hidden_path_is_refused(nested: Path, tmp_path: Path) -> None:
    job = _job(tmp_path, nested, "app", [str(nested / "app" / "data" / "labels.jsonl")], "abs")
    with pytest.raises(UsageError, match="relative to the target folder"):
        get_sandbox("process", announce=lambda m: None).run(job)


def test_evaluate_hides_the_sealed_files_git_and_the_runs(thief: Path) -> None:
    from pipemend.evaluate import hidden_paths
    from pipemend.manifest import load_manifest

    m = load_manifest(thief)
    sealed = m.sealed_paths(thief)
    assert {"data/labels.jsonl", "metric.py"} <= set(sealed)
    assert hidden_paths(m, thief, thief / "reports" / "r1", sealed) == [*sealed, ".git", "reports"]
    assert hidden_paths(m, thief, thief.parent / "elsewhere" / "r1", sealed) == [*sealed, ".git"]
    assert hidden_paths(m, thief, thief / "r1", ["extra/generator.py"]) == [
        "data/labels.jsonl", "extra/generator.py", "metric.py", ".git", "r1"]
    shutil.rmtree(thief / ".git")
    assert hidden_paths(m, thief, thief / "r1", sealed) == [*sealed, "r1"]

"""What a sandbox writes is hostile: planted links, FIFOs and huge files never reach the host's out_dir.

Each sandbox writes into a fresh scratch folder outside the run directory; the
host ingests ``results.jsonl`` and ``traces/<id>.json`` (the job's ids only),
regular files only, no link followed, size-capped, then removes the scratch.
The attacks below run as real pipelines in docker, bwrap and process, plus the
ingest itself on planted files. Nothing of a link's target may reach out_dir,
the evaluation still ends, and the attacked examples score as missing.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipemend.fsutil import read_jsonl
from pipemend.protocols import SandboxJob
from sandbox_support import SANDBOXES, sandbox_or_skip, scratch_base  # noqa: F401 - a fixture
from pipemend.sandbox.ingest import RESULTS_CAP, TRACE_CAP, Scratch, ingest, run_id_of

SECRET = "SECRET-LABEL-7f3a"
PASSWD = "root:x:0:0"

PIPELINE = r'''
import json, os, sys
from pathlib import Path


def _out():
    return Path(sys.argv[sys.argv.index("--out") + 1])


def _try(fn):
    try:
        return "ok: " + str(fn())
    except Exception as e:
        return "blocked: " + type(e).__name__


def run(inputs):
    kind, out, secret = inputs["attack"], _out(), inputs.get("secret", "")
    if kind == "victim":
        return "victim-output"
    if kind == "results_abs":
        (out / "results.jsonl").unlink()
        os.symlink(secret, out / "results.jsonl")
    elif kind == "results_rel":
        (out / "results.jsonl").unlink()
        os.symlink("../" * 30 + secret.lstrip("/"), out / "results.jsonl")
    elif kind == "trace_passwd":
        t = out / "traces" / "victim.json"
        t.unlink(missing_ok=True)
        os.symlink("/etc/passwd", t)
    elif kind == "trace_label":
        t = out / "traces" / "victim.json"
        t.unlink(missing_ok=True)
        os.symlink(secret, t)
    elif kind == "traces_dir_link":
        os.rename(out / "traces", out / "traces.real")
        os.symlink(os.path.dirname(secret), out / "traces")
    elif kind == "fifo":
        (out / "results.jsonl").unlink()
        os.mkfifo(out / "results.jsonl")
    elif kind == "huge":
        with open(out / "traces" / "victim.json", "wb") as f:
            f.truncate(TRACE_CAP + 1)
    elif kind == "dotdot":
        return json.dumps({"write": _try(lambda: (out / ".." / "x").write_text(secret))})
    elif kind == "rundir":
        run_dir = inputs["run_dir"]
        return json.dumps({"list": _try(lambda: os.listdir(run_dir)),
                           "read": _try(lambda: open(os.path.join(run_dir, "frozen", "labels.jsonl")).read()),
                           "older_run": _try(lambda: open(os.path.join(run_dir, "..", "older", "frozen",
                                                                       "labels.jsonl")).read()),
                           "write": _try(lambda: open(os.path.join(run_dir, "evals", "pwned"), "w").write("x"))})
    return "planted"
'''.replace("TRACE_CAP", str(TRACE_CAP))

ATTACKS = ["results_abs", "results_rel", "trace_passwd", "trace_label", "traces_dir_link", "fifo", "huge", "dotdot"]
RESULT_ATTACKS = {"results_abs", "results_rel", "fifo"}


@pytest.fixture
def world(tmp_path: Path):
    """A run directory (run.json, frozen labels, 0700) and a secret folder outside every sandbox mount."""
    run_dir = tmp_path / "run"
    (run_dir / "frozen").mkdir(parents=True)
    (run_dir / "evals").mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "run"}))
    (run_dir / "frozen" / "labels.jsonl").write_text(json.dumps({"id": "victim", "expected": SECRET}) + "\n")
    os.chmod(run_dir, 0o700)  # what a run directory should be (rundir.py): out of reach of uid 65534
    older = tmp_path / "older"  # an earlier run of the same target, beside this one
    (older / "frozen").mkdir(parents=True)
    (older / "run.json").write_text(json.dumps({"run_id": "older"}))
    (older / "frozen" / "labels.jsonl").write_text(SECRET + "\n")
    os.chmod(older, 0o700)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "labels.jsonl").write_text(SECRET + "\n")
    (secret_dir / "victim.json").write_text(json.dumps({"label": SECRET}))
    wt = tmp_path / "wt"
    wt.mkdir()
    (wt / "pipeline.py").write_text(PIPELINE)
    return {"run_dir": run_dir, "secret": secret_dir / "labels.jsonl", "wt": wt}


def _job(tmp_path: Path, world: dict, rows: list[dict], name: str) -> SandboxJob:
    inputs = tmp_path / f"{name}-inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SandboxJob(worktree=world["wt"], target_subdir="", entrypoint="pipeline:run", inputs_file=inputs,
                      out_dir=world["run_dir"] / "evals" / name, gateway_url="http://127.0.0.1:9", gateway_socket=None,
                      model="simulated/echo", concurrency=1, example_timeout_s=60, wall_timeout_s=180)


def _assert_clean(out_dir: Path) -> None:
    """No link anywhere in out_dir, and nothing of a link target in any file there."""
    for dirpath, dirnames, filenames in os.walk(out_dir):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            assert not p.is_symlink(), p
            if p.is_file():
                text = p.read_bytes()
                assert SECRET.encode() not in text and PASSWD.encode() not in text, p


@pytest.mark.parametrize("name", SANDBOXES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_planted_links_fifos_and_huge_files_never_reach_the_host(name, attack, tmp_path, world, scratch_base):
    sb = sandbox_or_skip(name)
    rows = [{"id": "victim", "inputs": {"attack": "victim"}},
            {"id": "plant", "inputs": {"attack": attack, "secret": str(world["secret"])}}]
    job = _job(tmp_path, world, rows, f"{attack}")
    outcome = sb.run(job)  # the evaluation ends: an outcome, not an exception or a hang

    out = job.out_dir
    _assert_clean(out)
    assert list(scratch_base.iterdir()) == []  # the scratch folder is gone
    assert not (world["run_dir"] / "evals" / "x").exists() and not (world["run_dir"] / "evals" / "x.json").exists()
    results = {r["id"]: r for r in read_jsonl(out / "results.jsonl")} if (out / "results.jsonl").exists() else {}
    if attack in RESULT_ATTACKS:
        assert not (out / "results.jsonl").exists()  # refused whole: every example scores "no result"
        assert "refused" in outcome.stderr_tail and "results.jsonl" in outcome.stderr_tail, outcome
    else:
        assert results["victim"]["output"] == "victim-output", (outcome, results)
    if attack in {"trace_passwd", "trace_label", "traces_dir_link", "huge"}:
        assert not (out / "traces" / "victim.json").exists()
    if attack == "dotdot":  # (an id like "../x" never gets this far: the runner refuses it; ingest skips it too)
        assert results["plant"]["error"] is None
        assert sorted(p.name for p in (out / "traces").iterdir()) == ["plant.json", "victim.json"]
        assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "runner.json", "traces"]
        assert json.loads((out / "runner.json").read_text())["startup_s"] >= 0  # start-up is charged too


@pytest.mark.parametrize("name", SANDBOXES)
def test_the_run_directory_is_out_of_the_pipelines_reach(name, tmp_path, world, scratch_base):
    sb = sandbox_or_skip(name)
    if name == "process" and os.geteuid() != 0:
        pytest.skip("not root: the process sandbox cannot hide the run directory (it says so loudly)")
    run_dir = world["run_dir"]
    job = _job(tmp_path, world, [{"id": "r", "inputs": {"attack": "rundir", "run_dir": str(run_dir)}}], "rundir")
    outcome = sb.run(job)
    assert outcome.error is None, outcome
    seen = json.loads(next(iter(read_jsonl(job.out_dir / "results.jsonl")))["output"])
    assert all(v.startswith("blocked") for v in seen.values()), seen
    assert not (run_dir / "evals" / "pwned").exists()
    assert run_id_of(job.out_dir) == "run"


# --------------------------------------------------------------------------- ingest itself, on planted files


@pytest.fixture
def planted(tmp_path: Path):
    scratch = Scratch.create("t", base=tmp_path)
    out = tmp_path / "host-out"
    (out / "traces").mkdir(parents=True)
    (out / "traces" / "gone.json").write_text("stale")  # a stale trace for an id of this job
    (out / "results.jsonl").write_text('{"id": "stale"}\n')
    yield scratch, out
    scratch.remove()


def test_ingest_takes_regular_expected_files_only(planted, tmp_path: Path):
    scratch, out = planted
    so = scratch.out
    (so / "traces").mkdir()
    (so / "results.jsonl").write_text('{"id": "a"}\n')
    (so / "traces" / "a.json").write_text('{"ok": 1}')
    (so / "traces" / "b.json").symlink_to("/etc/passwd")
    (so / "traces" / "c.json").symlink_to("../results.jsonl")
    os.mkfifo(so / "traces" / "d.json")
    (so / "traces" / "not-asked.json").write_text("{}")
    (so / "extra.txt").write_text("x")
    (so / "runner.json").symlink_to("/etc/passwd")
    report = ingest(so, out, ["a", "b", "c", "d", "gone", "../x", "."])
    assert report.results and report.traces == ["a"]
    assert sorted(p.name for p in (out / "traces").iterdir()) == ["a.json"]
    assert (out / "results.jsonl").read_text() == '{"id": "a"}\n'
    assert not (out / "extra.txt").exists() and not (out / "runner.json").exists()
    assert {r.split(":")[0] for r in report.refused} == {"runner.json", "traces/b.json", "traces/c.json",
                                                         "traces/d.json"}
    (so / "runner.json").unlink()
    (so / "runner.json").write_text('{"format": "pipemend-runner-1", "startup_s": 0.5}')
    ingest(so, out, ["a"])
    assert json.loads((out / "runner.json").read_text())["startup_s"] == 0.5


def test_ingest_refuses_a_linked_traces_folder_and_results_and_caps_sizes(planted, tmp_path: Path):
    scratch, out = planted
    so = scratch.out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.json").write_text(SECRET)
    (so / "traces").symlink_to(elsewhere)
    (so / "results.jsonl").symlink_to(elsewhere / "a.json")
    report = ingest(so, out, ["a"])
    assert not report.results and report.traces == []
    assert not (out / "results.jsonl").exists()  # the stale one is gone too: it cannot pass for a new one
    _assert_clean(out)
    (so / "results.jsonl").unlink()
    (so / "results.jsonl").write_bytes(b"x" * 101)
    assert not ingest(so, out, [], results_cap=100).results
    assert RESULTS_CAP > TRACE_CAP > 0


def test_ingest_refuses_a_linked_out_folder(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "results.jsonl").write_text(SECRET)
    link = tmp_path / "out-link"
    link.symlink_to(real)
    report = ingest(link, tmp_path / "host", ["a"])
    assert not report.results and report.refused


def test_a_fifo_does_not_stall_the_host(planted):
    scratch, out = planted
    os.mkfifo(scratch.out / "results.jsonl")
    done = threading.Event()
    threading.Thread(target=lambda: (ingest(scratch.out, out, []), done.set()), daemon=True).start()
    assert done.wait(30)
    assert not (out / "results.jsonl").exists()

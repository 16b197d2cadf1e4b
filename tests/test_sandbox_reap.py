"""Orphans reaped: a pipemend killed (-9) mid-evaluation leaves a container, processes and a scratch folder;
``reap(run_id)`` (what ``resume`` and ``pipemend doctor --clean`` call) removes all of them, and nothing of a
live run.

The driver is a real pipemend process running a real sandbox job (the real
Docker engine, bubblewrap, or a subprocess) whose pipeline hangs; the test
kills it with SIGKILL once the pipeline runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sandbox_support import SANDBOXES, sandbox_or_skip, scratch_base  # noqa: F401 - a fixture
from pipemend.sandbox.ingest import SCRATCH_PREFIX, owner_token
from pipemend.sandbox.reap import reap

# `reap(None)` (doctor --clean) removes every dead owner's orphans on the machine: its tests see no Docker engine,
# and under --dist loadgroup this mark keeps them on one worker with the tests that count orphans (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("reap")

PIPELINE = r'''
import os, subprocess, sys, time
from pathlib import Path


def run(inputs):
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    child = subprocess.Popen(["sleep", "600"])  # a grandchild in the sandbox's process group
    (out / "child.pid").write_text(str(child.pid))
    time.sleep(600)
'''

DRIVER = r'''
import json, sys
from pathlib import Path
from pipemend.protocols import SandboxJob
from pipemend.sandbox import get_sandbox

name, wt, run_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
inputs = run_dir / "inputs.jsonl"
inputs.write_text(json.dumps({"id": "hang", "inputs": {}}) + "\n")
job = SandboxJob(worktree=wt, target_subdir="", entrypoint="pipeline:run", inputs_file=inputs,
                 out_dir=run_dir / "evals" / "val", gateway_url="http://127.0.0.1:9", gateway_socket=None,
                 model="simulated/echo", concurrency=1, example_timeout_s=600, wall_timeout_s=600)
get_sandbox(name, announce=lambda m: None).run(job)
'''



def _containers(run_id: str) -> list:
    from pipemend.sandbox.docker import docker_client

    return docker_client().containers.list(all=True, filters={"label": f"pipemend.run={run_id}"})


def _wait(cond, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, host pids."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.parametrize("name", SANDBOXES)
def test_a_run_killed_mid_evaluation_is_reaped(name: str, tmp_path: Path, scratch_base: Path) -> None:
    sandbox_or_skip(name)
    run_id = f"reap{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / run_id
    (run_dir / "evals").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id}))
    wt = tmp_path / "wt"
    wt.mkdir()
    (wt / "pipeline.py").write_text(PIPELINE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, name, str(wt), str(run_dir)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        scratch = lambda: [d for d in scratch_base.iterdir() if d.name.startswith(f"{SCRATCH_PREFIX}{run_id}-")]
        _wait(lambda: any((d / "out" / "child.pid").is_file() for d in scratch()) or driver.poll() is not None,
              "the pipeline to start")
        assert driver.poll() is None, driver.stderr.read().decode()
        [folder] = scratch()
        pgid = None if name == "docker" else json.loads((folder / "process.json").read_text())["pgid"]
        if name == "docker":
            assert [c.status for c in _containers(run_id)] == ["running"]
        if name == "process":
            assert len(_group(pgid)) >= 2  # the runner and the pipeline's grandchild
        # a live run is never reaped
        assert reap(run_id).total() == 0 and folder.is_dir()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()

    time.sleep(0.5)
    if name == "docker":
        assert _containers(run_id), "the container outlived its driver (what reap is for)"
    assert folder.is_dir()
    report = reap(run_id)
    assert str(folder) in report.folders, report
    assert not folder.exists()
    assert [d for d in scratch_base.iterdir() if run_id in d.name] == []
    if name == "docker":
        assert len(report.containers) == 1 and _containers(run_id) == []
    else:
        _wait(lambda: not _group(pgid), "the sandbox's processes to go", timeout=10)
    if name == "process":
        assert report.processes == [pgid]  # the grandchild outlived the runner: reap killed its group
    assert reap(run_id).total() == 0  # nothing left to do


def test_reap_leaves_other_runs_and_live_owners_alone(tmp_path: Path, scratch_base: Path, monkeypatch) -> None:
    # no engine: `reap(None)` would take every dead owner's containers, orphans other tests count included
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = scratch_base / f"{SCRATCH_PREFIX}runA-{dead.pid}.1-abc"
    other = scratch_base / f"{SCRATCH_PREFIX}runB-{dead.pid}.1-def"
    live = scratch_base / f"{SCRATCH_PREFIX}runA-{owner_token()}-ghi"
    for d in (gone, other, live):
        (d / "out").mkdir(parents=True)
    (gone / "out" / "link").symlink_to(tmp_path)  # removing a hostile folder must not follow its links
    (tmp_path / "keep.txt").write_text("x")
    report = reap("runA")
    assert report.folders == [str(gone)]
    assert other.is_dir() and live.is_dir() and (tmp_path / "keep.txt").is_file()
    assert str(other) in reap(None).folders and live.is_dir()

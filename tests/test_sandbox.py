"""Sandbox registry, the process sandbox, target venvs, image tags, the doctor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipemend.errors import SandboxUnavailable, UsageError
from pipemend.fsutil import read_jsonl
from pipemend.protocols import Sandbox, SandboxJob
from pipemend.sandbox import SandboxLimits, get_sandbox
from pipemend.sandbox.doctor import Check, check_all

FIXTURE = Path(__file__).parent / "fixtures" / "targets" / "hostile"


@pytest.fixture
def gateway(tmp_path: Path):
    from pipemend.gateway import Gateway, GatewayConfig

    gw = Gateway(GatewayConfig(run_dir=tmp_path / "run", socket_path=tmp_path / "gw.sock",
                               cache_dir=tmp_path / "llm-cache", models=["simulated/echo"]))
    gw.start()
    yield gw
    gw.stop()


def make_job(tmp_path: Path, gw, rows: list[dict], name: str = "e", **kw) -> SandboxJob:
    wt = tmp_path / "wt"
    if not wt.exists():
        shutil.copytree(FIXTURE, wt, ignore=shutil.ignore_patterns("__pycache__"))
    inputs = tmp_path / f"{name}.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SandboxJob(worktree=wt, target_subdir="", entrypoint="hostile:run", inputs_file=inputs,
                      out_dir=tmp_path / "out" / name, gateway_url=gw.url, gateway_socket=None,
                      model="simulated/echo", **kw)


def results(job: SandboxJob) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(job.out_dir / "results.jsonl")}


def test_unknown_sandbox_lists_the_valid_names():
    with pytest.raises(UsageError) as e:
        get_sandbox("vm")
    assert all(n in str(e.value) for n in ("auto", "docker", "bwrap", "process"))


@pytest.mark.bwrap
def test_auto_picks_one_and_says_which():
    said: list[str] = []
    try:
        sb = get_sandbox("auto", announce=said.append)
    except SandboxUnavailable as e:
        pytest.skip(f"neither docker nor bwrap works here: {e}")
    assert isinstance(sb, Sandbox) and sb.name in ("docker", "bwrap")
    assert said and said[0].startswith(f"sandbox: {sb.name}")


def test_dotted_path_works_like_a_short_name():
    sb = get_sandbox("pipemend.sandbox.process:ProcessSandbox", announce=lambda m: None)
    assert sb.name == "process"


def test_process_sandbox_runs_the_runner_warns_and_filters_secrets(tmp_path: Path, gateway, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    said: list[str] = []
    sb = get_sandbox("process", announce=said.append)
    rows = [{"id": "e1", "inputs": {"attack": "echo", "text": "x"}},
            {"id": "llm", "inputs": {"attack": "gateway", "text": "through the gateway"}},
            {"id": "sec", "inputs": {"attack": "secrets", "key_file": "/nonexistent", "real_key": "sk-ant-real"}}]
    job = make_job(tmp_path, gateway, rows, env={"MY_API_KEY": "leak", "RETRIEVAL_K": "3"})
    out = sb.run(job)
    assert out.error is None and out.returncode == 0, out
    assert any("does NOT isolate" in m for m in said)
    res = results(job)
    assert res["e1"]["output"] == "echo:x"
    assert res["llm"]["output"] == "through the gateway"
    sec = json.loads(res["sec"]["output"])
    assert sec["real_key_in_env"] is False and "MY_API_KEY" not in sec["env"]
    calls = list(read_jsonl(tmp_path / "run" / "gateway" / "calls.jsonl"))
    assert [c["example_id"] for c in calls] == ["llm"]


def test_process_sandbox_limits_memory_and_wall_time(tmp_path: Path, gateway):
    sb = get_sandbox("process", announce=lambda m: None, limits=SandboxLimits(memory_mb=256))
    mem = sb.run(make_job(tmp_path, gateway, [{"id": "m", "inputs": {"attack": "memory"}}], "mem", concurrency=1))
    res = results_or_empty(tmp_path / "out" / "mem")
    said = (mem.error or "") + json.dumps(res)
    assert "out of memory" in said or "MemoryError" in said, mem

    hang = sb.run(make_job(tmp_path, gateway, [{"id": "h", "inputs": {"attack": "hang"}}], "hang",
                           wall_timeout_s=2, example_timeout_s=600))
    assert hang.timed_out and "wall-time" in (hang.error or "")


def results_or_empty(out_dir: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(out_dir / "results.jsonl")} if (out_dir / "results.jsonl").exists() else {}


def test_target_venv_stands_on_its_own_and_is_cached(tmp_path: Path, monkeypatch):
    """Not layered on the pipemend install that built it: a second install (or this one deleted) still works."""
    from pipemend.sandbox.venvs import MARKER, target_python, venv_key

    monkeypatch.setenv("PIPEMEND_VENVS", str(tmp_path / "venvs"))
    req = tmp_path / "requirements.txt"
    req.write_text("pyyaml\n")
    said: list[str] = []
    py = target_python(req, announce=said.append)
    venv = py.parent.parent
    assert venv == tmp_path / "venvs" / venv_key(req) and len(said) == 1
    assert (venv / MARKER).is_file()
    assert not list(venv.rglob("_pipemend_parent_env.pth"))
    env = {"PATH": "/usr/bin:/bin"}  # nothing of pipemend's env on the path
    probe = subprocess.run([str(py), "-c", "import sys, yaml; print(sys.prefix)"], capture_output=True, text=True,
                           env=env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(venv)
    alone = subprocess.run([str(py), "-c", "import pydantic"], capture_output=True, text=True, env=env)
    assert alone.returncode != 0  # pipemend's own dependencies are not leaking in through a .pth
    for p in [venv, *venv.rglob("*")]:  # readable by the sandbox user (65534)
        if not p.is_symlink():
            assert p.stat().st_mode & 0o004, p
    assert target_python(req, announce=said.append) == py and len(said) == 1  # cached, silent


def test_target_venv_key_covers_what_it_depends_on(tmp_path: Path, monkeypatch):
    from pipemend.sandbox import venvs

    req = tmp_path / "requirements.txt"
    req.write_text("pyyaml\n")
    k = venvs.venv_key(req)
    req.write_text("pyyaml\n# changed\n")
    assert venvs.venv_key(req) != k
    k2 = venvs.venv_key(req)
    monkeypatch.setattr(venvs, "LAYOUT", "other-layout")
    assert venvs.venv_key(req) != k2
    monkeypatch.setattr(venvs, "LAYOUT", venvs.LAYOUT)
    monkeypatch.setattr(venvs, "RUNNER_REQUIREMENTS", ("httpx",))
    assert venvs.venv_key(req) != k2


def test_a_half_built_venv_is_never_used_and_concurrent_builders_share_one(tmp_path: Path, monkeypatch):
    import threading

    from pipemend.sandbox.venvs import MARKER, target_python, venv_key

    monkeypatch.setenv("PIPEMEND_VENVS", str(tmp_path / "venvs"))
    req = tmp_path / "requirements.txt"
    req.write_text("pyyaml\n")
    half = tmp_path / "venvs" / venv_key(req)
    (half / "bin").mkdir(parents=True)  # what a crash mid-build under the final name would look like
    (half / "bin" / "python").write_text("#!/bin/sh\nexit 3\n")
    got: list[Path] = []
    builders = [threading.Thread(target=lambda: got.append(target_python(req, announce=lambda m: None)))
                for _ in range(2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    assert got[0] == got[1] == half / "bin" / "python"
    assert (half / MARKER).is_file()
    assert subprocess.run([str(got[0]), "-c", "import yaml"]).returncode == 0
    assert [p.name for p in (tmp_path / "venvs").iterdir() if ".build-" in p.name] == []


def test_auto_never_picks_process(monkeypatch, tmp_path: Path):
    """No Docker engine and no bubblewrap: auto refuses, and says how to install them and what the opt-in is."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(SandboxUnavailable) as e:
        get_sandbox("auto", announce=lambda m: None)
    msg = str(e.value)
    assert "bubblewrap" in msg and "docker" in msg.lower() and "--sandbox process" in msg and "unsafe" in msg
    assert get_sandbox("process", announce=lambda m: None).name == "process"  # by name, it still runs


def test_process_sandbox_runs_as_nobody_when_it_can_and_says_loudly_when_not(tmp_path: Path, gateway):
    """As root: as 65534 when that user can run the Python, else confined; not root: a loud warning."""
    import sys

    from pipemend.sandbox.process import unreachable_by_nobody

    said: list[str] = []
    sb = get_sandbox("process", announce=said.append)
    job = make_job(tmp_path, gateway, [{"id": "w", "inputs": {"attack": "whoami"}}], "who")
    out = sb.run(job)
    assert out.error is None, out
    who = json.loads(results(job)["w"]["output"])
    if os.geteuid() != 0:
        assert who["uid"] == os.geteuid()
        assert any("CANNOT hide the run directory" in m for m in said), said
    elif unreachable_by_nobody(Path(sys.executable)) is None:
        assert who["uid"] == 65534 and who["gid"] == 65534
    else:  # 65534 cannot run this Python: root without capabilities, run directories covered
        assert who["uid"] == 0
        assert any("without any capability" in m for m in said), said


def test_doctor_reports_every_sandbox_with_a_fix_when_broken():
    checks = check_all()
    assert all(isinstance(c, Check) for c in checks)
    names = [c.name for c in checks]
    assert "bwrap" in names and "process" in names and "docker engine" in names
    assert all(c.ok or c.fix for c in checks)


def test_image_tag_follows_the_build_inputs(tmp_path: Path):
    from pipemend.sandbox.docker import image_tag, sandboxes_dir

    tag = image_tag()
    assert tag.startswith("pipemend-sandbox:")
    out = subprocess.run(["python3", str(sandboxes_dir() / "build"), "--print-tag"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == tag
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\n")
    t1 = image_tag(req)
    req.write_text("numpy\nbm25s\n")
    assert t1.startswith(tag + "-req-") and image_tag(req) != t1


@pytest.mark.docker
def test_docker_runs_a_target_with_its_own_requirements(tmp_path: Path, gateway):
    try:
        sb = get_sandbox("docker", announce=lambda m: None)
    except SandboxUnavailable as e:
        pytest.skip(f"Docker unavailable: {e}")
    wt = tmp_path / "wt"
    wt.mkdir()
    (wt / "requirements.txt").write_text("PyStemmer==3.1.0\n")
    (wt / "pipe.py").write_text("import Stemmer\n\ndef run(inputs):\n"
                                "    return Stemmer.Stemmer('english').stemWord(inputs['w'])\n")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": "s", "inputs": {"w": "running"}}) + "\n")
    job = SandboxJob(worktree=wt, target_subdir="", entrypoint="pipe:run", inputs_file=inputs,
                     out_dir=tmp_path / "out", gateway_url=gateway.url, gateway_socket=Path(gateway.socket_path),
                     model="simulated/echo", requirements=wt / "requirements.txt")
    out = sb.run(job)
    assert out.error is None, out
    assert results(job)["s"]["output"] == "run"

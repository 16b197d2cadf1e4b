"""Sandbox registry, the process sandbox, target venvs, image tags, the doctor."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipemend.errors import SandboxUnavailable, UsageError
from pipemend.fsutil import read_jsonl
from pipemend.protocols import Sandbox, SandboxJob
from pipemend.sandbox import SandboxLimits, get_sandbox
from pipemend.sandbox.doctor import Check, check_all

FIXTURE = Path(__file__).parent / "fixtures" / "hostile"


@pytest.fixture
def gateway(tmp_path: Path):
    from pipemend.gateway import Gateway, GatewayConfig

    gw = Gateway(GatewayConfig(run_dir=tmp_path / "run", socket_path=tmp_path / "gw.sock",
                               cache_dir=tmp_path / "llm-cache"))
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


def test_auto_picks_one_and_says_which():
    said: list[str] = []
    sb = get_sandbox("auto", announce=said.append)
    assert isinstance(sb, Sandbox)
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


def test_target_venv_is_layered_on_pipemend_and_cached(tmp_path: Path, monkeypatch):
    from pipemend.sandbox.venvs import target_python

    monkeypatch.setenv("PIPEMEND_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("pyyaml\n")  # already in pipemend's env: nothing to download
    said: list[str] = []
    py = target_python(req, announce=said.append)
    assert py.parent.parent.parent == tmp_path / "cache" / "venvs" and len(said) == 1
    probe = subprocess.run([str(py), "-c", "import sys, yaml, pipemend; print(sys.prefix)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(py.parent.parent)
    assert target_python(req, announce=said.append) == py and len(said) == 1  # cached, silent


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

"""Hostile pipelines against the real Docker and bubblewrap sandboxes, with the real gateway.

Each test snapshots the hostile fixture target into git, runs it from a fresh
candidate worktree through ``python -m pipemend.runner`` in the sandbox, and
checks that the attack achieved nothing, that a killed candidate comes back as
a ``SandboxOutcome`` with an error (the run goes on), that the gateway stays
reachable and logs calls against the right example, and that no container or
worktree is left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipemend.errors import SandboxUnavailable
from pipemend.fsutil import read_jsonl
from pipemend.protocols import SandboxJob
from pipemend.sandbox import SandboxLimits, get_sandbox
from pipemend.sandbox.worktrees import snapshot_target

FIXTURE = Path(__file__).parent / "fixtures" / "targets" / "hostile"
REAL_KEY = "sk-ant-api03-REAL-KEY-THAT-MUST-NEVER-LEAK"
LIMITS = SandboxLimits(memory_mb=384, pids=64, cpus=1.0, tmp_mb=64)


def _docker_sandbox():
    try:
        sb = get_sandbox("docker", announce=lambda m: None, limits=LIMITS)
    except SandboxUnavailable as e:
        pytest.skip(f"Docker unavailable: {e}")
    from pipemend.sandbox.docker import ensure_image

    ensure_image()  # built by sandboxes/ci-setup.sh in CI; built here on first use otherwise
    return sb


def _bwrap_sandbox():
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    try:
        return get_sandbox("bwrap", announce=lambda m: None, limits=LIMITS)
    except SandboxUnavailable as e:
        pytest.skip(f"bubblewrap cannot sandbox here: {e}")


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), pytest.param("bwrap", marks=pytest.mark.bwrap)])
def sandbox(request):
    return _docker_sandbox() if request.param == "docker" else _bwrap_sandbox()


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch):
    """The real gateway on a unix socket, with a key file the sandbox must not be able to read."""
    from pipemend.gateway import Gateway, GatewayConfig

    monkeypatch.setenv("ANTHROPIC_API_KEY", REAL_KEY)
    secrets = tmp_path / "gwsecrets"
    secrets.mkdir()
    key_file = secrets / "api-key"
    key_file.write_text(REAL_KEY)
    gw = Gateway(GatewayConfig(run_dir=tmp_path / "run", socket_path=secrets / "gw.sock",
                               cache_dir=tmp_path / "llm-cache", api_key_file=key_file, models=["simulated/echo"]))
    gw.start()
    gw.key_file = key_file
    yield gw
    gw.stop()


@pytest.fixture
def candidate(tmp_path: Path):
    """The hostile target snapshotted into git, and a factory for candidate worktrees."""
    target = tmp_path / "target"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("__pycache__"))
    snap = snapshot_target(target, "hostile", tmp_path / "run")
    yield snap
    snap.prune()


def _job(tmp_path: Path, wt: Path, gw, rows: list[dict], name: str, **kw) -> SandboxJob:
    inputs = tmp_path / f"{name}-inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SandboxJob(worktree=wt, target_subdir="", entrypoint="hostile:run", inputs_file=inputs,
                      out_dir=tmp_path / "run" / "evals" / name, gateway_url=gw.url,
                      gateway_socket=Path(gw.socket_path), model="simulated/echo", concurrency=kw.pop("concurrency", 2),
                      example_timeout_s=kw.pop("example_timeout_s", 30), wall_timeout_s=kw.pop("wall_timeout_s", 120),
                      **kw)


def _results(job: SandboxJob) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(job.out_dir / "results.jsonl")}


def _assert_nothing_left(sandbox, snap, wt: Path) -> None:
    snap.remove_worktree(wt)
    assert not wt.exists()
    assert list(snap.worktrees_dir.iterdir()) == []
    if sandbox.name == "docker":
        from pipemend.sandbox.ingest import owner_token

        # ours only (labelled with this process as owner): other pipemend runs may share the engine
        assert sandbox.client.containers.list(all=True, filters={"label": f"pipemend.owner={owner_token()}"}) == []


def _run(sandbox, snap, job_for):
    wt = snap.add_worktree("cand", snap.base_branch)
    job = job_for(wt)
    try:
        return job, sandbox.run(job), wt
    finally:
        _assert_nothing_left(sandbox, snap, wt)


def test_attacks_achieve_nothing_and_the_gateway_still_answers(sandbox, gateway, candidate, tmp_path: Path):
    host_docker_sock = "/var/run/docker.sock"
    outside = [
        "/sandbox/work/hostile.py",  # the read-only worktree
        "/etc/pwned", "/usr/pwned", "/pwned",
        "/opt/pipemend/pipemend/pwned",  # pipemend's own source
        str(tmp_path / "pwned"),  # a host path
    ]
    rows = [
        {"id": "net", "inputs": {"attack": "network", "gateway_host": "127.0.0.1",
                                 "gateway_port": int(gateway.url.rsplit(":", 1)[1])}},
        {"id": "write", "inputs": {"attack": "write_outside", "paths": outside}},
        {"id": "secret", "inputs": {"attack": "secrets", "key_file": str(gateway.key_file), "real_key": REAL_KEY}},
        {"id": "dock", "inputs": {"attack": "docker_socket", "host_socket": host_docker_sock}},
        {"id": "who", "inputs": {"attack": "whoami"}},
        {"id": "llm-1", "inputs": {"attack": "gateway", "text": "hello from inside"}},
    ]
    job, outcome, wt = _run(sandbox, candidate, lambda wt: _job(tmp_path, wt, gateway, rows, "attacks"))

    assert outcome.error is None, outcome
    assert outcome.returncode == 0
    res = _results(job)
    assert all(r["error"] is None for r in res.values()), res

    net = json.loads(res["net"]["output"])
    assert all(v.startswith("blocked") for v in net.values()), net

    writes = json.loads(res["write"]["output"])
    assert all(v.startswith("blocked") for v in writes.values()), writes
    assert not (tmp_path / "pwned").exists()
    assert (FIXTURE / "hostile.py").read_text() == (tmp_path / "target" / "hostile.py").read_text()

    secret = json.loads(res["secret"]["output"])
    assert secret["key_file"].startswith("blocked")
    assert secret["real_key_in_env"] is False
    assert REAL_KEY not in json.dumps(secret["env"])
    assert set(secret["env"]) <= {"ANTHROPIC_API_KEY", "OPENAI_API_KEY"}  # the runner's dummies, nothing else
    assert set(secret["env"].values()) <= {"pipemend-gateway"}

    assert json.loads(res["dock"]["output"]) == {"/var/run/docker.sock": False, "/run/docker.sock": False}

    who = json.loads(res["who"]["output"])
    assert who["uid"] == 65534 and who["gid"] == 65534

    # the gateway answered, and logged the call against the example that made it
    assert res["llm-1"]["output"] == "hello from inside"
    calls = list(read_jsonl(tmp_path / "run" / "gateway" / "calls.jsonl"))
    assert [c["example_id"] for c in calls] == ["llm-1"]

    # outputs belong to the host user again
    assert (job.out_dir / "results.jsonl").stat().st_uid == job.out_dir.parent.stat().st_uid


def test_writable_job_may_write_the_worktree_only(sandbox, gateway, candidate, tmp_path: Path):
    seen = {}

    def job_for(wt: Path) -> SandboxJob:
        return _job(tmp_path, wt, gateway, [{"id": "w", "inputs": {
            "attack": "write_outside", "paths": ["/sandbox/work/new.txt", "/etc/pwned"]}}], "writable", writable=True)

    wt = candidate.add_worktree("cand", candidate.base_branch)
    try:
        job = job_for(wt)
        outcome = sandbox.run(job)
        assert outcome.error is None, outcome
        writes = json.loads(_results(job)["w"]["output"])
        assert writes["/sandbox/work/new.txt"].startswith("ok") and writes["/etc/pwned"].startswith("blocked")
        assert (wt / "new.txt").read_text() == "pwned"
        assert (wt / "new.txt").stat().st_uid == wt.stat().st_uid
        seen["changed"] = candidate.build_candidate(wt, candidate.resolve(candidate.base_branch), message="c\n",
                                                    is_editable=lambda _path: True, sealed=()).changed
    finally:
        _assert_nothing_left(sandbox, candidate, wt)
    assert seen["changed"] == ["new.txt"]


@pytest.mark.parametrize(
    "attack, wall, expect",
    [
        ("fork_bomb", 20, "process limit"),
        ("memory", 60, "out of memory|MemoryError"),
        ("hang", 4, "wall-time"),
    ],
)
def test_a_runaway_candidate_fails_alone(sandbox, gateway, candidate, tmp_path: Path, attack, wall, expect):
    import re

    rows = [{"id": "ok-first", "inputs": {"attack": "echo", "text": "fine"}},
            {"id": "bad", "inputs": {"attack": attack}}]
    job, outcome, _ = _run(sandbox, candidate, lambda wt: _job(
        tmp_path, wt, gateway, rows, attack, wall_timeout_s=wall,
        example_timeout_s=3 if attack == "fork_bomb" else 600, concurrency=1))

    print(attack, outcome.error, outcome.timed_out, outcome.returncode)
    # the candidate failed with a reason, as data: an outcome error, or the example's own error/timeout
    res = _results(job) if (job.out_dir / "results.jsonl").exists() else {}
    bad = res.get("bad")
    said = " ".join(filter(None, [outcome.error, json.dumps(bad) if bad else None]))
    assert bad is None or bad["error"] or bad["timed_out"], (outcome, bad)
    assert re.search(expect, said), (outcome, bad)
    if attack == "hang":
        assert outcome.timed_out

    # the run goes on: the same sandbox runs the next candidate normally
    job2, outcome2, _ = _run(sandbox, candidate, lambda wt: _job(
        tmp_path, wt, gateway, [{"id": "after", "inputs": {"attack": "echo", "text": "still here"}}], attack + "-next"))
    assert outcome2.error is None, outcome2
    assert _results(job2)["after"]["output"] == "echo:still here"

"""The Ray executor on a local Ray (`ray.init(address="local", num_cpus=2)`, started once for this file's
tests, its one node carrying the custom resource `pipemend_docker`): the same scores as the local executor (with
the process sandbox and with Docker), a task whose worker dies is retried for its examples, a hung task is
cancelled (`ray.cancel(force=True)`) at its timeout and its examples come back timed out, `--ray-task-cpus`
reaches the tasks, and a cluster that could never run a task (no `pipemend_docker` node for a Docker run, fewer
CPUs than asked) is refused before any is submitted. The gateway beyond loopback needs the run's token.

Skipped when Ray is not installed, except in CI (`PIPEMEND_REQUIRE_SANDBOXES=1`), where that is a failure."""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from executor_support import ran, shared_dir, toy_job
from pipemend.evaluate import run_eval
from pipemend.executors import gateway_token
from pipemend.fsutil import read_json, read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.protocols import SandboxJob

TARGETS = Path(__file__).parent / "fixtures" / "targets"
DOCKER_RESOURCE = "pipemend_docker"  # executors.ray.DOCKER_RESOURCE, which imports ray
PLUGINS = Path(__file__).parent / "fixtures" / "executor"


@pytest.fixture(scope="session")
def local_ray():
    if importlib.util.find_spec("ray") is None:
        why = "ray is not installed (pip install 'pipemend[ray]', or the dev extra)"
        if os.environ.get("PIPEMEND_REQUIRE_SANDBOXES"):
            pytest.fail(why)
        pytest.skip(why)
    import ray

    import pipemend

    # Ray's workers inherit this environment: pipemend (this tree's) and the crash plugin import there
    src = str(Path(pipemend.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(PLUGINS), old) if p)
    ray.init(address="local", num_cpus=2, resources={DOCKER_RESOURCE: 1000}, include_dashboard=False,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture
def shared():
    d = shared_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _executor(**kw):
    from pipemend.executors.ray import RayExecutor

    return RayExecutor(announce=lambda msg: None, **kw)


def test_ray_scores_as_the_local_executor_does(local_ray, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = tmp_path / "echo_qa"
    shutil.copytree(TARGETS / "echo_qa", target, ignore=shutil.ignore_patterns("__pycache__"))
    scored = {}
    for kind in ("local", "ray"):
        res = run_eval(target, split="val", sandbox="process", executor=kind, run_id=f"eval-{kind}",
                       reports_dir=tmp_path / "reports")
        assert not res.dead, res.dead
        rows = read_jsonl(res.run_dir / "evals" / "val" / "scored.jsonl")
        scored[kind] = {r["id"]: (r["output"], r["score"], r["error"]) for r in rows}
        assert (res.run_dir / "evals" / "val" / "traces").is_dir()
    assert scored["ray"] == scored["local"] and any(s for _, s, _ in scored["local"].values())


def test_a_task_whose_worker_dies_is_retried(local_ray, tmp_path, shared) -> None:
    rows = [{"id": "a", "mode": "ok", "log": str(shared / "log")}, {"id": "b", "mode": "ok", "log": str(shared / "log")}]
    job = toy_job(tmp_path, rows, env={"PIPEMEND_TEST_CRASH_MARKER": str(shared / "crashed")})
    executor = _executor(sandbox_kind="crash_sandbox:CrashOnceSandbox", shard_size=1, max_retries=1)
    try:
        got = {r.example_id: r for r in executor.submit(job, candidate="c1").results()}
    finally:
        executor.close()
    assert (shared / "crashed").exists()  # one worker died
    assert {k: r.row["output"] for k, r in got.items()} == {"a": "a", "b": "b"}
    assert sorted(r.attempts for r in got.values()) == [1, 2]
    assert sorted(ran(shared / "log")) == ["a", "b"]  # each example's pipeline ran once


def test_a_hung_task_is_cancelled_and_times_out(local_ray, tmp_path) -> None:
    rows = [{"id": "a", "mode": "ok"}, {"id": "h", "mode": "hang"}]
    executor = _executor(sandbox_kind="process", shard_size=1, max_retries=2)
    try:
        batch = executor.submit(toy_job(tmp_path, rows, example_timeout_s=3600), candidate="c1", timeout_s=20)
        got = {r.example_id: r.row for r in batch.results()}
    finally:
        executor.close()
    assert got["a"]["output"] == "a" and got["a"]["timed_out"] is False
    assert got["h"]["timed_out"] is True and "cancelled" in got["h"]["error"]
    outcome = batch.outcome()
    assert outcome.timed_out and "cancelled" in (outcome.error or "")


def test_the_node_relay_carries_the_gateway_token(local_ray, tmp_path, monkeypatch) -> None:
    # a Docker or bubblewrap sandbox on another node gets a unix socket served by the task, which forwards to
    # the gateway's URL (its token in the path); without the token the gateway refuses
    from pipemend.executors.ray import GatewayRelay  # needs ray: imported once the fixture found it

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", token=gateway_token("ray"), models=["simulated/echo"])) as gw:
        good, bad = GatewayRelay(tmp_path / "good.sock", gw.url), GatewayRelay(tmp_path / "bad.sock", gw.address)
        try:
            assert _unix_get(good.path, "/health") == 200
            assert _unix_get(bad.path, "/health") == 401
        finally:
            good.close()
            bad.close()


def _unix_get(path: Path, route: str) -> int:
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(path))

    conn = Conn("localhost", timeout=30)
    try:
        conn.request("GET", route)
        return conn.getresponse().status
    finally:
        conn.close()


def test_an_optimize_round_of_three_on_ray_ends_as_the_local_one_does(local_ray, tmp_path, monkeypatch) -> None:
    """``optimize --executor ray --parallel 3`` on tinyqa: every evaluation runs as Ray tasks, and the round
    ends in the verdicts and refs that ``test_parallel_candidates`` asserts of the local executor (1 kept,
    2 re-judged against it and refused, 3 not applying onto the new base)."""
    from parallel_support import ROUND, config, make_repo, ref_trees

    from pipemend.optimize import OptimizeConfig, run_optimize

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = make_repo(tmp_path / "repo")
    summary = run_optimize(OptimizeConfig.model_validate({**config(tmp_path, target, "ray", ROUND),
                                                          "executor": "ray"}))
    by_n = {c.n: c for c in summary.candidates}
    assert summary.status == "done" and by_n[1].accepted and summary.best["n"] == 1
    assert not by_n[2].accepted and by_n[2].delta == 0.0
    assert not by_n[3].accepted and any("does not apply onto the new base" in r for r in by_n[3].reasons)
    assert set(ref_trees(tmp_path / "repo", "ray")) == {
        "refs/heads/pipemend/RUN/base", "refs/heads/pipemend/RUN/cand-1", "refs/heads/pipemend/RUN/best",
        "refs/pipemend/RUN/rejected/2", "refs/pipemend/RUN/rejected/3"}
    run_dir = Path(summary.run_dir)
    outcomes = [read_json(p) for p in run_dir.glob("**/evals/*/outcome.json")]
    vals = [o for o in outcomes if o["split"] == "val"]
    assert len(vals) >= 4 and {o["executor"] for o in vals} == {"ray"}, "val evaluations ran as Ray tasks"


def _scores(run_dir: Path) -> dict[str, tuple]:
    rows = read_jsonl(run_dir / "evals" / "val" / "scored.jsonl")
    return {r["id"]: (r["output"], r["score"], r["error"]) for r in rows}


@pytest.mark.docker
def test_docker_on_a_ray_node_scores_as_the_local_executor_does(local_ray, tmp_path, monkeypatch) -> None:
    """``eval --sandbox docker --executor ray``: the tasks ask for ``pipemend_docker`` (this Ray's node has it),
    run the runner in a Docker container on the node, and score exactly as the local executor's Docker run."""
    from sandbox_support import sandbox_or_skip

    sandbox_or_skip("docker")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = tmp_path / "echo_qa"
    shutil.copytree(TARGETS / "echo_qa", target, ignore=shutil.ignore_patterns("__pycache__"))
    scored, outcomes = {}, {}
    for kind in ("local", "ray"):
        res = run_eval(target, split="val", sandbox="docker", executor=kind, run_id=f"eval-docker-{kind}",
                       reports_dir=tmp_path / "reports", ray_task_cpus=0.5)
        assert not res.dead, res.dead
        scored[kind] = _scores(res.run_dir)
        outcomes[kind] = read_json(res.run_dir / "evals" / "val" / "outcome.json")
    assert scored["ray"] == scored["local"] and any(s for _, s, _ in scored["local"].values())
    assert (outcomes["ray"]["executor"], outcomes["local"]["executor"]) == ("ray", "local")
    assert outcomes["ray"]["sandbox"] == outcomes["local"]["sandbox"] == "docker"


def test_fractional_task_cpus_let_more_tasks_run_at_once(local_ray, tmp_path, shared) -> None:
    """``--ray-task-cpus 0.5`` on this 2-CPU Ray: four one-example tasks run at once. Three of them wait for a
    marker that only the fourth (submitted last) writes, so with one CPU a task (two at once) the waiters would
    hold both CPUs until their wait gives up and fail."""
    marker = str(shared / "released")
    rows = [{"id": f"w{i}", "mode": "wait_for", "path": marker} for i in range(3)]
    rows.append({"id": "release", "mode": "ok", "marker": marker})
    executor = _executor(sandbox_kind="process", shard_size=1, max_retries=0, num_cpus=0.5)
    try:
        assert executor.tasks.num_cpus == 0.5
        got = {r.example_id: r.row for r in executor.submit(toy_job(tmp_path, rows), candidate="c1").results()}
    finally:
        executor.close()
    assert {k: (row["output"], row["error"]) for k, row in got.items()} == {
        "w0": ("w0", None), "w1": ("w1", None), "w2": ("w2", None), "release": ("release", None)}


def test_more_cpus_a_task_than_any_node_has_is_refused_before_any_task(local_ray, tmp_path) -> None:
    from pipemend.errors import UsageError

    with pytest.raises(UsageError, match=r"--ray-task-cpus 3: no node of the Ray cluster has that many CPUs "
                                         r"\(the largest has 2\).*ask for at most 2"):
        _executor(sandbox_kind="process", num_cpus=3)
    with pytest.raises(UsageError, match="--ray-task-cpus 0: expected .* a number > 0"):
        run_eval(TARGETS / "echo_qa", split="val", sandbox="process", executor="ray", ray_task_cpus=0,
                 reports_dir=tmp_path / "reports")
    assert not (tmp_path / "reports").exists()  # refused before any run directory
    assert local_ray.is_initialized()  # the session's Ray, which the executor did not start, is left alone


def _pipemend(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipemend.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.docker
def test_a_docker_run_on_a_cluster_without_docker_nodes_is_a_usage_error(local_ray, tmp_path) -> None:
    """``eval --sandbox docker --executor ray`` against a Ray whose nodes lack ``pipemend_docker`` (a fresh
    local one, started by the command) stops with exit 2 and says how to mark the nodes, instead of leaving its
    tasks pending forever."""
    from sandbox_support import sandbox_or_skip

    sandbox_or_skip("docker")
    target = tmp_path / "echo_qa"
    shutil.copytree(TARGETS / "echo_qa", target, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    done = _pipemend("eval", str(target), "--sandbox", "docker", "--executor", "ray", "--ray-address", "local",
                     "--reports-dir", str(tmp_path / "reports"), env=env)
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert "no node of the Ray cluster (1 node(s)) has the custom resource pipemend_docker" in said
    assert """--resources '{"pipemend_docker": 1000}'""" in said and "--sandbox bwrap" in said


def test_check_cluster_says_which_nodes_are_missing() -> None:
    pytest.importorskip("ray")
    from pipemend.errors import UsageError
    from pipemend.executors.ray import check_cluster

    docker_node, plain = {"CPU": 2.0, DOCKER_RESOURCE: 1000.0}, {"CPU": 16.0}
    check_cluster([plain, docker_node], "docker", 2)
    check_cluster([plain], "bwrap", 16)
    with pytest.raises(UsageError, match="no node of the Ray cluster .2 node.s.. has the custom resource"):
        check_cluster([plain, plain], "docker", 1)
    # a docker task needs both on one node: the big node has no Docker
    with pytest.raises(UsageError, match="no node with pipemend_docker of the Ray cluster has that many CPUs"):
        check_cluster([plain, docker_node], "docker", 4)


def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback (the one its default route leaves by), if any."""
    for probe in ("192.0.2.1", "10.255.255.255", "172.31.255.255"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((probe, 9))  # UDP: picks the source address, sends nothing
            except OSError:
                continue
            ip = s.getsockname()[0]
            if not ipaddress.ip_address(ip).is_loopback:
                return ip
    return None


def _tcp_status(ip: str, port: int, method: str, route: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> int:
    """The status of one request to ``ip:port`` from the non-loopback source address ``ip``."""
    conn = http.client.HTTPConnection(ip, port, timeout=30, source_address=(ip, 0))
    try:
        conn.request(method, route, body=body, headers={"content-type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def test_a_gateway_on_every_interface_refuses_a_network_request_without_the_runs_token(tmp_path,
                                                                                      monkeypatch) -> None:
    """``--gateway-host 0.0.0.0``: whatever the executor, the run's gateway gets a token, and a request over TCP
    from a non-loopback address is refused (401) without it, served with it (path prefix or header)."""
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    token = gateway_token("local", "0.0.0.0")
    assert token and gateway_token("local", "127.0.0.1") is None and gateway_token("local", "::1") is None
    assert gateway_token("local", ip) and gateway_token("local", "gateway.example")
    call = json.dumps({"model": "simulated/echo", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", host="0.0.0.0", token=token,
                               models=["simulated/echo"])) as gw:
        port = gw.port
        assert _tcp_status(ip, port, "GET", "/health") == 401
        assert _tcp_status(ip, port, "POST", "/v1/messages", body=call) == 401
        assert _tcp_status(ip, port, "POST", "/t/" + "x" * len(token) + "/v1/messages", body=call) == 401
        assert _tcp_status(ip, port, "POST", "/v1/messages", {"x-pipemend-token": token + "x"}, call) == 401
        assert _tcp_status(ip, port, "GET", f"/t/{token}/health") == 200
        assert _tcp_status(ip, port, "POST", f"/t/{token}/v1/messages", body=call) == 200
        assert _tcp_status(ip, port, "POST", "/v1/messages", {"x-pipemend-token": token}, call) == 200
        gw.flush()
    calls = list(read_jsonl(tmp_path / "run" / "gateway" / "calls.jsonl"))
    assert len(calls) == 2  # the refused requests never reached a backend


@pytest.mark.parametrize("kind", ["process", pytest.param("bwrap", marks=pytest.mark.bwrap),
                                  pytest.param("docker", marks=pytest.mark.docker)])
def test_a_task_without_the_drivers_socket_reaches_a_gateway_on_every_interface_with_the_token(
        local_ray, tmp_path, monkeypatch, kind) -> None:
    """As on a node other than the driver's (no gateway socket to mount): the gateway listens on 0.0.0.0, the
    task dials it at the driver's address as Ray knows it, with the run's token: the process sandbox itself,
    bubblewrap and Docker (no network inside) through the task's relay socket. Every echo comes back, logged."""
    from sandbox_support import sandbox_or_skip

    from pipemend.executors.ray import with_host

    sandbox_or_skip(kind)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = tmp_path / "echo_qa"
    shutil.copytree(TARGETS / "echo_qa", target, ignore=shutil.ignore_patterns("__pycache__"))
    rows = list(read_jsonl(target / "data.jsonl"))[:4]
    (tmp_path / "out").mkdir()
    inputs = tmp_path / "out" / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": r["id"], "inputs": r["inputs"]}) + "\n" for r in rows))
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", host="0.0.0.0", token=gateway_token("ray", "0.0.0.0"),
                               models=["simulated/echo"])) as gw:
        job = SandboxJob(worktree=target, target_subdir="", entrypoint="pipeline:run", inputs_file=inputs,
                         out_dir=tmp_path / "out", gateway_url=gw.url, gateway_socket=None, model="simulated/echo",
                         concurrency=2, example_timeout_s=60, hidden=["data.jsonl"])
        executor = _executor(sandbox_kind=kind, shard_size=2)
        try:
            batch = executor.submit(job, candidate="c1")
            got = {r.example_id: r.row for r in batch.results()}
        finally:
            executor.close()
        gw.flush()
        assert batch.job.gateway_url == with_host(gw.url, executor.driver_ip) != gw.url
        ip = ipaddress.ip_address(executor.driver_ip)
        assert not ip.is_unspecified and (not ip.is_loopback or _non_loopback_ipv4() is None)  # over the network
    assert {k: (row["output"], row["error"]) for k, row in got.items()} == {
        r["id"]: (r["inputs"]["question"], None) for r in rows}
    calls = read_jsonl(tmp_path / "run" / "gateway" / "calls.jsonl")
    assert sorted(c.get("example_id") for c in calls) == sorted(r["id"] for r in rows)


@pytest.mark.parametrize("command", ["eval", "optimize"])
def test_ray_task_cpus_on_the_command_line_is_checked_before_anything_runs(tmp_path, command) -> None:
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from pipemend.cli import app

    def run(*args: str):
        done = CliRunner().invoke(app, [command, str(TARGETS / "echo_qa"), "--reports-dir", str(tmp_path), *args])
        return done.exit_code, " ".join(done.output.split())

    code, said = run("--executor", "local", "--ray-task-cpus", "0.25")
    assert code == 2 and "--ray-task-cpus needs --executor ray" in said
    for bad in ("0", "-1", "nan", "inf", "0.00001"):
        code, said = run("--executor", "ray", "--ray-task-cpus", bad)
        assert code == 2 and "expected the CPUs each Ray task asks for, a number > 0" in said, (bad, said)
    assert not any(tmp_path.iterdir())  # no run directory, no Ray started


def test_ray_task_cpus_in_a_config_is_checked_and_kept() -> None:
    from pydantic import ValidationError

    from pipemend.optimize import OptimizeConfig

    assert OptimizeConfig(target="t").ray_task_cpus == 1.0
    cfg = OptimizeConfig.model_validate({"target": "t", "executor": "ray", "ray_task_cpus": 0.25})
    assert cfg.ray_task_cpus == 0.25
    for bad in (0, -0.5, float("nan"), True, "many"):
        with pytest.raises(ValidationError, match="ray_task_cpus"):
            OptimizeConfig(target="t", ray_task_cpus=bad)


def test_eval_takes_the_gateways_interface_and_a_fixed_port_for_a_tunnel(tmp_path, monkeypatch) -> None:
    """``eval --gateway-host 0.0.0.0 --gateway-port N`` (the local executor): the gateway listens there, with a
    token since it is beyond loopback, the journal records its address without the token, and the run's
    sandboxes, on the run's socket, score as usual."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = tmp_path / "echo_qa"
    shutil.copytree(TARGETS / "echo_qa", target, ignore=shutil.ignore_patterns("__pycache__"))
    res = run_eval(target, split="val", sandbox="process", run_id="eval-tunnel", reports_dir=tmp_path / "reports",
                   gateway_host="0.0.0.0", gateway_port=port)
    assert not res.dead, res.dead
    started = [e for e in read_jsonl(res.run_dir / "journal.jsonl") if e["event"] == "gateway_started"]
    assert [e["url"] for e in started] == [f"http://0.0.0.0:{port}"]
    assert any(s for _, s, _ in _scores(res.run_dir).values())

"""The Ray executor on a local Ray (`ray.init(address="local", num_cpus=2)`, started once for this file's
tests): the same scores as the local executor, a task whose worker dies is retried for its examples, and a
hung task is cancelled (`ray.cancel(force=True)`) at its timeout and its examples come back timed out.

Skipped when Ray is not installed, except in CI (`PIPEMEND_REQUIRE_SANDBOXES=1`), where that is a failure."""

from __future__ import annotations

import http.client
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

from executor_support import ran, shared_dir, toy_job
from pipemend.evaluate import run_eval
from pipemend.executors import gateway_token
from pipemend.fsutil import read_json, read_jsonl
from pipemend.gateway import Gateway, GatewayConfig

TARGETS = Path(__file__).parent / "fixtures" / "targets"
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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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

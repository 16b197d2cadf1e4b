"""The local executor (`pipemend.executors.local`): tasks are shards of a batch, each one sandbox job (the
process sandbox here); results stream back as tasks finish, an example whose task died is retried (keyed by
candidate and example), a finished one never runs again, and a task past its timeout comes back timed out."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest

from executor_support import ran, shared_dir, toy_job
from pipemend.executors import LocalExecutor, check_executor, gateway_token
from pipemend.errors import UsageError
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.sandbox.process import ProcessSandbox


@pytest.fixture
def shared():
    d = shared_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_results_stream_back_in_completion_order(tmp_path, shared) -> None:
    # "slow" (first in the batch) waits until the test has "fast"'s result in hand: the batch must stream fast's
    # result back while slow's task still runs (fast merely writing a marker would race slow's task under load)
    rows = [{"id": "slow", "mode": "wait_for", "path": str(shared / "go")}, {"id": "fast", "mode": "ok"}]
    executor = LocalExecutor(ProcessSandbox(announce=lambda m: None), shard_size=1)
    batch = executor.submit(toy_job(tmp_path, rows), candidate="c1")
    results = batch.results()
    got = [next(results)]
    (shared / "go").touch()
    got += list(results)
    assert [r.example_id for r in got] == ["fast", "slow"]
    assert [r.row["output"] for r in got] == ["fast", "slow"] and batch.done
    assert batch.outcome().returncode == 0 and not batch.outcome().timed_out


def test_a_crashed_task_is_retried_for_its_unfinished_examples_only(tmp_path, shared) -> None:
    log = str(shared / "log")
    rows = [{"id": "a", "mode": "ok", "log": log},
            {"id": "b", "mode": "crash_once", "marker": str(shared / "crashed"), "log": log},
            {"id": "c", "mode": "ok", "log": log}]
    executor = LocalExecutor(ProcessSandbox(announce=lambda m: None), max_retries=1)
    batch = executor.submit(toy_job(tmp_path, rows, concurrency=1), candidate="c1")
    got = {r.example_id: r for r in batch.results()}
    assert {k: r.row["output"] for k, r in got.items()} == {"a": "a", "b": "b", "c": "c"}
    assert ran(shared / "log") == ["a", "b", "b", "c"]  # a finished before the crash: never run again
    assert (got["a"].attempts, got["b"].attempts, got["c"].attempts) == (1, 2, 2)


def test_without_retries_a_crashed_example_has_no_row(tmp_path, shared) -> None:
    rows = [{"id": "a", "mode": "ok"}, {"id": "b", "mode": "crash_once", "marker": str(shared / "crashed")}]
    executor = LocalExecutor(ProcessSandbox(announce=lambda m: None))
    batch = executor.submit(toy_job(tmp_path, rows), candidate="c1")
    got = {r.example_id: r.row for r in batch.results()}
    assert got["a"]["output"] == "a" and got["b"] is None  # scored "no result", as a dead sandbox's always was
    assert batch.outcome().returncode != 0


def test_a_hung_task_is_ended_at_its_timeout_and_its_examples_time_out(tmp_path, shared) -> None:
    rows = [{"id": "a", "mode": "ok"}, {"id": "h", "mode": "hang"}]
    executor = LocalExecutor(ProcessSandbox(announce=lambda m: None), max_retries=2)
    batch = executor.submit(toy_job(tmp_path, rows, concurrency=2, example_timeout_s=3600), candidate="c1",
                            timeout_s=4)
    got = {r.example_id: r.row for r in batch.results()}
    assert got["a"]["output"] == "a" and got["a"]["timed_out"] is False
    assert got["h"]["timed_out"] is True and got["h"]["output"] is None  # not retried: timed out is a result
    assert batch.outcome().timed_out


def test_an_unknown_executor_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="expected one of local, ray"):
        check_executor("dask")


def test_a_gateway_with_a_token_refuses_requests_without_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    token = gateway_token("ray")
    assert token and gateway_token("local") is None
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", token=token, models=["simulated/echo"])) as gw:
        assert gw.url.endswith(f"/t/{token}") and token not in gw.address
        assert _get(gw.url + "/health") == 200  # the token in the path, as the runner's base URL carries it
        assert _get(gw.address + "/health", {"x-pipemend-token": token}) == 200
        assert _get(gw.address + "/health") == 401
        assert _get(gw.address + "/t/" + "x" * len(token) + "/health") == 401
        assert _get(gw.address + "/health", {"x-pipemend-token": token[:-1]}) == 401


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_tasks_hostile_output_keeps_only_its_own_capped_rows_and_traces() -> None:
    """What a node sends back is taken in as hostile: rows and traces of other ids, path-like trace names,
    oversized or non-bytes files, a garbled outcome are dropped, and what was dropped is said."""
    from pipemend.executors.base import TaskOutput
    from pipemend.sandbox.ingest import RUNNER_CAP, TRACE_CAP

    raw = {
        "outcome": {"sandbox": "x" * 500, "returncode": True, "timed_out": "yes", "error": 7,
                    "stderr_tail": "e" * 10_000, "startup_s": float("nan"), "wall_s": 2},
        "rows": [{"id": "a", "output": "A"}, {"id": "stranger", "output": "S"}, ["not", "a", "row"],
                 {"id": 3, "output": "?"}],
        "traces": {"a": b"{}", "../a": b"{}", "b": "not bytes", "stranger": b"{}",
                   "big": b"x" * (TRACE_CAP + 1)},
        "runner_json": b"y" * (RUNNER_CAP + 1), "egress_json": "text",
    }
    out = TaskOutput.checked(raw, ["a", "b", "big", "../a"], sandbox="process")
    assert out.rows == [{"id": "a", "output": "A"}]
    assert out.traces == {"a": b"{}"}
    assert out.runner_json is None and out.egress_json is None
    o = out.outcome
    assert len(o.sandbox) == 40 and o.returncode is None and o.timed_out is False and o.error is None
    assert o.startup_s == 0.0 and o.wall_s == 2.0
    assert "refused from the task's output" in o.stderr_tail and "a trace of another id" in o.stderr_tail
    assert "a row of another id or shape" in o.stderr_tail
    # nothing usable at all is an outcome that says so, never a crash
    empty = TaskOutput.checked(["not", "a", "dict"], ["a"], sandbox="process")
    assert empty.rows == [] and empty.outcome.error == "the task returned no outcome"


def test_a_torn_or_linked_results_file_from_a_task_is_read_as_regular_files_only(tmp_path) -> None:
    from pipemend.executors.base import read_task_output
    from pipemend.protocols import SandboxOutcome

    out = tmp_path / "out"
    (out / "traces").mkdir(parents=True)
    (out / "results.jsonl").write_bytes(b'{"id": "a", "output": "A"}\n{"id": "b", "outp')  # torn last line
    secret = tmp_path / "secret.json"
    secret.write_text('{"labels": "leaked"}')
    (out / "traces" / "a.json").symlink_to(secret)  # a link is never followed
    got = read_task_output(out, ["a", "b"], SandboxOutcome(sandbox="process", returncode=0))
    assert got.rows == [{"id": "a", "output": "A"}] and got.traces == {}

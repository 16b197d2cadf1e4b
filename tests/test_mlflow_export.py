"""MLflow export (``optimize --mlflow URI``) against a real MLflow server this module starts.

Real parts: ``mlflow server`` on 127.0.0.1 with a sqlite backend (one per module), MLflow's own client
reading back what pipemend logged, run directories built by the real writers (``runbuilder``) in a real git
repo, and (slow) a whole ``pipemend optimize`` on the ``prompt_qa`` target with the ladder proposer and the
strict ``scripted:`` model, killed after its baseline and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import optimize_harness
import runbuilder
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.errors import UsageError
from pipemend.fsutil import read_jsonl
from pipemend.journal import replay
from pipemend.optimize import OptimizeConfig
from pipemend.optimize.observers import build_observers, notify

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'pipemend[mlflow]')")
from mlflow import MlflowClient  # noqa: E402 - after the skip: the extra may be missing

from pipemend.export.mlflow_observer import MlflowObserver  # noqa: E402

# one xdist worker runs this module (.ci/run: --dist loadfile; the mark keeps it so under loadgroup), so its module-scoped MLflow server starts once
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("mlflow_export")]
WHOLE_OPTIMIZE = pytest.mark.slow
"""The whole optimize, killed and resumed, with its server: 2-3.5 minutes on two shared cores. The built run's test
with its server took 30-45 s there (the server's start 12-20 s of it) when the cores were not swamped: the
default group."""
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
"""Neither the server nor the client this test drives phones home."""
PROMPT_QA = Path(__file__).resolve().parent / "fixtures" / "targets" / "prompt_qa"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free port with a sqlite store; its URL once ``/health`` answers."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, **QUIET}
    saved = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(tmp / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited {server.returncode}: {(tmp / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"mlflow server did not answer /health: {(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if server.poll() is not None:  # it died under the tests: say how (pytest shows this with the failure)
            print(f"mlflow server exited {server.returncode}:\n{(tmp / 'server.log').read_text()[-5000:]}")
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client_of(url: str) -> MlflowClient:
    """A client of the test's server, its registry named too: an observer points MLflow's process-wide default
    (which a client without a registry URI takes) at its own server, a dead one in one test."""
    return MlflowClient(url, registry_uri=url)


def runs_by_candidate(client: MlflowClient, experiment: str, run_id: str) -> dict[str, "mlflow.entities.Run"]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`pipemend.run_id` = '{run_id}'")
    by: dict[str, mlflow.entities.Run] = {}
    for r in runs:
        key = r.data.tags["pipemend.candidate"]
        assert key not in by, f"two MLflow runs for {key}"
        by[key] = r
    return by


def prompt_versions(client: MlflowClient, name: str) -> list:
    return sorted(client.search_prompt_versions(name, max_results=100), key=lambda v: int(v.version))


def notify_all(observer: MlflowObserver, run_dir: Path, numbers: list[int]) -> None:
    observer.baseline_done(run_dir)
    for n in numbers:
        observer.candidate_done(run_dir, n)
    observer.run_done(run_dir)


# --------------------------------------------------------------------------- a built run, told twice


def test_a_run_logs_one_mlflow_run_per_candidate_and_again_nothing_twice(mlflow_server, tmp_path):
    built = runbuilder.build_run(tmp_path, run_id="optimize-mlf")
    run_dir = built.run_dir
    cfg = OptimizeConfig(target=str(built.target), mlflow=mlflow_server)
    [observer] = build_observers(cfg, run_dir)
    assert isinstance(observer, MlflowObserver) and observer.name == "mlflow"
    tracking_before = os.environ.get("MLFLOW_TRACKING_URI")
    notify_all(observer, run_dir, [1, 2, 3, 4])
    # MLflow's process-wide URI is pointed at the server only while a sync runs: a later run in this process
    # (the next test's optimize) is not sent to it
    assert os.environ.get("MLFLOW_TRACKING_URI") == tracking_before

    client = client_of(mlflow_server)
    by = runs_by_candidate(client, "pipemend/fixture-qa", "optimize-mlf")
    assert sorted(by) == ["baseline", "cand-1", "cand-2", "cand-3", "cand-4"]
    assert all(r.info.status == "FINISHED" for r in by.values())
    assert by["cand-1"].info.run_name == "optimize-mlf cand-1"

    base = by["baseline"].data
    assert base.params["git_sha"] == replay(run_dir).base_sha
    assert base.params["branch"] == "pipemend/optimize-mlf/base" and base.params["proposer"] == "claude"
    assert base.metrics["val_score"] == 0.5 and base.metrics["train_score"] == 0.4
    assert base.metrics["test_score"] == pytest.approx(1 / 3)
    assert base.metrics["cost_usd"] == 0.006 and base.metrics["latency_s"] == 0.9
    assert base.tags["pipemend.verdict"] == "baseline"

    c1 = by["cand-1"].data
    assert c1.params["git_sha"] == built.shas[1] and c1.params["branch"] == "pipemend/optimize-mlf/cand-1"
    assert c1.params["rung"] == "prompt" and c1.params["proposer"] == "claude"
    assert c1.params["rationale"].startswith("Ask for the short answer only") and c1.params["files_changed"] == "pipe/prompt.txt"
    assert c1.metrics["accepted"] == 1.0 and c1.metrics["val_score"] == pytest.approx(4 / 6)
    assert c1.metrics["delta"] == pytest.approx(1 / 6) and c1.metrics["regressions"] == 0 and c1.metrics["fixed"] == 1
    assert c1.metrics["ci_low"] <= c1.metrics["delta"] <= c1.metrics["ci_high"]
    assert "test_score" not in c1.metrics, "only the best candidate ran the test split"
    assert c1.tags["pipemend.verdict"] == "accepted" and c1.tags["mlflow.note.content"].startswith("Ask for the short")

    c2 = by["cand-2"].data
    assert c2.metrics["accepted"] == 0.0 and c2.metrics["regressions"] == 1 and c2.tags["pipemend.verdict"] == "rejected"
    assert c2.params["branch"] == "refs/pipemend/optimize-mlf/rejected/2" and c2.params["files_changed"] == "pipe/app.py"
    assert "pipemend.prompts" not in c2.tags, "a rejected candidate registers no prompt"
    c3 = by["cand-3"].data
    assert c3.metrics["test_score"] == pytest.approx(2 / 3), "the best candidate carries the test score"
    c4 = by["cand-4"].data
    assert c4.metrics["accepted"] == 0.0 and "val_score" not in c4.metrics, "refused before val: no val numbers"
    assert "protected" in c4.tags["pipemend.reasons"]

    # the prompt registry: the baseline's prompt and each kept candidate's new text, tagged with its commit
    versions = prompt_versions(client, "fixture-qa.prompt.txt")
    assert [v.tags["pipemend.git_sha"] for v in versions] == [base.params["git_sha"], built.shas[1], built.shas[3]]
    assert [v.tags["pipemend.candidate"] for v in versions] == ["baseline", "cand-1", "cand-3"]
    assert versions[0].template == runbuilder.PROMPT and "answer with the entity only" in versions[1].template
    assert client.get_prompt("fixture-qa.app.py") is None, "app.py is no prompt file"
    linked = client.get_run(by["cand-1"].info.run_id).data.tags["mlflow.linkedPrompts"]
    assert json.loads(linked) == [{"name": "fixture-qa.prompt.txt", "version": str(versions[1].version)}]
    assert by["cand-1"].data.tags["pipemend.prompts"] == f"fixture-qa.prompt.txt/{versions[1].version}"
    exp_id = client.get_experiment_by_name("pipemend/fixture-qa").experiment_id
    assert client.get_prompt("fixture-qa.prompt.txt").tags["_mlflow_experiment_ids"] == f",{exp_id},"

    # each MLflow run's val evaluation as traces, one per example, linked to the run
    assert by["cand-1"].data.tags["pipemend.traces"] == "6"
    traces = client.search_traces(locations=[exp_id], run_id=by["cand-1"].info.run_id)
    assert len(traces) == 6
    names = {s.name for t in traces for s in t.data.spans}
    assert {"retrieve", "answer", "chat claude-haiku-4-5"} <= names, names
    assert len(client.search_traces(locations=[exp_id], run_id=by["baseline"].info.run_id)) == 6
    assert "pipemend.traces" not in c4.tags, "no val evaluation, no traces"

    # told again, by a new observer (a resumed process): the same MLflow runs, nothing logged twice
    [again] = build_observers(cfg, run_dir)
    notify_all(again, run_dir, [4])
    by2 = runs_by_candidate(client, "pipemend/fixture-qa", "optimize-mlf")
    assert {k: r.info.run_id for k, r in by2.items()} == {k: r.info.run_id for k, r in by.items()}
    assert len(prompt_versions(client, "fixture-qa.prompt.txt")) == 3
    assert len(client.get_metric_history(by["cand-1"].info.run_id, "val_score")) == 1
    assert len(client.get_metric_history(by["baseline"].info.run_id, "test_score")) == 1
    assert len(client.search_experiments(filter_string="name = 'pipemend/fixture-qa'")) == 1
    assert len(client.search_traces(locations=[exp_id], run_id=by["cand-1"].info.run_id)) == 6
    assert len(client.search_traces(locations=[exp_id])) == 6 * 4, "baseline, cand-1, cand-2, cand-3"


def test_an_unreachable_server_is_a_usage_error_at_start_and_a_warning_mid_run(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    built = runbuilder.build_run(tmp_path, run_id="optimize-down")
    with pytest.raises(UsageError, match=rf"--mlflow {dead}: the MLflow server does not answer"):
        build_observers(OptimizeConfig(target=str(built.target), mlflow=dead), built.run_dir)
    progress = optimize_harness.RecordingProgress()
    notify([MlflowObserver(dead)], "candidate_done", progress, built.run_dir, 1)
    [warning] = progress.events("warning")
    assert warning["text"].startswith(f"mlflow: candidate_done not sent: UsageError: --mlflow {dead}")


def test_optimize_refuses_an_mlflow_server_that_does_not_answer(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    target = prompt_repo(tmp_path / "repo")
    result = CliRunner().invoke(app, ["optimize", str(target), "--sandbox", "process", "--reports-dir",
                                      str(tmp_path / "reports"), "--mlflow", dead])
    assert result.exit_code == 2, result.output
    assert f"--mlflow {dead}: the MLflow server does not answer" in " ".join(result.output.split())


# --------------------------------------------------------------------------- a whole optimize, killed and resumed


def prompt_repo(root: Path) -> Path:
    """A git repo at ``root`` with the prompt_qa target committed under ``targets/prompt_qa``; returns the target."""
    target = root / "targets" / "prompt_qa"
    shutil.copytree(PROMPT_QA, target, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-C", str(root)]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return target


def journal_has(run_dir: Path, event: str, **match) -> bool:
    try:
        return any(e.get("event") == event and all(e.get(k) == v for k, v in match.items())
                   for e in read_jsonl(run_dir / "journal.jsonl"))
    except (OSError, ValueError):
        return False


@WHOLE_OPTIMIZE
def test_optimize_with_mlflow_killed_and_resumed_logs_each_candidate_once(mlflow_server, tmp_path):
    target = prompt_repo(tmp_path / "repo")
    run_dir = tmp_path / "reports" / "mlf-e2e"
    cli = [sys.executable, "-m", "pipemend.cli"]
    env = {**os.environ, **QUIET}
    started = subprocess.Popen(
        [*cli, "optimize", str(target), "--model", f"scripted:{target / 'model.yaml'}", "--max-candidates", "2",
         "--sandbox", "process", "--run-id", "mlf-e2e", "--reports-dir", str(tmp_path / "reports"),
         "--mlflow", mlflow_server, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    # kill -9 once candidate 1 started: the loop told the observers about the baseline before it went on
    deadline = time.time() + 400
    while not journal_has(run_dir, "candidate_started", n=1):
        assert started.poll() is None, started.communicate()[1][-3000:]
        assert time.time() < deadline, "candidate 1 never started"
        time.sleep(0.05)
    os.killpg(started.pid, signal.SIGKILL)
    started.communicate()
    client = client_of(mlflow_server)
    assert sorted(runs_by_candidate(client, "pipemend/prompt-qa", "mlf-e2e")) == ["baseline"]

    done = subprocess.run([*cli, "resume", str(run_dir), "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one object: MLflow printed nothing on stdout
    assert summary["status"] == "done" and summary["candidates"][0]["accepted"]

    by = runs_by_candidate(client, "pipemend/prompt-qa", "mlf-e2e")
    assert sorted(by) == ["baseline"] + [f"cand-{c['n']}" for c in summary["candidates"]], "each once, after the resume"
    base, c1 = by["baseline"].data, by["cand-1"].data
    assert base.metrics["val_score"] == summary["baseline"]["val"] and base.params["proposer"] == "ladder"
    assert c1.params["git_sha"] == summary["best"]["sha"] and c1.params["branch"] == "pipemend/mlf-e2e/cand-1"
    assert c1.params["rung"] == "prompt" and c1.params["proposer"] == "ladder"
    assert c1.params["files_changed"] == "targets/prompt_qa/prompts/answer.txt"
    assert c1.metrics["accepted"] == 1.0 and c1.metrics["val_score"] == summary["candidates"][0]["val_score"]
    assert c1.metrics["delta"] == summary["candidates"][0]["delta"] and c1.metrics["test_score"] == summary["best"]["test"]
    assert c1.tags["pipemend.verdict"] == "accepted"
    for c in summary["candidates"][1:]:
        assert by[f"cand-{c['n']}"].data.metrics["accepted"] == (1.0 if c["accepted"] else 0.0)

    # the prompt file at the baseline and as candidate 1 rewrote it, each tagged with its commit
    versions = prompt_versions(client, "prompt-qa.prompts.answer.txt")
    assert [v.tags["pipemend.git_sha"] for v in versions] == [base.params["git_sha"], summary["best"]["sha"]]
    assert "answer with the entity or short phrase only" in versions[1].template
    assert "answer with the entity" not in versions[0].template

    # the traces of each val evaluation, under the MLflow run of its candidate
    exp_id = client.get_experiment_by_name("pipemend/prompt-qa").experiment_id
    n_val = len((PROMPT_QA / "data" / "val.jsonl").read_text().splitlines())
    assert len(client.search_traces(locations=[exp_id], run_id=by["baseline"].info.run_id)) == n_val
    assert len(client.search_traces(locations=[exp_id], run_id=by["cand-1"].info.run_id)) == n_val

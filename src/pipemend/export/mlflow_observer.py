"""MLflow following an optimize run (``optimize --mlflow URI``, or ``MLFLOW_TRACKING_URI``): extra ``pipemend[mlflow]``.

What appears on the MLflow server:

- an experiment per target, ``pipemend/<manifest name>``;
- an MLflow run per candidate (``<run id> cand-<n>``) and one for the baseline (``<run id> baseline``), tagged
  ``pipemend.run_id`` and ``pipemend.candidate`` (``baseline``, ``cand-<n>``): params (proposer, rung, rationale,
  files changed, branch or ref, git sha), metrics (val score, delta, the interval's bounds, regressions, cost,
  latency, ``accepted`` 1/0; ``test_score`` on the baseline and the best candidate once the test split ran) and
  the verdict as the tag ``pipemend.verdict``;
- the target's prompt files in the prompt registry (``mlflow_prompts``), for the baseline and each accepted
  candidate that changed one, with the commit as the version tag ``pipemend.git_sha``, linked to the run;
- each run's val evaluation as OTLP traces, sent to the server's ``/v1/traces`` with the headers
  ``x-mlflow-experiment-id`` and ``x-mlflow-run-id`` (the server links them to the run).

Everything is read from the run directory with the report's readers (``report.load``), and each call logs
whatever the journal says is done and the server does not hold yet: the MLflow runs are found again by their
tags, params and metrics already there are not logged twice, and the tags ``pipemend.traces`` and
``pipemend.prompts`` mark what was sent. A resumed run, or a server that was down for a while, ends with
the same MLflow runs and nothing twice. A failure is raised to the loop, which makes it a warning.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import fluent as mlflow_fluent
from mlflow.tracking._model_registry import utils as mlflow_registry_utils
from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

from ..errors import UsageError
from ..fsutil import read_json
from ..journal import RunState, replay
from ..manifest import Manifest, load_manifest
from ..optimize.env import read_sealed
from ..report.load import load_run
from ..rundir import read_run
from ..sandbox.worktrees import Snapshot
from .mlflow_prompts import prompt_files, prompt_name, register
from .otlp import candidate_label, evaluation_request, request_traces, split_request
from .otlp_push import post_traces

if TYPE_CHECKING:
    from ..optimize.config import OptimizeConfig

EXPERIMENT_PREFIX = "pipemend/"
TAG_RUN = "pipemend.run_id"
TAG_CANDIDATE = "pipemend.candidate"
TAG_VERDICT = "pipemend.verdict"
TAG_TRACES = "pipemend.traces"
"""Set once the run's val evaluation was sent as traces: how many examples."""
TAG_PROMPTS = "pipemend.prompts"
"""Set once the run's prompt versions are registered and linked: ``name/version`` list."""
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a param value (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)."""
MAX_TAG_CHARS = 8000
HEALTH_TIMEOUT_S = 5.0
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
"""The environment variables MLflow's setters write (``pointed_at`` puts them back)."""
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
"""Set during a sync unless the user set them. MLflow's client retries a failing server for minutes by default and the run
waits on it: fewer, shorter tries. It prints each finished run's URL on stdout, where ``--json`` prints one
object: not that."""
TRACES_PATH = "/v1/traces"
TRACES_TIMEOUT_S = 30.0
RUN_ID_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ALL_PROMPTS = "all"
"""A run's ``prompts`` field: register every prompt file (the baseline), these changed files (a kept candidate),
or None (nothing)."""


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MlflowObserver:
    """``protocols.RunObserver`` for an MLflow tracking server (see the module's docstring)."""

    name = "mlflow"

    def __init__(self, uri: str, client: MlflowClient | None = None):
        self.uri = uri.rstrip("/")
        self.client = client or MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._experiment_id: str | None = None

    @classmethod
    def from_config(cls, cfg: OptimizeConfig, run_dir: Path) -> MlflowObserver:
        """An observer of ``cfg.mlflow``; a server that does not answer is a UsageError naming the URI."""
        if not cfg.mlflow:
            raise UsageError("--mlflow: no tracking URI given")
        uri = cfg.mlflow.rstrip("/")
        if is_http(uri):
            check_server(uri)
        return cls(uri)

    # ------------------------------------------------------------------ RunObserver

    def baseline_done(self, run_dir: Path) -> None:
        self.sync(run_dir)

    def candidate_done(self, run_dir: Path, n: int) -> None:
        self.sync(run_dir)

    def run_done(self, run_dir: Path) -> None:
        self.sync(run_dir)

    # ------------------------------------------------------------------ the sync

    def sync(self, run_dir: Path) -> None:
        """Log what the run directory holds and the server lacks; raise one error listing what failed."""
        with pointed_at(self.uri):
            self._sync(Path(run_dir))

    def _sync(self, run_dir: Path) -> None:
        if is_http(self.uri):
            check_server(self.uri)  # fail in seconds, not after the client's retries, when it is down
        view = load_run(run_dir)
        st = replay(run_dir)
        if st.baseline is None:
            return
        exp_id = self.experiment_id(view)
        have = self.runs_of(exp_id, view["run_id"])
        ctx = RunContext.open(run_dir, st)
        items = [(0, baseline_fields(run_dir, view, ctx))]
        items += [(c["n"], candidate_fields(run_dir, view, c, ctx)) for c in view["candidates"] if c["n"] in st.candidates]
        failed: list[str] = []
        for n, fields in items:
            key = candidate_label(n)
            try:
                run = have.get(key) or self.client.get_run(self.client.create_run(
                    exp_id, run_name=f"{view['run_id']} {key}",
                    tags={TAG_RUN: view["run_id"], TAG_CANDIDATE: key}).info.run_id)
                self.log_missing(run, fields)
                tags = run.data.tags
                if TAG_PROMPTS not in tags and fields["prompts"] is not None:
                    self.log_prompts(run, exp_id, view, ctx, key, fields)
                if TAG_TRACES not in tags and fields["val_dir"] and is_http(self.uri):
                    self.log_traces(run, exp_id, run_dir / fields["val_dir"], view["run_id"], key)
                if run.info.status != "FINISHED":
                    self.client.set_terminated(run.info.run_id, "FINISHED")
            except Exception as e:  # noqa: BLE001 - one MLflow run failing leaves the others to log
                failed.append(f"{key}: {type(e).__name__}: {e}")
        if failed:
            raise RuntimeError("MLflow at " + self.uri + ": " + "; ".join(failed))

    def experiment_id(self, view: dict[str, Any]) -> str:
        """The target's experiment (made the first time), also MLflow's active one for this sync."""
        if self._experiment_id is None:
            name = EXPERIMENT_PREFIX + (view.get("name") or Path(str(view.get("target") or "target")).name)
            exp = self.client.get_experiment_by_name(name)
            self._experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                name, tags={"pipemend.target": str(view.get("target") or "")})
        mlflow.set_experiment(experiment_id=self._experiment_id)
        return self._experiment_id

    def runs_of(self, exp_id: str, run_id: str) -> dict[str, Run]:
        """The MLflow runs of pipemend run ``run_id``, by candidate key (the oldest, should there be two)."""
        if not RUN_ID_CHARS.fullmatch(run_id):  # rundir.create_run_dir allows no other: quoting needs none
            raise ValueError(f"run id {run_id!r} has characters outside [A-Za-z0-9._-]")
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{TAG_RUN}` = '{run_id}'", max_results=1000)
        out: dict[str, Run] = {}
        for r in sorted(runs, key=lambda r: r.info.start_time or 0):
            out.setdefault(r.data.tags.get(TAG_CANDIDATE, ""), r)
        return out

    def log_missing(self, run: Run, fields: dict[str, Any]) -> None:
        """Params not yet set, metrics whose latest value differs, tags that differ: in one batch."""
        data = run.data
        now = int(time.time() * 1000)
        params = [Param(k, clip(str(v), MAX_PARAM_CHARS)) for k, v in fields["params"].items()
                  if v not in (None, "") and k not in data.params]
        metrics = [Metric(k, float(v), now, 0) for k, v in fields["metrics"].items()
                   if v is not None and data.metrics.get(k) != float(v)]
        tags = [RunTag(k, clip(str(v), MAX_TAG_CHARS)) for k, v in fields["tags"].items()
                if v is not None and data.tags.get(k) != clip(str(v), MAX_TAG_CHARS)]
        if params or metrics or tags:
            self.client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)

    def log_prompts(self, run: Run, exp_id: str, view: dict[str, Any], ctx: RunContext, key: str,
                    fields: dict[str, Any]) -> None:
        sha = fields["params"].get("git_sha")
        if not sha or ctx.snap is None:
            return
        only = None if fields["prompts"] == ALL_PROMPTS else fields["prompts"]
        files = prompt_files(ctx.snap, sha, ctx.manifest, ctx.sealed, only=only)
        versions = [register(self.client, prompt_name(ctx.manifest.name, rel), text, sha=sha, rel=rel,
                             message=f"{view['run_id']} {key}: {fields['title']}",
                             tags={TAG_RUN: view["run_id"], TAG_CANDIDATE: key}, experiment_id=exp_id)
                    for rel, text in sorted(files.items())]
        for version in versions:
            self.client.link_prompt_version_to_run(run.info.run_id, version)
        linked = ", ".join(f"{v.name}/{v.version}" for v in versions)
        self.client.set_tag(run.info.run_id, TAG_PROMPTS, clip(linked or "(none)", MAX_TAG_CHARS))

    def log_traces(self, run: Run, exp_id: str, eval_dir: Path, run_id: str, key: str) -> None:
        sent = send_traces(self.uri + TRACES_PATH, eval_dir, run_id=run_id, candidate=key,
                           headers={**auth_headers(), "x-mlflow-experiment-id": exp_id,
                                    "x-mlflow-run-id": run.info.run_id})
        self.client.set_tag(run.info.run_id, TAG_TRACES, str(sent))


@contextmanager
def pointed_at(uri: str) -> Iterator[None]:
    """MLflow's process-wide state pointed at ``uri`` for one sync, then put back as it was.

    Parts of MlflowClient's prompt registry go through that state (the tracking store of
    ``link_prompt_version_to_run``, the active experiment a new prompt version is listed under), and MLflow
    keeps it in module globals and environment variables (``MLFLOW_TRACKING_URI``...). Left set, it would
    point the caller's later MLflow use, and a later ``optimize`` in the same process, at this server."""
    env = {k: os.environ.get(k) for k in (*MLFLOW_ENV, *CLIENT_DEFAULTS)}
    log, level = logging.getLogger("mlflow"), logging.getLogger("mlflow").level
    tracking, registry = mlflow_tracking_utils._tracking_uri, mlflow_registry_utils._registry_uri
    experiment = mlflow_fluent._active_experiment_id
    try:
        for key, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        log.setLevel(max(level, logging.WARNING))  # its INFO lines ("Waiting up to 300 seconds...") are noise here
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield
    finally:
        mlflow.set_tracking_uri(tracking)  # None unsets MLFLOW_TRACKING_URI too
        mlflow_registry_utils._registry_uri = registry
        mlflow_fluent._active_experiment_id = experiment
        log.setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- what each MLflow run holds


class RunContext:
    """What the prompt registry needs of the run: its snapshot repo and base commit, the frozen manifest and
    the sealed files."""

    def __init__(self, snap: Snapshot | None, base_sha: str | None, manifest: Manifest, sealed: list[str]):
        self.snap, self.base_sha, self.manifest, self.sealed = snap, base_sha, manifest, sealed
        self.prefix = snap.target_subdir + "/" if snap is not None and snap.target_subdir else ""
        """The target's folder in the repo, with a slash ('' at the root): verdicts name repo-relative files."""

    @classmethod
    def open(cls, run_dir: Path, st: RunState) -> RunContext:
        manifest = load_manifest(run_dir / "frozen", check_files=False)
        snap = Snapshot.from_json(st.snapshot) if st.snapshot else None
        target = Path(str(read_run(run_dir).get("target") or run_dir))
        return cls(snap, st.base_sha, manifest, read_sealed(run_dir, manifest, target))


def eval_numbers(run_dir: Path, rel: str | None) -> dict[str, float | None]:
    """Cost and mean latency of an evaluation (its ``summary.json``); None each when it is missing."""
    try:
        summary = read_json(run_dir / rel / "summary.json") if rel else None
    except (OSError, ValueError):
        summary = None
    summary = summary if isinstance(summary, dict) else {}
    return {"cost_usd": summary.get("cost_usd"), "latency_s": summary.get("latency_s_mean")}


def common_params(view: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": view["run_id"], "target": view.get("target"), "model": view.get("model")}


def baseline_fields(run_dir: Path, view: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    base = view["baseline"]
    low, high = base.get("val_ci") or (None, None)
    test = view["test"].get("baseline")
    return {
        "params": {**common_params(view), "proposer": view.get("proposer"),
                   "git_sha": ctx.base_sha, "branch": ctx.snap.base_branch if ctx.snap else None},
        "metrics": {"val_score": base.get("val"), "ci_low": low, "ci_high": high, "train_score": base.get("train"),
                    "test_score": test, **eval_numbers(run_dir, base.get("val_dir"))},
        "tags": {TAG_VERDICT: "baseline"},
        "val_dir": base.get("val_dir"), "prompts": ALL_PROMPTS, "title": "baseline",
    }


def candidate_fields(run_dir: Path, view: dict[str, Any], c: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    meta = c.get("meta") or {}
    best = view.get("best") or {}
    numbers = eval_numbers(run_dir, c.get("val_dir"))
    changed = [str(p) for p in c.get("changed_files") or []]
    rels = [p[len(ctx.prefix):] for p in changed if p.startswith(ctx.prefix)]
    return {
        "params": {**common_params(view), "proposer": meta.get("proposer") or view.get("proposer"),
                   "rung": c.get("rung"), "rationale": c.get("rationale"), "files_changed": ", ".join(changed),
                   "branch": c.get("branch") or c.get("ref"), "git_sha": c.get("sha")},
        "metrics": {"val_score": c.get("val_score"), "delta": c.get("delta"), "ci_low": c.get("ci_low"),
                    "ci_high": c.get("ci_high"), "regressions": len(c.get("regressions") or []),
                    "fixed": len(c.get("fixed") or []), "p_value": c.get("p_value"), "alpha": c.get("alpha"),
                    "accepted": 1.0 if c.get("accepted") else 0.0,
                    "cost_usd": numbers["cost_usd"] if numbers["cost_usd"] is not None else c.get("cost_cand_usd"),
                    "latency_s": numbers["latency_s"],
                    "test_score": view["test"].get("best") if best.get("n") == c["n"] else None},
        "tags": {TAG_VERDICT: c.get("status"), "pipemend.why": c.get("why") or None,
                 "pipemend.reasons": "; ".join(c.get("reasons") or []) or None,
                 "mlflow.note.content": c.get("rationale") or None},
        "val_dir": c.get("val_dir"),
        "prompts": rels if c.get("accepted") and c.get("sha") else None,
        "title": c.get("title") or "",
    }


# --------------------------------------------------------------------------- HTTP


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str) -> None:
    """GET ``{uri}/health``; a UsageError that names the URI when the server does not answer 200."""
    try:
        r = httpx.get(uri + "/health", timeout=HEALTH_TIMEOUT_S, headers=auth_headers())
    except httpx.HTTPError as e:
        raise UsageError(f"--mlflow {uri}: the MLflow server does not answer ({type(e).__name__}: {e}); "
                         "start it (mlflow server --host 127.0.0.1 --port 5000) or leave out --mlflow") from None
    if r.status_code != 200:
        raise UsageError(f"--mlflow {uri}: {uri}/health answered HTTP {r.status_code}, not an MLflow server's 200")


def auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (``MLFLOW_TRACKING_TOKEN``, or username and password)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")}
    return {}


def send_traces(url: str, eval_dir: Path, *, run_id: str, candidate: str, headers: dict[str, str]) -> int:
    """Send evaluation ``eval_dir`` to ``url`` as OTLP traces (``otlp.evaluation_request``, in protobuf, which every
    MLflow 3.6+ takes; split by whole traces); returns how many traces (examples) were sent."""
    request = evaluation_request(eval_dir, run_id=run_id, candidate=candidate)
    for part in split_request(request):
        post_traces(url, part, headers=headers, encoding="protobuf", timeout_s=TRACES_TIMEOUT_S)
    return len(request_traces(request))

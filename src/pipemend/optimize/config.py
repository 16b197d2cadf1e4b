"""An optimize run's configuration (``run.json``'s ``config``) and its summary (``summary.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UsageError
from ..executors import DEFAULT_TASK_CPUS, check_task_cpus
from ..proposers import get_proposer

SUMMARY_FORMAT = "pipemend-optimize-summary-1"

LLM_PROPOSERS = ("claude", "claude-code", "reflect")
"""Proposers that call a model: they get an agent-side gateway, a transcript folder and ``--agent-model``."""


class OptimizeConfig(BaseModel):
    """One optimize run. Stored in ``run.json``; ``resume`` reads it back."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="The target pipeline's folder (holding pipemend.yaml).")
    proposer: str = Field("ladder", description="claude | claude-code | ladder | reflect | package.module:Class.")
    proposer_options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the proposer.")
    model: str | None = Field(None, description="Model the pipeline calls (PIPEMEND_MODEL); default the manifest's llm.model.")
    agent_model: str | None = Field(None, description="Model of an LLM proposer (passed to it as `model`).")
    budget_usd: float = Field(5.0, gt=0, description="Dollars the gateway may spend on pipeline calls, test split included.")
    test_reserve: float = Field(0.2, ge=0, lt=1, description="Share of budget_usd kept for the final test split.")
    max_candidates: int = Field(10, ge=0, description="Candidates to propose at most.")
    hours: float | None = Field(None, gt=0, description="Stop proposing after this many hours since the run started.")
    deadline: float | None = Field(None, gt=0, description=(
        "Stop proposing at this time (seconds since the epoch), whatever `hours` says: a CI job's end. "
        "`resume(..., deadline=)` gives a resumed drive its own."))
    limit: int | None = Field(None, ge=1, description="Use only the first N examples of each split.")
    sandbox: str = Field("auto", description="docker | bwrap | process | auto.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where evaluations run: local (this machine) or ray (a Ray cluster, pipemend[ray]).")
    ray_address: str | None = Field(
        None, description="The Ray cluster (`ray://HOST:10001`, `HOST:6379`, `auto`); None: $RAY_ADDRESS, else a "
        "local Ray. Only with executor ray.")
    ray_task_cpus: float = Field(
        DEFAULT_TASK_CPUS, description="CPUs each Ray task asks for (executor ray): a number > 0. Tasks that mostly "
        "wait on a model (an API model's latency) can ask for a fraction such as 0.25, so that four run per CPU.")
    gateway_host: str = Field(
        "127.0.0.1", description="Interface the pipeline gateway listens on; with executor ray on other machines, "
        "an address the Ray nodes reach, or 0.0.0.0 (beyond loopback, and for every ray run, the gateway needs "
        "its per-run token). See docs/distributed.md.")
    gateway_port: int = Field(0, ge=0, le=65535, description=(
        "TCP port of the pipeline gateway; 0: a free one. A fixed port lets an SSH or TLS tunnel carry the Ray "
        "nodes' calls (docs/distributed.md)."))
    run_id: str | None = Field(None, description="Run id (default optimize-<date>-<time>-<hex>).")
    reports_dir: str = Field("reports", description="Folder holding run directories.")
    cache_dir: str | None = Field(None, description="LLM response cache (default RUN_DIR/gateway/cache).")
    max_turns: int = Field(40, ge=1, description="Turns of an LLM proposer per candidate.")
    max_agent_usd: float = Field(2.0, ge=0, description="Dollars of an LLM proposer's own calls per candidate.")
    per_tool_timeout_s: float = Field(300.0, gt=0, description="Time limit of one proposer tool call.")
    parallel: int = Field(1, ge=1, le=16, description=(
        "Candidates proposed from the same base and evaluated at once; the best that passes is kept and each "
        "other that passed is rebased onto the new base and judged again (1: one at a time)."))
    seed: int = Field(0, description="Seed of the racing order of val and of the gate's bootstrap.")
    otlp_endpoint: str | None = Field(None, description=(
        "OTLP/HTTP traces endpoint (http://host:4318/v1/traces) that each evaluated example is sent to as it "
        "is judged; headers from OTEL_EXPORTER_OTLP_HEADERS."))
    mlflow: str | None = Field(None, description=(
        "MLflow tracking URI: an experiment per target, a run per candidate, prompts registered, traces sent."))

    @field_validator("ray_task_cpus", mode="before")
    @classmethod
    def _task_cpus(cls, value: Any) -> float:
        try:
            return check_task_cpus(value)
        except UsageError as e:
            raise ValueError(str(e)) from None


class CandidateSummary(BaseModel):
    n: int
    accepted: bool
    val_score: float | None
    delta: float | None
    reasons: list[str]
    rationale: str
    ref: str | None
    alpha: float | None = Field(None, description="Its share of the run's error budget (None: no val test).")
    val_evaluated: int | None = Field(None, description="Val examples it was run on (fewer when raced out).")
    val_saved: int | None = Field(None, description="Val example evaluations racing did not pay for it.")


class OptimizeSummary(BaseModel):
    format: str = SUMMARY_FORMAT
    run_id: str
    run_dir: str
    status: str
    stop_reason: str | None
    baseline: dict[str, float | None] = Field(description="train, val and test scores of the base.")
    best: dict[str, Any] | None = Field(description="The last accepted candidate: n, branch, sha, val, test.")
    candidates: list[CandidateSummary]
    spent_usd: float
    llm_calls: int
    cache_hits: int
    wall_s: float
    val_saved: int = Field(0, description="Val example evaluations racing saved over the run.")
    guarantee: str = Field("", description="The run-level guarantee of the gate, in one sentence.")


def proposer_options(cfg: OptimizeConfig) -> dict[str, Any]:
    """Build the proposer once to validate its name and options (a UsageError names what is wrong);
    returns the options to build it with."""
    options = dict(cfg.proposer_options)
    if cfg.agent_model:
        if cfg.proposer not in LLM_PROPOSERS:
            raise UsageError(f"--agent-model is for an LLM proposer ({', '.join(LLM_PROPOSERS)}), not {cfg.proposer!r}")
        options.setdefault("model", cfg.agent_model)
    get_proposer(cfg.proposer, **options)
    return options

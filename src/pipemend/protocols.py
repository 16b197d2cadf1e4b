"""The pluggable parts of pipemend, in one place.

- ``LLMBackend``: what the gateway forwards a Messages request to.
- ``Sandbox``: where the runner executes a candidate's pipeline.
- ``Proposer``: what edits a candidate worktree.
- ``Progress``: how a flow (``optimize``, ``eval``) tells its caller what it is doing.

Implementations live beside their kin (``gateway/backends/``, ``sandbox/``,
``proposers/``) and are found through the short-name registries there; a
dotted path ``package.module:Class`` works wherever a short name does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:  # the manifest and the tools import this module; these names are for annotations only
    from .manifest import Manifest
    from .proposers.budget import ProposerBudget
    from .proposers.tools import ProposerTools


# --------------------------------------------------------------------------- LLM backends


@runtime_checkable
class LLMBackend(Protocol):
    """Answers one Anthropic Messages API request body with a full (non-streaming) response body.

    The gateway owns streaming, caching, logging and budgets; a backend only
    answers. It raises ``BackendError`` (gateway/backends) for a request it
    cannot serve; the gateway turns that into an Anthropic-style error reply.
    """

    name: str

    def complete(self, request: dict[str, Any]) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- sandboxes


@dataclass
class SandboxJob:
    """One runner invocation: a batch of examples of one candidate, in one sandbox."""

    worktree: Path
    """The candidate's worktree (the target's folder inside it is ``worktree / target_subdir``)."""
    target_subdir: str
    """Path of the target folder relative to the worktree root ('' when the worktree *is* the target)."""
    entrypoint: str
    """``module:function`` from the manifest, importable from the target folder."""
    inputs_file: Path
    """JSONL rows ``{"id", "inputs"}`` only: never labels."""
    out_dir: Path
    """Where the runner writes ``results.jsonl`` and ``traces/<id>.json``; on the host."""
    gateway_url: str
    """``http://127.0.0.1:PORT`` of the gateway (used by the process sandbox)."""
    gateway_socket: Path | None
    """Unix socket of the gateway, mounted into isolated sandboxes."""
    model: str
    """Value of ``PIPEMEND_MODEL`` for the pipeline."""
    concurrency: int = 4
    example_timeout_s: float = 120.0
    wall_timeout_s: float = 3600.0
    writable: bool = False
    """Train runs of a proposer may write into the worktree; val/test runs are read-only."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the pipeline (never secrets)."""
    requirements: Path | None = None
    """The target's own requirements file, if any (sandbox installs it, cached by hash)."""
    hidden: list[str] = field(default_factory=list)
    """Paths relative to the target folder that the pipeline must not be able to read (the dataset files with
    labels); every sandbox masks them."""


@dataclass
class SandboxOutcome:
    """How the runner process ended. Per-example results are in ``job.out_dir``."""

    sandbox: str
    returncode: int | None
    timed_out: bool = False
    error: str | None = None
    """Why the whole batch failed (OOM, pid limit, dead container...), or None."""
    stdout_tail: str = ""
    stderr_tail: str = ""
    startup_s: float = 0.0
    wall_s: float = 0.0


@runtime_checkable
class Sandbox(Protocol):
    name: str

    def run(self, job: SandboxJob) -> SandboxOutcome: ...


# --------------------------------------------------------------------------- executors


@dataclass
class ExampleResult:
    """One example of a submitted batch, as it came back from the task that ran it."""

    example_id: str
    row: dict[str, Any] | None
    """The runner's ``results.jsonl`` row (``id``, ``output``, ``error``, ``timed_out``, ``duration_s``), or one
    the executor wrote (``timed_out`` true, an ``error``) when its task ran past the task timeout or was
    cancelled; None when its task died without a row for it more often than the retries allow (it scores
    "no result", as an example of a dead sandbox always has)."""
    trace: bytes | None = None
    """``traces/<id>.json`` as the runner wrote it (checked: a regular file, under the trace cap), or None."""
    attempts: int = 1
    """How many tasks this example was part of (1 + retries)."""


class ExecutorBatch(Protocol):
    """A submitted batch (``Executor.submit``): a ``concurrent.futures``-like handle on its tasks."""

    total: int
    """Examples in the batch."""

    def wait(self, timeout: float | None = None) -> list[ExampleResult]:
        """Results of the examples whose tasks finished since the last call, in completion order; waits up to
        ``timeout`` seconds for the next one (None: until one finishes); an empty list once ``done``."""

    def results(self) -> Iterator[ExampleResult]:
        """Every example's result once, in completion order, as tasks finish (``wait`` in a loop)."""

    @property
    def done(self) -> bool:
        """Every example has a result (ran, timed out, or failed past its retries)."""

    def finished(self) -> int:
        """Examples that came back with a row so far (an executor that sees a running task's rows counts those
        too): what a progress bar shows."""

    def cancel(self) -> None:
        """Stop every task still running (forcibly); their unfinished examples come back timed out."""

    def outcome(self) -> SandboxOutcome:
        """The batch's tasks as one outcome (``returncode`` the worst, tails joined, ``wall_s`` of the batch)."""


@runtime_checkable
class Executor(Protocol):
    """Where sandbox jobs run: this machine's threads (``local``) or a Ray cluster (``ray``).

    ``submit`` splits a job (a batch of examples of one candidate) into tasks, each a shard of examples run as
    ONE sandbox job, and streams the examples' results back as tasks finish. Retries are keyed by
    ``(candidate, example id)``: an example whose task died without a row for it is run again in a new task,
    up to ``max_retries`` times; an example with a row is never run again. A task past its timeout is
    cancelled and its unfinished examples come back timed out (scored as errors, like the runner's own)."""

    name: str

    def submit(self, job: SandboxJob, *, candidate: str, timeout_s: float | None = None) -> ExecutorBatch:
        """Start running ``job`` (its ``inputs_file`` rows, in shards); ``timeout_s`` per task (None: the
        job's ``wall_timeout_s`` for the shard's size). The tasks write only into folders of their own:
        ``job.out_dir`` is the caller's, and it writes what comes back there."""

    def close(self) -> None:
        """Cancel what still runs and release the executor's resources."""


# --------------------------------------------------------------------------- proposers


@dataclass
class Proposal:
    """What a proposer hands back: its edits are already in the candidate worktree."""

    rationale: str
    rung: str | None = None
    """The ladder rung the change addresses (prompt, retrieval, context, model), if known."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything worth keeping with the candidate (knob name and value, agent turns, cost...)."""


@dataclass
class ProposalContext:
    """Everything a proposer may use. It sees train examples, never val or test labels."""

    candidate_index: int
    worktree: Path
    """The candidate worktree, checked out from the current base; edit files here."""
    target_subdir: str
    manifest: Manifest
    """The frozen manifest."""
    diagnosis: dict[str, Any]
    """The base's latest diagnosis on train (``pipemend.diagnose`` JSON form)."""
    history: list[dict[str, Any]]
    """Earlier candidates: index, rationale, rung, meta, verdict summary (val aggregates only)."""
    history_dir: Path | None
    """A read-only folder with each earlier candidate's diff, rationale, verdict and train traces."""
    tools: ProposerTools
    """Guarded file edits, train runs, traces, diagnosis, diff."""
    budget: ProposerBudget | None
    """Turns, tokens, dollars, per-tool seconds (None: the proposer's defaults)."""
    train_examples: list[dict[str, Any]] = field(default_factory=list)
    """Train rows (id, inputs, expected, evidence) for few-shot or inspection."""
    log: Callable[[str], None] = print
    in_flight: list[dict[str, Any]] = field(default_factory=list)
    """What the other candidates of this parallel round (``optimize --parallel``) are working on, proposed before
    this one from the same base: ``{n, rung, rationale, meta}`` each; do not propose the same change again."""


class Proposer(Protocol):
    """Makes one change per call, or returns None when it has no more ideas."""

    name: str

    def propose(self, ctx: ProposalContext) -> Proposal | None: ...


# --------------------------------------------------------------------------- progress


@runtime_checkable
class Progress(Protocol):
    """What a running flow tells its caller; the CLI shows it (rich), a test records it, a library caller may
    ignore it (``NullProgress``). Every method returns at once and never raises into the flow."""

    def status(self, text: str) -> None:
        """What is happening now (replaces the previous status)."""

    def log(self, text: str) -> None:
        """A line worth keeping (plain text, no markup)."""

    def event(self, name: str, **fields: Any) -> None:
        """Something with data: ``announce`` (text: a sandbox fallback), ``eval_progress`` (task, done, total),
        ``diagnosis`` (split, diagnosis: the JSON form), ``candidate_done`` (n, accepted, val_score, delta,
        reasons)."""


class NullProgress:
    """The default ``Progress``: shows nothing."""

    def status(self, text: str) -> None:
        pass

    def log(self, text: str) -> None:
        pass

    def event(self, name: str, **fields: Any) -> None:
        pass


@runtime_checkable
class RunObserver(Protocol):
    """Something outside the run that follows it as it goes (an OTLP collector, an MLflow server).

    The optimize loop calls it after the baseline is journaled, after each candidate is journaled and
    after the test split; each call gets the run directory and reads what it needs from there (the journal,
    ``evals/``, ``candidates/<n>/``). A resumed run calls it again for what it redoes or replays, so an
    observer makes each call idempotent (keyed by run id and candidate). A raising observer is a warning,
    never a failed run; it must not write inside the run directory except under ``observers/<name>/``."""

    name: str

    def baseline_done(self, run_dir: Path) -> None: ...

    def candidate_done(self, run_dir: Path, n: int) -> None: ...

    def run_done(self, run_dir: Path) -> None: ...

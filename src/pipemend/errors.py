"""Typed errors shared across pipemend.

Each error carries enough to tell the user *what* went wrong and *where*.
The CLI maps ``UsageError`` (and its subclasses) to exit code 2 and
``RunFailed`` to exit code 1.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

BudgetReason = Literal["turns", "tokens", "usd", "time", "gateway", "run"]
"""Which limit a ``BudgetExhausted`` reports. A proposer's own limits for one candidate: ``turns``,
``tokens``, ``usd`` (its agent dollars), ``time`` (its session's wall clock); ``gateway``: the agent-side
gateway refused the proposer; ``run``: the run's pipeline budget (the gateway refused a pipeline call).
What each one does to the optimize loop is one table: ``pipemend.optimize.stops.ON_BUDGET``."""

BUDGET_REASONS: tuple[str, ...] = get_args(BudgetReason)


class PipemendError(Exception):
    """Base class of every error pipemend raises on purpose."""


class UsageError(PipemendError):
    """Bad usage, configuration or input. The CLI exits 2 with this message."""


class ConfigError(UsageError):
    """A configuration or data file is wrong.

    ``file`` is the path, ``where`` a key path (``gates.min_delta``) or a line
    (``line 12``), ``expected`` what would have been accepted.
    """

    def __init__(self, file: object, where: str | None, problem: str, expected: str | None = None):
        self.file = str(file)
        self.where = where
        self.problem = problem
        self.expected = expected
        loc = self.file + (f": {where}" if where else "")
        msg = f"{loc}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


class RunFailed(PipemendError):
    """The run itself failed (not the user's input). The CLI exits 1."""


class BudgetExhausted(PipemendError):
    """A token, dollar, evaluation, time or turn budget is spent.

    ``reason`` says which (``BudgetReason``; default ``run``, the run's own budget); ``meta`` is what the
    optimize loop records with the candidate when a proposer ran out (turns, tokens, dollars, transcript).
    """

    def __init__(self, message: str, *, reason: BudgetReason = "run", meta: dict[str, Any] | None = None):
        if reason not in BUDGET_REASONS:
            raise ValueError(f"budget reason {reason!r}: expected one of {', '.join(BUDGET_REASONS)}")
        self.reason: BudgetReason = reason
        self.meta: dict[str, Any] = dict(meta or {})
        super().__init__(message)


class SandboxUnavailable(PipemendError):
    """A sandbox kind cannot run here; the message says why and how to fix it."""


class ExportFailed(RunFailed):
    """Sending a run's traces or results to an outside tool failed (an OTLP collector, MLflow); the message
    names the URL and what it answered."""

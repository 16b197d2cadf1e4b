"""Typed errors shared across pipemend.

Each error carries enough to tell the user *what* went wrong and *where*.
The CLI maps ``UsageError`` (and its subclasses) to exit code 2 and
``RunFailed`` to exit code 1.
"""

from __future__ import annotations


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
    """A token, dollar, evaluation, time or turn budget is spent."""


class SandboxUnavailable(PipemendError):
    """A sandbox kind cannot run here; the message says why and how to fix it."""

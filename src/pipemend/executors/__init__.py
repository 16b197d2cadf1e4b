"""Where sandbox jobs run (``protocols.Executor``): ``local`` (threads on this machine, the default) or ``ray``
(tasks on a Ray cluster, extra ``pipemend[ray]``).

``get_executor(name, sandbox, ...)`` makes one; ``ray_available()`` says whether Ray is installed, and
``executor_from_env()`` picks ``ray`` when ``RAY_ADDRESS`` is set and Ray is installed (else ``local``).
"""

from __future__ import annotations

import importlib.util
import os
import secrets

from ..errors import UsageError
from ..protocols import Executor, Sandbox
from .local import LocalExecutor

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: pip install 'pipemend[ray]'"


def ray_available() -> bool:
    """Whether the ``ray`` package is installed (not imported: that takes seconds)."""
    return importlib.util.find_spec("ray") is not None


def executor_from_env() -> str:
    """``ray`` when ``RAY_ADDRESS`` is set and Ray is installed, else ``local``."""
    return "ray" if os.environ.get("RAY_ADDRESS", "").strip() and ray_available() else "local"


def check_executor(name: str) -> str:
    """``name`` when it is a known executor whose package is installed; else a ``UsageError`` saying what to do."""
    if name not in EXECUTORS:
        raise UsageError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "ray" and not ray_available():
        raise UsageError(RAY_MISSING)
    return name


def gateway_token(executor: str) -> str | None:
    """A fresh per-run gateway token for an executor whose sandboxes may dial the gateway over the network
    (``ray``); None for ``local`` (loopback and the unix socket only)."""
    return secrets.token_urlsafe(32) if executor == "ray" else None


def get_executor(name: str, sandbox: Sandbox, *, sandbox_kind: str = "auto", ray_address: str | None = None,
                 announce=print) -> Executor:
    """The named executor running jobs in ``sandbox`` (``local``) or, on Ray, in the sandbox ``sandbox_kind``
    names on each node (``auto``: Docker where the node has it, else bubblewrap)."""
    check_executor(name)
    if name == "local":
        return LocalExecutor(sandbox)
    from .ray import RayExecutor  # the optional extra

    return RayExecutor(sandbox_kind=sandbox_kind, address=ray_address, announce=announce)


__all__ = ["EXECUTORS", "LocalExecutor", "check_executor", "executor_from_env", "gateway_token", "get_executor",
           "ray_available"]

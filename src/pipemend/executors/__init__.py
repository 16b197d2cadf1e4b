"""Where sandbox jobs run (``protocols.Executor``): ``local`` (threads on this machine, the default) or ``ray``
(tasks on a Ray cluster, extra ``pipemend[ray]``).

``get_executor(name, sandbox, ...)`` makes one; ``ray_available()`` says whether Ray is installed, and
``executor_from_env()`` picks ``ray`` when ``RAY_ADDRESS`` is set and Ray is installed (else ``local``).
``check_task_cpus(cpus)`` checks a Ray task's CPU request (``--ray-task-cpus``), and ``gateway_token(executor,
host)`` gives a run's gateway its token when its sandboxes may dial it over the network.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import secrets

from ..errors import UsageError
from ..protocols import Executor, Sandbox
from .local import LocalExecutor

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: pip install 'pipemend[ray]'"
DEFAULT_TASK_CPUS = 1.0
"""CPUs each Ray task asks for unless ``--ray-task-cpus`` says otherwise."""
MIN_TASK_CPUS = 0.0001
"""The smallest CPU request Ray takes (its resource precision)."""


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


def check_task_cpus(cpus: float) -> float:
    """``cpus`` as a Ray task's CPU request when it is a finite number of at least ``MIN_TASK_CPUS``; else a
    ``UsageError`` (a ``ValueError``, so pydantic reports it on its field) saying what is expected."""
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not math.isfinite(cpus) \
            or cpus < MIN_TASK_CPUS:
        raise UsageError(f"--ray-task-cpus {cpus!r}: expected the CPUs each Ray task asks for, a number > 0 "
                         f"(at least {MIN_TASK_CPUS}; a fraction such as 0.25 for tasks that mostly wait on a model)")
    return float(cpus)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface the gateway listens on) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume the network


def gateway_token(executor: str, host: str = "127.0.0.1") -> str | None:
    """A fresh per-run gateway token when the gateway's sandboxes may dial it over the network: the ``ray``
    executor, or a gateway listening on ``host`` beyond loopback (``--gateway-host``). None otherwise (loopback
    and the unix socket only)."""
    return secrets.token_urlsafe(32) if executor == "ray" or not is_loopback(host) else None


def get_executor(name: str, sandbox: Sandbox, *, sandbox_kind: str = "auto", ray_address: str | None = None,
                 ray_task_cpus: float = DEFAULT_TASK_CPUS, announce=print) -> Executor:
    """The named executor running jobs in ``sandbox`` (``local``) or, on Ray, in the sandbox ``sandbox_kind``
    names on each node (``auto``: Docker where the node has it, else bubblewrap), each task asking for
    ``ray_task_cpus`` CPUs. A Ray cluster that cannot run those tasks is a ``UsageError`` (``RayExecutor``)."""
    check_executor(name)
    if name == "local":
        return LocalExecutor(sandbox)
    from .ray import RayExecutor  # the optional extra

    return RayExecutor(sandbox_kind=sandbox_kind, address=ray_address, num_cpus=check_task_cpus(ray_task_cpus),
                       announce=announce)


__all__ = ["DEFAULT_TASK_CPUS", "EXECUTORS", "LocalExecutor", "check_executor", "check_task_cpus", "executor_from_env",
           "gateway_token", "get_executor", "is_loopback", "ray_available"]

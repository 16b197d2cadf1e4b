"""What every command shares: the consoles and the one mapping from pipemend's errors to exit codes.

Exit codes: 0 done, 1 the run failed (``RunFailed`` and any other ``PipemendError``,
``BudgetExhausted``...), 2 bad usage, config or input (``UsageError``/``ConfigError``,
and ``SandboxUnavailable``, whose message says how to fix it). A bug still shows its traceback.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from ..errors import PipemendError, SandboxUnavailable, UsageError
from ..executors import check_executor, check_task_cpus, executor_from_env

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

USAGE_EXIT = 2
FAILED_EXIT = 1


def exit_code(e: BaseException) -> int | None:
    """The exit code for one of pipemend's errors; None for anything else (a bug)."""
    if isinstance(e, (UsageError, SandboxUnavailable)):
        return USAGE_EXIT
    if isinstance(e, PipemendError):
        return FAILED_EXIT
    return None


def cli_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command, turning pipemend's errors into their exit code and a one-line message on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipemendError as e:
            code = exit_code(e)
            err.print(f"[bold red]{'error' if code == USAGE_EXIT else 'run failed'}:[/] {escape(str(e))}")
            raise typer.Exit(code) from None

    return wrapper


def options_error(e: ValidationError) -> UsageError:
    """A pydantic error in a command's options as a usage error naming the option (``--budget-usd: ...``)."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "options"
    return UsageError(f"--{where.replace('_', '-')}: {first.get('msg', 'invalid value')}")


EXECUTOR_HELP = "local | ray: where evaluations run (default: ray when RAY_ADDRESS is set and ray is installed)."
RAY_ADDRESS_HELP = "The Ray cluster for --executor ray (default: $RAY_ADDRESS, else a local Ray)."
RAY_TASK_CPUS_HELP = ("CPUs each Ray task asks for (default 1; a number > 0): a fraction such as 0.25 runs four "
                      "latency-bound tasks (waiting on an API model) per CPU.")
GATEWAY_HOST_HELP = ("Interface the pipeline gateway listens on (default 127.0.0.1). With --executor ray on other "
                     "machines: an address the nodes reach, or 0.0.0.0. Beyond loopback every request needs the "
                     "run's token, over plain HTTP: docs/distributed.md.")
GATEWAY_PORT_HELP = ("TCP port of the pipeline gateway (default 0: a free one); fix it for an SSH or TLS tunnel "
                     "to the Ray nodes (docs/distributed.md).")


def executor_options(executor: str | None, ray_address: str | None,
                     ray_task_cpus: float | None = None) -> dict[str, Any]:
    """``executor``, ``ray_address`` and ``ray_task_cpus`` (when given) for a flow: the named executor (checked:
    ``ray`` needs the package), else ``ray`` when ``RAY_ADDRESS`` is set and Ray is installed, else ``local``."""
    name = check_executor(executor) if executor is not None else executor_from_env()
    for option, value in (("--ray-address", ray_address), ("--ray-task-cpus", ray_task_cpus)):
        if value is not None and name != "ray":
            raise UsageError(f"{option} needs --executor ray")
    options: dict[str, Any] = {"executor": name, "ray_address": ray_address}
    if ray_task_cpus is not None:
        options["ray_task_cpus"] = check_task_cpus(ray_task_cpus)
    return options

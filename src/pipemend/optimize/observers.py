"""The run's observers (``protocols.RunObserver``): OTLP collectors and MLflow servers that follow a run.

``build_observers`` makes one per option the run was started with (``--otlp-endpoint``, ``--mlflow``);
each lives in an optional module, imported only when asked for, so a run without them needs none of their
packages. ``notify`` calls them; an observer that raises is a warning line and the run goes on.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..protocols import Progress, RunObserver

if TYPE_CHECKING:
    from .config import OptimizeConfig

OBSERVERS: dict[str, str] = {
    "otlp_endpoint": "pipemend.export.otlp_observer:OtlpObserver",
    "mlflow": "pipemend.export.mlflow_observer:MlflowObserver",
}
"""OptimizeConfig field -> the observer class it turns on (built with ``Class.from_config(cfg, run_dir)``)."""


def build_observers(cfg: OptimizeConfig, run_dir: Path) -> list[RunObserver]:
    """One observer per option set in ``cfg``; a missing optional package is a UsageError naming the extra."""
    out: list[RunObserver] = []
    for field, spec in OBSERVERS.items():
        if getattr(cfg, field) is None:
            continue
        module, _, cls = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise UsageError(f"--{field.replace('_', '-')} needs a package that is not installed ({e.name}); "
                             f"install pipemend's extra for it") from None
        out.append(factory.from_config(cfg, run_dir))
    return out


def notify(observers: list[RunObserver], event: str, progress: Progress, run_dir: Path, *args: Any) -> None:
    """Call ``event`` (baseline_done, candidate_done, run_done) on each observer; a fault is a warning."""
    for obs in observers:
        try:
            getattr(obs, event)(run_dir, *args)
        except Exception as e:  # noqa: BLE001 - an observer never stops the run
            progress.event("warning", text=f"{obs.name}: {event} not sent: {type(e).__name__}: {e}")

"""Snapshot + worktrees (git), and the sandboxes a candidate's pipeline runs in.

``get_sandbox(name)`` returns a ``pipemend.protocols.Sandbox``: ``docker``
(preferred), ``bwrap``, ``process`` (no isolation: only when asked for by name,
with a loud warning), ``auto`` (docker, else bwrap, announced; never ``process``),
or a dotted path ``package.module:Class``.
"""

from __future__ import annotations

from typing import Callable

from ..errors import SandboxUnavailable
from ..plugins import resolve
from ..protocols import Sandbox
from .bwrap import probe
from .common import SandboxLimits

SANDBOXES = {
    "docker": "pipemend.sandbox.docker:DockerSandbox",
    "bwrap": "pipemend.sandbox.bwrap:BwrapSandbox",
    "process": "pipemend.sandbox.process:ProcessSandbox",
}
NAMES = ("auto", *SANDBOXES)
NO_ISOLATION = (
    "no isolating sandbox works here ({reasons}). Install one: bubblewrap (`apt-get install bubblewrap`, "
    "which scripts/install does when it can) or Docker (`apt-get install docker.io` and start it, or "
    "`sandboxes/ci-setup.sh start`); `pipemend doctor` checks both. `--sandbox process` runs the pipeline "
    "without isolation (it could read the run's labels): an unsafe opt-in, never chosen for you."
)


def _make(name: str, announce: Callable[[str], None], limits: SandboxLimits | None) -> Sandbox:
    cls = resolve(name, SANDBOXES, kind="sandbox", extra_names=("auto",))
    try:
        return cls(limits=limits, announce=announce)
    except TypeError:
        return cls()


def get_sandbox(name: str = "auto", announce: Callable[[str], None] = print,
                limits: SandboxLimits | None = None) -> Sandbox:
    """The named sandbox, or with ``auto`` the first that works here (docker, then bwrap), announced.

    ``auto`` never falls back to ``process``: a pipeline there can read the run's
    frozen labels, so it runs only when asked for by name. Raises
    ``SandboxUnavailable`` (why + how to fix) when a named one cannot run, or
    when ``auto`` finds neither docker nor bwrap; ``UsageError`` for an unknown name.
    """
    if name != "auto":
        sb = _make(name, announce, limits)
        if name == "bwrap":
            probe()
        return sb
    reasons = []
    for candidate in ("docker", "bwrap"):
        try:
            sb = _make(candidate, announce, limits)
            if candidate == "bwrap":
                probe()
            if reasons:
                announce(f"sandbox: {candidate} ({'; '.join(reasons)})")
            else:
                announce(f"sandbox: {candidate}")
            return sb
        except SandboxUnavailable as e:
            reasons.append(f"{candidate} unavailable: {e}")
    raise SandboxUnavailable(NO_ISOLATION.format(reasons="; ".join(reasons)))


__all__ = ["SANDBOXES", "NAMES", "SandboxLimits", "get_sandbox", "SandboxUnavailable"]

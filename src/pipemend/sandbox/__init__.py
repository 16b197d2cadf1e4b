"""Snapshot + worktrees (git), and the sandboxes a candidate's pipeline runs in.

``get_sandbox(name)`` returns a ``pipemend.protocols.Sandbox``: ``docker``
(preferred), ``bwrap``, ``process`` (no isolation), ``auto`` (the first that works
here, announced), or a dotted path ``package.module:Class``.
"""

from __future__ import annotations

from typing import Callable

from ..errors import SandboxUnavailable
from ..plugins import resolve
from ..protocols import Sandbox
from .common import SandboxLimits

SANDBOXES = {
    "docker": "pipemend.sandbox.docker:DockerSandbox",
    "bwrap": "pipemend.sandbox.bwrap:BwrapSandbox",
    "process": "pipemend.sandbox.process:ProcessSandbox",
}
NAMES = ("auto", *SANDBOXES)


def _make(name: str, announce: Callable[[str], None], limits: SandboxLimits | None) -> Sandbox:
    cls = resolve(name, SANDBOXES, kind="sandbox", extra_names=("auto",))
    try:
        return cls(limits=limits, announce=announce)
    except TypeError:
        return cls()


def get_sandbox(name: str = "auto", announce: Callable[[str], None] = print,
                limits: SandboxLimits | None = None) -> Sandbox:
    """The named sandbox, or with ``auto`` the first that works here (docker, bwrap, process), announced.

    Raises ``SandboxUnavailable`` (why + how to fix) when a named one cannot run,
    ``UsageError`` for an unknown name.
    """
    if name != "auto":
        sb = _make(name, announce, limits)
        if name == "bwrap":
            from .bwrap import probe

            probe()
        return sb
    reasons = []
    for candidate in ("docker", "bwrap"):
        try:
            sb = _make(candidate, announce, limits)
            if candidate == "bwrap":
                from .bwrap import probe

                probe()
            if reasons:
                announce(f"sandbox: {candidate} ({'; '.join(reasons)})")
            else:
                announce(f"sandbox: {candidate}")
            return sb
        except SandboxUnavailable as e:
            reasons.append(f"{candidate} unavailable: {e}")
    announce(f"sandbox: process ({'; '.join(reasons)})")
    return _make("process", announce, limits)


__all__ = ["SANDBOXES", "NAMES", "SandboxLimits", "get_sandbox", "SandboxUnavailable"]

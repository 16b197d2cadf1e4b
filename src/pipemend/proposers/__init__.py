"""Proposers: what edits a candidate worktree (the ``Proposer`` protocol is in ``pipemend.protocols``).

``get_proposer(name, **options)`` builds one by short name (``PROPOSERS``), or runs
a plugin named by a dotted path ``package.module:Class`` in its own sandbox
(``isolation.py``); the class is constructed with ``**options`` and must have a
``propose(ctx)`` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import UsageError
from ..plugins import is_dotted_path, resolve
from ..protocols import Proposer
from .budget import ProposerBudget, ProposerBudgetExhausted
from .isolation import IsolatedProposer

PROPOSERS: dict[str, str] = {
    "claude": "pipemend.proposers.claude:ClaudeProposer",
    "claude-code": "pipemend.proposers.claude_code:ClaudeCodeProposer",
    "ladder": "pipemend.proposers.ladder:LadderProposer",
    "reflect": "pipemend.proposers.reflect:ReflectProposer",
}

__all__ = ["PROPOSERS", "ProposerBudget", "ProposerBudgetExhausted", "get_proposer", "parse_options"]

Config = TypeVar("Config", bound=BaseModel)


def parse_options(config_cls: type[Config], options: dict[str, Any], proposer: str) -> Config:
    """A proposer's options as its pydantic config; a ``UsageError`` naming the first bad option."""
    try:
        return config_cls(**options)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise UsageError(f"{proposer} proposer option {where!r}: {first.get('msg')}") from None


def get_proposer(name: str, /, *, guard: Sequence[Path] = (), **options: Any) -> Proposer:
    """A proposer by short name (claude, claude-code, ladder, reflect) or ``package.module:Class``.

    A plugin (a dotted path) is code pipemend did not write: it is never imported here but runs in its
    own sandbox (``isolation.IsolatedProposer``), which refuses plugin code overlapping a ``guard`` folder
    (the run directory, the user's target). ``guard`` is therefore not a plugin option name.
    """
    if name not in PROPOSERS and ":" in name:
        if not is_dotted_path(name):
            resolve(name, PROPOSERS, kind="proposer")  # raises the usage error that lists the valid names
        return IsolatedProposer(name, options, guard=[Path(g) for g in guard])
    cls = resolve(name, PROPOSERS, kind="proposer")
    if not callable(cls) or not callable(getattr(cls, "propose", None)):
        raise UsageError(f"proposer {name!r}: {PROPOSERS.get(name, name)} has no propose(ctx) method")
    try:
        proposer = cls(**options)
    except UsageError:
        raise
    except TypeError as e:
        raise UsageError(f"proposer {name!r}: bad options {sorted(options)}: {e}") from None
    if not getattr(proposer, "name", None):
        try:
            proposer.name = name
        except AttributeError:
            pass
    return proposer

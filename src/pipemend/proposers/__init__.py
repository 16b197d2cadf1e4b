"""Proposers: what edits a candidate worktree (the ``Proposer`` protocol is in ``pipemend.protocols``).

``get_proposer(name, **options)`` builds one by short name (``PROPOSERS``) or by
a dotted path ``package.module:Class``; the class is constructed with
``**options`` and must have a ``propose(ctx)`` method.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import UsageError
from ..protocols import Proposer
from .budget import ProposerBudget, ProposerBudgetExhausted

PROPOSERS: dict[str, str] = {
    "claude": "pipemend.proposers.claude:ClaudeProposer",
    "claude-code": "pipemend.proposers.claude_code:ClaudeCodeProposer",
    "ladder": "pipemend.proposers.ladder:LadderProposer",
}

__all__ = ["PROPOSERS", "ProposerBudget", "ProposerBudgetExhausted", "get_proposer", "load_class", "parse_options"]

Config = TypeVar("Config", bound=BaseModel)


def parse_options(config_cls: type[Config], options: dict[str, Any], proposer: str) -> Config:
    """A proposer's options as its pydantic config; a ``UsageError`` naming the first bad option."""
    try:
        return config_cls(**options)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise UsageError(f"{proposer} proposer option {where!r}: {first.get('msg')}") from None


def load_class(dotted: str) -> type:
    """Import ``package.module:Class``; ``UsageError`` when it cannot be found."""
    module_name, sep, attr = dotted.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"proposer {dotted!r}: not a known name nor a dotted path; "
            f"use one of {', '.join(PROPOSERS)} or package.module:Class"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"proposer {dotted!r}: cannot import module {module_name!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"proposer {dotted!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def get_proposer(name: str, **options: Any) -> Proposer:
    """A proposer by short name (claude, ladder, claude-code) or ``package.module:Class``."""
    dotted = PROPOSERS.get(name)
    if dotted is None and ":" not in name:
        raise UsageError(f"unknown proposer {name!r}; valid: {', '.join(PROPOSERS)} or package.module:Class")
    cls = load_class(dotted or name)
    if not callable(cls) or not callable(getattr(cls, "propose", None)):
        raise UsageError(f"proposer {name!r}: {dotted or name} has no propose(ctx) method")
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

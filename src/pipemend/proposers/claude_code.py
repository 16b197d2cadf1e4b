"""The ``claude-code`` proposer (Claude Code through ``claude-agent-sdk``): not built yet.

Planned: the same tools as ``claude`` served as an in-process MCP server, cwd
fixed to the candidate worktree, limits from ``ProposerBudget``. Until then,
asking for it is a usage error that names the proposers that exist.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError


class ClaudeCodeProposer:
    name = "claude-code"

    def __init__(self, **options: Any):
        raise UsageError("the claude-code proposer is not available in this version; use --proposer claude or ladder")

    def propose(self, ctx: Any) -> None:  # pragma: no cover - never constructed
        raise NotImplementedError

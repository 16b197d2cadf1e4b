"""A proposer's limits, enforced by the harness: turns, agent tokens, agent dollars, per-tool time.

The counters live on the budget object, so its scope is whoever holds it: the
optimize loop gives each candidate a fresh ``ProposerBudget`` (or shares one
across candidates for a run-wide cap). Agent usage is counted here, apart from
the pipeline's own calls, which the gateway's run budget covers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import BudgetExhausted, BudgetReason
from ..gateway.pricing import cost_usd  # one price table for the product: agent calls are priced like pipeline calls

__all__ = ["ProposerBudget", "ProposerBudgetExhausted", "cost_usd"]


class ProposerBudgetExhausted(BudgetExhausted):
    """A proposer's limit is spent before it submitted.

    ``reason`` is ``turns``, ``tokens``, ``usd``, ``time`` (a session's wall clock) or
    ``gateway`` (``errors.BudgetReason``); ``meta`` carries
    what the loop records with the candidate (turns, tokens, dollars, transcript).
    The candidate's worktree may hold partial edits: the loop discards it.
    """

    def __init__(self, reason: BudgetReason, message: str, meta: dict[str, Any] | None = None):
        super().__init__(message, reason=reason, meta=meta)


class ProposerBudget(BaseModel):
    """Limits of one proposer session; ``charge`` counts, ``check`` raises when one is spent."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(40, ge=1, description="Model responses the agent may get (one per request).")
    max_agent_tokens: int = Field(200_000, ge=1, description="Input + output tokens of the agent's own calls.")
    max_agent_usd: float = Field(2.0, ge=0, description="Dollars of the agent's own calls (usage x price table).")
    per_tool_timeout_s: float = Field(300.0, gt=0, description="Wall-clock limit of one tool call (train runs included).")

    _turns: int = PrivateAttr(0)
    _input_tokens: int = PrivateAttr(0)
    _output_tokens: int = PrivateAttr(0)
    _usd: float = PrivateAttr(0.0)

    @property
    def turns(self) -> int:
        return self._turns

    @property
    def tokens(self) -> int:
        return self._input_tokens + self._output_tokens

    @property
    def usd(self) -> float:
        return self._usd

    def charge(self, *, turns: int = 0, input_tokens: int = 0, output_tokens: int = 0, usd: float = 0.0) -> None:
        """Count what was spent (never refuses: the call already happened)."""
        self._turns += int(turns)
        self._input_tokens += int(input_tokens)
        self._output_tokens += int(output_tokens)
        self._usd += float(usd)

    def exhausted(self) -> Literal["turns", "tokens", "usd"] | None:
        """The first spent limit (``turns``, ``tokens``, ``usd``) or None."""
        if self._turns >= self.max_turns:
            return "turns"
        if self.tokens >= self.max_agent_tokens:
            return "tokens"
        if self._usd >= self.max_agent_usd:
            return "usd"
        return None

    def check(self, meta: dict[str, Any] | None = None) -> None:
        """Raise ``ProposerBudgetExhausted`` if a limit is spent."""
        reason = self.exhausted()
        if reason:
            raise ProposerBudgetExhausted(reason, f"proposer budget exhausted ({reason}): {self.describe()}", meta)

    def spent(self) -> dict[str, Any]:
        return {
            "turns": self._turns,
            "input_tokens": self._input_tokens,
            "output_tokens": self._output_tokens,
            "usd": round(self._usd, 6),
        }

    def describe(self) -> str:
        return (
            f"{self._turns}/{self.max_turns} turns, {self.tokens}/{self.max_agent_tokens} tokens, "
            f"${self._usd:.4f}/${self.max_agent_usd:.2f}"
        )

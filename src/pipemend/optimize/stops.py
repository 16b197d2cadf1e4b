"""When the optimize loop stops, and what a spent budget does to it.

Stop rules, checked before each candidate (``check_limits``): the candidate
limit, the hours since the run started (and the drive's deadline), and the dollars spent with the test
split's reserve kept back. The fourth way to stop is the proposer's: it has
no more ideas (``StopRun("ideas", ...)`` from the candidate step).

A ``BudgetExhausted`` carries a ``BudgetReason``; ``ON_BUDGET`` is the one
table that says whether it costs the candidate (``skip_candidate``: the
proposer spent its own per-candidate allowance) or ends the loop
(``stop_run``: the run's money or the agent gateway is gone).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from ..errors import BudgetExhausted, BudgetReason

StopReason = Literal["candidates", "hours", "deadline", "budget", "ideas"]
Action = Literal["skip_candidate", "stop_run"]

ON_BUDGET: dict[BudgetReason, Action] = {
    "turns": "skip_candidate",
    "tokens": "skip_candidate",
    "usd": "skip_candidate",
    "time": "skip_candidate",
    "gateway": "stop_run",
    "run": "stop_run",
}


class StopRun(Exception):
    """Ends the candidate loop; ``message`` is the reason recorded in the journal (``loop_stopped``)."""

    def __init__(self, reason: StopReason, message: str):
        self.reason: StopReason = reason
        self.message = message
        super().__init__(message)

    @classmethod
    def from_budget(cls, e: BudgetExhausted) -> StopRun:
        return cls("budget", f"budget: {e}")


def on_budget(e: BudgetExhausted) -> Action:
    """What a spent budget does to the loop."""
    return ON_BUDGET[e.reason]


def check_limits(*, done: int, max_candidates: int, elapsed_s: float, hours: float | None, spent_usd: float,
                 budget_usd: float, test_reserve: float, now: float = 0.0, deadline: float | None = None) -> None:
    """Raise ``StopRun`` when a limit is reached before the next candidate (``now`` and ``deadline``: seconds
    since the epoch)."""
    if done >= max_candidates:
        raise StopRun("candidates", f"candidate limit reached ({done} of {max_candidates})")
    if hours is not None and elapsed_s >= hours * 3600:
        raise StopRun("hours", f"time limit reached ({hours:g} h)")
    if deadline is not None and now >= deadline:
        when = datetime.fromtimestamp(deadline, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise StopRun("deadline", f"deadline reached ({when})")
    if spent_usd >= budget_usd * (1 - test_reserve):
        raise StopRun("budget", f"budget spent (${spent_usd:.4f} of ${budget_usd:.2f}, "
                                f"{test_reserve:.0%} kept for the test split)")

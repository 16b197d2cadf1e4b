"""One Messages request of an LLM proposer's session, through the ``anthropic`` SDK and the agent gateway.

``send`` makes the request, maps a budget refusal of the gateway (402/429 naming
the budget) to ``ProposerBudgetExhausted`` (reason ``gateway``), records any other
API error as the session's end and re-raises it, charges the response's usage
to the session's ``ProposerBudget`` at the price table (prompt-cache tokens
counted as input), and records the response in the transcript. Checking the
budget before the request is the caller's: it knows what the session was about to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anthropic

from .budget import cost_usd

if TYPE_CHECKING:
    from .agent_tools import AgentSession


def send(session: AgentSession, client: anthropic.Anthropic, kwargs: dict[str, Any], *,
         prices: tuple[float, float] | None = None) -> Any:
    """``client.messages.create(**kwargs)`` for ``session``, charged and recorded; the SDK's response."""
    try:
        resp = client.messages.create(**kwargs)
    except anthropic.APIStatusError as e:
        body = str(getattr(e, "message", e))
        if e.status_code in (402, 429) and "budget" in body.lower():
            raise session.exhausted("gateway", f"the agent gateway refused: {body}") from None
        session.record("end", outcome="error", error=f"{type(e).__name__}: {body}", spent=session.budget.spent())
        raise
    except anthropic.APIError as e:
        session.record("end", outcome="error", error=f"{type(e).__name__}: {e}", spent=session.budget.spent())
        raise
    usage = resp.usage
    dollars = cost_usd(str(kwargs.get("model")), usage, prices)
    in_tok = int(usage.input_tokens or 0) + int(getattr(usage, "cache_creation_input_tokens", 0) or 0) \
        + int(getattr(usage, "cache_read_input_tokens", 0) or 0)
    session.budget.charge(turns=1, input_tokens=in_tok, output_tokens=int(usage.output_tokens or 0), usd=dollars)
    session.record("response", response=resp.model_dump(mode="json", exclude_none=True), cost_usd=dollars,
                   spent=session.budget.spent())
    return resp

"""One Messages request of an LLM proposer's session, through the ``anthropic`` SDK and the agent gateway.

``request`` makes the request and returns the reply as the JSON the server sent
(never the SDK's model of it, which a weak model's malformed reply could break).
It maps a budget refusal of the gateway (402/429 naming the budget) to
``ProposerBudgetExhausted`` (reason ``gateway``), and records any other API error
as the session's end before re-raising it. ``charge`` books a reply's usage to
the session's ``ProposerBudget`` at the price table (prompt-cache tokens counted
as input), whatever the server put in it. ``send`` is both, plus the reply
recorded in the transcript. Checking the budget before the request is the
caller's: it knows what the session was about to do.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import anthropic

from ..gateway.pricing import tokens_of
from .budget import cost_usd

if TYPE_CHECKING:
    from .agent_tools import AgentSession


def client(cfg: Any) -> anthropic.Anthropic:
    """The SDK client of an LLM proposer's config (``api_key``, ``base_url``, ``max_retries``,
    ``request_timeout_s``): the agent gateway's URL when the loop set it; the key, when none is given, is the
    user's (a real API) or a placeholder (the gateway holds the real one)."""
    key = cfg.api_key or os.environ.get("ANTHROPIC_API_KEY") or "pipemend-gateway"
    return anthropic.Anthropic(base_url=cfg.base_url, api_key=key, max_retries=cfg.max_retries,
                               timeout=cfg.request_timeout_s)


def with_temperature(kwargs: dict[str, Any], temperature: float | None) -> dict[str, Any]:
    """``kwargs`` with the sampling temperature set, when one is given (anthropic>=2's ``create`` has no
    ``temperature`` argument; the API still reads the field, so it goes in the body)."""
    if temperature is not None:
        kwargs["extra_body"] = {**kwargs.get("extra_body", {}), "temperature": temperature}
    return kwargs


def request(session: AgentSession, client: anthropic.Anthropic, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``client.messages.create(**kwargs)`` for ``session``: the reply's JSON object (a body that is no JSON
    object is a reply with ``"content": None`` and the body's start)."""
    try:
        raw = client.messages.with_raw_response.create(**kwargs)
    except anthropic.APIStatusError as e:
        body = str(getattr(e, "message", e))
        if e.status_code in (402, 429) and "budget" in body.lower():
            raise session.exhausted("gateway", f"the agent gateway refused: {body}") from None
        session.record("end", outcome="error", error=f"{type(e).__name__}: {body}", spent=session.budget.spent())
        raise
    except anthropic.APIError as e:
        session.record("end", outcome="error", error=f"{type(e).__name__}: {e}", spent=session.budget.spent())
        raise
    try:
        data = raw.http_response.json()
    except ValueError:
        return {"content": None, "body": raw.http_response.text[:2000]}
    return data if isinstance(data, dict) else {"content": None, "body": json.dumps(data)[:2000]}


def charge(session: AgentSession, model: str, usage: Any, prices: tuple[float, float] | None = None) -> float:
    """Book one turn and ``usage`` (any shape: garbage counts as 0) to the session's budget; the dollars."""
    dollars = cost_usd(model, usage, prices)
    tokens_in, tokens_out = tokens_of(usage)
    session.budget.charge(turns=1, input_tokens=tokens_in, output_tokens=tokens_out, usd=dollars)
    return dollars


def send(session: AgentSession, client: anthropic.Anthropic, kwargs: dict[str, Any], *,
         prices: tuple[float, float] | None = None) -> dict[str, Any]:
    """``request``, charged and recorded: the reply's JSON object."""
    data = request(session, client, kwargs)
    dollars = charge(session, str(kwargs.get("model")), data.get("usage"), prices)
    session.record("response", response=data, cost_usd=dollars, spent=session.budget.spent())
    return data


def reply_text(data: dict[str, Any]) -> str:
    """The text blocks of a reply's JSON, joined (blocks of any other shape are skipped)."""
    blocks = data.get("content")
    return "".join(b["text"] for b in blocks or [] if isinstance(b, dict) and b.get("type") == "text"
                   and isinstance(b.get("text"), str))

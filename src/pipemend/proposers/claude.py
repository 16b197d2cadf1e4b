"""The ``claude`` proposer: an Anthropic tool-use loop over the guarded tools.

One ``propose`` call is one agent session: the system prompt
(``templates/system.md.j2``: ladder, manifest, diagnosis, history) and a tool
set over the candidate's target folder, train runs, train traces, train
examples one by one and the read-only history folder. It ends when the agent
calls ``submit`` with a rationale (a ``Proposal``), calls ``give_up`` (None),
or a limit is spent.

Limits are the harness's (``ProposerBudget``): before each request the turn,
token and dollar counters are checked, and each response's ``usage`` is
charged at ``pipemend.gateway.pricing.PRICES``. When a limit is spent before a valid
submit, ``propose`` raises ``ProposerBudgetExhausted`` (reason ``turns``,
``tokens``, ``usd`` or ``gateway``, and ``.meta`` with the transcript); the
loop records "budget exhausted" and discards the candidate. A submit in the
response that crossed a limit still counts (that response is already paid).

A reply cut short (``stop_reason == "max_tokens"``) is never acted on, nor is a
malformed tool call (unknown tool, input that fails its schema, submit without
rationale, submit with no change in the worktree): the agent is told and the
session goes on.

Transcript: every request (the new messages), response, tool result and notice
is a ``pipemend-transcript-1`` record, kept in ``Proposal.meta["transcript"]``
(and in the exception's ``.meta``) and appended as it happens to
``<transcript_dir>/transcript.jsonl`` when the ``transcript_dir`` option is set;
``{candidate}`` in it is replaced by the candidate index, e.g.
``reports/RUN/candidates/{candidate}``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anthropic
import jinja2
from pydantic import Field

from ..protocols import Proposal, ProposalContext
from . import parse_options
from .agent_tools import ENDING_TOOLS, AgentProposerConfig, AgentSession
from .budget import cost_usd

TEMPLATES = Path(__file__).parent / "templates"


class ClaudeProposerConfig(AgentProposerConfig):
    """Options of the ``claude`` proposer (``get_proposer("claude", **options)``)."""

    max_tokens: int = Field(8192, ge=256, description="max_tokens of each agent response.")
    temperature: float | None = Field(None, ge=0, le=1, description="Sampling temperature; None: the API default.")
    max_retries: int = Field(2, ge=0, description="SDK retries of a failed request.")
    request_timeout_s: float = Field(600.0, gt=0, description="HTTP timeout of one agent request.")


def _aggregate_verdict(verdict: Any) -> dict[str, Any]:
    """Only the scalar aggregates of a verdict (never per-example val ids or outputs)."""
    if not isinstance(verdict, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in verdict.items():
        if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
            out[k] = round(v, 4) if isinstance(v, float) else v
        elif isinstance(v, str) and len(v) <= 200:
            out[k] = v
        elif k == "reasons" and isinstance(v, list):
            out[k] = "; ".join(str(r)[:200] for r in v[:5])
    return out


def render_system_prompt(ctx: ProposalContext, template_path: Path | None = None) -> str:
    path = template_path or TEMPLATES / "system.md.j2"
    # plain Undefined: optional fields of the diagnosis and history may be absent
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(path.parent)),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    m = ctx.manifest
    history = []
    for h in ctx.history or []:
        verdict = h.get("verdict")
        if not isinstance(verdict, dict):  # the loop's flat form: aggregates beside the rationale
            verdict = {k: v for k, v in h.items() if k not in ("n", "index", "rationale", "rung", "meta", "accepted")}
        history.append({
            "index": h.get("index", h.get("n")),
            "rung": h.get("rung"),
            "rationale": str(h.get("rationale") or ""),
            "accepted": bool(h.get("accepted", verdict.get("accepted") if isinstance(verdict, dict) else False)),
            "verdict": _aggregate_verdict(verdict),
        })
    diagnosis = ctx.diagnosis or {}
    return env.get_template(path.name).render(
        manifest=m,
        metric=m.metric,
        editable=m.editable,
        protected=m.all_protected(),
        knobs={name: k.model_dump() for name, k in (m.knobs or {}).items()},
        diagnosis={k: diagnosis.get(k) for k in ("counts", "recommended", "ids")} if diagnosis else {},
        history=history,
        history_dir=ctx.history_dir,
        candidate_index=ctx.candidate_index,
    )


class ClaudeProposer:
    name = "claude"

    def __init__(self, **options: Any):
        self.config = parse_options(ClaudeProposerConfig, options, "claude")

    def client(self) -> Any:
        key = self.config.api_key or os.environ.get("ANTHROPIC_API_KEY") or "pipemend-gateway"
        return anthropic.Anthropic(base_url=self.config.base_url, api_key=key,
                                   max_retries=self.config.max_retries, timeout=self.config.request_timeout_s)

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        return _Session(self, ctx).run()


class _Session(AgentSession):
    """One agent session for one candidate."""

    proposer_name = "claude"

    def __init__(self, proposer: ClaudeProposer, ctx: ProposalContext):
        super().__init__(ctx, model=proposer.config.model, transcript_dir=proposer.config.transcript_dir,
                         max_tool_output_chars=proposer.config.max_tool_output_chars)
        self.cfg = proposer.config
        self.proposer = proposer

    # ----------------------------------------------------------------- the loop

    def run(self) -> Proposal | None:
        ctx = self.ctx
        system = render_system_prompt(ctx, Path(self.cfg.system_template) if self.cfg.system_template else None)
        tools = self.box.defs()
        self.record("start", model=self.cfg.model, system=system, tools=[t["name"] for t in tools],
                    budget=self.budget.model_dump())
        messages: list[dict[str, Any]] = [{"role": "user", "content": (
            f"Propose one change for candidate {ctx.candidate_index}. There are {len(self.train)} train examples. "
            "Start from the diagnosis, read failing traces, make one scoped change, check it on train, then submit."
        )}]
        client = self.proposer.client()
        sent = 0
        while True:
            reason = self.budget.exhausted()
            if reason:
                raise self.exhausted(reason, f"proposer budget exhausted before submit ({reason}): {self.budget.describe()}")
            self.turn += 1
            self.record("request", new_messages=messages[sent:])
            sent = len(messages)
            kwargs: dict[str, Any] = {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens,
                                      "system": system, "tools": tools, "messages": messages}
            if self.cfg.temperature is not None:
                kwargs["temperature"] = self.cfg.temperature
            try:
                resp = client.messages.create(**kwargs)
            except anthropic.APIStatusError as e:
                body = str(getattr(e, "message", e))
                if e.status_code in (402, 429) and "budget" in body.lower():
                    raise self.exhausted("gateway", f"the agent gateway refused: {body}") from None
                self.record("end", outcome="error", error=f"{type(e).__name__}: {body}", spent=self.budget.spent())
                raise
            except anthropic.APIError as e:
                self.record("end", outcome="error", error=f"{type(e).__name__}: {e}", spent=self.budget.spent())
                raise
            usage = resp.usage
            dollars = cost_usd(self.cfg.model, usage, self.cfg.price_per_mtok)
            in_tok = int(usage.input_tokens or 0) + int(getattr(usage, "cache_creation_input_tokens", 0) or 0) \
                + int(getattr(usage, "cache_read_input_tokens", 0) or 0)
            self.budget.charge(turns=1, input_tokens=in_tok, output_tokens=int(usage.output_tokens or 0), usd=dollars)
            self.record("response", response=resp.model_dump(mode="json", exclude_none=True), cost_usd=dollars,
                        spent=self.budget.spent())
            content = [self._block(b) for b in resp.content]
            messages.append({"role": "assistant", "content": content})
            uses = [b for b in content if b.get("type") == "tool_use"]

            if resp.stop_reason == "max_tokens":
                note = ("Your reply was cut off at max_tokens, so none of its tool calls were run. "
                        "Send a shorter reply: smaller edits, one tool call at a time.")
                self.record("notice", message=note)
                messages.append({"role": "user", "content": [
                    *({"type": "tool_result", "tool_use_id": u["id"], "is_error": True, "content": note} for u in uses),
                    *([] if uses else [{"type": "text", "text": note}]),
                ]})
                continue
            if not uses:
                note = "Use the tools to work on the change, then call `submit` (or `give_up` if nothing is worth trying)."
                self.record("notice", message=note)
                messages.append({"role": "user", "content": note})
                continue

            results: list[dict[str, Any]] = []
            for use in uses:
                name, args = use["name"], use.get("input") or {}
                if name in ENDING_TOOLS:
                    outcome = self._finish(name, args)
                    if isinstance(outcome, str):
                        results.append({"type": "tool_result", "tool_use_id": use["id"], "is_error": True,
                                        "content": outcome})
                        self.record("tool", name=name, input=args, output=outcome, is_error=True, tool_use_id=use["id"])
                        continue
                    return outcome
                results.append(self._call(use))
            messages.append({"role": "user", "content": results})

    @staticmethod
    def _block(block: Any) -> dict[str, Any]:
        if block.type == "text":
            return {"type": "text", "text": block.text}
        if block.type == "tool_use":
            return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
        return block.model_dump(mode="json", exclude_none=True)

    # ----------------------------------------------------------------- tools

    def _call(self, use: dict[str, Any]) -> dict[str, Any]:
        name, args = use["name"], use.get("input") or {}
        started = time.monotonic()
        output, is_error = self.box.call(name, args)
        self.record("tool", name=name, input=args, output=output, is_error=is_error, tool_use_id=use["id"],
                    duration_s=round(time.monotonic() - started, 3))
        result = {"type": "tool_result", "tool_use_id": use["id"], "content": output}
        if is_error:
            result["is_error"] = True
        return result

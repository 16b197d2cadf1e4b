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

A weak model cannot crash a session. The reply is read from the JSON the
server sent, never trusted: blocks that are no objects, tool calls without an
id, a name or an object input, and inputs past ``max_tool_input_chars`` are
refused, and what goes back in the next request is always well formed (unique
ids, valid names, object inputs, the oversized ones dropped, an empty reply as
``(empty reply)``); garbage ``usage`` counts nothing. A reply cut short
(``stop_reason == "max_tokens"``) is never acted on, nor is a malformed tool
call (unknown tool, input that fails its schema, submit without rationale,
submit with no change in the worktree), nor an edit that breaks a Python file
or a Jinja2 template (``tools.EditRejected``): the agent is told and the
session goes on. Each of these is counted (``Toolbox.FLAGS`` and the session's
``idle_replies``, ``truncated_replies``, ``malformed_block``,
``malformed_reply``, ``oversized_text``): in the ``tool``/``response`` records'
``flags``/``problems``, the ``end`` record's ``counters`` and
``meta["agent_counters"]``.

The harness ends a session going nowhere by raising ``AgentSessionEnded``
(the loop refuses the candidate with reason ``proposer_ended`` and goes on):
``looping`` (the same call ``max_repeated_calls`` times with no file changed
in between, or ``max_session_repeats`` times in the session), ``malformed``
(``max_malformed_calls`` malformed or unknown calls in a row), ``no_submit``
(``max_idle_replies`` replies in a row without a tool call run). The last
turn is announced to the agent; a turn budget spent without a submit is
``ProposerBudgetExhausted("turns")``.

Transcript: every request (the new messages), response, tool result and notice
is a ``pipemend-transcript-1`` record, kept in ``Proposal.meta["transcript"]``
(and in the exception's ``.meta``) and appended as it happens to
``<transcript_dir>/transcript.jsonl`` when the ``transcript_dir`` option is set;
``{candidate}`` in it is replaced by the candidate index, e.g.
``reports/RUN/candidates/{candidate}``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

import anthropic
import jinja2
from pydantic import Field

from ..protocols import Proposal, ProposalContext
from . import agent_call, parse_options
from .agent_call import with_temperature
from .agent_tools import ENDING_TOOLS, AgentProposerConfig, AgentSession, json_size

TEMPLATES = Path(__file__).parent / "templates"


class ClaudeProposerConfig(AgentProposerConfig):
    """Options of the ``claude`` proposer (``get_proposer("claude", **options)``)."""

    max_tokens: int = Field(8192, ge=256, description="max_tokens of each agent response.")
    temperature: float | None = Field(None, ge=0, le=1, description="Sampling temperature; None: the API default.")
    max_retries: int = Field(2, ge=0, description="SDK retries of a failed request.")
    request_timeout_s: float = Field(600.0, gt=0, description="HTTP timeout of one agent request.")
    tool_choice: Literal["auto", "any"] | None = Field(
        None, description="`any`: every reply is a tool call, with no text before it; `auto`: the model may reply "
                          "in text. None: `any` for a `local/` model (a small model writes hundreds of tokens of "
                          "its instructions back before each call, minutes a turn on a CPU), `auto` otherwise.")

    def effective_tool_choice(self) -> str:
        return self.tool_choice or ("any" if self.model.startswith("local/") else "auto")


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
    editable_files = _editable_files(ctx)
    return env.get_template(path.name).render(
        manifest=m,
        metric=m.metric_label(),
        editable=m.editable,
        editable_files=editable_files[:MAX_LISTED_FILES], editable_more=len(editable_files) > MAX_LISTED_FILES,
        protected=m.all_protected(),
        knobs={name: k.model_dump() for name, k in (m.knobs or {}).items()},
        diagnosis={k: diagnosis.get(k) for k in ("counts", "recommended", "ids", "errors", "error_ids", "unattributed",
                                                   "unattributed_ids")} if diagnosis else {},
        history=history,
        in_flight=[{"n": f.get("n"), "rung": f.get("rung"), "rationale": str(f.get("rationale") or "")}
                   for f in ctx.in_flight or []],
        history_dir=ctx.history_dir,
        candidate_index=ctx.candidate_index,
    )


MAX_LISTED_FILES = 40


def _editable_files(ctx: ProposalContext) -> list[str]:
    """The files of the worktree the agent may edit (named in its prompt: a small model otherwise invents paths)."""
    tools = getattr(ctx, "tools", None)
    if tools is None:
        return []
    try:
        return [p for p in tools.list_files() if tools.is_writable(p)]
    except Exception:  # noqa: BLE001 - a listing that fails leaves the prompt without it; the tools still work
        return []


def opening(ctx: ProposalContext, n_train: int) -> str:
    """The session's first user message: the task, and where to start (a failing example of the recommended
    rung, by id: a small model given only "read failing traces" called other tools first)."""
    diagnosis = ctx.diagnosis or {}
    rung = diagnosis.get("recommended")
    ids = (diagnosis.get("ids") or {}).get(rung) if isinstance(diagnosis.get("ids"), dict) else None
    start = (f"Start by calling `read_trace` on `{ids[0]}`, a failing train example at the recommended rung "
             f"({rung}); then read the file that step used, " if isinstance(ids, list) and ids
             else "Start from the diagnosis, read failing traces, ")
    return (f"Propose one change for candidate {ctx.candidate_index}. There are {n_train} train examples. "
            f"{start}make one scoped change, check it on train, then submit.")


class ClaudeProposer:
    name = "claude"

    def __init__(self, **options: Any):
        self.config = parse_options(ClaudeProposerConfig, options, "claude")

    def client(self) -> anthropic.Anthropic:
        return agent_call.client(self.config)

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        return _Session(self, ctx).run()


class _Session(AgentSession):
    """One agent session for one candidate."""

    proposer_name = "claude"

    def __init__(self, proposer: ClaudeProposer, ctx: ProposalContext):
        super().__init__(ctx, model=proposer.config.model, transcript_dir=proposer.config.transcript_dir,
                         max_tool_output_chars=proposer.config.max_tool_output_chars, config=proposer.config)
        self.cfg = proposer.config
        self.proposer = proposer
        self.idle = 0
        """Replies in a row with no tool call run (text only, empty, cut off)."""

    # ----------------------------------------------------------------- the loop

    def run(self) -> Proposal | None:
        ctx = self.ctx
        system = render_system_prompt(ctx, Path(self.cfg.system_template) if self.cfg.system_template else None)
        tools = self.box.defs()
        self.record("start", model=self.cfg.model, system=system, tools=[t["name"] for t in tools],
                    budget=self.budget.model_dump(),
                    limits={k: getattr(self.cfg, k) for k in ("max_tool_input_chars", "max_tool_output_chars",
                                                               "max_repeated_calls", "max_session_repeats",
                                                               "max_malformed_calls", "max_idle_replies")})
        messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": opening(
            ctx, len(self.train))}]}]
        client = self.proposer.client()
        sent = 0
        while True:
            reason = self.budget.exhausted()
            if reason:
                raise self.exhausted(reason, f"proposer budget exhausted before submit ({reason}): {self.budget.describe()}"
                                     + (": no submit within the turn limit" if reason == "turns" else ""))
            if self.budget.max_turns - self.budget.turns == 1:
                _tell(messages, "This is your last turn: call `submit` now if the worktree holds your change, "
                                "else `give_up`.")
            self.turn += 1
            self.record("request", new_messages=messages[sent:])
            sent = len(messages)
            kwargs: dict[str, Any] = {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens,
                                      "system": system, "tools": tools, "messages": messages}
            if self.cfg.effective_tool_choice() == "any":
                kwargs["tool_choice"] = {"type": "any"}
            data = agent_call.request(self, client, with_temperature(kwargs, self.cfg.temperature))
            dollars = agent_call.charge(self, self.cfg.model, data.get("usage"), self.cfg.price_per_mtok)
            content, uses, problems = self._read_reply(data)
            self.counts.update(problems)
            self.record("response", response=self._recordable(data, content), cost_usd=dollars,
                        spent=self.budget.spent(), **({"problems": problems} if problems else {}))
            messages.append({"role": "assistant", "content": content})

            if data.get("stop_reason") == "max_tokens" or not uses:
                self.idle += 1
                cut = data.get("stop_reason") == "max_tokens"
                self.counts["truncated_replies" if cut else "idle_replies"] += 1
                if self.idle >= self.cfg.max_idle_replies:
                    raise self.ended("no_submit", f"{self.idle} replies in a row without a tool call run (text only, "
                                                  "empty or cut off at max_tokens); nothing was submitted")
                note = ("Your reply was cut off at max_tokens, so none of its tool calls were run. "
                        "Send a shorter reply: smaller edits, one tool call at a time." if cut else
                        "Use the tools to work on the change, then call `submit` (or `give_up` if nothing is worth "
                        "trying).")
                self.record("notice", message=note)
                messages.append({"role": "user", "content": [
                    *({"type": "tool_result", "tool_use_id": u["id"], "is_error": True, "content": note} for u in uses),
                    {"type": "text", "text": note},
                ]})
                continue
            self.idle = 0

            results: list[dict[str, Any]] = []
            for use in uses:
                name, args = use["name"], use["input"]
                if name in ENDING_TOOLS:
                    outcome = self._finish(name, args)
                    if not isinstance(outcome, str):
                        return outcome
                    results.append({"type": "tool_result", "tool_use_id": use["id"], "is_error": True,
                                    "content": outcome})
                    self.record("tool", name=name, input=self._shown(args), output=outcome, is_error=True,
                                tool_use_id=use["id"], flags=self.box.last_flags)
                else:
                    results.append(self._call(use))
                if self.box.ending is not None:
                    raise self.ended(*self.box.ending)
            messages.append({"role": "user", "content": results})

    def _read_reply(self, data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """The reply's content as it is sent back in the next request (well formed whatever came: an empty reply,
        blocks that are no objects, tool calls without an id, a name or an object input, inputs past the cap),
        the tool calls as the agent made them (their id is the echoed one) and what was wrong with it."""
        blocks = data.get("content")
        problems: list[str] = []
        if not isinstance(blocks, list):
            blocks = []
            problems.append("malformed_reply")
        content: list[dict[str, Any]] = []
        uses: list[dict[str, Any]] = []
        ids: set[str] = set()
        cap = self.cfg.max_tool_input_chars
        for i, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text = block.get("text")
                if isinstance(text, str) and text.strip():
                    if len(text) > cap:
                        problems.append("oversized_text")
                        text = text[:cap] + f"\n... [cut: {len(text) - cap} more characters]"
                    content.append({"type": "text", "text": text})
            elif kind == "tool_use":
                uid = block.get("id")
                if not isinstance(uid, str) or not _ID.fullmatch(uid) or uid in ids:
                    uid = f"toolu_pipemend_{self.turn}_{i}"
                ids.add(uid)
                name, args = block.get("name"), block.get("input")
                echo_name = name if isinstance(name, str) and _NAME.fullmatch(name) else "invalid_tool_name"
                echo_args = args if isinstance(args, dict) and json_size(args) <= cap else {}
                content.append({"type": "tool_use", "id": uid, "name": echo_name, "input": echo_args})
                uses.append({"id": uid, "name": name, "input": args})
            elif kind in ("thinking", "redacted_thinking") and json_size(block) <= cap:
                content.append(block)
            else:
                problems.append("malformed_block")
        if not content:
            content.append({"type": "text", "text": "(empty reply)"})
        return content, uses, problems

    def _recordable(self, data: dict[str, Any], content: list[dict[str, Any]]) -> dict[str, Any]:
        """The reply for the transcript: as it came, or with its content as echoed when it is too large."""
        if json_size(data) <= 2 * self.cfg.max_tool_input_chars:
            return data
        return {**{k: v for k, v in data.items() if k != "content" and json_size(v) <= 10_000}, "content": content,
                "clipped": f"the reply was {json_size(data)} characters; its content is recorded as it was sent back"}

    # ----------------------------------------------------------------- tools

    def _shown(self, args: Any) -> Any:
        """A call's input for the transcript (an oversized one is only named)."""
        return args if json_size(args) <= self.cfg.max_tool_input_chars else "(oversized)"

    def _call(self, use: dict[str, Any]) -> dict[str, Any]:
        name, args = use["name"], use["input"]
        started = time.monotonic()
        output, is_error = self.box.call(name, args)
        self.record("tool", name=name, input=self._shown(args), output=output, is_error=is_error, tool_use_id=use["id"], flags=self.box.last_flags,
                    duration_s=round(time.monotonic() - started, 3))
        result = {"type": "tool_result", "tool_use_id": use["id"], "content": output}
        if is_error:
            result["is_error"] = True
        return result


_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _tell(messages: list[dict[str, Any]], text: str) -> None:
    """Add a text block to the last (user) message."""
    last = messages[-1]
    if isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"]}]
    last["content"].append({"type": "text", "text": text})

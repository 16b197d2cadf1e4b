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

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError
from ..fsutil import append_jsonl
from ..protocols import Proposal, ProposalContext
from .budget import ProposerBudget, ProposerBudgetExhausted, cost_usd
from .tools import ReadOnlyTree, ToolError

TRANSCRIPT_FORMAT = "pipemend-transcript-1"
TEMPLATES = Path(__file__).parent / "templates"


class ClaudeProposerConfig(BaseModel):
    """Options of the ``claude`` proposer (``get_proposer("claude", **options)``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("claude-sonnet-4-5", description="Model of the agent (not of the pipeline).")
    base_url: str | None = Field(None, description="Messages API base URL; the loop passes the agent-side gateway.")
    api_key: str | None = Field(None, description="API key; default $ANTHROPIC_API_KEY, else a dummy for a gateway.")
    max_tokens: int = Field(8192, ge=256, description="max_tokens of each agent response.")
    temperature: float | None = Field(None, ge=0, le=1, description="Sampling temperature; None: the API default.")
    max_retries: int = Field(2, ge=0, description="SDK retries of a failed request.")
    request_timeout_s: float = Field(600.0, gt=0, description="HTTP timeout of one agent request.")
    transcript_dir: str | None = Field(None, description="Folder for transcript.jsonl; `{candidate}` is replaced.")
    max_tool_output_chars: int = Field(20_000, ge=1000, description="Cap on one tool result sent to the agent.")
    system_template: str | None = Field(None, description="A Jinja2 file replacing templates/system.md.j2.")
    price_per_mtok: tuple[float, float] | None = Field(
        None, description="(input, output) dollars per million tokens of `model`; default: the price table."
    )


# --------------------------------------------------------------------------- tool inputs (schemas + validation)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListFilesIn(_In):
    glob: str = Field("**/*", description="Glob relative to the target folder; ** spans folders.")


class ReadFileIn(_In):
    path: str = Field(description="Path relative to the target folder.")
    start_line: int | None = Field(None, ge=1, description="First line (1-based).")
    end_line: int | None = Field(None, ge=1, description="Last line (inclusive).")


class SearchIn(_In):
    pattern: str = Field(description="Python regular expression matched against each line.")
    glob: str | None = Field(None, description="Only files matching this glob.")


class EditFileIn(_In):
    path: str = Field(description="Path relative to the target folder (must be editable).")
    old: str = Field(min_length=1, description="Exact text to replace; must occur exactly once.")
    new: str = Field(description="Replacement text.")


class WriteFileIn(_In):
    path: str = Field(description="Path relative to the target folder (must be editable).")
    content: str = Field(description="The whole new content of the file.")


class RunTrainIn(_In):
    ids: list[str] | None = Field(None, description="Train example ids; omit to run all train examples.")


class ExampleIdIn(_In):
    id: str = Field(description="A train example id.")


class NoIn(_In):
    pass


class ListTrainIn(_In):
    offset: int = Field(0, ge=0, description="Skip this many ids.")
    limit: int = Field(50, ge=1, le=500, description="Return at most this many ids.")


class SubmitIn(_In):
    rationale: str = Field(min_length=1, description="What you changed, which failures it targets, and why.")
    rung: Literal["prompt", "retrieval", "context", "model"] = Field(description="The ladder rung of the change.")


class GiveUpIn(_In):
    reason: str = Field(min_length=1, description="Why there is nothing worth trying.")


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            node.pop("title", None)
            if "anyOf" in node and {"type": "null"} in node["anyOf"]:
                rest = [s for s in node.pop("anyOf") if s != {"type": "null"}]
                node.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
            for v in node.values():
                clean(v)
        elif isinstance(node, list):
            for v in node:
                clean(v)
        return node

    clean(schema)
    schema.setdefault("properties", {})
    schema["additionalProperties"] = False
    return schema


TOOL_SPECS: dict[str, tuple[type[BaseModel], str]] = {
    "list_files": (ListFilesIn, "List files of the target folder, each marked editable, read-only or protected."),
    "read_file": (ReadFileIn, "Read a file (numbered lines) of the target folder; protected files are refused."),
    "search": (SearchIn, "Search the target folder's readable files with a regex; returns path:line:text."),
    "edit_file": (EditFileIn, "Replace one exact, unique occurrence of `old` by `new` in an editable file."),
    "write_file": (WriteFileIn, "Create or overwrite an editable file with `content`."),
    "run_train": (RunTrainIn, "Run the candidate on train examples (some ids, or all) and get per-example scores."),
    "read_trace": (ExampleIdIn, "The latest train trace of one example in this candidate, step by step."),
    "diagnose": (NoIn, "Re-run the failure diagnosis of this candidate on train: failures per ladder rung."),
    "show_diff": (NoIn, "The diff of the candidate against the base so far."),
    "list_train_examples": (ListTrainIn, "Ids of the train examples (paged)."),
    "show_train_example": (ExampleIdIn, "One train example: id, inputs, expected answer, gold evidence ids."),
    "history_list": (ListFilesIn, "List files of the read-only history folder of earlier candidates."),
    "history_read": (ReadFileIn, "Read a file of the history folder (diffs, rationales, verdicts, traces)."),
    "history_search": (SearchIn, "Search the history folder with a regex."),
    "submit": (SubmitIn, "Submit the change now in the worktree as this candidate, with its rationale and rung."),
    "give_up": (GiveUpIn, "End without a candidate when nothing worth trying is left."),
}


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
    import jinja2

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
        try:
            self.config = ClaudeProposerConfig(**options)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise UsageError(f"claude proposer option {where!r}: {first.get('msg')}") from None

    def client(self) -> Any:
        import anthropic

        key = self.config.api_key or os.environ.get("ANTHROPIC_API_KEY") or "pipemend-gateway"
        return anthropic.Anthropic(base_url=self.config.base_url, api_key=key,
                                   max_retries=self.config.max_retries, timeout=self.config.request_timeout_s)

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        return _Session(self, ctx).run()


class _Session:
    """One agent session for one candidate."""

    def __init__(self, proposer: ClaudeProposer, ctx: ProposalContext):
        self.cfg = proposer.config
        self.proposer = proposer
        self.ctx = ctx
        self.tools = ctx.tools
        self.budget: ProposerBudget = ctx.budget if ctx.budget is not None else ProposerBudget()
        self.history = ReadOnlyTree(ctx.history_dir) if ctx.history_dir and Path(ctx.history_dir).is_dir() else None
        self.train = {str(ex["id"]): ex for ex in ctx.train_examples}
        self.transcript: list[dict[str, Any]] = []
        self.transcript_path: Path | None = None
        if self.cfg.transcript_dir:
            folder = Path(self.cfg.transcript_dir.replace("{candidate}", str(ctx.candidate_index)))
            self.transcript_path = folder / "transcript.jsonl"
        self.turn = 0

    # ----------------------------------------------------------------- bookkeeping

    def record(self, event: str, **fields: Any) -> None:
        rec = {"format": TRANSCRIPT_FORMAT, "t": time.time(), "candidate": self.ctx.candidate_index,
               "turn": self.turn, "event": event, **fields}
        self.transcript.append(rec)
        if self.transcript_path is not None:
            append_jsonl(self.transcript_path, rec)

    def meta(self, outcome: str) -> dict[str, Any]:
        meta = {"proposer": "claude", "model": self.cfg.model, "outcome": outcome,
                **{f"agent_{k}": v for k, v in self.budget.spent().items()}, "transcript": self.transcript}
        if self.transcript_path is not None:
            meta["transcript_path"] = str(self.transcript_path)
        return meta

    def tool_defs(self) -> list[dict[str, Any]]:
        names = [n for n in TOOL_SPECS if self.history is not None or not n.startswith("history_")]
        return [{"name": n, "description": TOOL_SPECS[n][1], "input_schema": _schema(TOOL_SPECS[n][0])}
                for n in names]

    def exhausted(self, reason: str, message: str) -> ProposerBudgetExhausted:
        self.record("end", outcome="budget_exhausted", reason=reason, message=message, spent=self.budget.spent())
        return ProposerBudgetExhausted(reason, message, self.meta("budget_exhausted"))

    # ----------------------------------------------------------------- the loop

    def run(self) -> Proposal | None:
        import anthropic

        ctx = self.ctx
        system = render_system_prompt(ctx, Path(self.cfg.system_template) if self.cfg.system_template else None)
        tools = self.tool_defs()
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
                if name in ("submit", "give_up"):
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

    # ----------------------------------------------------------------- ending

    def _finish(self, name: str, args: Any) -> Proposal | None | str:
        """The session's result, or a string telling the agent why its submit was refused."""
        spec = TOOL_SPECS[name][0]
        try:
            parsed = spec.model_validate(args)
        except ValidationError as e:
            return f"{name} refused: {_explain(e)}"
        if name == "give_up":
            self.record("end", outcome="gave_up", reason=parsed.reason, spent=self.budget.spent())
            self.ctx.log(f"claude proposer gave up: {parsed.reason}")
            return None
        if not parsed.rationale.strip():
            return "submit refused: the rationale is empty; say what you changed and why"
        try:
            diff = self.tools.show_diff()
        except ToolError as e:
            return f"submit refused: could not compute the diff ({e})"
        if not diff.strip():
            return "submit refused: the worktree has no change yet; edit a file first"
        self.record("end", outcome="submitted", rationale=parsed.rationale, rung=parsed.rung,
                    spent=self.budget.spent())
        meta = self.meta("submitted")
        meta["files_written"] = list(getattr(self.tools, "written", []))
        return Proposal(rationale=parsed.rationale.strip(), rung=parsed.rung, meta=meta)

    # ----------------------------------------------------------------- tools

    def _call(self, use: dict[str, Any]) -> dict[str, Any]:
        name, args = use["name"], use.get("input") or {}
        started = time.monotonic()
        is_error = False
        handler: Callable[[Any], str] | None = getattr(self, f"_t_{name}", None)
        if name not in TOOL_SPECS or handler is None or (name.startswith("history_") and self.history is None):
            valid = ", ".join(t["name"] for t in self.tool_defs())
            output, is_error = f"unknown tool {name!r}; the tools are: {valid}", True
        else:
            try:
                parsed = TOOL_SPECS[name][0].model_validate(args)
                output = handler(parsed)
            except ValidationError as e:
                output, is_error = f"bad input for {name}: {_explain(e)}", True
            except ToolError as e:
                output, is_error = f"{name} refused: {e}", True
            except Exception as e:  # noqa: BLE001 - a tool fault is the agent's information, not a crash
                output, is_error = f"{name} failed: {type(e).__name__}: {e}", True
        cap = self.cfg.max_tool_output_chars
        if len(output) > cap:
            output = output[:cap] + f"\n... [truncated: {len(output) - cap} more characters]"
        self.record("tool", name=name, input=args, output=output, is_error=is_error, tool_use_id=use["id"],
                    duration_s=round(time.monotonic() - started, 3))
        result = {"type": "tool_result", "tool_use_id": use["id"], "content": output}
        if is_error:
            result["is_error"] = True
        return result

    def _t_list_files(self, a: ListFilesIn) -> str:
        files = self.tools.list_files(a.glob)
        return "\n".join(f"{f}  [{self.tools.describe(f)}]" for f in files) or "(no files match)"

    def _t_read_file(self, a: ReadFileIn) -> str:
        return self.tools.read_file(a.path, a.start_line, a.end_line, numbered=True)

    def _t_search(self, a: SearchIn) -> str:
        return "\n".join(self.tools.search(a.pattern, a.glob)) or "(no matches)"

    def _t_edit_file(self, a: EditFileIn) -> str:
        return self.tools.edit_file(a.path, a.old, a.new)

    def _t_write_file(self, a: WriteFileIn) -> str:
        return self.tools.write_file(a.path, a.content)

    def _check_train_id(self, example_id: str) -> None:
        if example_id not in self.train:
            raise ToolError(f"{example_id!r} is not a train example id (see list_train_examples)")

    def _t_run_train(self, a: RunTrainIn) -> str:
        for i in a.ids or []:
            self._check_train_id(i)
        rows = self.tools.run_train(a.ids or None)
        if not rows:
            return "no results"
        scores = [float(r.get("score") or 0.0) for r in rows]
        lines = [f"mean {self.ctx.manifest.metric} = {sum(scores) / len(scores):.3f} over {len(rows)} train examples"]
        for r in rows:
            out = json.dumps(r.get("output"), ensure_ascii=False, default=str)
            line = f"- {r.get('id')}: score={float(r.get('score') or 0.0):.3f} output={out[:200]}"
            if r.get("error"):
                err = r["error"]
                line += f" error={(err.get('message') if isinstance(err, dict) else err)!s:.200}"
            if r.get("timed_out"):
                line += " TIMED OUT"
            lines.append(line)
        return "\n".join(lines)

    def _t_read_trace(self, a: ExampleIdIn) -> str:
        self._check_train_id(a.id)
        return self.tools.read_trace(a.id, max_chars=self.cfg.max_tool_output_chars)

    def _t_diagnose(self, a: NoIn) -> str:
        return json.dumps(self.tools.diagnose(), indent=1, default=str)

    def _t_show_diff(self, a: NoIn) -> str:
        return self.tools.show_diff() or "(no changes yet)"

    def _t_list_train_examples(self, a: ListTrainIn) -> str:
        ids = sorted(self.train)
        page = ids[a.offset : a.offset + a.limit]
        more = len(ids) - a.offset - len(page)
        return "\n".join(page) + (f"\n... ({more} more; use offset)" if more > 0 else "") if page else "(none)"

    def _t_show_train_example(self, a: ExampleIdIn) -> str:
        self._check_train_id(a.id)
        ex = self.train[a.id]
        shown = {k: ex.get(k) for k in ("id", "inputs", "expected", "evidence")}
        return json.dumps(shown, indent=1, ensure_ascii=False, default=str)

    def _t_history_list(self, a: ListFilesIn) -> str:
        return "\n".join(self.history.list_files(a.glob)) or "(no files match)"

    def _t_history_read(self, a: ReadFileIn) -> str:
        return self.history.read_file(a.path, a.start_line, a.end_line, numbered=True)

    def _t_history_search(self, a: SearchIn) -> str:
        return "\n".join(self.history.search(a.pattern, a.glob)) or "(no matches)"


def _explain(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}" for err in e.errors())

"""The agent proposers' tools, shared by ``claude`` (an Anthropic tool-use loop) and ``claude-code`` (an MCP server).

Each tool is a pydantic input model (its JSON schema is what the agent sees;
a validation error is what it gets back when its input is wrong) and a handler
over the guarded ``ProposerTools`` (target folder, train runs, traces,
diagnosis, diff), the read-only history folder and the train examples. Val and
test never appear here. ``submit`` and ``give_up`` end a session; the session
asks ``Toolbox.finish`` whether the call is acceptable.

``AgentProposerConfig`` holds the options both agent proposers take, and
``AgentSession`` what both keep per session: toolbox, budget, transcript and
the ending (a ``Proposal``, or None for ``give_up``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BudgetReason, PipemendError
from ..fsutil import append_jsonl
from ..protocols import Proposal, ProposalContext
from .budget import ProposerBudget, ProposerBudgetExhausted
from .tools import EditRejected, ReadOnlyTree, ToolError

ENDING_TOOLS = ("submit", "give_up")
TRANSCRIPT_FORMAT = "pipemend-transcript-1"

EndReason = Literal["looping", "malformed", "no_submit"]
"""Why the harness ended a session that was going nowhere: the same call over and over (``looping``), malformed
or unknown calls in a row (``malformed``), replies in a row with no tool call at all (``no_submit``)."""
FLAGS = ("malformed", "unknown_tool", "oversized_input", "repeated", "rejected_edit", "refused_submit",
         "oversized_output")
"""What ``Toolbox`` counts of the calls it is given (``counts``): each a transcript counter."""


class AgentSessionEnded(PipemendError):
    """The harness ended an agent session before a submit (``reason``: an ``EndReason``).

    Not a crash and not a spent budget: the optimize loop records the candidate as ended with the reason
    (``proposer_ended``), keeps its transcript (``meta``) and goes on with the next candidate. The worktree may
    hold partial edits: the loop discards them.
    """

    def __init__(self, reason: EndReason, message: str, meta: dict[str, Any] | None = None):
        super().__init__(message)
        self.reason: EndReason = reason
        self.meta: dict[str, Any] = dict(meta or {})


def json_size(value: Any) -> int:
    """Characters of ``value`` as JSON (what it costs to send it back to the agent)."""
    try:
        return len(json.dumps(value, default=str))
    except (TypeError, ValueError, RecursionError):
        return len(repr(value))


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


def tool_schema(model: type[BaseModel]) -> dict[str, Any]:
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


class Toolbox:
    """The tools of one proposer session over one candidate.

    ``call`` never raises: whatever the agent sends (a name that is no tool, an input that is no object or
    fails its schema, an input past ``max_input_chars``, an edit that breaks a file) comes back as an error
    string for the agent. Each such call is counted in ``counts`` (``FLAGS``), and the flags of the last call
    are in ``last_flags``. Two patterns end the session: the same call (tool and input) made
    ``max_repeated_calls`` times with no file changed in between, or ``max_session_repeats`` times in the
    session whatever changed (an edit and a train run in a cycle that goes nowhere: a small model's habit),
    both ``looping``; and ``max_malformed_calls`` malformed or unknown calls in a row (``malformed``).
    ``ending`` then holds ``(reason, message)`` and the session stops (``AgentSessionEnded``).
    """

    def __init__(self, ctx: ProposalContext, *, max_output_chars: int = 20_000, max_input_chars: int = 200_000,
                 max_repeated_calls: int = 4, max_malformed_calls: int = 5, max_session_repeats: int = 8):
        self.ctx = ctx
        self.tools = ctx.tools
        self.max_output_chars = max_output_chars
        self.max_input_chars = max_input_chars
        self.max_repeated_calls = max_repeated_calls
        self.max_malformed_calls = max_malformed_calls
        self.max_session_repeats = max_session_repeats
        self.history = ReadOnlyTree(ctx.history_dir) if ctx.history_dir and Path(ctx.history_dir).is_dir() else None
        self.train = {str(ex["id"]): ex for ex in ctx.train_examples}
        self.counts: Counter[str] = Counter()
        self.last_flags: list[str] = []
        self.ending: tuple[EndReason, str] | None = None
        self._seen: Counter[str] = Counter()
        self._seen_in_session: Counter[str] = Counter()
        self._repeats = 0
        self._malformed_streak = 0

    def names(self) -> list[str]:
        return [n for n in TOOL_SPECS if self.history is not None or not n.startswith("history_")]

    def defs(self) -> list[dict[str, Any]]:
        """``{name, description, input_schema}`` of each tool this session has."""
        return [{"name": n, "description": TOOL_SPECS[n][1], "input_schema": tool_schema(TOOL_SPECS[n][0])}
                for n in self.names()]

    def call(self, name: Any, args: Any) -> tuple[str, bool]:
        """Run one (non-ending) tool: its output, capped, and whether it is an error for the agent."""
        if self.ending is not None:  # a session the harness ended runs nothing more (whatever its client does)
            return f"session ended by the harness: {self.ending[1]}", True
        flags: list[str] = []
        output, is_error = self._screen(name, args, flags), True
        if output is None:
            handler: Callable[[Any], str] = getattr(self, f"_t_{name}")
            try:
                output, is_error = handler(TOOL_SPECS[name][0].model_validate(args or {})), False
            except ValidationError as e:
                flags.append("malformed")
                output = f"bad input for {name}: {explain(e)}"
            except EditRejected as e:
                flags.append("rejected_edit")
                output = f"{name} rejected: {e}"
            except ToolError as e:
                output = f"{name} refused: {e}"
            except Exception as e:  # noqa: BLE001 - a tool fault is the agent's information, not a crash
                output = f"{name} failed: {type(e).__name__}: {e}"
            if "repeated" in flags:
                output = (f"[you made this exact call {self._repeats} times with no file changed "
                          f"in between; the result is the same. Do something else, or submit.]\n{output}")
        cap = self.max_output_chars
        if len(output) > cap:
            flags.append("oversized_output")
            output = (output[:cap] + f"\n... [truncated: {len(output) - cap} more characters; read a line range "
                      "(start_line/end_line), a narrower glob or fewer ids]")
        self._count(name, flags)
        return output, is_error

    @staticmethod
    def _call_key(name: Any, args: Any) -> str:
        try:
            text = json.dumps([name, args], sort_keys=True, default=str)
        except (TypeError, ValueError, RecursionError):
            text = repr((name, args))
        return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()

    def _screen(self, name: Any, args: Any, flags: list[str]) -> str | None:
        """Why the call cannot run (its flags appended), or None when it may."""
        if not isinstance(name, str) or not name:
            flags.append("malformed")
            return f"a tool call needs a tool name; the tools are: {', '.join(self.names())}"
        if name not in self.names() or name in ENDING_TOOLS or not hasattr(self, f"_t_{name}"):
            flags.append("unknown_tool")
            return f"unknown tool {name[:100]!r}; the tools are: {', '.join(self.names())}"
        return self._shape(name, args, flags) or self._repeat(name, args, flags)

    def _shape(self, name: str, args: Any, flags: list[str]) -> str | None:
        """Why the input cannot be read at all (not an object, too large), or None."""
        if args is not None and not isinstance(args, dict):
            flags.append("malformed")
            return f"bad input for {name}: the input must be a JSON object of named fields, not a {type(args).__name__}"
        if json_size(args) > self.max_input_chars:
            flags.append("oversized_input")
            return (f"{name} refused: its input is {json_size(args)} characters, over the {self.max_input_chars} "
                    "allowed; make smaller edits (edit_file with a short unique `old`)")
        return None

    def _repeat(self, name: str, args: Any, flags: list[str]) -> str | None:
        call = self._call_key(name, args)
        self._seen_in_session[call] += 1
        key = f"{getattr(self.tools, 'revision', 0)}:{call}"
        self._seen[key] += 1
        n = self._repeats = self._seen[key]
        if n >= 2:
            flags.append("repeated")
        shown = json.dumps(args, default=str)[:200] if args is not None else "{}"
        if n >= self.max_repeated_calls:
            self.ending = ("looping", f"the agent made the same call {name} {shown} {n} times with no file changed "
                                      "in between")
        elif self._seen_in_session[call] >= self.max_session_repeats:
            self.ending = ("looping", f"the agent made the same call {name} {shown} {self._seen_in_session[call]} "
                                      "times in this session")
        return f"session ended by the harness: {self.ending[1]}" if self.ending else None

    def _count(self, name: Any, flags: list[str]) -> None:
        self.last_flags = flags
        self.counts.update(flags)
        if "malformed" in flags or "unknown_tool" in flags:
            self._malformed_streak += 1
            if self._malformed_streak >= self.max_malformed_calls and self.ending is None:
                self.ending = ("malformed", f"{self._malformed_streak} malformed or unknown tool calls in a row "
                                            f"(the last: {str(name)[:100]!r})")
        else:
            self._malformed_streak = 0

    def finish(self, name: str, args: Any) -> SubmitIn | GiveUpIn | str:
        """The parsed ``submit``/``give_up``, or a string telling the agent why it was refused (counted like
        ``call``: a malformed or repeated refused ending counts toward ``malformed`` and ``looping``)."""
        flags: list[str] = []
        refused = self._finish(name, args, flags)
        if isinstance(refused, str):
            if not flags:
                flags.append("refused_submit")
            self._repeat(name, args, flags)  # counted only when refused: an accepted ending ends the session anyway
            self._count(name, flags)
        return refused

    def _finish(self, name: str, args: Any, flags: list[str]) -> SubmitIn | GiveUpIn | str:
        if self.ending is not None:
            return f"{name} refused: the session was ended by the harness: {self.ending[1]}"
        if shape := self._shape(name, args, flags):
            return shape
        try:
            parsed = TOOL_SPECS[name][0].model_validate(args or {})
        except ValidationError as e:
            flags.append("malformed")
            return f"{name} refused: {explain(e)}"
        if isinstance(parsed, GiveUpIn):
            return parsed
        if not parsed.rationale.strip():
            return "submit refused: the rationale is empty; say what you changed and why"
        try:
            diff = self.tools.show_diff()
        except ToolError as e:
            return f"submit refused: could not compute the diff ({e})"
        if not diff.strip():
            return "submit refused: the worktree has no change yet; edit a file first"
        if (same := self._judged_before(diff)) is not None:
            n, verdict = same
            return (f"submit refused: this is exactly the change of candidate {n}, judged on this same base and not "
                    f"kept ({verdict}); judging it again would say the same. Change something else, or give_up")
        return parsed

    def _judged_before(self, diff: str) -> tuple[int, str] | None:
        """(n, why it was not kept) of an earlier candidate judged on the current base whose diff is ``diff``
        (the history's ``<n>/diff.patch``: the gate's diff, as ``diff`` is), else None. The candidates after the
        last accepted one share the current base."""
        if self.history is None:
            return None
        history = [h for h in self.ctx.history or [] if isinstance(h.get("n"), int)]
        last_kept = max((h["n"] for h in history if h.get("accepted")), default=0)
        for h in history:
            if h["n"] <= last_kept:  # judged on an older base (or kept)
                continue
            try:
                earlier = self.history.read_file(f"{h['n']}/diff.patch")
            except ToolError:
                continue
            if earlier == diff:
                reasons = (h.get("verdict") or {}).get("reasons") if isinstance(h.get("verdict"), dict) else None
                why = "; ".join(str(r) for r in reasons[:3]) if isinstance(reasons, list) and reasons else "refused"
                return h["n"], why
        return None

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
        lines = [f"mean {self.ctx.manifest.metric_label()} = {sum(scores) / len(scores):.3f} over {len(rows)} train examples"]
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
        return self.tools.read_trace(a.id, max_chars=self.max_output_chars)

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


class AgentProposerConfig(BaseModel):
    """Options every agent proposer has; each adds its own."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("claude-sonnet-4-5", description="Model of the agent (not of the pipeline).")
    base_url: str | None = Field(None, description="Messages API base URL; the loop passes the agent-side gateway.")
    api_key: str | None = Field(None, description="API key; default $ANTHROPIC_API_KEY, else a dummy for a gateway.")
    transcript_dir: str | None = Field(None, description="Folder for transcript.jsonl; `{candidate}` is replaced.")
    max_tool_output_chars: int = Field(20_000, ge=1000, description="Cap on one tool result sent to the agent.")
    max_tool_input_chars: int = Field(
        200_000, ge=1000, description="A tool call whose input is larger is refused (and not sent back to the agent).")
    max_repeated_calls: int = Field(
        4, ge=2, description="The same call (tool and input) this many times with no file changed in between ends "
                             "the session (`looping`).")
    max_session_repeats: int = Field(
        8, ge=2, description="The same call (tool and input) this many times in one session, files changed in "
                             "between or not, ends it (`looping`): an edit and a train run in a cycle going nowhere.")
    max_malformed_calls: int = Field(
        5, ge=1, description="Malformed or unknown tool calls in a row that end the session (`malformed`).")
    max_idle_replies: int = Field(
        3, ge=1, description="Replies in a row with no tool call (text only, empty or cut off) that end the "
                             "session (`no_submit`).")
    system_template: str | None = Field(None, description="A Jinja2 file replacing templates/system.md.j2.")
    price_per_mtok: tuple[float, float] | None = Field(
        None, description="(input, output) dollars per million tokens of `model`; default: the price table."
    )


class AgentSession:
    """What every agent proposer session keeps: the toolbox, the budget, the transcript, the ending.

    Transcript: each event (start, request, response, tool, notice, end) is a
    ``pipemend-transcript-1`` record, kept in memory for ``Proposal.meta`` and
    appended as it happens to ``<transcript_dir>/transcript.jsonl`` when a
    ``transcript_dir`` is given (``{candidate}`` replaced by the candidate index).
    """

    proposer_name = "agent"

    def __init__(self, ctx: ProposalContext, *, model: str, transcript_dir: str | None, max_tool_output_chars: int,
                 config: AgentProposerConfig | None = None):
        self.ctx = ctx
        self.model = model
        self.tools = ctx.tools
        self.budget: ProposerBudget = ctx.budget if ctx.budget is not None else ProposerBudget()
        cfg = config or AgentProposerConfig()
        self.box = Toolbox(ctx, max_output_chars=max_tool_output_chars, max_input_chars=cfg.max_tool_input_chars,
                           max_repeated_calls=cfg.max_repeated_calls, max_malformed_calls=cfg.max_malformed_calls,
                           max_session_repeats=cfg.max_session_repeats)
        self.counts = self.box.counts
        """The transcript's counters: the toolbox's (``FLAGS``) and the session's own (replies)."""
        self.train = self.box.train
        self.transcript: list[dict[str, Any]] = []
        self.transcript_path: Path | None = None
        if transcript_dir:
            folder = Path(transcript_dir.replace("{candidate}", str(ctx.candidate_index)))
            self.transcript_path = folder / "transcript.jsonl"
        self.turn = 0

    def record(self, event: str, **fields: Any) -> None:
        rec = {"format": TRANSCRIPT_FORMAT, "t": time.time(), "candidate": self.ctx.candidate_index,
               "turn": self.turn, "event": event, **fields}
        self.transcript.append(rec)
        if self.transcript_path is not None:
            append_jsonl(self.transcript_path, rec)

    def meta(self, outcome: str) -> dict[str, Any]:
        meta = {"proposer": self.proposer_name, "model": self.model, "outcome": outcome,
                **{f"agent_{k}": v for k, v in self.budget.spent().items()}, "agent_counters": dict(self.counts),
                "transcript": self.transcript}
        if self.transcript_path is not None:
            meta["transcript_path"] = str(self.transcript_path)
        return meta

    def exhausted(self, reason: BudgetReason, message: str) -> ProposerBudgetExhausted:
        self.record("end", outcome="budget_exhausted", reason=reason, message=message, spent=self.budget.spent(),
                    counters=dict(self.counts))
        return ProposerBudgetExhausted(reason, message, self.meta("budget_exhausted"))

    def ended(self, reason: EndReason, message: str) -> AgentSessionEnded:
        """The harness's own ending of a session going nowhere (recorded, then raised by the caller)."""
        self.record("end", outcome="ended", reason=reason, message=message, spent=self.budget.spent(),
                    counters=dict(self.counts))
        self.ctx.log(f"{self.proposer_name} proposer session ended ({reason}): {message}")
        return AgentSessionEnded(reason, f"agent session ended ({reason}): {message}", self.meta("ended"))

    def _finish(self, name: str, args: Any) -> Proposal | None | str:
        """The session's result (a Proposal, or None for give_up), or a string telling the agent why its
        ``submit``/``give_up`` was refused."""
        parsed = self.box.finish(name, args)
        if isinstance(parsed, str):
            return parsed
        if isinstance(parsed, GiveUpIn):
            self.record("end", outcome="gave_up", reason=parsed.reason, spent=self.budget.spent(),
                        counters=dict(self.counts))
            self.ctx.log(f"{self.proposer_name} proposer gave up: {parsed.reason}")
            return None
        self.record("end", outcome="submitted", rationale=parsed.rationale, rung=parsed.rung,
                    spent=self.budget.spent(), counters=dict(self.counts))
        meta = self.meta("submitted")
        meta["files_written"] = list(getattr(self.tools, "written", []))
        return Proposal(rationale=parsed.rationale.strip(), rung=parsed.rung, meta=meta)


def explain(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}" for err in e.errors())

"""The ``reflect`` proposer: a reflective prompt rewrite, aimed by the diagnosis, for any model.

GEPA's reflective mutation, in one request: the agent model is shown one prompt
file of the pipeline and up to ``k_examples`` failing train examples of one
ladder rung (their inputs, expected answers, outputs, the diagnosis's reason
and their per-step traces, each capped), and asked for the whole file
rewritten. No tool use, so a small local model can do it
(``--agent-model local/qwen2.5-coder-1.5b-instruct``, the default, offline), and
so can Claude when a key is set (``--agent-model claude-sonnet-4-5``).

- **Rung:** the prompt rung when the diagnosis puts failures on it, then its
  recommended rung, then the other rungs with failures, then the failures it
  could put on no rung (``unattributed``) or that raised (``error``); option
  ``rung`` forces one. Each reflect candidate at a rung starts ``k_examples``
  further down that rung's list, so successive candidates see different
  failures; once every failure of a rung has been shown, the next candidate
  takes the next rung's. When all have been shown, the first rung's come round
  again (the model also sees its earlier rewrites, and a repeated one is refused).
- **File:** among the editable prompt files (``transforms.is_prompt_file``),
  the one the failing generation steps used: its name matches a step's name or
  one of its short inputs (``style: short`` → ``short.txt``), or its fixed text
  appears in a step's prompt; later generation steps weigh more, then files
  named for the answer. Option ``prompt_file`` forces one.
- **Reply:** ``Rationale: ...`` then the file between ``<prompt>`` and
  ``</prompt>`` (a fenced block is accepted too). The rewrite must parse and
  render as the original did (a Jinja2 template: ``transforms.check_template``)
  and keep exactly the template variables of the original (Jinja2 names, or
  ``str.format`` fields of a ``.txt`` prompt), must differ from the current
  file and from every earlier reflect rewrite of it (``meta["reflect_key"]``
  in the history, and in ``ctx.in_flight``: the reflect candidates of the same
  parallel round, which also count for the example offset and are shown to the
  model as being judged now, so K reflect candidates of a round are K different
  rewrites from K different sets of failures). A reply that breaks a rule is answered once
  (``repair_turns``) with what was wrong; a second bad reply ends this candidate
  (``AgentSessionEnded``, ``malformed``: the loop records it and goes on, and the
  next candidate is shown the next failures). After ``MAX_UNUSABLE_IN_A_ROW``
  such candidates in a row, reflect is out of ideas (None).

The request goes through the run's agent-side gateway (``base_url``: the loop
passes it, the key stays there); each response's usage is charged to the
``ProposerBudget`` at the price table, and a spent budget raises
``ProposerBudgetExhausted`` as the agent proposers do. Every request, response
and notice is a ``pipemend-transcript-1`` record (``transcript_dir``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import anthropic
import jinja2
import jinja2.meta
from pydantic import BaseModel, ConfigDict, Field

from ..protocols import Proposal, ProposalContext
from . import agent_call, parse_options
from .agent_call import reply_text, send, with_temperature
from .agent_tools import AgentSession
from .tools import ToolError, format_trace
from .transforms import TransformError, check_template, is_jinja, is_prompt_file

TEMPLATES = Path(__file__).parent / "templates"
LADDER_RUNGS = ("prompt", "retrieval", "context", "model")
MAX_PROMPT_CHARS = 64_000
"""A rewritten prompt file longer than this is refused."""
FIELD_CHARS = 400
"""Inputs, expected answer and output of an example are cut here in the request."""
MAX_UNUSABLE_IN_A_ROW = 3
"""After this many reflect candidates in a row ended with no usable rewrite, reflect is out of ideas."""

SYSTEM = ("You are an expert prompt engineer. You rewrite one prompt template of an LLM pipeline so that the "
          "pipeline stops failing the way the examples show. You reply in the exact form asked for.")

RUNG_HINTS = {
    "prompt": "the evidence reached the model, but its output broke the format or the instructions.",
    "context": "the evidence was there and the output well formed, but the answer ignored or misread the evidence.",
    "retrieval": "the gold evidence never reached the generation step; a prompt that writes the search "
                 "queries, or one that copes with missing evidence, may help.",
    "model": "the evidence was there and the instructions clear, and the model was still wrong.",
    "unattributed": "the diagnosis could not say which rung failed.",
    "error": "a step raised an exception (for instance a parse step that could not read the model's reply).",
}


class ReflectConfig(BaseModel):
    """Options of the ``reflect`` proposer (``get_proposer("reflect", **options)``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("local/qwen2.5-coder-1.5b-instruct",
                       description="Model that writes the rewrite (`--agent-model`); a claude-* model needs a key.")
    base_url: str | None = Field(None, description="Messages API base URL; the loop passes the agent-side gateway.")
    api_key: str | None = Field(None, description="API key; default $ANTHROPIC_API_KEY, else a dummy for a gateway.")
    transcript_dir: str | None = Field(None, description="Folder for transcript.jsonl; `{candidate}` is replaced.")
    price_per_mtok: tuple[float, float] | None = Field(
        None, description="(input, output) dollars per million tokens of `model`; default: the price table.")
    k_examples: int = Field(3, ge=1, le=10, description="Failing train examples shown to the model.")
    max_trace_chars: int = Field(2_000, ge=200, le=50_000, description="Characters of one example's step trace.")
    rung: Literal["prompt", "retrieval", "context", "model", "unattributed", "error"] | None = Field(
        None, description="Take the failing examples of this rung (default: prompt, else the recommended one).")
    prompt_file: str | None = Field(None, description="The prompt file to rewrite (default: chosen from the traces).")
    temperature: float | None = Field(0.0, ge=0, le=1, description="Sampling temperature; None: the API default.")
    repair_temperature: float | None = Field(
        0.7, ge=0, le=1, description="Temperature of a repair request (a greedy small model repeats its bad reply).")
    max_tokens: int = Field(1_024, ge=64, description="max_tokens of the reply (the whole rewritten file).")
    repair_turns: int = Field(1, ge=0, le=3, description="Requests after a malformed reply, each told what was wrong.")
    max_retries: int = Field(2, ge=0, description="SDK retries of a failed request.")
    request_timeout_s: float = Field(600.0, gt=0, description="HTTP timeout of one request.")
    template: str | None = Field(None, description="A Jinja2 file replacing templates/reflect.md.j2.")


class ReflectError(ValueError):
    """A reply that cannot be used; its message is what the model is told."""


# --------------------------------------------------------------------------- template variables


@dataclass
class PromptSyntax:
    """How the pipeline fills a prompt file: ``jinja``, ``format`` (``str.format``) or ``plain``, and its names."""

    kind: Literal["jinja", "format", "plain"]
    names: frozenset[str]

    def describe(self) -> str:
        if self.kind == "jinja":
            return ("It is a Jinja2 template: the pipeline renders it with the variables "
                    f"{', '.join(sorted(self.names)) or '(none)'}; keep its {{{{ }}}} and {{% %}} syntax valid.")
        if self.kind == "format":
            return ("It is a Python str.format template: the pipeline fills its fields "
                    f"{', '.join('{' + n + '}' for n in sorted(self.names)) or '(none)'}; write a literal brace "
                    "as {{ or }}.")
        return "It is plain text, sent as it is."


def prompt_syntax(text: str, rel: str) -> PromptSyntax:
    """The syntax of the prompt file ``rel`` holding ``text`` (a ``ReflectError`` if it does not parse)."""
    if is_jinja(rel):
        try:
            check_template(text, rel)
            names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text))
        except (TransformError, jinja2.TemplateError) as e:
            raise ReflectError(f"it is not a valid Jinja2 template: {e}") from None
        return PromptSyntax("jinja", frozenset(names))
    fields = format_fields(text)
    return PromptSyntax("plain", frozenset()) if fields is None else PromptSyntax("format", fields)


def format_fields(text: str) -> frozenset[str] | None:
    """The ``str.format`` field names of ``text`` (``{a.b}`` → ``a``), or None when it is no format string."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return None
    return frozenset(re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in parsed if name is not None)


def check_rewrite(old: str, new: str, rel: str) -> None:
    """Raise ``ReflectError`` unless ``new`` may replace ``old`` in ``rel``: parses as the original did, keeps
    exactly its template variables, differs from it, is not too long."""
    if len(new) > MAX_PROMPT_CHARS:
        raise ReflectError(f"the new prompt is {len(new)} characters; at most {MAX_PROMPT_CHARS}")
    if new.strip() == old.strip():
        raise ReflectError("the new prompt is the current one unchanged; change the instructions")
    before = prompt_syntax(old, rel)
    if before.kind == "plain":
        return
    if before.kind == "jinja":
        after = prompt_syntax(new, rel)
    else:
        fields = format_fields(new)
        if fields is None:
            raise ReflectError("the new prompt is not a valid str.format template (an unmatched { or }); "
                               "write a literal brace as {{ or }}")
        after = PromptSyntax("format", fields)
    missing, extra = sorted(before.names - after.names), sorted(after.names - before.names)
    problems = []
    if missing:
        problems.append(f"drops the template variable(s) {', '.join(missing)}, which the pipeline fills in")
    if extra:
        where = [line.strip() for line in new.splitlines()
                 if any(re.search(rf"\{{[^{{}}]*\b{re.escape(n)}\b", line) for n in extra)][:3]
        problems.append(f"adds the variable(s) {', '.join(extra)}, which the pipeline does not provide"
                        + (f" (remove or rewrite the line(s) {' | '.join(where)})" if where else ""))
    if problems:
        raise ReflectError("the new prompt " + "; ".join(problems) + f"; keep exactly: {', '.join(sorted(before.names))}")


# --------------------------------------------------------------------------- the reply

_TAGGED = re.compile(r"<prompt>[ \t]*\n?(.*?)</prompt>", re.S)
_FENCED = re.compile(r"```[\w.+-]*[ \t]*\n(.*?)```", re.S)
_RATIONALE = re.compile(r"rationale\s*:\s*(.+)", re.I)
_PLACEHOLDER = "<the complete new content of"


def extract_rewrite(reply: str) -> tuple[str, str]:
    """(rationale, new prompt text) from the model's reply; ``ReflectError`` saying what is missing."""
    blocks = [m for m in _TAGGED.finditer(reply) if _PLACEHOLDER not in m.group(1)]
    if blocks:
        body, rest = blocks[-1].group(1), reply[: blocks[-1].start()] + reply[blocks[-1].end():]
    elif "<prompt>" in reply and "</prompt>" not in reply:
        head, body = reply.rsplit("<prompt>", 1)  # an unclosed tag at the end of a complete reply
        rest = head
    else:
        fenced = sorted(_FENCED.finditer(reply), key=lambda m: len(m.group(1)))
        if not fenced:
            raise ReflectError("your reply has no <prompt> ... </prompt> block holding the new prompt file")
        body, rest = fenced[-1].group(1), reply[: fenced[-1].start()] + reply[fenced[-1].end():]
    inner = _FENCED.fullmatch(body.strip())
    if inner:  # a fence inside the tags
        body = inner.group(1)
    body = body.strip("\n").rstrip()
    if not body.strip():
        raise ReflectError("the <prompt> block is empty; put the complete new prompt file inside it")
    if _PLACEHOLDER in body:
        raise ReflectError("the <prompt> block holds the placeholder, not the new prompt file")
    found = _RATIONALE.search(rest)
    rationale = found.group(1) if found else rest
    rationale = " ".join(rationale.replace("<prompt>", " ").replace("</prompt>", " ").split())[:1_000]
    return rationale or "rewrote the prompt from failing train examples", body


# --------------------------------------------------------------------------- what to show the model


def rung_failures(diagnosis: dict[str, Any], train_ids: set[str],
                  forced: str | None = None) -> list[tuple[str, list[str]]]:
    """Each rung with failing train examples, as (rung, ids), in the order reflect takes them: ``forced`` alone,
    else prompt, the recommended rung, the other rungs, the unattributed, the erroring ones."""
    ids = diagnosis.get("ids") if isinstance(diagnosis.get("ids"), dict) else {}
    lists = {r: ids.get(r) for r in LADDER_RUNGS}
    lists["unattributed"] = diagnosis.get("unattributed_ids")
    lists["error"] = diagnosis.get("error_ids")
    if forced:
        order = [forced]
    else:
        recommended = diagnosis.get("recommended")
        order = list(dict.fromkeys(["prompt", *([recommended] if recommended in LADDER_RUNGS else []), "context",
                                    "model", "retrieval", "unattributed", "error"]))
    found = []
    for rung in order:
        failing = lists.get(rung)
        on_train = [str(i) for i in failing if str(i) in train_ids] if isinstance(failing, list) else []
        if on_train:
            found.append((rung, on_train))
    return found


def next_examples(rungs: list[tuple[str, list[str]]], shown: dict[str, int], k: int) -> tuple[str, list[str]]:
    """(rung, the next ``k`` failing ids to show): the first rung of ``rungs`` whose failures the ``shown[rung]``
    earlier candidates at it have not all seen, from where they stopped; when every rung's have been seen, the
    first rung's again, going on round its list. ``rungs`` is not empty."""
    rung, ids = next(((r, i) for r, i in rungs if shown.get(r, 0) * k < len(i)), rungs[0])
    start = (shown.get(rung, 0) * k) % len(ids)
    return rung, (ids[start:] + ids[:start])[:k]  # a short last block is filled from the start of the list


def _strings(value: Any, out: list[str], budget: int = 200) -> None:
    """The strings inside ``value`` (a hostile trace field), depth-first, at most ``budget`` of them."""
    stack = [value]
    while stack and len(out) < budget:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(list(v.values())[:budget])
        elif isinstance(v, list):
            stack.extend(v[:budget])


def _generation_steps(trace: dict[str, Any] | None) -> list[dict[str, Any]]:
    steps = (trace or {}).get("steps")
    return [s for s in steps[:300] if isinstance(s, dict) and s.get("kind") == "generation"] \
        if isinstance(steps, list) else []


_TEMPLATE_PARTS = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}|\{[^{}\n]*\}", re.S)


def _anchors(text: str) -> list[str]:
    """Lines of fixed text of a prompt file (template parts removed), long enough to recognise in a prompt."""
    lines = (" ".join(line.split()) for line in _TEMPLATE_PARTS.sub("\n", text).splitlines())
    return [line for line in lines if len(line) >= 12][:8]


def prompt_relevance(rel: str, text: str, traces: list[dict[str, Any] | None]) -> int:
    """How strongly the failing traces point at the prompt file ``rel``: its name is a generation step's name or
    one of its short inputs, or its fixed text is in the step's prompt; later generation steps weigh more."""
    stem = PurePosixPath(rel).name.split(".", 1)[0].lower()
    anchors = _anchors(text)
    score = 0
    for trace in traces:
        for pos, step in enumerate(_generation_steps(trace), start=1):
            strings: list[str] = []
            _strings(step.get("inputs"), strings)
            name = str(step.get("name") or "").lower()
            short = {s.strip().lower() for s in strings if len(s) <= 80}
            hit = 2 if stem and (stem in name or stem in short) else 0
            flat = " ".join(" ".join(s.split()) for s in strings)
            if anchors and any(a in flat for a in anchors):
                hit += 3
            score += hit * pos
    return score


def _short(value: Any, limit: int = FIELD_CHARS) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f" ... [+{len(text) - limit} chars]"


def rewrite_key(rel: str, text: str) -> str:
    """The identity of a rewrite (what the history records as tried)."""
    return hashlib.sha256(f"{rel}\0{text.strip()}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the proposer


class ReflectProposer:
    name = "reflect"

    def __init__(self, **options: Any):
        self.config = parse_options(ReflectConfig, options, "reflect")
        self._tried: set[str] = set()

    def client(self) -> anthropic.Anthropic:
        return agent_call.client(self.config)

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        return _Reflection(self, ctx).run()


class _Reflection(AgentSession):
    """One reflective rewrite for one candidate: the transcript, the budget and the request/repair turns."""

    proposer_name = "reflect"

    def __init__(self, proposer: ReflectProposer, ctx: ProposalContext):
        super().__init__(ctx, model=proposer.config.model, transcript_dir=proposer.config.transcript_dir,
                         max_tool_output_chars=20_000)
        self.cfg = proposer.config
        self.proposer = proposer

    def run(self) -> Proposal | None:
        ctx = self.ctx
        earlier = [h for h in ctx.history or [] if (h.get("meta") or {}).get("proposer") == "reflect"]
        siblings = [f for f in ctx.in_flight or [] if (f.get("meta") or {}).get("proposer") == "reflect"]
        rungs = rung_failures(ctx.diagnosis or {}, set(self.train), self.cfg.rung)
        if not rungs:
            ctx.log("reflect: no failing train example to learn from")
            return None
        unusable = list(itertools.takewhile(lambda h: (h.get("meta") or {}).get("outcome") == "ended",
                                            reversed(earlier)))
        if len(unusable) >= MAX_UNUSABLE_IN_A_ROW:
            ctx.log(f"reflect: the model's last {len(unusable)} candidates gave no usable rewrite; stopping")
            return None
        shown = Counter(str((h.get("meta") or {}).get("rung_failed")) for h in earlier + siblings)
        rung, chosen = next_examples(rungs, shown, self.cfg.k_examples)
        traces = {i: self._trace(i) for i in chosen}
        rel = self._choose_file(list(traces.values()))
        if rel is None:
            return None
        text = self.tools.read_file(rel)
        try:
            syntax = prompt_syntax(text, rel)
        except ReflectError as e:
            ctx.log(f"reflect: {rel} cannot be rewritten safely: {e}")
            return None
        tried = set(self.proposer._tried)
        tried.update(str((h.get("meta") or {}).get("reflect_key")) for h in earlier + siblings)
        message = self._render(rel, text, syntax, rung, chosen, traces, earlier, siblings)
        self.record("start", model=self.cfg.model, system=SYSTEM, prompt_file=rel, rung=rung, examples=chosen,
                    budget=self.budget.model_dump())
        messages: list[dict[str, Any]] = [{"role": "user", "content": message}]
        client = self.proposer.client()
        problem = ""
        for attempt in range(1 + self.cfg.repair_turns):
            reply, stop = self._ask(client, messages, self.cfg.temperature if attempt == 0 else self.cfg.repair_temperature)
            messages.append({"role": "assistant", "content": reply or "(empty)"})
            try:
                if stop == "max_tokens":
                    raise ReflectError(f"your reply was cut off at {self.cfg.max_tokens} tokens; write a shorter "
                                       "prompt file and nothing else but the rationale line")
                rationale, new = extract_rewrite(reply)
                new += "\n" if text.endswith("\n") else ""
                check_rewrite(text, new, rel)
                key = rewrite_key(rel, new)
                if key in tried:
                    raise ReflectError("this exact rewrite was tried before and not kept; write a different one")
            except ReflectError as e:
                problem = str(e)
                self.record("notice", message=problem)
                messages.append({"role": "user", "content": (
                    f"That reply cannot be used: {problem}. Reply again in the same form: a `Rationale:` line, "
                    f"then the complete new content of {rel} between <prompt> and </prompt>.")})
                continue
            self.tools.write_file(rel, new)
            self.proposer._tried.add(key)
            self.record("end", outcome="submitted", rationale=rationale, file=rel, spent=self.budget.spent())
            meta = self.meta("submitted")
            meta.update(kind="reflect", file=rel, rung_failed=rung, examples=chosen, reflect_key=key,
                        files_written=[rel])
            why = f" (reflective rewrite of {rel} from {len(chosen)} failing train examples at the {rung} rung)"
            return Proposal(rationale=rationale + why, rung=rung if rung in LADDER_RUNGS else "prompt", meta=meta)
        reason = f"no usable rewrite of {rel} after {1 + self.cfg.repair_turns} replies: {problem}"
        ended = self.ended("malformed", reason)
        ended.meta.update(kind="reflect", file=rel, rung_failed=rung, examples=chosen)
        raise ended

    # ----------------------------------------------------------------- parts

    def _trace(self, example_id: str) -> dict[str, Any] | None:
        try:
            return self.tools.read_trace_raw(example_id)
        except ToolError as e:
            self.ctx.log(f"reflect: no trace for {example_id}: {e}")
            return None

    def _choose_file(self, traces: list[dict[str, Any] | None]) -> str | None:
        tools = self.tools
        if self.cfg.prompt_file:
            if not tools.is_writable(self.cfg.prompt_file):
                self.ctx.log(f"reflect: prompt_file {self.cfg.prompt_file!r} is not an editable file of the target")
                return None
            return self.cfg.prompt_file
        files = [p for p in tools.list_files() if is_prompt_file(p) and tools.is_writable(p)]
        if not files:
            self.ctx.log("reflect: the target has no editable prompt file")
            return None
        scores = {}
        for rel in files:
            try:
                scores[rel] = prompt_relevance(rel, tools.read_file(rel), traces)
            except ToolError:
                continue
        if not scores:
            return None
        return max(scores, key=lambda r: (scores[r], "answer" in PurePosixPath(r).name.lower(), -files.index(r)))

    def _render(self, rel: str, text: str, syntax: PromptSyntax, rung: str, chosen: list[str],
                traces: dict[str, dict[str, Any] | None], earlier: list[dict[str, Any]],
                siblings: list[dict[str, Any]]) -> str:
        path = Path(self.cfg.template) if self.cfg.template else TEMPLATES / "reflect.md.j2"
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(path.parent)), trim_blocks=True,
                                 lstrip_blocks=True, keep_trailing_newline=True)
        details = (self.ctx.diagnosis or {}).get("details") or {}
        examples = []
        for i in chosen:
            ex, trace = self.train[i], traces[i]
            steps = trace.get("steps") if isinstance(trace, dict) and isinstance(trace.get("steps"), list) else []
            field_chars = max(80, self.cfg.max_trace_chars // (2 * min(len(steps), 300) + 4))
            d = details.get(i) if isinstance(details.get(i), dict) else {}
            why = "; ".join(_short(d[k], 300) for k in ("rule", "evidence") if d.get(k))
            examples.append({
                "id": i, "inputs": _short(ex.get("inputs")), "expected": _short(ex.get("expected")),
                "output": _short(trace.get("output")) if isinstance(trace, dict) else "(no trace)",
                "why": why,
                "trace": format_trace(trace, max_chars=self.cfg.max_trace_chars, field_chars=field_chars)
                if isinstance(trace, dict) else "(no trace recorded)",
            })
        tried = [{"n": h.get("n", h.get("index")), "outcome": "kept" if h.get("accepted") else "not kept",
                  "rationale": _short(str(h.get("rationale") or ""), 300)}
                 for h in earlier if (h.get("meta") or {}).get("file") == rel
                 and (h.get("meta") or {}).get("outcome") != "ended"]  # no rewrite came of it
        tried += [{"n": f.get("n"), "outcome": "being judged now, in this round", "rationale": _short(str(
                   f.get("rationale") or ""), 300)} for f in siblings if (f.get("meta") or {}).get("file") == rel]
        m = self.ctx.manifest
        return env.get_template(path.name).render(
            manifest=m, metric=m.metric_label(), rung=rung, rung_hint=RUNG_HINTS.get(rung, ""), path=rel, text=text,
            syntax=syntax.describe(), variables=sorted(syntax.names), examples=examples, tried=tried)

    def _ask(self, client: anthropic.Anthropic, messages: list[dict[str, Any]],
             temperature: float | None) -> tuple[str, str | None]:
        """One request: the reply's text and stop reason; the budget is checked before and charged after."""
        reason = self.budget.exhausted()
        if reason:
            raise self.exhausted(reason, f"proposer budget exhausted before a rewrite ({reason}): {self.budget.describe()}")
        self.turn += 1
        self.record("request", new_messages=messages[-1:])
        kwargs: dict[str, Any] = {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens, "system": SYSTEM,
                                  "messages": messages}
        data = send(self, client, with_temperature(kwargs, temperature), prices=self.cfg.price_per_mtok)
        stop = data.get("stop_reason")
        return reply_text(data), stop if isinstance(stop, str) else None

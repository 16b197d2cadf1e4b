"""Tool use on the local model: Qwen2.5's tool-call format, each call's JSON decoded under a grammar.

A Messages request with ``tools`` is rendered as Qwen2.5's chat template renders tools
(ChatML; the system turn ends with a ``# Tools`` section listing each tool as
``{"type": "function", "function": {name, description, parameters}}`` inside
``<tools></tools>``), earlier ``tool_use`` blocks as ``<tool_call>`` JSON and
``tool_result`` blocks as ``<tool_response>`` turns.

Decoding (``ToolDecoder``) runs in phases on one token sequence:

1. free text, until the model ends its turn or samples the ``<tool_call>`` token
   (skipped when ``tool_choice`` forces a call: ``any`` or ``tool``);
2. the call body, constrained by a GBNF grammar (llama.cpp's JSON-schema converter) of
   the union of ``{"name": <const>, "arguments": <the tool's input_schema>}`` over the
   offered tools, so the call always parses and names an offered tool;
3. after ``</tool_call>``, a few free tokens: another ``<tool_call>`` starts another
   call (unless parallel calls are off), anything else ends the turn.

The answer is a function of the request alone: the prompt is evaluated as from scratch
(``LlamaSession.prefill`` reads it from an empty KV cache),
then each phase extends the same sequence. Calls become
``tool_use`` blocks (ids ``toolu_local_…``, ``stop_reason: tool_use``); a call cut off by
``max_tokens`` is dropped (``stop_reason: max_tokens``). llama.cpp's converter does not
enforce numeric bounds (``minimum``/``maximum``), so the tool's own validation still applies.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from .base import BackendError, text_of

TOOL_ID_PREFIX = "toolu_local_"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TURN_END = "<|im_end|>"
END_TOKENS = (TURN_END, "<|endoftext|>")
MAX_CALLS = 8  # tool calls in one reply
AFTER_CALL_TOKENS = 6  # free tokens after a call in which another may start
ERROR_PREFIX = "Error: "
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


# --------------------------------------------------------------------------- request → tools, choice


@dataclass(frozen=True)
class ToolChoice:
    """``tool_choice`` of a Messages request: auto, any, tool (with ``name``) or none."""

    kind: str = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.kind in ("any", "tool")


def request_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's client tools, checked: ``{name, description?, input_schema}`` each."""
    tools = request.get("tools") or []
    if not isinstance(tools, list):
        raise BackendError(400, "tools: expected a list of tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BackendError(400, f"tools.{i}: expected a tool with a name")
        if tool.get("type") not in (None, "custom"):
            raise BackendError(400, f"tools.{i}: the local model runs only client tools, not {tool.get('type')!r}")
        if not isinstance(tool.get("input_schema"), dict):
            raise BackendError(400, f"tools.{i}.input_schema: expected a JSON Schema object")
        if tool["name"] in seen:
            raise BackendError(400, f"tools.{i}.name: {tool['name']!r} is offered twice")
        seen.add(tool["name"])
    return tools


def tool_choice(request: dict[str, Any], tools: list[dict[str, Any]]) -> ToolChoice:
    raw = request.get("tool_choice") or {"type": "auto"}
    if not isinstance(raw, dict) or raw.get("type") not in ("auto", "any", "tool", "none"):
        raise BackendError(400, "tool_choice: expected {'type': 'auto'|'any'|'tool'|'none'}")
    parallel = not raw.get("disable_parallel_tool_use", False)
    if raw["type"] == "tool":
        name = raw.get("name")
        if name not in {t["name"] for t in tools}:
            raise BackendError(400, f"tool_choice.name: {name!r} is not one of the offered tools")
        return ToolChoice("tool", name, parallel=False)
    if raw["type"] in ("any", "tool") and not tools:
        raise BackendError(400, f"tool_choice: {raw['type']!r} needs tools")
    return ToolChoice(raw["type"], parallel=parallel)


# --------------------------------------------------------------------------- the prompt


def _function_json(tool: dict[str, Any]) -> str:
    fn = {"name": tool["name"], "description": str(tool.get("description") or ""), "parameters": tool["input_schema"]}
    return json.dumps({"type": "function", "function": fn}, ensure_ascii=False)


def call_json(name: str, arguments: Any) -> str:
    """A call as Qwen writes it inside ``<tool_call>``."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def _turn(role: str, body: str) -> str:
    return f"<|im_start|>{role}\n{body}{TURN_END}\n"


def _assistant_body(content: Any) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    calls: list[str] = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append(f"{TOOL_CALL_OPEN}\n{call_json(str(block.get('name')), block.get('input', {}))}\n{TOOL_CALL_CLOSE}")
    return "\n".join([t for t in ("".join(texts).strip(),) if t] + calls)


def _user_part(block: dict[str, Any]) -> str | None:
    """One block of a user turn as Qwen reads it: text, or a ``<tool_response>`` (errors marked)."""
    kind = block.get("type")
    if kind in ("image", "document"):
        raise BackendError(400, f"the local model takes text only, got a {kind} block")
    if kind == "tool_result":
        result = (ERROR_PREFIX if block.get("is_error") else "") + text_of(block.get("content", ""))
        return f"<tool_response>\n{result}\n</tool_response>"
    return str(block.get("text", "")) if kind == "text" else None


def _user_body(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = (_user_part(block) for block in content or [] if isinstance(block, dict))
    return "\n".join(part for part in parts if part is not None)


def render_prompt(request: dict[str, Any], tools: list[dict[str, Any]]) -> str:
    """The whole ChatML prompt of a request with tools, ending where the assistant's reply begins."""
    system = text_of(request.get("system") or "") or DEFAULT_SYSTEM
    listed = "".join("\n" + _function_json(t) for t in tools)
    out = [_turn("system", f"{system}\n\n{TOOLS_INTRO}{listed}{TOOLS_OUTRO}")]
    for message in request.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "assistant":
            out.append(_turn("assistant", _assistant_body(message.get("content"))))
        elif role == "system":
            out.append(_turn("system", text_of(message.get("content"))))
        else:
            out.append(_turn("user", _user_body(message.get("content"))))
    prompt = "".join(out) + "<|im_start|>assistant\n"
    last = (request.get("messages") or [{}])[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":  # a prefilled reply: continue it
        prompt = prompt.removesuffix(f"{TURN_END}\n<|im_start|>assistant\n")
    return prompt


# --------------------------------------------------------------------------- the call grammar


def _local_refs_only(node: Any, where: str) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
            raise BackendError(400, f"{where}: only local $ref ('#/...') is served, got {str(ref)[:100]!r}")
        for key, value in node.items():
            _local_refs_only(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _local_refs_only(value, f"{where}.{i}")


def _rebase_refs(node: Any, prefix: str) -> Any:
    """``#/$defs/X`` (or ``#/definitions/X``) of one tool's schema → ``#/$defs/<prefix>X`` of the union."""
    if isinstance(node, dict):
        out = {k: _rebase_refs(v, prefix) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        if isinstance(ref, str):
            for root in ("#/$defs/", "#/definitions/"):
                if ref.startswith(root):
                    out["$ref"] = "#/$defs/" + prefix + ref[len(root):]
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, prefix) for v in node]
    return node


def call_schema(tools: list[dict[str, Any]], only: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call: ``{"name": const, "arguments": input_schema}`` over the tools (or one)."""
    options: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        if only is not None and tool["name"] != only:
            continue
        schema = tool["input_schema"]
        _local_refs_only(schema, f"tools.{i}.input_schema")
        prefix = f"t{i}-"
        for key in ("$defs", "definitions"):
            for name, sub in (schema.get(key) or {}).items():
                defs[prefix + name] = _rebase_refs(sub, prefix)
        arguments = _rebase_refs(schema, prefix)
        arguments.setdefault("type", "object")
        options.append({"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": arguments},
                        "required": ["name", "arguments"], "additionalProperties": False})
    union: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        union = {**union, "$defs": defs}
    return union


# the JSON converter allows one optional space between tokens; a model that writes its JSON indented
# (as Qwen does in a code fence) then runs a number on with digits where it wanted a newline
SPACE_RULE = "space ::= \" \"?"
SPACE_RULE_INDENTED = 'space ::= | " " | "\\n" [ \\t]{0,20}'
_grammars: dict[str, str] = {}


def call_grammar(tools: list[dict[str, Any]], only: str | None = None) -> str:
    """The GBNF grammar (root rule ``root``) of one call, by llama.cpp's JSON-schema converter (kept per schema)."""
    schema = json.dumps(call_schema(tools, only))  # not sorted: the converter keeps the properties' order
    if schema not in _grammars:
        from llama_cpp.llama_grammar import json_schema_to_gbnf  # the local extra, as the model itself

        try:
            gbnf = json_schema_to_gbnf(schema)
        except Exception as e:  # noqa: BLE001 - the converter raises bare ValueError/AssertionError/KeyError
            raise BackendError(400, f"cannot constrain tool calls to the tools' input_schema: "
                                    f"{type(e).__name__}: {str(e)[:300]}") from None
        lines = [SPACE_RULE_INDENTED if line.strip() == SPACE_RULE else line for line in gbnf.splitlines()]
        if len(_grammars) > 64:
            _grammars.clear()
        _grammars[schema] = "\n".join(lines) + "\n"
    return _grammars[schema]


def call_block(body: str, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A ``tool_use`` block from a decoded call body, or None when it is not a whole call of an offered tool."""
    try:
        call = json.loads(body, strict=False)  # the grammar lets raw control characters into strings
    except ValueError:
        return None
    names = {t["name"] for t in tools}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"type": "tool_use", "id": TOOL_ID_PREFIX + uuid.uuid4().hex[:24], "name": call["name"],
            "input": call["arguments"]}


# --------------------------------------------------------------------------- decoding

# a call written as plain JSON (``{"name": "…``), bare or opening a code fence
_CALL_START = re.compile(r'(?:```[a-z]*\s*)?\{\s*"name"\s*:\s*"')
CALL_SCAN = 400  # characters at the end of the text searched for a call's start


def call_start(text: str) -> int | None:
    """Where a call the model writes outside ``<tool_call>`` starts in ``text`` (its fence included), or None."""
    offset = max(0, len(text) - CALL_SCAN)
    match = _CALL_START.search(text, offset)
    return match.start() if match else None



@dataclass
class Sampling:
    """How to draw each token (greedy when ``temperature`` is 0)."""

    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 0.95
    seed: int = 0


@dataclass
class Reply:
    content: list[dict[str, Any]]
    stop_reason: str
    input_tokens: int
    output_tokens: int
    stop_sequence: str | None = None


@dataclass
class _Phase:
    tokens: list[int] = field(default_factory=list)
    ended: str = "length"  # length | end | open (a <tool_call>) | stop (a stop sequence)
    stop_sequence: str | None = None
    text: str = ""  # the reply's text of this phase (up to a stop sequence or a call)


class ToolDecoder:
    """Runs the phases of one reply on a model session (``local_llama.LlamaSession``)."""

    def __init__(self, session: Any, sampling: Sampling, *, prefill: bool = True):
        self.session = session
        self.sampling = sampling
        self.prefill = prefill  # False: llama-cpp-python's own prefix reuse (PIPEMEND_LOCAL_PREFIX_REUSE)
        self.open_id = self._single(TOOL_CALL_OPEN)
        self.end_ids = {self._single(t) for t in END_TOKENS} | {session.token_eos()}

    def _tokens(self, text: str) -> list[int]:
        return self.session.tokenize(text)

    def _single(self, text: str) -> int:
        ids = self._tokens(text)
        if len(ids) != 1:
            raise BackendError(500, f"the local model's vocabulary has no single token for {text!r}; "
                                    "tool use needs Qwen2.5's tokenizer")
        return ids[0]

    def _text(self, tokens: list[int]) -> str:
        return self.session.detokenize(tokens)

    def _run(self, sequence: list[int], budget: int, *, grammar: str | None = None, stops: Iterable[str] = (),
             catch_calls: bool = False) -> _Phase:
        """Sample up to ``budget`` tokens after ``sequence``.

        ``catch_calls``: a call the model starts to write outside ``<tool_call>`` (``{"name": "…``,
        bare or in a code fence) ends the phase as ``open`` too, its text cut before the call.
        """
        phase = _Phase()
        if budget <= 0:
            return phase
        s = self.sampling
        stops = [x for x in stops if x]
        options = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed}
        tokens = (self.session.generate(sequence, **options) if grammar is None
                  else self.session.generate_constrained(sequence, grammar, **options))
        for token in tokens:
            if token in self.end_ids:
                phase.ended = "end"
                break
            if token == self.open_id and grammar is None:
                phase.ended = "open"
                break
            phase.tokens.append(token)
            if stops or catch_calls:
                text = self._text(phase.tokens)
                hit = next((x for x in stops if x in text), None)
                if hit is not None:
                    phase.ended, phase.stop_sequence, phase.text = "stop", hit, text[: text.index(hit)]
                    return phase
                start = call_start(text) if catch_calls else None
                if start is not None:
                    phase.ended, phase.text = "open", text[:start]
                    return phase
            if len(phase.tokens) >= budget:
                break
        phase.text = self._text(phase.tokens)
        return phase

    def decode(self, request: dict[str, Any], tools: list[dict[str, Any]], choice: ToolChoice,
               max_tokens: int, stop_sequences: list[str]) -> Reply:
        prompt = self._tokens(render_prompt(request, tools))
        room = self.session.n_ctx() - len(prompt)
        if room <= 0:
            raise BackendError(400, f"the prompt is {len(prompt)} tokens, more than the local model's context "
                                    f"({self.session.n_ctx()} tokens; set PIPEMEND_LOCAL_N_CTX)")
        budget = min(max_tokens, room)
        if self.prefill:
            self.session.prefill(prompt)  # the answer depends on this request only
        sequence = list(prompt)
        content: list[dict[str, Any]] = []
        used = 0
        calls = 0
        open_call = choice.forced
        if not open_call:
            phase = self._run(sequence, budget, stops=stop_sequences, catch_calls=choice.kind != "none")
            used += len(phase.tokens)
            text = phase.text.strip() if phase.ended == "open" else phase.text
            if text.strip():
                content.append({"type": "text", "text": text})
            if phase.ended != "open" or choice.kind == "none":
                return self._reply(content, prompt, used, phase)
            # the assistant's turn as rendering it back would give: its text, then the call
            sequence += self._tokens(text + "\n") if text else []
            open_call = True
        while open_call:
            sequence += [self.open_id, *self._tokens("\n")]
            only = choice.name if choice.kind == "tool" else None
            body = self._run(sequence, budget - used, grammar=call_grammar(tools, only))
            used += len(body.tokens)
            block = call_block(self._text(body.tokens), tools)
            if block is None:  # cut off by max_tokens (the grammar admits nothing else)
                return Reply(content or [{"type": "text", "text": ""}], "max_tokens", len(prompt), used)
            content.append(block)
            calls += 1
            sequence += [*body.tokens, *self._tokens(f"\n{TOOL_CALL_CLOSE}")]
            if not choice.parallel or calls >= MAX_CALLS or used >= budget:
                break
            after = self._run(sequence, min(AFTER_CALL_TOKENS, budget - used))
            used += len(after.tokens)
            sequence += after.tokens
            open_call = after.ended == "open"
        return Reply(content, "tool_use", len(prompt), used)

    @staticmethod
    def _reply(content: list[dict[str, Any]], prompt: list[int], used: int, phase: _Phase) -> Reply:
        reason = {"end": "end_turn", "stop": "stop_sequence", "open": "end_turn"}.get(phase.ended, "max_tokens")
        return Reply(content or [{"type": "text", "text": ""}], reason, len(prompt), used,
                     stop_sequence=phase.stop_sequence)

"""Tool use on the local backend (``gateway/backends/local_tools.py``, ``local_llama.py``).

Default group: the Qwen2.5 prompt rendering (tools, earlier calls, tool results), the call
schema and its grammar, parsing decoded calls into ``tool_use`` blocks, and the decoding
phases against ``ScriptedQwenAtTheModelBoundary``, a strict fake of the model session (the
LLM boundary: it replies from a script and records what it was asked), also through a real
gateway with the ``anthropic`` and ``openai`` SDKs. Slow group: the real local model calling a
tool through the gateway, parsed by the ``anthropic`` SDK, plain and streaming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import anthropic
import openai
import pytest

from pipemend.gateway import BackendError, Gateway, GatewayConfig, model_files
from pipemend.gateway.backends import local
from pipemend.gateway.backends.local_tools import (
    TOOL_ID_PREFIX, Sampling, ToolChoice, ToolDecoder, call_block, call_grammar, call_schema, call_start,
    render_prompt, request_tools, tool_choice,
)

pytestmark = pytest.mark.timeout(60)

READ_FILE = {"name": "read_file", "description": "Read a file.",
             "input_schema": {"type": "object", "properties": {"path": {"type": "string"},
                                                               "start_line": {"type": "integer"}},
                              "required": ["path"], "additionalProperties": False}}
SUBMIT = {"name": "submit", "description": "Submit the change.",
          "input_schema": {"type": "object", "properties": {"rationale": {"type": "string", "minLength": 1},
                                                            "rung": {"enum": ["prompt", "retrieval"]}},
                           "required": ["rationale", "rung"], "additionalProperties": False}}
TOOLS = [READ_FILE, SUBMIT]
ASK = [{"role": "user", "content": "What does app.py say?"}]


def needs_converter() -> None:
    pytest.importorskip("llama_cpp.llama_grammar", reason="llama-cpp-python is not installed (pipemend[local])")


class ScriptedQwenAtTheModelBoundary:
    """A strict fake of ``local_llama.LlamaSession``: a character tokenizer with Qwen's special
    tokens as single ids, and replies taken in order from ``script`` (free phases) and
    ``calls`` (grammar-constrained phases). It records every sequence and grammar it is given;
    an unexpected phase (nothing scripted for it) fails the test."""

    SPECIALS = ("<tool_call>", "</tool_call>", "<|im_end|>", "<|endoftext|>", "<|im_start|>")
    EOS = 2  # <|im_end|>

    def __init__(self, script: Sequence[str] = (), calls: Sequence[str] = (), n_ctx: int = 100_000):
        self.script, self.calls = list(script), list(calls)
        self.events: list[str] = []
        self.sequences: list[list[int]] = []
        self.grammars: list[str] = []
        self.context = n_ctx

    def tokenize(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            special = next((s for s in self.SPECIALS if text.startswith(s, i)), None)
            if special:
                out.append(self.SPECIALS.index(special))
                i += len(special)
            else:
                out.append(ord(text[i]) + len(self.SPECIALS))
                i += 1
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.SPECIALS[t] if t < len(self.SPECIALS) else chr(t - len(self.SPECIALS)) for t in tokens)

    def n_ctx(self) -> int:
        return self.context

    def token_eos(self) -> int:
        return self.EOS

    def prefill(self, prompt: Sequence[int]) -> None:
        self.events.append("prefill")
        self.sequences.append(list(prompt))

    def generate(self, sequence: Sequence[int], **sampling: Any) -> Iterator[int]:
        assert self.script, f"the model was asked for free text after {self.detokenize(sequence)[-80:]!r}"
        self.events.append("free")
        self.sequences.append(list(sequence))
        yield from self.tokenize(self.script.pop(0))
        yield self.EOS

    def generate_constrained(self, sequence: Sequence[int], gbnf: str, **sampling: Any) -> Iterator[int]:
        assert self.calls, f"the model was asked for a call after {self.detokenize(sequence)[-80:]!r}"
        self.events.append("call")
        self.sequences.append(list(sequence))
        self.grammars.append(gbnf)
        yield from self.tokenize(self.calls.pop(0))
        yield self.EOS


def decode(model: ScriptedQwenAtTheModelBoundary, *, tools=TOOLS, messages=ASK, max_tokens=200,
           stop: Sequence[str] = (), **request: Any):
    req = {"messages": messages, "tools": tools, **request}
    return ToolDecoder(model, Sampling()).decode(req, request_tools(req), tool_choice(req, request_tools(req)),
                                                 max_tokens, list(stop))


# --------------------------------------------------------------------------- prompt rendering


def test_the_prompt_lists_the_tools_and_renders_calls_and_results_in_qwens_format():
    request = {
        "system": [{"type": "text", "text": "You fix pipelines."}],
        "messages": [
            {"role": "user", "content": "Read app.py"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_a", "name": "read_file", "input": {"path": "app.py"}},
                {"type": "tool_use", "id": "toolu_b", "name": "read_file", "input": {"path": "gone.py"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": [{"type": "text", "text": "1: x = 1"}]},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "no such file", "is_error": True},
                {"type": "text", "text": "Go on."}]},
        ],
    }
    prompt = render_prompt(request, TOOLS)
    system, rest = prompt.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou fix pipelines.\n\n# Tools\n")
    listed = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(line) for line in listed] == [
        {"type": "function", "function": {"name": t["name"], "description": t["description"],
                                          "parameters": t["input_schema"]}} for t in TOOLS]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert rest == (
        "<|im_start|>user\nRead app.py<|im_end|>\n"
        "<|im_start|>assistant\nReading.\n"
        '<tool_call>\n{"name": "read_file", "arguments": {"path": "app.py"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "read_file", "arguments": {"path": "gone.py"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n1: x = 1\n</tool_response>\n"
        "<tool_response>\nError: no such file\n</tool_response>\nGo on.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_without_a_system_prompt_qwens_default_stands_and_images_are_refused():
    assert render_prompt({"messages": ASK}, TOOLS).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools")
    with pytest.raises(BackendError, match="text only"):
        render_prompt({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, TOOLS)


@pytest.mark.parametrize("tools, choice, message", [
    ([{"name": "x"}], None, r"tools\.0\.input_schema"),
    ([{"type": "web_search_20250305", "name": "web_search", "input_schema": {}}], None, "only client tools"),
    ([READ_FILE, READ_FILE], None, "offered twice"),
    (TOOLS, {"type": "tool", "name": "delete_all"}, "not one of the offered tools"),
    (TOOLS, {"type": "sometimes"}, "tool_choice"),
])
def test_bad_tools_and_choices_are_refused_with_where(tools, choice, message):
    request = {"tools": tools, **({"tool_choice": choice} if choice else {})}
    with pytest.raises(BackendError, match=message) as e:
        tool_choice(request, request_tools(request))
    assert e.value.status == 400


def test_tool_choice_forms():
    assert tool_choice({}, TOOLS) == ToolChoice("auto")
    assert tool_choice({"tool_choice": {"type": "any", "disable_parallel_tool_use": True}}, TOOLS) == \
        ToolChoice("any", parallel=False)
    forced = tool_choice({"tool_choice": {"type": "tool", "name": "submit"}}, TOOLS)
    assert forced.forced and forced.name == "submit" and not forced.parallel


# --------------------------------------------------------------------------- call schema and grammar


def test_the_call_schema_is_a_union_of_name_and_arguments_per_tool():
    union = call_schema(TOOLS)
    assert [o["properties"]["name"] for o in union["anyOf"]] == [{"const": "read_file"}, {"const": "submit"}]
    assert union["anyOf"][1]["properties"]["arguments"] == SUBMIT["input_schema"]
    assert all(o["required"] == ["name", "arguments"] and o["additionalProperties"] is False for o in union["anyOf"])
    only = call_schema(TOOLS, "submit")
    assert only["properties"]["name"] == {"const": "submit"}


def test_definitions_of_each_tool_are_kept_apart_and_remote_refs_refused():
    with_defs = {"name": "f", "input_schema": {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}},
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}}}}}
    union = call_schema([READ_FILE, with_defs])
    assert union["$defs"] == {"t1-Item": with_defs["input_schema"]["$defs"]["Item"]}
    assert union["anyOf"][1]["properties"]["arguments"]["properties"]["item"] == {"$ref": "#/$defs/t1-Item"}
    remote = {"name": "g", "input_schema": {"type": "object", "properties": {
        "x": {"$ref": "https://attacker.example/schema.json"}}}}
    with pytest.raises(BackendError, match=r"tools\.0\.input_schema\.properties\.x: only local \$ref"):
        call_schema([remote])


def test_the_grammar_names_each_tool_keeps_property_order_and_allows_indented_json():
    needs_converter()
    gbnf = call_grammar(TOOLS)
    rules = dict(line.split(" ::= ", 1) for line in gbnf.splitlines() if " ::= " in line)
    assert '"\\"read_file\\""' in gbnf and '"\\"submit\\""' in gbnf
    assert rules["root"] == "alternative-0 | alternative-1"
    for i in (0, 1):  # "name" comes first, as Qwen writes it, so the tool is chosen first
        assert rules[f"alternative-{i}"].index("name-kv") < rules[f"alternative-{i}"].index("arguments-kv")
    assert rules["space"] == '| " " | "\\n" [ \\t]{0,20}'
    assert '"\\"prompt\\""' in gbnf and '"\\"retrieval\\""' in gbnf  # the enum
    forced = call_grammar(TOOLS, "submit")
    assert '"\\"submit\\""' in forced and "read_file" not in forced


def test_a_schema_the_converter_cannot_read_is_a_400_not_a_crash():
    needs_converter()
    odd = {"name": "h", "input_schema": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}
    with pytest.raises(BackendError, match="cannot constrain tool calls") as e:
        call_grammar([odd])
    assert e.value.status == 400


# --------------------------------------------------------------------------- decoded calls → blocks


def test_a_decoded_call_becomes_a_tool_use_block_and_anything_else_does_not():
    block = call_block('{"name": "read_file", "arguments": {"path": "a\nb.py"}}', TOOLS)
    assert block is not None and block["id"].startswith(TOOL_ID_PREFIX) and len(block["id"]) > len(TOOL_ID_PREFIX)
    assert (block["type"], block["name"], block["input"]) == ("tool_use", "read_file", {"path": "a\nb.py"})
    assert call_block('{"name": "read_file", "arguments": {"pa', TOOLS) is None  # cut off
    assert call_block('{"name": "rm", "arguments": {}}', TOOLS) is None
    assert call_block('{"name": "read_file", "arguments": "app.py"}', TOOLS) is None


@pytest.mark.parametrize("text, start", [
    ('I will read it.\n```json\n{\n  "name": "read_file"', 16),
    ('{"name": "submit"', 0),
    ("The name of the file is app.py", None),
    ('{"path": "app.py"}', None),
])
def test_a_call_written_outside_tool_call_tags_is_found(text, start):
    assert call_start(text) == start


# --------------------------------------------------------------------------- decoding phases


def test_a_tool_call_after_text_is_decoded_under_the_grammar():
    needs_converter()
    model = ScriptedQwenAtTheModelBoundary(script=["I will read it.\n<tool_call>", "<|im_end|>"],
                                           calls=['{"name": "read_file", "arguments": {"path": "app.py"}}'])
    reply = decode(model)
    assert reply.stop_reason == "tool_use"
    assert reply.content[0] == {"type": "text", "text": "I will read it."}
    assert reply.content[1]["name"] == "read_file" and reply.content[1]["input"] == {"path": "app.py"}
    assert model.events == ["prefill", "free", "call", "free"]  # the prompt evaluated once, as from scratch
    prompt = render_prompt({"messages": ASK}, TOOLS)
    assert model.detokenize(model.sequences[0]) == model.detokenize(model.sequences[1]) == prompt
    assert model.detokenize(model.sequences[2]) == prompt + "I will read it.\n<tool_call>\n"
    assert model.grammars == [call_grammar(TOOLS)]
    # after the call, the model may start another; here it ends its turn
    assert model.detokenize(model.sequences[3]).endswith('{"path": "app.py"}}\n</tool_call>')
    assert reply.input_tokens == len(model.tokenize(prompt))


def test_a_call_written_as_fenced_json_is_redone_under_the_grammar():
    needs_converter()
    model = ScriptedQwenAtTheModelBoundary(
        script=['Reading.\n```json\n{\n  "name": "read_file", "arguments": {"path": 7}}\n```', "<|im_end|>"],
        calls=['{"name": "read_file", "arguments": {"path": "app.py", "start_line": 1}}'])
    reply = decode(model)
    assert [b["type"] for b in reply.content] == ["text", "tool_use"]
    assert reply.content[0]["text"] == "Reading." and reply.content[1]["input"] == {"path": "app.py", "start_line": 1}
    # the constrained phase continues from the text only, not from the malformed JSON
    assert model.detokenize(model.sequences[2]).endswith("<|im_start|>assistant\nReading.\n<tool_call>\n")


def test_a_plain_answer_has_no_call_and_ends_the_turn():
    model = ScriptedQwenAtTheModelBoundary(script=["app.py sets x to 1."])
    reply = decode(model)
    assert (reply.content, reply.stop_reason) == ([{"type": "text", "text": "app.py sets x to 1."}], "end_turn")
    assert model.events == ["prefill", "free"]


def test_several_calls_in_one_reply_unless_parallel_use_is_off():
    needs_converter()
    script = ["<tool_call>", "\n<tool_call>", "<|im_end|>"]
    calls = ['{"name": "read_file", "arguments": {"path": "a.py"}}', '{"name": "read_file", "arguments": {"path": "b.py"}}']
    reply = decode(ScriptedQwenAtTheModelBoundary(script=script, calls=calls))
    assert [b["input"]["path"] for b in reply.content] == ["a.py", "b.py"]
    assert len({b["id"] for b in reply.content}) == 2
    one = decode(ScriptedQwenAtTheModelBoundary(script=script[:1], calls=calls[:1]),
                 tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b["input"]["path"] for b in one.content] == ["a.py"] and one.stop_reason == "tool_use"


def test_a_forced_tool_skips_the_free_text_and_constrains_to_that_tool():
    needs_converter()
    model = ScriptedQwenAtTheModelBoundary(calls=['{"name": "submit", "arguments": {"rationale": "r", "rung": "prompt"}}'])
    reply = decode(model, tool_choice={"type": "tool", "name": "submit"})
    assert [(b["type"], b["name"]) for b in reply.content] == [("tool_use", "submit")]
    assert model.events == ["prefill", "call"]
    assert model.grammars == [call_grammar(TOOLS, "submit")]
    assert model.detokenize(model.sequences[1]).endswith("<|im_start|>assistant\n<tool_call>\n")


def test_tool_choice_none_never_calls():
    model = ScriptedQwenAtTheModelBoundary(script=["Let me see. <tool_call>"])
    reply = decode(model, tool_choice={"type": "none"})
    assert (reply.content, reply.stop_reason) == ([{"type": "text", "text": "Let me see."}], "end_turn")
    assert "call" not in model.events


def test_a_call_cut_off_by_max_tokens_is_dropped():
    needs_converter()

    class CutOff(ScriptedQwenAtTheModelBoundary):
        def generate_constrained(self, sequence, gbnf, **sampling):
            self.events.append("call")
            yield from self.tokenize('{"name": "read_file", "arguments": {"path": "a very long path')

    model = CutOff(script=["<tool_call>"])
    reply = decode(model, max_tokens=20)
    assert reply.stop_reason == "max_tokens" and reply.output_tokens == 20
    assert not [b for b in reply.content if b["type"] == "tool_use"]


def test_stop_sequences_end_the_text():
    model = ScriptedQwenAtTheModelBoundary(script=["Answer: 42\nEND and more"])
    reply = decode(model, stop=["END"])
    assert (reply.content[0]["text"], reply.stop_reason, reply.stop_sequence) == ("Answer: 42\n", "stop_sequence", "END")


def test_a_prompt_longer_than_the_context_is_a_400():
    with pytest.raises(BackendError, match="more than the local model's context") as e:
        decode(ScriptedQwenAtTheModelBoundary(n_ctx=50))
    assert e.value.status == 400


# --------------------------------------------------------------------------- through the gateway


@pytest.fixture
def scripted_local(monkeypatch):
    """The local backend with its model session replaced by the scripted fake (the model file is never loaded)."""
    holder: dict[str, ScriptedQwenAtTheModelBoundary] = {}
    monkeypatch.setattr(local, "load_llama", lambda *args: object())
    monkeypatch.setattr(local, "LlamaSession", lambda llama, snapshots=None: holder["model"])
    return holder


def test_tool_use_through_the_gateway_parses_in_both_sdks_plain_and_streaming(tmp_path, scripted_local):
    needs_converter()
    call = '{"name": "read_file", "arguments": {"path": "app.py", "start_line": 3}}'
    config = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=[local.MODEL_NAME])
    with Gateway(config) as gw:
        client = anthropic.Anthropic(base_url=gw.url, api_key="x")
        ask = dict(model=local.MODEL_NAME, max_tokens=100, tools=TOOLS, messages=ASK)
        scripted_local["model"] = ScriptedQwenAtTheModelBoundary(script=["<tool_call>", "<|im_end|>"], calls=[call])
        msg = client.messages.create(**ask)
        assert msg.stop_reason == "tool_use" and msg.id.startswith("msg_local_")
        (use,) = msg.content
        assert (use.type, use.name, use.input) == ("tool_use", "read_file", {"path": "app.py", "start_line": 3})
        assert use.id.startswith(TOOL_ID_PREFIX)

        scripted_local["model"] = ScriptedQwenAtTheModelBoundary(script=["Look:\n<tool_call>", "<|im_end|>"],
                                                                 calls=[call])
        with client.messages.stream(**{**ask, "system": "stream it"}) as stream:
            deltas = [e for e in stream if e.type == "input_json"]
            final = stream.get_final_message()
        assert deltas and deltas[-1].snapshot == {"path": "app.py", "start_line": 3}
        assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[1].input == use.input

        # the tool result goes back to the model as Qwen's <tool_response> turn
        scripted_local["model"] = model = ScriptedQwenAtTheModelBoundary(script=["app.py line 3 sets x."])
        after = client.messages.create(**{**ask, "messages": [
            *ASK, {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3: x = 1"}]}]})
        assert after.content[0].text == "app.py line 3 sets x." and after.stop_reason == "end_turn"
        seen = model.detokenize(model.sequences[0])
        assert seen.endswith(f"<tool_call>\n{call}\n</tool_call><|im_end|>\n"
                             "<|im_start|>user\n<tool_response>\n3: x = 1\n</tool_response><|im_end|>\n"
                             "<|im_start|>assistant\n")

        # the Chat Completions API maps the same call to tool_calls
        scripted_local["model"] = ScriptedQwenAtTheModelBoundary(script=["<tool_call>", "<|im_end|>"], calls=[call])
        chat = openai.OpenAI(base_url=gw.url + "/v1", api_key="x").chat.completions.create(
            model=local.MODEL_NAME, max_tokens=100, messages=[{"role": "user", "content": "read app.py, openai"}],
            tools=[{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                     "parameters": t["input_schema"]}} for t in TOOLS])
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "read_file"
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"path": "app.py", "start_line": 3}


# --------------------------------------------------------------------------- the real local model (slow)


def _local_model_or_skip() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pipemend[local]')")
    if not model_files.default_model_path().exists():
        pytest.skip(f"local model file absent: {model_files.default_model_path()}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_real_local_model_calls_a_tool_that_the_anthropic_sdk_parses(tmp_path: Path):
    _local_model_or_skip()
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")) as gw:
        client = anthropic.Anthropic(base_url=gw.url, api_key="x", timeout=1200)
        ask = dict(model=local.MODEL_NAME, max_tokens=60, tools=[READ_FILE],
                   system="You are a careful engineer. Use the tools.",
                   messages=[{"role": "user", "content": "Read the file pipeline/prompts.py."}])
        msg = client.messages.create(**ask)
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and uses, msg.content
        assert uses[0].name == "read_file" and isinstance(uses[0].input.get("path"), str)
        assert set(uses[0].input) <= {"path", "start_line"}  # the grammar admits nothing else
        # streamed: the same reply (from the cache), its input rebuilt from input_json_delta events
        with client.messages.stream(**ask) as stream:
            final = stream.get_final_message()
        assert [b.input for b in final.content if b.type == "tool_use"] == [u.input for u in uses]
        # a forced tool, fresh from the model: a call of exactly that tool, with no text before it
        forced = client.messages.create(**{**ask, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "submit"},
                                           "max_tokens": 150})
        assert [b.type for b in forced.content] == ["tool_use"] and forced.content[0].name == "submit"
        assert forced.content[0].input["rung"] in ("prompt", "retrieval") and forced.content[0].input["rationale"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_prefilled_prompt_gives_the_very_logits_of_a_fresh_evaluation():
    """An agent's next request repeats its last one and adds to it: read after other work (a shorter prompt and
    a few generated tokens in the KV cache), its prompt gives the logits of a fresh evaluation, bit for bit."""
    _local_model_or_skip()
    import numpy as np

    from pipemend.gateway.backends.local_llama import LlamaSession, PrefixSnapshots

    backend = local.LocalBackend()
    llama = local.load_llama(None, backend.n_ctx, backend.n_threads)
    session = LlamaSession(llama)
    first = {"system": "You fix pipelines. " + "Read traces before you edit. " * 80, "messages": ASK}
    then = {**first, "messages": [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "read_file", "input": {"path": "app.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1: x = 1\n" * 60}]}]}
    one, two = (session.tokenize(render_prompt(r, [READ_FILE])) for r in (first, then))
    assert two[:len(one)] == one and len(one) > llama.n_batch

    def last_logits() -> Any:
        return np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),)).copy()

    session.prefill(two)
    fresh = last_logits()
    session.prefill(one)
    for i, _ in enumerate(session.generate(one, temperature=0, top_k=1, top_p=1, seed=0)):
        if i >= 4:  # a few generated tokens in the KV cache too, as after a real reply
            break
    session.prefill(two)
    assert np.array_equal(last_logits(), fresh)

    # read from a snapshot of `one`'s first blocks, after other work: the very same logits
    snapshots = PrefixSnapshots()
    kept = LlamaSession(llama, snapshots)
    kept.prefill(one)
    assert snapshots.saved == 1 and snapshots.hits == 0
    for i, _ in enumerate(kept.generate(one, temperature=0, top_k=1, top_p=1, seed=0)):
        if i >= 4:
            break
    kept.prefill(session.tokenize("Something else entirely. " * 40))
    kept.prefill(two)
    assert snapshots.hits == 1
    assert np.array_equal(last_logits(), fresh)


def test_prefix_snapshots_give_the_longest_saved_boundary_whose_tokens_match_and_drop_the_oldest():
    from pipemend.gateway.backends.local_llama import PrefixSnapshots

    snaps = PrefixSnapshots(max_bytes=25)
    prompt = list(range(100, 135))
    keys = PrefixSnapshots.keys(prompt, 8, 34)
    assert [b for b, _ in keys] == [8, 16, 24, 32]
    assert snaps.longest(prompt, keys) == (0, None)
    snaps.put(keys[0][1], prompt[:8], b"a" * 10)
    snaps.put(keys[2][1], prompt[:24], b"c" * 10)
    assert snaps.longest(prompt, keys) == (24, b"c" * 10)
    assert snaps.longest(prompt[:20], PrefixSnapshots.keys(prompt[:20], 8, 19)) == (8, b"a" * 10)
    changed = prompt[:10] + [0] + prompt[11:]  # a token of the second block differs: only the first block is shared
    assert snaps.longest(changed, PrefixSnapshots.keys(changed, 8, 34)) == (8, b"a" * 10)
    snaps.put(keys[3][1], prompt[:32], b"d" * 10)  # over 25 bytes: the least recently used one (24) goes
    assert snaps.longest(prompt, keys) == (32, b"d" * 10)
    assert snaps.longest(prompt, keys[:3]) == (8, b"a" * 10)
    snaps.put(keys[1][1], prompt[:16], b"x" * 26)  # larger than the whole cache: not kept
    assert snaps.longest(prompt, keys[:2]) == (8, b"a" * 10)
    assert (snaps.saved, snaps.hits) == (3, 6)

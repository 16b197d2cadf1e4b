"""The ``claude`` proposer survives a weak model: every mistake is counted in the transcript, told to the agent
or ended by the harness with a reason, and nothing raises but the harness's own endings.

Driven through the real anthropic SDK and the real gateway; the only fake is the strict ``scripted:`` backend
(each reply answers once, in order, only when the request carries what the previous call returned).
"""

from __future__ import annotations

import json

import pytest

from support import SUBDIR, StubTrain, git, make_ctx, reply, start, tool_use, transcript

from pipemend.proposers import ProposerBudget
from pipemend.proposers.agent_tools import AgentSessionEnded
from pipemend.proposers.syntax import syntax_error


def _tools(s) -> dict[str, dict]:
    return {r["tool_use_id"]: r for r in transcript(s) if r["event"] == "tool"}


def _requests(s) -> list[dict]:
    """The requests the proposer sent the agent gateway, as the gateway logged them."""
    return [json.loads(line)["request"] for line in s.calls_text().splitlines()]


def test_an_edit_that_breaks_python_or_a_template_is_refused_and_the_file_kept(tmp_path, wt, sessions):
    pipeline = (wt / SUBDIR / "pipeline.py").read_text()
    prompt = (wt / SUBDIR / "prompts" / "answer.j2").read_text()
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("edit_file", {"path": "pipeline.py", "old": "def run(inputs):",
                                            "new": "def run(inputs)"}, "tu1"),
                     tool_use("write_file", {"path": "prompts/answer.j2",
                                             "content": "Question: {{ question }\n{% for d in docs %}\nAnswer:"}, "tu2"),
                     tool_use("write_file", {"path": "prompts/new.j2", "content": "{% if x %}never closed"}, "tu3"))),
        ("TemplateSyntaxError", reply(tool_use("edit_file", {"path": "prompts/answer.j2", "old": "Answer:",
                                                             "new": "Reply with the entity only.\nAnswer:"}, "tu4"))),
        ("edited prompts/answer.j2", reply(tool_use("submit", {"rationale": "entity only", "rung": "prompt"}, "tu5"))),
    ])
    proposal = s.proposer().propose(make_ctx(wt))
    s.check_complete()
    assert proposal is not None and proposal.meta["files_written"] == ["prompts/answer.j2"]
    out = _tools(s)
    # file, line and message, and the file as it was
    assert out["tu1"]["is_error"] and "pipeline.py line 4" in out["tu1"]["output"]
    assert "SyntaxError" in out["tu1"]["output"] and "pipeline.py is unchanged" in out["tu1"]["output"]
    assert (wt / SUBDIR / "pipeline.py").read_text() == pipeline
    assert out["tu2"]["is_error"] and "prompts/answer.j2 line 1: TemplateSyntaxError" in out["tu2"]["output"]
    assert out["tu3"]["is_error"] and "prompts/new.j2 line 1" in out["tu3"]["output"]
    assert not (wt / SUBDIR / "prompts" / "new.j2").exists()
    assert (wt / SUBDIR / "prompts" / "answer.j2").read_text() == prompt.replace(
        "Answer:", "Reply with the entity only.\nAnswer:")
    assert [out[t]["flags"] for t in ("tu1", "tu2", "tu3", "tu4")] == [["rejected_edit"]] * 3 + [[]]
    end = transcript(s)[-1]
    assert end["outcome"] == "submitted" and end["counters"]["rejected_edit"] == 3
    assert proposal.meta["agent_counters"]["rejected_edit"] == 3


def test_syntax_checks_parse_and_never_run_the_agents_code(tmp_path):
    marker = tmp_path / "ran"
    # compiled only: the module-level code that would write the marker never runs
    assert syntax_error("a.py", f"open({str(marker)!r}, 'w').write('x')\n") is None
    assert syntax_error("t.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for i in range(10**9) %}x{% endfor %}") is None
    assert not marker.exists()
    assert syntax_error("a.py", "return 1\n") == "a.py line 1, column 1: SyntaxError: 'return' outside function"
    assert "a.py line 2" in syntax_error("a.py", "if x:\nprint(1)\n") and "IndentationError" in syntax_error(
        "a.py", "if x:\nprint(1)\n")
    assert syntax_error("a.py", "x = 1\0\n").startswith("a.py")  # NUL bytes: refused, with the file named
    assert syntax_error("deep.py", "(" * 5000 + ")" * 5000).startswith("deep.py")
    assert syntax_error("t.jinja", "{% endfor %}").startswith("t.jinja line 1: TemplateSyntaxError")
    assert syntax_error("notes.md", "{% if %}") is None  # only Python and Jinja2 files are held to a syntax


def test_a_file_that_did_not_parse_before_may_still_be_edited(tmp_path, wt):
    from support import make_tools

    (wt / SUBDIR / "prompts" / "odd.j2").write_text("{{ not jinja }")
    tools = make_tools(wt)
    assert tools.edit_file("prompts/odd.j2", "not", "still not").startswith("edited")
    assert tools.revision == 1
    tools.write_file("prompts/odd.j2", "{{ still not jinja }")  # the same text again: no change
    assert tools.revision == 1


def test_the_same_call_in_a_loop_ends_the_session_as_looping(tmp_path, wt, sessions):
    read = {"path": "prompts/answer.j2"}
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("read_file", read, "tu1"))),
        ("Answer:", reply(tool_use("edit_file", {"path": "prompts/answer.j2", "old": "Answer:", "new": "A:"}, "tu2"))),
        # after an edit the same read is a new question: not a repeat
        ("edited", reply(tool_use("read_file", read, "tu3"))),
        ("A:", reply(tool_use("read_file", read, "tu4"))),
        ("the result is the same", reply(tool_use("read_file", read, "tu5"))),
        ("the result is the same", reply(tool_use("read_file", read, "tu6"))),
    ])
    with pytest.raises(AgentSessionEnded) as info:
        s.proposer(max_repeated_calls=4).propose(make_ctx(wt))
    s.check_complete()  # no request after the ending
    assert info.value.reason == "looping" and "read_file" in str(info.value) and "4 times" in str(info.value)
    out = _tools(s)
    assert out["tu3"]["flags"] == [] and out["tu4"]["flags"] == ["repeated"]
    assert "you made this exact call 2 times" in out["tu4"]["output"]
    end = transcript(s)[-1]
    assert end["event"] == "end" and end["outcome"] == "ended" and end["reason"] == "looping"
    assert end["counters"]["repeated"] == 3
    assert info.value.meta["outcome"] == "ended" and info.value.meta["agent_counters"]["repeated"] == 3
    assert info.value.meta["transcript"][-1] == end


def test_malformed_and_unknown_calls_in_a_row_end_the_session(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("rm_rf", {"path": "."}, "tu1"),
                     tool_use("read_file", ["prompts/answer.j2"], "tu2"))),
        ("unknown tool 'rm_rf'", reply(tool_use("read_file", {"file": "x"}, "tu3"),
                                       tool_use("list_files", {}, "tu4"))),  # a good call breaks the streak
        ("prompts/answer.j2", reply({"type": "tool_use", "id": "tu5", "input": {}},
                                    tool_use("Bash", {"command": "ls"}, "tu6"),
                                    tool_use("read_file", "prompts/answer.j2", "tu7"))),
        ("must be a JSON object", reply(tool_use("submit", "done", "tu8"), tool_use("edit", {}, "tu9"))),
    ])
    with pytest.raises(AgentSessionEnded) as info:
        s.proposer(max_malformed_calls=5).propose(make_ctx(wt))
    s.check_complete()
    assert info.value.reason == "malformed" and "5 malformed or unknown tool calls in a row" in str(info.value)
    out = _tools(s)
    assert out["tu1"]["flags"] == ["unknown_tool"] and out["tu2"]["flags"] == ["malformed"]
    assert "not a list" in out["tu2"]["output"] and "bad input for read_file" in out["tu3"]["output"]
    assert out["tu4"]["flags"] == [] and not out["tu4"]["is_error"]
    assert "needs a tool name" in out["tu5"]["output"] and out["tu8"]["flags"] == ["malformed"]
    assert "tu9" in out  # the fifth in a row, after tu5..tu8
    counters = transcript(s)[-1]["counters"]
    assert counters["malformed"] == 5 and counters["unknown_tool"] == 3


def test_replies_without_a_tool_call_end_the_session_as_no_submit(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply({"type": "text", "text": "I will now think about it."}, stop="end_turn")),
        ("call `submit`", reply(stop="end_turn")),  # an empty reply
        ("call `submit`", reply(tool_use("read_file", {"path": "config.yaml"}, "tu1"), stop="max_tokens")),
    ])
    with pytest.raises(AgentSessionEnded) as info:
        s.proposer(max_idle_replies=3).propose(make_ctx(wt))
    s.check_complete()
    assert info.value.reason == "no_submit" and "3 replies in a row without a tool call" in str(info.value)
    counters = transcript(s)[-1]["counters"]
    assert counters["idle_replies"] == 2 and counters["truncated_replies"] == 1
    # the empty reply went back as a well-formed assistant turn
    sent = _requests(s)[2]["messages"]
    assert {"role": "assistant", "content": [{"type": "text", "text": "(empty reply)"}]} in sent


def test_a_weird_reply_never_raises_and_goes_back_well_formed(tmp_path, wt, sessions):
    huge = "x" * 5_000
    s = start(tmp_path, sessions, [
        (None, {"content": [tool_use("read_file", "config.yaml", "same"),
                            {"type": "tool_use", "name": "list_files", "input": {}},  # no id
                            tool_use("show_diff", {}, "same"),  # a duplicate id
                            {"type": "tool_use", "id": "tu4", "name": ["read_file"], "input": {}},
                            tool_use("write_file", {"path": "prompts/answer.j2", "content": huge}, "tu5"),
                            "not a block", {"type": "mystery"}, {"type": "text", "text": ""}],
                "stop_reason": "tool_use", "usage": {"input_tokens": -5, "output_tokens": None}}),
        ("its input is", {"content": [{"type": "text"}, ["nested"]], "stop_reason": 7, "usage": []}),
        ("call `submit`", reply(tool_use("edit_file", {"path": "prompts/answer.j2", "old": "Answer:",
                                                       "new": "Entity only.\nAnswer:"}, "tu6"))),
        ("edited", reply(tool_use("submit", {"rationale": "entity only", "rung": "prompt"}, "tu7"))),
    ])
    proposal = s.proposer(max_tool_input_chars=1_000).propose(make_ctx(wt))
    s.check_complete()
    assert proposal is not None and proposal.rationale == "entity only"
    records = transcript(s)
    tools = [r for r in records if r["event"] == "tool"]
    ids = [r["tool_use_id"] for r in tools]
    assert len(ids) == len(set(ids)) == 6  # every call got its own id
    by_name = {str(r["name"]): r for r in tools}
    assert by_name["list_files"]["is_error"] is False and by_name["show_diff"]["is_error"] is False
    assert "needs a tool name" in by_name["['read_file']"]["output"]
    assert by_name["write_file"]["flags"] == ["oversized_input"] and by_name["write_file"]["input"] == "(oversized)"
    assert "Answer:" in (wt / SUBDIR / "prompts" / "answer.j2").read_text() and huge not in (
        wt / SUBDIR / "prompts" / "answer.j2").read_text()
    responses = [r for r in records if r["event"] == "response"]
    assert responses[0]["problems"] == ["malformed_block", "malformed_block"]
    assert responses[1]["problems"] == ["malformed_block"]
    assert responses[0]["spent"]["input_tokens"] == 0 == responses[0]["spent"]["output_tokens"]  # garbage counts 0
    # what went back to the agent: object inputs, valid names, unique ids, the huge input dropped
    echoed = _requests(s)[1]["messages"][1]["content"]
    assert [b["type"] for b in echoed] == ["tool_use"] * 5
    assert [b["input"] for b in echoed] == [{}, {}, {}, {}, {}]
    assert echoed[3]["name"] == "invalid_tool_name" and len({b["id"] for b in echoed}) == 5
    assert huge not in json.dumps(_requests(s))
    counters = records[-1]["counters"]
    assert counters["oversized_input"] == 1 and counters["malformed"] == 2 and counters["malformed_block"] == 3
    assert counters["idle_replies"] == 1


def test_a_reply_that_is_no_message_reads_as_empty(wt):
    """What the gateway itself refuses (content that is no list) can still come from elsewhere: read as empty."""
    from pipemend.proposers.claude import ClaudeProposer, _Session

    session = _Session(ClaudeProposer(model="scripted:x", base_url="http://127.0.0.1:9"), make_ctx(wt))
    content, uses, problems = session._read_reply({"content": "not a list", "usage": "none"})
    assert content == [{"type": "text", "text": "(empty reply)"}] and uses == [] and problems == ["malformed_reply"]


def test_a_giant_output_is_cut_with_a_note_and_counted(tmp_path, wt, sessions):
    (wt / SUBDIR / "prompts" / "long.j2").write_text("".join(f"line {i}: {'word ' * 20}\n" for i in range(400)))
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("read_file", {"path": "prompts/long.j2"}, "tu1"))),
        ("truncated", reply(tool_use("give_up", {"reason": "nothing to do"}, "tu2"))),
    ])
    assert s.proposer(max_tool_output_chars=1_000).propose(make_ctx(wt)) is None
    s.check_complete()
    out = _tools(s)["tu1"]
    assert out["flags"] == ["oversized_output"] and len(out["output"]) < 1_200
    assert "[truncated:" in out["output"] and "start_line/end_line" in out["output"]
    assert transcript(s)[-1]["counters"] == {"oversized_output": 1}


def test_the_last_turn_is_announced_and_a_spent_turn_budget_says_no_submit(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("list_files", {}, "tu1"))),
        ("This is your last turn", reply(tool_use("show_diff", {}, "tu2"))),
    ])
    from pipemend.proposers import ProposerBudgetExhausted

    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer().propose(make_ctx(wt, budget=ProposerBudget(max_turns=2), train=StubTrain(wt)))
    s.check_complete()
    assert info.value.reason == "turns" and "no submit within the turn limit" in str(info.value)


def test_an_edit_and_a_train_run_in_a_cycle_going_nowhere_end_the_session_as_looping(wt):
    """Each edit changes the file, so no call repeats with no file changed in between; the same calls made
    ``max_session_repeats`` times in the session end it all the same (a 1.5B agent's 40 turns went so)."""
    from pipemend.proposers.agent_tools import Toolbox

    box = Toolbox(make_ctx(wt, train=StubTrain(wt)), max_repeated_calls=4, max_session_repeats=3)
    edit = {"path": "prompts/answer.j2", "old": "Answer:", "new": "Now. Answer:"}
    for _ in range(2):
        assert box.call("edit_file", edit)[1] is False
        assert box.call("run_train", {"ids": ["t1"]})[1] is False
    assert box.ending is None and "Now. Now. Answer:" in (wt / SUBDIR / "prompts" / "answer.j2").read_text()
    out, is_error = box.call("edit_file", edit)
    assert is_error and box.ending is not None and box.ending[0] == "looping"
    assert "edit_file" in out and "3 times in this session" in out
    assert (wt / SUBDIR / "prompts" / "answer.j2").read_text().count("Now.") == 2  # the ending call did not run


def test_a_toolbox_whose_session_was_ended_runs_nothing_more(wt):
    """Whatever drives the toolbox (the claude loop raises at once; an MCP client may keep calling), an ended
    session's tools refuse everything, submit included."""
    from pipemend.proposers.agent_tools import Toolbox

    box = Toolbox(make_ctx(wt), max_repeated_calls=2)
    assert box.call("list_files", {})[1] is False
    out, is_error = box.call("list_files", {})
    assert is_error and box.ending is not None and box.ending[0] == "looping"
    (wt / SUBDIR / "prompts" / "answer.j2").write_text("changed\n")
    assert box.call("read_file", {"path": "config.yaml"}) == (f"session ended by the harness: {box.ending[1]}", True)
    assert "ended by the harness" in box.finish("submit", {"rationale": "r", "rung": "prompt"})


def test_a_submit_of_exactly_a_change_judged_on_this_base_is_refused_with_its_verdict(wt, tmp_path):
    """A greedy small agent makes the same edit candidate after candidate. Its submit is refused while the diff
    is one the history shows judged on this base and not kept; the candidate before the last accepted one was
    judged on an older base, so its diff does not count."""
    from pipemend.proposers.agent_tools import Toolbox

    answer = wt / SUBDIR / "prompts" / "answer.j2"
    answer.write_text(answer.read_text().replace("Answer:", "Reply briefly. Answer:"))
    diff = git(wt, "diff")  # what the tools' diff gives (the gate's diff in a run)
    history_dir = tmp_path / "history"
    for n in (1, 2, 3):
        (history_dir / str(n)).mkdir(parents=True)
        (history_dir / str(n) / "diff.patch").write_text(diff if n in (1, 3) else "other\n")
    verdict = {"reasons": ["val delta -0.2500 below min_delta 0.02"]}
    history = [{"n": 1, "accepted": False, "verdict": verdict}, {"n": 2, "accepted": True, "verdict": {}},
               {"n": 3, "accepted": False, "verdict": verdict}]
    submit = {"rationale": "brief answers", "rung": "prompt"}

    box = Toolbox(make_ctx(wt, n=4, history=history, history_dir=history_dir))
    out = box.finish("submit", submit)
    assert isinstance(out, str) and "exactly the change of candidate 3" in out and "below min_delta" in out
    assert box.counts["refused_submit"] == 1

    history[2]["accepted"] = True  # 3 kept: nothing judged on the new base yet, and 1 was on an older one
    assert not isinstance(Toolbox(make_ctx(wt, n=4, history=history, history_dir=history_dir)).finish(
        "submit", submit), str)
    answer.write_text(answer.read_text().replace("briefly", "in one word"))  # another change: accepted
    history[2]["accepted"] = False
    assert not isinstance(Toolbox(make_ctx(wt, n=4, history=history, history_dir=history_dir)).finish(
        "submit", submit), str)

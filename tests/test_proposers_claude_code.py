"""The ``claude-code`` proposer: the real Claude Code CLI (bundled with claude-agent-sdk) and the real gateway.

The only fake is the gateway's strict ``scripted:`` backend, as for the
``claude`` proposer: the CLI sends its requests (system prompt, environment
notes, pipemend's MCP tools) to pipemend's gateway, each scripted reply answers
once, in order, only when the request carries what the previous tool call
should have returned, and an extra or missing request fails the test.
"""

from __future__ import annotations

import json

import pytest

from support import SUBDIR, StubTrain, git, make_ctx, reply, secret_labels, start, tool_use, transcript

from pipemend.proposers import ProposerBudget, ProposerBudgetExhausted
from pipemend.proposers.agent_tools import AgentSessionEnded

pytestmark = [pytest.mark.claude_code, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def _needs_claude_agent_sdk():
    # a skip inside the test (not at import), so that CI's conftest turns it into a failure
    pytest.importorskip("claude_agent_sdk", reason="the claude-code extra is not installed (scripts/install --dev)")

P = "mcp__pipemend__"


def use(name: str, args: dict, uid: str) -> dict:
    return tool_use(P + name, args, uid)


def test_claude_code_reads_edits_runs_and_submits_through_pipemend_tools_only(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply({"type": "text", "text": "Looking at a failing example."}, use("read_trace", {"id": "t1"}, "tu1"))),
        ("[2] answer (generation)", reply(use("read_file", {"path": "data/qa.jsonl"}, "tu2"))),
        ("protected", reply(use("edit_file", {"path": "prompts/answer.j2", "old": "Answer:",
                                              "new": "Reply with the entity only.\nAnswer:"}, "tu3"))),
        ("edited prompts/answer.j2", reply(use("run_train", {"ids": ["t1", "t2"]}, "tu4"))),
        ("mean exact_match = 1.000 over 2", reply(use("submit", {
            "rationale": "The answer step wrote sentences; ask for the entity only.", "rung": "prompt"}, "tu5"))),
        ("the session is over", reply({"type": "text", "text": "Submitted."}, stop="end_turn")),
    ])
    train = StubTrain(wt)
    ctx = make_ctx(wt, train=train)
    proposal = s.proposer("claude-code").propose(ctx)
    s.check_complete()

    assert proposal is not None and proposal.rung == "prompt"
    assert proposal.rationale == "The answer step wrote sentences; ask for the entity only."
    assert git(wt, "diff", "--name-only").split() == [f"{SUBDIR}/prompts/answer.j2"]
    assert train.calls == [["t1", "t2"]]
    assert proposal.meta["proposer"] == "claude-code" and proposal.meta["files_written"] == ["prompts/answer.j2"]
    assert proposal.meta["agent_turns"] == 5  # the response after submit is not reached by the proposer
    records = transcript(s)
    assert records[0]["event"] == "start" and records[0]["tools"] == [P + n for n in (
        "list_files", "read_file", "search", "edit_file", "write_file", "run_train", "read_trace", "diagnose",
        "show_diff", "list_train_examples", "show_train_example", "submit", "give_up")]
    init = next(r for r in records if r["event"] == "system" and r["subtype"] == "init")
    assert sorted(init["data"]["tools"]) == sorted(records[0]["tools"]), "Claude Code's own tools are switched off"
    assert any(r["event"] == "end" and r["outcome"] == "submitted" for r in records)
    flow = [r["event"] for r in records if r["event"] in ("response", "tool", "end")]
    assert flow == ["response", "tool"] * 4 + ["response", "end", "response"], flow  # each response before its tools
    first = next(r for r in records if r["event"] == "response")["response"]
    assert first["role"] == "assistant" and first["content"][0] == {"type": "text", "text": "Looking at a failing example."}
    assert first["content"][1]["type"] == "tool_use" and first["content"][1]["name"] == P + "read_trace"
    # the report reads this transcript like the claude proposer's
    from pipemend.report.render import summarize_transcript

    summary = summarize_transcript(records)
    assert summary["turns"] == 6 and summary["outcome"] == "submitted" and summary["final"] == "Submitted."
    assert dict(summary["tools"]) == {"read_trace": 1, "read_file": 1, "edit_file": 1, "run_train": 1}
    tools = {r["name"]: r for r in records if r["event"] == "tool"}
    assert tools["read_file"]["is_error"] and "protected" in tools["read_file"]["output"]
    # every request went through the gateway, with the scripted model, and no label reached the agent
    calls = [json.loads(line) for line in s.calls_text().splitlines()]
    assert len(calls) == 6 and {c["model"] for c in calls} == {s.model}
    everything = (s.run_dir / "candidates/1/transcript.jsonl").read_text() + s.calls_text()
    for label in secret_labels():
        assert label not in everything


def test_ending_a_turn_without_submit_gets_a_reminder(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply({"type": "text", "text": "I think the prompt is fine."}, stop="end_turn")),
        ("without submitting", reply(use("give_up", {"reason": "the pipeline already answers tersely"}, "tu1"))),
        ("the session is over", reply({"type": "text", "text": "ok"}, stop="end_turn")),
    ])
    assert s.proposer("claude-code").propose(make_ctx(wt)) is None
    s.check_complete()
    records = transcript(s)
    assert [r["outcome"] for r in records if r["event"] == "end"] == ["gave_up"]
    assert any(r["event"] == "notice" and "without submitting" in r["message"] for r in records)


def test_the_harness_turn_limit_interrupts_claude_code(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply(use("list_files", {}, "tu1"))),
        ("prompts/answer.j2", reply(use("show_diff", {}, "tu2"))),
    ])
    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer("claude-code").propose(make_ctx(wt, budget=ProposerBudget(max_turns=2)))
    s.check_complete()  # exactly two requests: a third would be unmatched
    assert info.value.reason == "turns" and info.value.meta["agent_turns"] == 2
    assert transcript(s)[-1]["outcome"] == "budget_exhausted"
    assert git(wt, "status", "--porcelain") == ""


def test_a_failing_agent_request_is_an_error_not_a_hang(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [])  # nothing scripted: the gateway answers every request with an error
    with pytest.raises(Exception, match="claude-code: the agent's request failed"):
        s.proposer("claude-code").propose(make_ctx(wt))
    assert transcript(s)[-1]["outcome"] == "error"


def test_a_session_past_its_wall_clock_limit_is_discarded(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, reply(use("list_files", {}, "tu1")))], delay_s=20)
    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer("claude-code", session_timeout_s=2).propose(make_ctx(wt))
    assert info.value.reason == "time" and "ran past 2 s" in str(info.value)
    assert transcript(s)[-1]["outcome"] == "budget_exhausted"


def test_a_cli_that_still_offers_its_own_tools_is_refused(wt):
    """Claude Code's Read or Bash would reach the val labels in the worktree: such a session never starts."""
    from claude_agent_sdk import SystemMessage

    from pipemend.errors import PipemendError
    from pipemend.proposers.claude_code import ClaudeCodeProposerConfig, CodeSession

    session = CodeSession(ClaudeCodeProposerConfig(), make_ctx(wt))
    assert session.on_message(SystemMessage(subtype="init", data={"tools": [P + "read_file"]})) is None
    with pytest.raises(PipemendError, match="other than pipemend's \\(Bash\\)"):
        session.on_message(SystemMessage(subtype="init", data={"tools": [P + "read_file", "Bash"]}))
    assert session.transcript[-1]["event"] == "end" and session.transcript[-1]["outcome"] == "error"


def test_the_same_call_in_a_loop_ends_the_claude_code_session(tmp_path, wt, sessions):
    read = {"path": "prompts/answer.j2"}
    s = start(tmp_path, sessions, [
        (None, reply(use("read_file", read, "tu1"))),
        ("Answer:", reply(use("read_file", read, "tu2"))),
        ("the result is the same", reply(use("read_file", read, "tu3"))),
        ("the result is the same", reply(use("read_file", read, "tu4"))),
    ])
    with pytest.raises(AgentSessionEnded) as info:
        s.proposer("claude-code", max_repeated_calls=4).propose(make_ctx(wt))
    # the fourth identical call ended the session: the harness interrupted the CLI, whatever it asked next
    assert info.value.reason == "looping" and "read_file" in str(info.value)
    end = next(r for r in transcript(s) if r["event"] == "end")
    assert end["outcome"] == "ended" and end["reason"] == "looping" and end["counters"]["repeated"] == 3
    assert git(wt, "status", "--porcelain") == ""

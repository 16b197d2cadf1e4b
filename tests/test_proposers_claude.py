"""The ``claude`` proposer driven through the real anthropic SDK and the real pipemend gateway.

The only fake is the gateway's strict ``scripted:`` backend: each scripted reply
answers once, in order, and only when the request carries what the previous
tool call should have returned; an unexpected extra request or an unused reply
fails the test (``check_complete``).
"""

from __future__ import annotations

import json

import pytest

from support import SUBDIR, StubTrain, git, make_ctx, reply, secret_labels, start, tool_use, transcript

from pipemend.proposers import ProposerBudget, ProposerBudgetExhausted
from pipemend.proposers.claude import ClaudeProposerConfig


def test_multi_turn_session_reads_edits_runs_and_submits(tmp_path, wt, sessions):
    history_dir = tmp_path / "history"
    (history_dir / "1").mkdir(parents=True)
    (history_dir / "1" / "rationale.md").write_text("raised top_k to 8; rejected: cost ratio\n")
    s = start(tmp_path, sessions, [
        (None, reply({"type": "text", "text": "Let me look at a failing example."},
                     tool_use("read_trace", {"id": "t1"}, "tu1"))),
        ("[2] answer (generation)", reply(tool_use("read_file", {"path": "data/qa.jsonl"}, "tu2"),
                                          tool_use("search", {"pattern": "ZEBRA|OKAPI"}, "tu3"),
                                          tool_use("show_train_example", {"id": "t1"}, "tu4"),
                                          tool_use("show_train_example", {"id": "v1"}, "tu5"),
                                          tool_use("history_read", {"path": "1/rationale.md"}, "tu6"))),
        ("raised top_k to 8", reply(tool_use("edit_file", {"path": "prompts/answer.j2", "old": "Answer:",
                                                           "new": "Reply with the entity only.\nAnswer:"}, "tu7"))),
        ("edited prompts/answer.j2", reply(tool_use("run_train", {"ids": ["t1", "t2"]}, "tu8"))),
        ("mean exact_match = 1.000 over 2", reply(tool_use("submit", {
            "rationale": "The answer step wrote full sentences; ask for the entity only.", "rung": "prompt"}, "tu9"))),
    ])
    train = StubTrain(wt)
    ctx = make_ctx(wt, train=train, history_dir=history_dir, history=[
        {"n": 1, "accepted": False, "rationale": "raised top_k to 8", "val_score": 0.41, "delta": -0.02,
         "reasons": ["cost ratio"], "per_example": [{"id": "v1", "output": "VAL-ZEBRA-1"}]}])
    proposal = s.proposer().propose(ctx)
    s.check_complete()

    assert proposal is not None
    assert proposal.rationale == "The answer step wrote full sentences; ask for the entity only."
    assert proposal.rung == "prompt"
    assert "Reply with the entity only.\nAnswer:" in (wt / SUBDIR / "prompts/answer.j2").read_text()
    assert git(wt, "diff", "--name-only").split() == [f"{SUBDIR}/prompts/answer.j2"]
    assert proposal.meta["agent_turns"] == 5 and proposal.meta["files_written"] == ["prompts/answer.j2"]
    assert train.calls == [["t1", "t2"]]

    records = transcript(s)
    assert proposal.meta["transcript_path"].endswith("candidates/1/transcript.jsonl")
    assert [r["event"] for r in records].count("response") == 5
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    assert records[-1]["outcome"] == "submitted"
    assert all(r["format"] == "pipemend-transcript-1" for r in records)
    assert len(proposal.meta["transcript"]) == len(records)
    tools = {r["input"].get("path") or r["input"].get("id") or r["name"]: r for r in records if r["event"] == "tool"}
    assert tools["data/qa.jsonl"]["is_error"] and "protected" in tools["data/qa.jsonl"]["output"]
    assert tools["v1"]["is_error"] and "not a train example" in tools["v1"]["output"]
    assert '"expected": "River 1"' in tools["t1"]["output"] or "River 1" in tools["t1"]["output"]

    # val and test labels never reached the agent: not in the transcript, not in any request it sent
    everything = (s.run_dir / "candidates/1/transcript.jsonl").read_text() + s.calls_text()
    for label in secret_labels():
        assert label not in everything
    system = records[0]["system"]
    assert "val_score=0.41" in system and "history_read" in system and "retrieval" in system


def test_truncated_reply_is_not_acted_on(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("submit", {"rationale": "cut", "rung": "prompt"}, "tu1"), stop="max_tokens")),
        ("cut off at max_tokens", reply(tool_use("edit_file", {"path": "prompts/answer.j2", "old": "Answer:",
                                                               "new": "Short answer:"}, "tu2"))),
        ("edited", reply(tool_use("submit", {"rationale": "shorter cue", "rung": "prompt"}, "tu3"))),
    ])
    proposal = s.proposer().propose(make_ctx(wt))
    s.check_complete()
    assert proposal.rationale == "shorter cue"
    events = [r for r in transcript(s) if r["event"] == "notice"]
    assert "cut off" in events[0]["message"]


def test_malformed_calls_are_refused_and_the_session_goes_on(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("edit_file", {"path": "prompts/answer.j2"}, "tu1"),
                     tool_use("rm_rf", {"path": "."}, "tu2"),
                     tool_use("write_file", {"path": "../escape.txt", "content": "x"}, "tu3"),
                     tool_use("write_file", {"path": "pipemend.yaml", "content": "x"}, "tu4"))),
        ("unknown tool 'rm_rf'", reply(tool_use("submit", {"rationale": "nothing changed yet", "rung": "prompt"}, "tu5"))),
        ("no change yet", reply(tool_use("write_file", {"path": "prompts/answer.j2", "content": "Answer: {{ question }}\n"},
                                         "tu6"))),
        ("wrote prompts/answer.j2", reply(tool_use("submit", {"rationale": "", "rung": "prompt"}, "tu7"))),
        ("submit refused", reply(tool_use("submit", {"rationale": "simpler prompt", "rung": "sideways"}, "tu8"))),
        ("rung", reply({"type": "text", "text": "I think I'm done."}, stop="end_turn")),
        ("call `submit`", reply(tool_use("submit", {"rationale": "simpler prompt", "rung": "prompt"}, "tu9"))),
    ])
    proposal = s.proposer().propose(make_ctx(wt))
    s.check_complete()
    assert proposal.rationale == "simpler prompt"
    outputs = {r["tool_use_id"]: r for r in transcript(s) if r["event"] == "tool"}
    assert "bad input for edit_file" in outputs["tu1"]["output"] and "old" in outputs["tu1"]["output"]
    assert "'..' is refused" in outputs["tu3"]["output"]
    assert "protected" in outputs["tu4"]["output"]
    assert all(outputs[t]["is_error"] for t in ("tu1", "tu2", "tu3", "tu4", "tu5", "tu7", "tu8"))
    assert not (wt / "escape.txt").exists() and not (wt.parent / "escape.txt").exists()
    assert (wt / SUBDIR / "pipemend.yaml").read_text().startswith("name: proposer-fixture")


def test_turn_limit_is_enforced_by_the_harness(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("list_files", {}, "tu1"))),
        ("prompts/answer.j2", reply(tool_use("show_diff", {}, "tu2"))),
    ])
    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer().propose(make_ctx(wt, budget=ProposerBudget(max_turns=2)))
    s.check_complete()  # exactly two requests: a third would be unmatched
    assert info.value.reason == "turns"
    assert info.value.meta["outcome"] == "budget_exhausted" and info.value.meta["agent_turns"] == 2
    assert transcript(s)[-1]["outcome"] == "budget_exhausted"


def test_token_limit_is_enforced_by_the_harness(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, reply(tool_use("list_files", {}, "tu1"), tokens=(900, 200)))])
    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer().propose(make_ctx(wt, budget=ProposerBudget(max_agent_tokens=1000)))
    s.check_complete()
    assert info.value.reason == "tokens" and info.value.meta["agent_input_tokens"] == 900


def test_dollar_limit_is_enforced_by_the_harness(tmp_path, wt, sessions):
    # 10k input tokens at $3/Mtok + 1k output at $15/Mtok = $0.045 per turn; the limit is $0.05
    s = start(tmp_path, sessions, [
        (None, reply(tool_use("list_files", {}, "tu1"), tokens=(10_000, 1_000))),
        ("prompts/answer.j2", reply(tool_use("list_files", {}, "tu2"), tokens=(10_000, 1_000))),
    ])
    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer(price_per_mtok=(3.0, 15.0)).propose(make_ctx(wt, budget=ProposerBudget(max_agent_usd=0.05)))
    s.check_complete()
    assert info.value.reason == "usd" and info.value.meta["agent_usd"] == pytest.approx(0.09)


def test_give_up_returns_none(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, reply(tool_use("give_up", {"reason": "all tried"}, "tu1")))])
    assert s.proposer().propose(make_ctx(wt)) is None
    s.check_complete()


def test_unexpected_extra_request_fails_loudly(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, reply(tool_use("list_files", {}, "tu1")))])
    with pytest.raises(Exception):
        s.proposer().propose(make_ctx(wt))
    with pytest.raises(Exception, match="unmatched"):
        s.check_complete()


def test_the_temperature_option_reaches_the_model(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, reply(tool_use("give_up", {"reason": "all tried"}, "tu1")))])
    assert s.proposer(temperature=0.3).propose(make_ctx(wt)) is None
    (call,) = [json.loads(line) for line in s.calls_text().splitlines()]
    assert call["request"]["temperature"] == 0.3


def test_tool_choice_any_reaches_the_model_and_is_the_default_for_a_local_model(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, reply(tool_use("give_up", {"reason": "all tried"}, "tu1"))),
                                   (None, reply(tool_use("give_up", {"reason": "all tried"}, "tu2")))])
    assert s.proposer(tool_choice="any").propose(make_ctx(wt)) is None
    assert s.proposer().propose(make_ctx(wt, n=2)) is None
    s.check_complete()
    forced, default = [json.loads(line)["request"] for line in s.calls_text().splitlines()]
    assert forced["tool_choice"] == {"type": "any"}
    assert "tool_choice" not in default  # a scripted (API-like) model: `auto`, the API's own default
    assert ClaudeProposerConfig(model="local/qwen2.5-coder-1.5b-instruct").effective_tool_choice() == "any"
    assert ClaudeProposerConfig(model="local/qwen2.5-coder-1.5b-instruct", tool_choice="auto"
                                ).effective_tool_choice() == "auto"
    assert ClaudeProposerConfig(model="claude-sonnet-4-5").effective_tool_choice() == "auto"


def test_the_system_prompt_names_errors_and_unattributed_failures(wt):
    from pipemend.proposers.claude import render_system_prompt

    diagnosis = {"counts": {"prompt": 1, "retrieval": 0, "context": 0, "model": 0}, "recommended": "prompt",
                 "ids": {"prompt": ["t1"]}, "errors": 2, "error_ids": ["t2", "t3"], "unattributed": 1,
                 "unattributed_ids": ["t4"]}
    text = render_system_prompt(make_ctx(wt, diagnosis=diagnosis))
    assert "Runner errors, timeouts and failed model calls (no rung): 2 (t2, t3)" in text
    assert "Failures no rung could be judged for (no retrieval step and no evidence text): 1 (t4)" in text
    quiet = render_system_prompt(make_ctx(wt, diagnosis={**diagnosis, "errors": 0, "unattributed": 0}))
    assert "Runner errors" not in quiet and "no rung could be judged" not in quiet


def test_the_agent_is_told_its_editable_files_and_where_to_start(wt):
    """A small model given globs and "read failing traces" invented a file named after an example id: the
    system prompt lists the files it may edit (never a protected one), the opening names the first call."""
    from pipemend.proposers.claude import opening, render_system_prompt

    ctx = make_ctx(wt)
    text = render_system_prompt(ctx)
    line = next(ln for ln in text.splitlines() if ln.startswith("- The editable files there now:"))
    listed = line.split(":", 1)[1].replace("`", "").split(", ")
    assert "prompts/answer.j2" in listed and all(ctx.tools.is_writable(p) for p in listed)
    assert not [p for p in listed if p.startswith("data/")]
    assert opening(ctx, 3).startswith("Propose one change for candidate 1. There are 3 train examples. Start by "
                                      "calling `read_trace` on `t1`, a failing train example at the recommended "
                                      "rung (prompt)")
    assert "read failing traces" in opening(make_ctx(wt, diagnosis={"counts": {}}), 3)

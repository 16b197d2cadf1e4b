"""The ``reflect`` proposer: one reflective rewrite of a prompt file from failing train examples and their traces.

The model is the gateway's strict ``scripted:`` backend (each reply answers once, in order, only when the
request carries what it should; an unused reply or an unmatched request fails ``check_complete``), or, in
the slow group, the real local model. Worktrees, tools, the gateway and the optimize loop are real.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import optimize_harness
from support import SUBDIR, git, make_ctx, make_worktree, reply, secret_labels, start, transcript

from pipemend.errors import UsageError
from pipemend.fsutil import read_json, read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.model_files import default_model_path
from pipemend.optimize import OptimizeConfig, run_optimize
from pipemend.proposers import ProposerBudget, ProposerBudgetExhausted, get_proposer
from pipemend.proposers.agent_tools import AgentSessionEnded
from pipemend.proposers.reflect import (
    ReflectError, check_rewrite, extract_rewrite, next_examples, prompt_relevance, rewrite_key,
    rung_failures,
)

ANSWER = "prompts/answer.j2"
GOOD = """You answer questions from the passages below.

Question: {{ question }}

Passages:
{% for doc in docs %}
[{{ doc.id }}] {{ doc.text }}
{% endfor %}

Reply with the name of the entity only: no sentence, no "The answer is".
Answer:"""


def text(*blocks: str) -> dict:
    return {"type": "text", "text": "".join(blocks)}


def answer_reply(body: str, rationale: str = "The model wrapped the entity in a sentence; ask for the entity only.",
                 stop: str = "end_turn") -> dict:
    return reply(text(f"Rationale: {rationale}\n<prompt>\n{body}\n</prompt>\n"), stop=stop, tokens=(900, 120))


def request_text(s, n: int = 0) -> str:
    """The user text of the n-th request the scripted model got (from the agent gateway's call log)."""
    s.gateway.flush()
    rows = list(read_jsonl(s.run_dir / "gateway" / "calls.jsonl"))
    messages = rows[n]["request"]["messages"]
    return "\n".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in messages)


# --------------------------------------------------------------------------- one session, scripted model


def test_the_model_sees_failing_traces_and_the_prompt_and_its_rewrite_lands(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [
        (["<current_prompt>\nYou answer questions from the passages below.", "{% for doc in docs %}",
          "### Example 1 (t1)", "### Example 3 (t3)", "Expected answer: River 2", "[2] answer (generation)",
          "output: The answer is River 1.", "fills in exactly these variables: docs, question.",
          "at the **prompt** rung"],
         answer_reply(GOOD)),
    ])
    logs: list[str] = []
    ctx = make_ctx(wt)
    ctx.log = logs.append
    proposal = s.proposer("reflect", max_retries=0).propose(ctx)
    s.check_complete()

    assert proposal is not None and proposal.rung == "prompt"
    assert proposal.rationale.startswith("The model wrapped the entity in a sentence; ask for the entity only.")
    assert "reflective rewrite of prompts/answer.j2 from 3 failing train examples at the prompt rung" in proposal.rationale
    assert (wt / SUBDIR / ANSWER).read_text() == GOOD + "\n"
    assert git(wt, "diff", "--name-only").split() == [f"{SUBDIR}/{ANSWER}"]
    meta = proposal.meta
    assert meta["proposer"] == "reflect" and meta["file"] == ANSWER and meta["examples"] == ["t1", "t2", "t3"]
    assert meta["rung_failed"] == "prompt" and meta["reflect_key"] == rewrite_key(ANSWER, GOOD + "\n")
    assert meta["agent_turns"] == 1 and meta["agent_input_tokens"] == 900 and meta["agent_output_tokens"] == 120

    seen = request_text(s)
    assert "### Example 4" not in seen and "(t4)" not in seen  # t4 failed at retrieval, not at the prompt rung
    for label in secret_labels():  # val and test answers never reach the model
        assert label not in seen
    records = transcript(s)
    assert [r["event"] for r in records] == ["start", "request", "response", "end"]
    assert records[0]["prompt_file"] == ANSWER and records[-1]["outcome"] == "submitted"


def test_a_rewrite_that_drops_a_variable_is_refused_then_repaired(tmp_path, wt, sessions):
    dropped = GOOD.replace("Question: {{ question }}\n", "")
    s = start(tmp_path, sessions, [
        (None, answer_reply(dropped)),
        ("drops the template variable(s) question", answer_reply(GOOD)),
    ])
    proposal = s.proposer("reflect", max_retries=0).propose(make_ctx(wt))
    s.check_complete()
    assert proposal is not None and "{{ question }}" in (wt / SUBDIR / ANSWER).read_text()
    assert proposal.meta["agent_turns"] == 2
    s.gateway.flush()
    sent = [r["request"] for r in read_jsonl(s.run_dir / "gateway" / "calls.jsonl")]
    assert [r.get("temperature") for r in sent] == [0.0, 0.7]  # a greedy model would repeat its bad reply
    assert [r["message"] for r in transcript(s) if r["event"] == "notice"][0].startswith(
        "the new prompt drops the template variable(s) question")


def test_a_broken_template_then_no_block_ends_without_a_change(tmp_path, wt, sessions):
    broken = GOOD.replace("{% endfor %}\n", "")
    s = start(tmp_path, sessions, [
        (None, answer_reply(broken)),
        ("not a valid Jinja2 template", reply(text("I would tell the model to be brief."), stop="end_turn")),
    ])
    logs: list[str] = []
    ctx = make_ctx(wt)
    ctx.log = logs.append
    before = (wt / SUBDIR / ANSWER).read_text()
    with pytest.raises(AgentSessionEnded) as info:  # this candidate ends; the loop goes on with the next
        s.proposer("reflect", max_retries=0).propose(ctx)
    s.check_complete()
    assert (wt / SUBDIR / ANSWER).read_text() == before and not git(wt, "diff")
    assert info.value.reason == "malformed"
    assert "no usable rewrite of prompts/answer.j2 after 2 replies" in str(info.value)
    assert "no <prompt> ... </prompt> block" in str(info.value) and logs and "no <prompt>" in logs[-1]
    meta = info.value.meta
    assert meta["outcome"] == "ended" and meta["rung_failed"] == "prompt" and meta["examples"] == ["t1", "t2", "t3"]
    end = transcript(s)[-1]
    assert end["event"] == "end" and end["outcome"] == "ended" and end["reason"] == "malformed"


def test_after_three_unusable_candidates_in_a_row_reflect_is_out_of_ideas(tmp_path, wt, sessions):
    ended = {"proposer": "reflect", "outcome": "ended", "file": ANSWER, "rung_failed": "prompt"}
    history = [{"n": n, "accepted": False, "rationale": "", "rung": "prompt", "meta": dict(ended)} for n in (1, 2, 3)]
    s = start(tmp_path, sessions, [])
    logs: list[str] = []
    ctx = make_ctx(wt, n=4, history=history)
    ctx.log = logs.append
    assert s.proposer("reflect", max_retries=0).propose(ctx) is None
    s.check_complete()  # no request was sent
    assert "last 3 candidates gave no usable rewrite" in logs[-1]
    # one kept rewrite in between: the run of unusable ones is two, and reflect goes on
    history[1]["meta"] = {**ended, "outcome": "submitted", "reflect_key": "k2"}
    (tmp_path / "again").mkdir()
    s2 = start(tmp_path / "again", sessions, [(["### Example 1 (t5)"], answer_reply(GOOD))])
    assert s2.proposer("reflect", max_retries=0).propose(make_ctx(wt, n=4, history=history)) is not None
    s2.check_complete()


def test_a_rewrite_tried_before_is_refused_and_later_candidates_see_other_examples(tmp_path, wt, sessions):
    """History holds an earlier reflect rewrite of the file: the same text again is refused, and this candidate
    starts k examples further down the rung's failures."""
    history = [{"n": 1, "accepted": False, "rationale": "asked for the entity only", "rung": "prompt",
                "meta": {"proposer": "reflect", "file": ANSWER, "rung_failed": "prompt",
                         "reflect_key": rewrite_key(ANSWER, GOOD + "\n")}}]
    s = start(tmp_path, sessions, [
        (["### Example 1 (t3)", "### Example 2 (t1)", "candidate 1, not kept: asked for the entity only"],
         answer_reply(GOOD)),
    ])
    proposer = s.proposer("reflect", max_retries=0, k_examples=2, repair_turns=0)
    with pytest.raises(AgentSessionEnded, match="was tried before"):
        proposer.propose(make_ctx(wt, n=2, history=history))
    s.check_complete()
    assert "(t2)" not in request_text(s)
    assert "was tried before" in transcript(s, 2)[-2]["message"]


def test_a_sibling_of_the_same_parallel_round_counts_as_tried_and_moves_the_examples_on(tmp_path, wt, sessions):
    """``ctx.in_flight`` holds a reflect candidate of the same round, not judged yet: its rewrite is refused
    like a tried one, this candidate starts k examples further down, and the model is told the sibling's plan."""
    in_flight = [{"n": 1, "rung": "prompt", "rationale": "asked for the entity only",
                  "meta": {"proposer": "reflect", "file": ANSWER, "rung_failed": "prompt",
                           "reflect_key": rewrite_key(ANSWER, GOOD + "\n")}}]
    s = start(tmp_path, sessions, [
        (["### Example 1 (t3)", "### Example 2 (t1)",
          "candidate 1, being judged now, in this round: asked for the entity only"],
         answer_reply(GOOD)),
    ])
    ctx = make_ctx(wt, n=2)
    ctx.in_flight = in_flight
    proposer = s.proposer("reflect", max_retries=0, k_examples=2, repair_turns=0)
    with pytest.raises(AgentSessionEnded, match="was tried before"):
        proposer.propose(ctx)
    s.check_complete()
    assert "(t2)" not in request_text(s)
    assert "was tried before" in transcript(s, 2)[-2]["message"]


def test_once_a_rung_s_failures_have_all_been_shown_the_next_candidate_takes_the_next_rung_s(tmp_path, wt, sessions):
    """Two earlier reflect candidates saw all three prompt-rung failures (k = 2): the third is shown the context
    rung's failure (t5) instead of the same examples again. (The benchmark's reflect stopped after one candidate:
    its rung had a single failure, so its second request repeated the first.)"""
    history = [{"n": n, "accepted": False, "rationale": f"try {n}", "rung": "prompt",
                "meta": {"proposer": "reflect", "file": ANSWER, "rung_failed": "prompt", "reflect_key": f"k{n}"}}
               for n in (1, 2)]
    s = start(tmp_path, sessions, [
        (["### Example 1 (t5)", "at the **context** rung", "candidate 1, not kept: try 1"], answer_reply(GOOD)),
    ])
    proposal = s.proposer("reflect", max_retries=0, k_examples=2).propose(make_ctx(wt, n=3, history=history))
    s.check_complete()
    assert proposal is not None and proposal.rung == "context"
    assert proposal.meta["rung_failed"] == "context" and proposal.meta["examples"] == ["t5"]
    seen = request_text(s)
    assert "(t1)" not in seen and "(t2)" not in seen and "(t3)" not in seen and "(t4)" not in seen


def test_the_budget_is_the_harness_s(tmp_path, wt, sessions):
    s = start(tmp_path, sessions, [(None, answer_reply(GOOD.replace("{{ question }}", "{{ query }}")))])
    with pytest.raises(ProposerBudgetExhausted) as info:
        s.proposer("reflect", max_retries=0).propose(make_ctx(wt, budget=ProposerBudget(max_turns=1)))
    s.check_complete()  # the repair request was never sent
    assert info.value.reason == "turns" and info.value.meta["proposer"] == "reflect"


def test_options_are_checked():
    with pytest.raises(UsageError, match="reflect proposer option 'k_exampels'"):
        get_proposer("reflect", k_exampels=2)
    with pytest.raises(UsageError, match="reflect proposer option 'k_examples'"):
        get_proposer("reflect", k_examples=0)


# --------------------------------------------------------------------------- the parts


def test_extract_takes_tags_a_fence_or_an_unclosed_tag_and_says_what_is_missing():
    assert extract_rewrite("Rationale: shorter.\n<prompt>\nA {{ q }}\n</prompt>") == ("shorter.", "A {{ q }}")
    assert extract_rewrite("Rationale: x\n<prompt>\n```jinja\nA {{ q }}\n```\n</prompt>")[1] == "A {{ q }}"
    assert extract_rewrite("Here it is.\n```\nA {q}\n```\nDone.") == ("Here it is. Done.", "A {q}")
    assert extract_rewrite("Rationale: y\n<prompt>\nA {{ q }}\n")[1] == "A {{ q }}"
    for bad, says in [("Just be brief.", "no <prompt>"), ("<prompt>\n\n</prompt>", "empty"),
                      ("<prompt><the complete new content of a.j2></prompt>", "no <prompt>")]:
        with pytest.raises(ReflectError, match=says):
            extract_rewrite(bad)


def test_check_rewrite_keeps_format_fields_and_jinja_names():
    check_rewrite("Reply with a sentence. Fact: {fact}\n", "{fact}\n", "prompts/sentence.txt")
    with pytest.raises(ReflectError, match="drops the template variable"):
        check_rewrite("Fact: {fact}", "Fact: the fact", "prompts/sentence.txt")
    with pytest.raises(ReflectError, match="adds the variable"):
        check_rewrite("Fact: {fact}", "Fact: {fact} in {country}", "prompts/sentence.txt")
    with pytest.raises(ReflectError, match="not a valid str.format"):
        check_rewrite("Fact: {fact}", "Fact: {fact} {", "prompts/sentence.txt")
    with pytest.raises(ReflectError, match="unchanged"):
        check_rewrite("Fact: {fact}\n", "Fact: {fact}", "prompts/sentence.txt")
    check_rewrite("{% for d in docs %}{{ d }}{% endfor %}", "Docs:\n{% for x in docs %}- {{ x }}\n{% endfor %}", "a.j2")
    with pytest.raises(ReflectError, match=r"adds the variable\(s\) hint, .* \(remove or rewrite the line\(s\) "
                                           r"The answer is \{\{ hint \}\}\.\)"):
        check_rewrite("{{ question }}", "{{ question }}\nThe answer is {{ hint }}.\n", "a.j2")
    check_rewrite("plain {text", "plainer {text", "notes.md")  # no format string: nothing to keep


def test_failures_prefer_the_prompt_rung_and_stay_on_train():
    d = {"ids": {"prompt": ["v9", "t2"], "retrieval": ["t4"], "context": [], "model": []}, "recommended": "retrieval",
         "error_ids": ["t7"], "unattributed_ids": []}
    train = {"t2", "t4", "t7"}
    assert rung_failures(d, train)[0] == ("prompt", ["t2"])
    assert rung_failures(d, {"t4", "t7"})[0] == ("retrieval", ["t4"])
    assert rung_failures(d, {"t7"})[0] == ("error", ["t7"])
    assert rung_failures(d, train, "error") == [("error", ["t7"])]
    assert rung_failures({}, train) == []


def test_next_examples_walk_each_rung_then_the_next_then_come_round():
    d = {"ids": {"prompt": ["t1", "t2", "t3"], "retrieval": ["t4"], "context": ["t5", "v1"], "model": []},
         "recommended": "retrieval", "error_ids": ["t7"]}
    rungs = rung_failures(d, {"t1", "t2", "t3", "t4", "t5", "t7"})
    assert rungs == [("prompt", ["t1", "t2", "t3"]), ("retrieval", ["t4"]), ("context", ["t5"]), ("error", ["t7"])]
    walk, shown = [], {}
    for _ in range(7):
        rung, ids = next_examples(rungs, shown, 2)
        walk.append((rung, ids))
        shown[rung] = shown.get(rung, 0) + 1
    assert walk == [("prompt", ["t1", "t2"]), ("prompt", ["t3", "t1"]), ("retrieval", ["t4"]), ("context", ["t5"]),
                    ("error", ["t7"]), ("prompt", ["t2", "t3"]), ("prompt", ["t1", "t2"])]
    assert rung_failures(d, {"t1", "t7"}, "error") == [("error", ["t7"])]


def test_the_prompt_file_is_the_one_the_failing_steps_used():
    trace = {"steps": [{"kind": "retrieval", "name": "retrieve", "inputs": {"query": "peru"}},
                       {"kind": "generation", "name": "answer", "inputs": {"style": "sentence"}}]}
    assert prompt_relevance("prompts/sentence.txt", "Reply with a full sentence. Fact: {fact}", [trace]) > \
        prompt_relevance("prompts/short.txt", "Reply with the name only. Fact: {fact}", [trace])
    joined = {"steps": [{"kind": "generation", "name": "model call 1",
                         "inputs": {"messages": "user: Split the question into  simpler sub-questions, one per line."}}]}
    assert prompt_relevance("prompts/decompose.j2", "Split the question into simpler sub-questions, one per line.\n"
                            "Question: {{ question }}", [joined]) > 0
    assert prompt_relevance("prompts/answer.j2", "You answer questions from the passages below.", [joined]) == 0


# --------------------------------------------------------------------------- through the optimize loop


def optimize_reflect(tmp_path: Path, entries: list[dict], *, max_candidates: int):
    """`optimize --proposer reflect` on tinyqa (process sandbox) with the scripted agent model ``entries``;
    (summary, script path, target folder)."""
    target = optimize_harness.make_repo(tmp_path / "repo")
    script = tmp_path / "agent.yaml"
    script.write_text(yaml.safe_dump({"entries": entries}, sort_keys=False))
    cfg = OptimizeConfig(target=str(target), proposer="reflect", agent_model=f"scripted:{script}",
                         proposer_options={"max_retries": 0}, sandbox="process", run_id="rf",
                         reports_dir=str(tmp_path / "reports"), budget_usd=1.0, max_candidates=max_candidates)
    return run_optimize(cfg, optimize_harness.RecordingProgress()), script, target


@pytest.mark.timeout(300)
def test_optimize_with_reflect_judges_the_rewrite_at_the_gate(tmp_path):
    """`optimize --proposer reflect --agent-model scripted:...` on tinyqa: the rewrite of the prompt the failing
    answer step used (sentence.txt) goes through the gate and is kept."""
    entries = [
        {"name": "rewrite", "once": True, "required": True,
         "match": {"last_user_contains": ["<current_prompt>\nReply with a full sentence about the capital. Fact: {fact}",
                                          "str.format template", "Expected answer: "]},
         "response": {"content": [text("Rationale: the parse step keeps the whole reply; ask for the fact alone.\n"
                                       "<prompt>\n{fact}\n</prompt>")],
                      "stop_reason": "end_turn", "usage": {"input_tokens": 700, "output_tokens": 30}}},
    ]
    s, script, target = optimize_reflect(tmp_path, entries, max_candidates=1)
    run_dir = Path(s.run_dir)
    assert [c.accepted for c in s.candidates] == [True] and s.best["branch"] == "pipemend/rf/cand-1"
    assert s.candidates[0].val_score == 1.0 and s.baseline["val"] == 0.0
    assert (target / "prompts" / "sentence.txt").read_text().startswith("Reply with a full sentence")  # the user's copy
    assert git(tmp_path / "repo", "show", "pipemend/rf/cand-1:targets/tinyqa/prompts/sentence.txt") == "{fact}\n"
    proposal = read_json(run_dir / "candidates" / "1" / "proposal.json")
    assert proposal["proposer"] == "reflect" and proposal["file"] == "prompts/sentence.txt"
    agent_calls = list(read_jsonl(run_dir / "agent" / "gateway" / "calls.jsonl"))
    assert len(agent_calls) == 1 and agent_calls[0]["model"] == f"scripted:{script}"
    assert (run_dir / "candidates" / "1" / "transcript.jsonl").is_file()
    verdict = read_json(run_dir / "candidates" / "1" / "verdict.json")
    assert verdict["accepted"] is True


@pytest.mark.timeout(300)
def test_a_candidate_with_no_usable_rewrite_costs_only_that_candidate(tmp_path):
    """Candidate 1's two replies hold no rewrite: it ends as ``proposer_ended`` and the run goes on; candidate 2's
    rewrite is judged and kept. (Before, the loop took the unusable reply for "out of ideas" and stopped.)"""
    usage = {"input_tokens": 700, "output_tokens": 30}
    entries = [
        {"name": "no block", "once": True, "required": True, "match": {"last_user_contains": "<current_prompt>"},
         "response": {"content": [text("I would ask for the fact alone.")], "stop_reason": "end_turn", "usage": usage}},
        {"name": "no block again", "once": True, "required": True,
         "match": {"last_user_contains": "That reply cannot be used: your reply has no <prompt>"},
         "response": {"content": [text("Be brief.")], "stop_reason": "end_turn", "usage": usage}},
        {"name": "rewrite", "once": True, "required": True, "match": {"last_user_contains": "<current_prompt>"},
         "response": {"content": [text("Rationale: ask for the fact alone.\n<prompt>\n{fact}\n</prompt>")],
                      "stop_reason": "end_turn", "usage": usage}},
    ]
    s, _, _ = optimize_reflect(tmp_path, entries, max_candidates=2)
    run_dir = Path(s.run_dir)
    assert [c.accepted for c in s.candidates] == [False, True]
    assert not s.candidates[0].val_evaluated and any("agent session ended (malformed)" in r
                                                     for r in s.candidates[0].reasons)
    assert read_json(run_dir / "candidates" / "1" / "proposal.json")["outcome"] == "ended"
    assert s.best["branch"] == "pipemend/rf/cand-2"
    assert len(list(read_jsonl(run_dir / "agent" / "gateway" / "calls.jsonl"))) == 3


# --------------------------------------------------------------------------- the real local model (slow)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_local_model_writes_a_parseable_rewrite_and_the_checks_judge_it(tmp_path):
    """The real 1.5B model, offline: its reply holds a rewrite that parses out of the reply, and the session ends
    cleanly, with a rewrite that keeps the template's variables or with the checks' reason (this model is
    known to invent an `{{ answer }}` variable, which the checks refuse)."""
    if importlib.util.find_spec("llama_cpp") is None or not default_model_path().is_file():
        pytest.skip("the local model is not installed (scripts/install)")
    model = "local/qwen2.5-coder-1.5b-instruct"
    wt = make_worktree(tmp_path)
    gateway = Gateway(GatewayConfig(run_dir=tmp_path / "agent", cache_dir=tmp_path / "cache", models=[model])).start()
    try:
        proposer = get_proposer("reflect", model=model, base_url=gateway.url, api_key="test", k_examples=2,
                                max_trace_chars=1200, max_tokens=400, transcript_dir=str(tmp_path / "t"))
        try:
            proposal = proposer.propose(make_ctx(wt))
        except AgentSessionEnded:
            proposal = None  # no usable rewrite: this candidate ended, as the transcript says
    finally:
        gateway.stop()
    records = list(read_jsonl(tmp_path / "t" / "transcript.jsonl"))
    replies = ["".join(b.get("text", "") for b in r["response"]["content"]) for r in records if r["event"] == "response"]
    assert replies and replies[0].strip()
    _, first = extract_rewrite(replies[0])  # parseable: a <prompt> block (or a fence) holding a whole file
    assert first.strip()
    end = records[-1]
    original, new = git(wt, "show", f"HEAD:{SUBDIR}/{ANSWER}"), (wt / SUBDIR / ANSWER).read_text()
    if proposal is None:
        assert end["outcome"] == "ended" and end["reason"] == "malformed" and new == original
        with pytest.raises(ReflectError):
            check_rewrite(original, first + "\n", ANSWER)
    else:
        assert end["outcome"] == "submitted" and proposal.meta["agent_output_tokens"] > 0
        check_rewrite(original, new, ANSWER)

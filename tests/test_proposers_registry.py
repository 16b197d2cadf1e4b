"""Proposer registry: short names, dotted-path plugins and their errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support import SUBDIR, make_ctx, make_worktree

from pipemend.errors import UsageError
from pipemend.proposers import PROPOSERS, ProposerBudget, get_proposer
from pipemend.proposers.claude import ClaudeProposer
from pipemend.proposers.ladder import LadderProposer

PLUGINS = Path(__file__).parent / "fixtures" / "proposers" / "plugins"


@pytest.fixture(autouse=True)
def _plugins_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fixture_plugins`` (plugin proposers named by dotted path) importable, as an installed plugin would be."""
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_short_names():
    assert set(PROPOSERS) == {"claude", "claude-code", "ladder", "reflect"}
    assert isinstance(get_proposer("ladder"), LadderProposer)
    claude = get_proposer("claude", model="claude-haiku-4-5", base_url="http://127.0.0.1:9")
    assert isinstance(claude, ClaudeProposer) and claude.config.model == "claude-haiku-4-5"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UsageError, match="unknown proposer 'gpt'; valid: claude, claude-code, ladder, reflect"):
        get_proposer("gpt")


def test_plugin_by_dotted_path_edits_through_the_tools(tmp_path):
    proposer = get_proposer("fixture_plugins:AppendLine", line="Answer in one word.")
    wt = make_worktree(tmp_path)
    proposal = proposer.propose(make_ctx(wt))
    assert proposal.rationale == "append 'Answer in one word.'"
    assert (wt / SUBDIR / "prompts/answer.j2").read_text().endswith("Answer in one word.\n")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:Thing", "cannot find module 'no_such_module_xyz'"),
        ("fixture_plugins:Missing", "has no attribute 'Missing'"),
        ("fixture_plugins:NoPropose", "has no propose"),
        ("fixture_plugins:NOT_A_CLASS", "has no propose"),
        ("fixture_plugins:", "not a known name nor a dotted path"),
    ],
)
def test_plugin_errors_are_usage_errors(name, message):
    with pytest.raises(UsageError, match=message):
        get_proposer(name)


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="bad options"):
        get_proposer("fixture_plugins:AppendLine", colour="red")
    with pytest.raises(UsageError, match="max_tokens"):
        get_proposer("claude", max_tokens=1)
    with pytest.raises(UsageError, match="temprature"):
        get_proposer("claude", temprature=0.5)
    with pytest.raises(UsageError, match="max_reminders"):
        get_proposer("claude-code", max_reminders=-1)


def test_claude_code_without_its_extra_is_a_usage_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "claude_agent_sdk", None)  # as if the extra were not installed
    with pytest.raises(UsageError, match=r"pipemend\[claude-code\]"):
        get_proposer("claude-code")


def test_budget_counts_and_names_the_spent_limit():
    budget = ProposerBudget(max_turns=3, max_agent_tokens=100, max_agent_usd=1.0)
    assert budget.exhausted() is None
    budget.charge(turns=1, input_tokens=60, output_tokens=50, usd=0.2)
    assert budget.exhausted() == "tokens"
    assert budget.spent() == {"turns": 1, "input_tokens": 60, "output_tokens": 50, "usd": 0.2}
    with pytest.raises(Exception, match="extra"):
        ProposerBudget(max_turn=3)

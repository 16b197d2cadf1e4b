"""Plugin proposers run in their own bubblewrap sandbox with the tools served to them (issue 11, seal 9).

Each test writes a real plugin module, runs it through ``IsolatedProposer`` against real
``ProposerTools`` over a real folder, and checks what the plugin could and could not reach.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from pipemend.errors import UsageError
from pipemend.manifest import load_manifest
from pipemend.proposers import ProposerBudget
from pipemend.proposers.budget import ProposerBudgetExhausted
from pipemend.proposers.isolation import IsolatedProposer, PluginFailed
from pipemend.proposers.tools import ProposerTools
from pipemend.protocols import ProposalContext

pytestmark = [pytest.mark.bwrap, pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")]

MANIFEST = """\
name: tiny
entrypoint: pipeline:run
dataset:
  path: data/all.jsonl
  split: {train: 0.5, val: 0.25, test: 0.25, seed: 1}
metric: exact_match
editable: ["prompts/*", "pipeline.py"]
llm: {model: simulated/echo}
"""


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A user's target folder with labels, a run directory with frozen labels, and a candidate worktree."""
    user = tmp_path / "user" / "target"
    (user / "data").mkdir(parents=True)
    (user / "prompts").mkdir()
    rows = [{"id": f"q{i}", "inputs": {"q": f"question {i}"}, "expected": f"SECRET-ANSWER-{i}"} for i in range(8)]
    (user / "data" / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (user / "pipemend.yaml").write_text(MANIFEST)
    (user / "pipeline.py").write_text("def run(inputs):\n    return inputs['q']\n")
    (user / "prompts" / "answer.txt").write_text("Answer briefly.\n")
    run_dir = tmp_path / "reports" / "run-1"
    (run_dir / "frozen" / "data").mkdir(parents=True)
    shutil.copy(user / "data" / "all.jsonl", run_dir / "frozen" / "data" / "all.jsonl")
    (run_dir / "history").mkdir()
    wt = tmp_path / "wt" / "cand-1"
    shutil.copytree(user, wt, ignore=shutil.ignore_patterns("data"))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    return {"user": user, "run_dir": run_dir, "wt": wt, "plugins": plugins}


def _ctx(world: dict[str, Path], logs: list[str] | None = None) -> ProposalContext:
    wt = world["wt"]
    tools = ProposerTools(worktree=wt, target_subdir="", editable=["prompts/*", "pipeline.py"],
                          protected=["data/**", "pipemend.yaml"], run_train=lambda ids: [{"id": "q0", "score": 1.0}],
                          read_trace=lambda i: None, diagnose=lambda: {"counts": {}}, diff=lambda: "",
                          tool_timeout_s=30)
    return ProposalContext(candidate_index=1, worktree=wt, target_subdir="",
                           manifest=load_manifest(world["user"]), diagnosis={"counts": {}}, history=[],
                           history_dir=world["run_dir"] / "history", tools=tools, budget=ProposerBudget(),
                           train_examples=[{"id": "q0", "inputs": {"q": "question 0"}, "expected": "A0"}],
                           log=(logs.append if logs is not None else (lambda s: None)))


def _plugin(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> str:
    (world["plugins"] / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(world["plugins"]))
    return f"{name}:Plugin"


SNOOP = """
    import os, socket
    from pipemend.protocols import Proposal

    class Plugin:
        def __init__(self, paths):
            self.paths = paths

        def propose(self, ctx):
            seen = {}
            for p in self.paths:
                try:
                    with open(p) as f:
                        seen[p] = f.read()[:200]
                except OSError as e:
                    seen[p] = "refused: " + type(e).__name__
            for d in ("/root", "/home", os.path.dirname(self.paths[0])):
                try:
                    seen["ls " + d] = ",".join(os.listdir(d))
                except OSError as e:
                    seen["ls " + d] = "refused: " + type(e).__name__
            try:
                socket.create_connection(("127.0.0.1", 22), timeout=2)
                seen["net"] = "connected"
            except OSError as e:
                seen["net"] = "refused: " + type(e).__name__
            (ctx.worktree / "prompts" / "answer.txt").write_text("Answer in one word.\\n")
            ctx.tools.write_file("pipeline.py", "def run(inputs):\\n    return inputs['q'].upper()\\n")
            try:
                ctx.tools.read_file("data/all.jsonl")
                seen["tool data"] = "read"
            except Exception as e:
                seen["tool data"] = "refused: " + getattr(e, "kind", type(e).__name__)
            print("chatter on stdout must not break the protocol")
            ctx.log("hello from the plugin")
            return Proposal(rationale="snooped", rung="prompt", meta={"seen": seen, "uid": os.getuid()})
"""


def test_a_plugin_sees_neither_the_labels_nor_the_host_and_its_edits_land(world, monkeypatch):
    secret_paths = [str(world["run_dir"] / "frozen" / "data" / "all.jsonl"), str(world["user"] / "data" / "all.jsonl"),
                    "/etc/shadow", str(Path.home() / ".bash_history")]
    spec = _plugin(world, monkeypatch, "snoop_plugin", SNOOP)
    logs: list[str] = []
    proposal = IsolatedProposer(spec, {"paths": secret_paths}, guard=[world["run_dir"], world["user"]]).propose(
        _ctx(world, logs))
    assert proposal is not None and proposal.rationale == "snooped" and proposal.rung == "prompt"
    seen = proposal.meta["seen"]
    for p in secret_paths:
        assert seen[p].startswith("refused"), (p, seen[p])
    assert "SECRET-ANSWER" not in json.dumps(seen)
    assert seen["ls /root"].startswith("refused") or "pipemend" not in seen["ls /root"]
    assert seen["net"].startswith("refused")
    assert seen["tool data"] == "refused: PathRefused"
    assert proposal.meta["uid"] == 65534
    assert (world["wt"] / "prompts" / "answer.txt").read_text() == "Answer in one word.\n"
    assert "upper()" in (world["wt"] / "pipeline.py").read_text()
    assert "hello from the plugin" in logs


def test_a_crashing_plugin_fails_its_candidate_with_the_traceback(world, monkeypatch):
    spec = _plugin(world, monkeypatch, "crash_plugin", """
        class Plugin:
            def propose(self, ctx):
                raise RuntimeError("fell over")
    """)
    with pytest.raises(PluginFailed, match="RuntimeError: fell over"):
        IsolatedProposer(spec).propose(_ctx(world))


def test_a_plugin_that_never_answers_is_stopped(world, monkeypatch):
    spec = _plugin(world, monkeypatch, "hang_plugin", """
        import time
        class Plugin:
            def propose(self, ctx):
                while True:
                    time.sleep(1)
    """)
    with pytest.raises(PluginFailed, match="did not finish within"):
        IsolatedProposer(spec, session_timeout_s=3).propose(_ctx(world))


def test_a_plugin_cannot_call_anything_but_the_tools(world, monkeypatch):
    spec = _plugin(world, monkeypatch, "call_plugin", """
        from pipemend.protocols import Proposal
        class Plugin:
            def propose(self, ctx):
                out = []
                for name in ("_run_train", "__init__", "check_writable", "worktree"):
                    try:
                        getattr(ctx.tools, name)()
                        out.append(name + ": ran")
                    except Exception as e:
                        out.append(name + ": " + str(e)[:60])
                return Proposal(rationale="; ".join(out))
    """)
    proposal = IsolatedProposer(spec).propose(_ctx(world))
    assert proposal is not None
    assert "ran" not in proposal.rationale


def test_a_plugins_budget_claim_only_skips_its_own_candidate(world, monkeypatch):
    spec = _plugin(world, monkeypatch, "budget_plugin", """
        from pipemend.errors import BudgetExhausted
        class Plugin:
            def propose(self, ctx):
                e = BudgetExhausted("the gateway refused: budget exhausted")
                e.reason = "gateway"
                raise e
    """)
    with pytest.raises(ProposerBudgetExhausted) as info:
        IsolatedProposer(spec).propose(_ctx(world))
    assert info.value.reason == "turns"


def test_a_plugin_living_beside_the_labels_is_refused_before_it_runs(world, monkeypatch):
    (world["user"] / "inside_plugin.py").write_text("class Plugin:\n    def propose(self, ctx):\n        return None\n")
    monkeypatch.syspath_prepend(str(world["user"]))
    with pytest.raises(UsageError, match="overlaps"):
        IsolatedProposer("inside_plugin:Plugin", guard=[world["user"]])


def test_an_unknown_plugin_module_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot find module"):
        IsolatedProposer("no_such_plugin_module_xyz:Plugin")

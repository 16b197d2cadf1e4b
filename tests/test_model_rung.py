"""The ``model`` rung: a knob whose values are models (a per-step model choice), end to end.

The manifest check refuses model knobs that name no model or leave out the model the step calls;
the run's gateway serves ``Manifest.models()`` (the run's model and every model-knob value) and
nothing else; the ladder tries a model knob's stronger models when the diagnosis puts failures
on the model rung, and its cheaper models first when the run's objective is cost or latency.
Real parts: the gateway over HTTP, the process sandbox, the loop, git. Fakes only at the LLM
boundary: the ``simulated/`` models and a strict ``scripted:`` model that answers wrong.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import SUBDIR, git, make_ctx
from support import climb as climb_ladder
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.configfile import set_config_value
from pipemend.errors import ConfigError
from pipemend.fsutil import read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.manifest import load_manifest
from pipemend.manifest_checks import check_manifest_files, model_name_problem
from pipemend.optimize import OptimizeConfig, run_optimize
from pipemend.proposers.ladder import LadderProposer, rungs_to_try
from pipemend.proposers.model_choice import model_price, order_models

MODELQA = Path(__file__).parent / "fixtures" / "targets" / "modelqa"
MODEL_FAILURES = {"counts": {"prompt": 0, "retrieval": 0, "context": 0, "model": 3},
                  "ids": {"model": ["t1", "t2", "t3"]}, "recommended": "model"}
NO_FAILURES = {"counts": {"prompt": 0, "retrieval": 0, "context": 0, "model": 0}}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the gateway's response cache
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def copy_target(dst: Path) -> Path:
    shutil.copytree(MODELQA, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def edit_yaml(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def set_model_knob(target: Path, values: list[Any], current: Any) -> None:
    edit_yaml(target / "pipemend.yaml", lambda m: m["knobs"]["answer_model"].update(values=values))
    config = target / "config.yaml"
    config.write_text(set_config_value(config.read_text(), "yaml", "steps.answer.model", current))  # comments kept


def with_objective(manifest: Any, objective: str) -> Any:
    """The manifest with ``gates.objective`` set (a copy; the field is the gate's, read here by name)."""
    return manifest.model_copy(update={"gates": manifest.gates.model_copy(update={"objective": objective})})


def model_worktree(tmp_path: Path, values: list[str], current: str) -> Path:
    """A git repo with the modelqa target in ``target/`` whose answer-model knob holds ``values``."""
    wt = tmp_path / "wt"
    set_model_knob(copy_target(wt / SUBDIR), values, current)
    git(wt, "init", "-q")
    git(wt, "add", "-A")
    git(wt, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "base")
    return wt


def climb(ladder: LadderProposer, wt: Path, *, diagnosis: dict, objective: str | None = None) -> list[Any]:
    """Every proposal the ladder makes in turn, each rejected (dropped from the worktree), until None."""
    def adjust(ctx: Any) -> None:
        if objective is not None:
            ctx.manifest = with_objective(ctx.manifest, objective)
    return climb_ladder(ladder, wt, diagnosis=diagnosis, limit=20, adjust=adjust)


def answer_model(wt: Path) -> str:
    return yaml.safe_load((wt / SUBDIR / "config.yaml").read_text())["steps"]["answer"]["model"]


# --------------------------------------------------------------------------- the manifest check


def test_models_are_the_run_model_then_every_model_knob_value_once(tmp_path):
    target = copy_target(tmp_path / "t")
    edit_yaml(target / "pipemend.yaml", lambda m: m["knobs"].update(
        width={"file": "config.yaml", "key": "steps.answer.model", "rung": "prompt", "values": ["not-a-model"]},
        judge_model={"file": "config.yaml", "key": "steps.answer.model", "rung": "model",
                     "values": ["simulated/echo", "simulated/tool-echo", "claude-haiku-4-5"]}))
    manifest = load_manifest(target)
    assert manifest.models() == ["simulated/echo", "simulated/tool-echo", "claude-haiku-4-5"]
    assert manifest.models("claude-sonnet-4-5") == [
        "claude-sonnet-4-5", "simulated/tool-echo", "simulated/echo", "claude-haiku-4-5"]
    assert "not-a-model" not in manifest.models(), "only knobs on the model rung name models"


@pytest.mark.parametrize(("values", "current", "where", "needle"), [
    ([3, "simulated/echo"], "simulated/echo", "knobs.answer_model.values[0]", "3 is not a model name"),
    (["simulated/echo", ""], "simulated/echo", "knobs.answer_model.values[1]", "is not a model name"),
    (["simulated/echo", "claude-*"], "simulated/echo", "knobs.answer_model.values[1]", "not one model's name"),
    (["simulated/echo", "gpt4"], "simulated/echo", "knobs.answer_model.values[1]", "unknown model 'gpt4'"),
    (["simulated/echo"], "simulated/tool-echo", "knobs.answer_model.values", "'simulated/tool-echo', which the"),
])
def test_a_model_knob_must_name_models_and_list_the_model_the_step_calls(tmp_path, values, current, where, needle):
    target = copy_target(tmp_path / "t")
    set_model_knob(target, values, current)
    with pytest.raises(ConfigError) as err:
        load_manifest(target)
    assert err.value.where == where and needle in str(err.value)
    assert "pipemend.yaml" in str(err.value)


def test_a_step_that_calls_the_run_model_may_leave_its_knob_value_empty(tmp_path):
    target = copy_target(tmp_path / "t")
    set_model_knob(target, ["simulated/tool-echo"], None)
    check_manifest_files(load_manifest(target, check_files=False), target, target / "pipemend.yaml",
                         import_entrypoint=False)
    assert model_name_problem("scripted:/x/y.yaml") is None and model_name_problem("simulated/echo") is None


def test_models_refuses_a_model_knob_value_that_is_no_name_even_without_the_file_checks(tmp_path):
    target = copy_target(tmp_path / "t")
    set_model_knob(target, ["simulated/tool-echo", 7], "simulated/tool-echo")
    manifest = load_manifest(target, check_files=False)  # how a run reads its frozen manifest
    with pytest.raises(ConfigError, match=r"knobs\.answer_model\.values\[1\]: 7 is not a model name"):
        manifest.models()


# --------------------------------------------------------------------------- the gateway serves exactly those


def test_the_gateway_a_run_builds_serves_the_knob_models_and_nothing_else(tmp_path):
    manifest = load_manifest(MODELQA)
    gw = Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "c", models=manifest.models())).start()
    try:
        def ask(model: str) -> httpx.Response:
            return httpx.post(f"{gw.url}/v1/messages", timeout=30, json={
                "model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})

        for model in ("simulated/echo", "simulated/tool-echo"):
            assert ask(model).status_code == 200, model
        for model in ("simulated/slow-echo", "claude-sonnet-4-5", "local/qwen2.5-coder-1.5b-instruct"):
            refused = ask(model)
            assert refused.status_code == 404 and "simulated/tool-echo" in refused.json()["error"]["message"]
    finally:
        gw.stop()


@pytest.mark.timeout(300)
def test_eval_serves_the_answer_steps_own_model(tmp_path):
    """`pipemend eval`: the answer step calls the knob's model, which is not llm.model, and it is served."""
    target = copy_target(tmp_path / "t")
    res = CliRunner().invoke(app, ["eval", str(target), "--json", "--sandbox", "process",
                                   "--reports-dir", str(tmp_path / "r"), "--run-id", "m"])
    assert res.exit_code == 0, res.output
    val = json.loads(res.stdout)["splits"]["val"]
    assert val["score"] == 1.0 and val["errors"] == 0
    calls = list(read_jsonl(tmp_path / "r" / "m" / "gateway" / "calls.jsonl"))
    assert {(c["step"], c["model"]) for c in calls} == {("rewrite", "simulated/echo"),
                                                         ("answer", "simulated/tool-echo")}
    assert all(c["error"] is None for c in calls)


# --------------------------------------------------------------------------- the ladder


def test_model_failures_bring_the_model_rung_last():
    assert rungs_to_try(MODEL_FAILURES) == ["prompt", "retrieval", "context", "model"]
    mixed = {"counts": {"prompt": 0, "retrieval": 4, "context": 0, "model": 2}, "recommended": "retrieval"}
    assert rungs_to_try(mixed) == ["retrieval", "context", "prompt", "model"], "offline last resorts come first"
    assert "model" not in rungs_to_try({"counts": {"prompt": 2, "retrieval": 0, "context": 0, "model": 0}})
    assert "model" not in rungs_to_try({}), "no diagnosis is no evidence against the model"


def test_prices_order_cheaper_first_for_cost_and_stronger_first_for_score():
    assert model_price("claude-haiku-4-5") == (1.0, 5.0) and model_price("local/qwen2.5-coder-1.5b-instruct") == (0, 0)
    assert model_price("simulated/echo") is None and model_price("claude-nova-9") is None
    values = ["claude-opus-4-5", "claude-3-haiku-20240307", "simulated/echo", "claude-sonnet-4-5",
              "claude-haiku-4-5", "claude-sonnet-4-20250514"]
    cost = order_models(values, "claude-sonnet-4-5", "cost")
    assert [o.model for o in cost] == ["claude-3-haiku-20240307", "claude-haiku-4-5", "simulated/echo"]
    assert [o.relation for o in cost] == ["cheaper", "cheaper", "unknown price"]
    assert [o.model for o in order_models(values, "claude-sonnet-4-5", "latency")] == [o.model for o in cost]
    score = order_models(values, "claude-sonnet-4-5", "score")
    assert [o.model for o in score] == ["claude-opus-4-5", "simulated/echo", "claude-sonnet-4-20250514"]
    # an unknown current price says nothing: the manifest's order, the current model left out
    unknown_now = order_models(values, "simulated/echo", "cost")
    assert [o.model for o in unknown_now] == [v for v in values if v != "simulated/echo"]


def test_the_ladder_tries_a_stronger_model_for_model_failures(tmp_path):
    values = ["claude-haiku-4-5", "claude-opus-4-5", "claude-sonnet-4-5", "claude-3-haiku-20240307"]
    wt = model_worktree(tmp_path, values, "claude-haiku-4-5")
    proposals = climb(LadderProposer(transforms=[]), wt, diagnosis=MODEL_FAILURES)
    assert [p.meta["value"] for p in proposals] == ["claude-opus-4-5", "claude-sonnet-4-5"], \
        "the stronger models in the manifest's order; a cheaper one fixes no model failure"
    first = proposals[0]
    assert first.rung == "model" and first.meta["kind"] == "model" and first.meta["previous"] == "claude-haiku-4-5"
    assert first.meta["model"]["relation"] == "dearer" and first.meta["objective"] == "score"
    assert "from 'claude-haiku-4-5' to 'claude-opus-4-5'" in first.rationale
    assert "stronger model" in first.rationale and "$5/$25 per Mtok" in first.rationale
    assert "(diagnosis: 3 train failures at the model rung)" in first.rationale
    assert climb(LadderProposer(transforms=[]), wt, diagnosis=NO_FAILURES) == [], "nothing fails, nothing tried"


def test_under_a_cost_objective_the_ladder_tries_cheaper_models_first(tmp_path):
    values = ["claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-3-haiku-20240307"]
    wt = model_worktree(tmp_path, values, "claude-sonnet-4-5")
    proposals = climb(LadderProposer(), wt, diagnosis=NO_FAILURES, objective="cost")
    assert [p.meta["value"] for p in proposals] == ["claude-3-haiku-20240307", "claude-haiku-4-5"], \
        "cheapest first; nothing fails, so no stronger model and no prompt change"
    cheapest = proposals[0]
    assert cheapest.rung == "model" and cheapest.meta["model"]["relation"] == "cheaper"
    assert cheapest.meta["objective"] == "cost" and cheapest.meta["aim"] == "saving"
    assert "objective is cost" in cheapest.rationale and "non-inferior" in cheapest.rationale
    assert cheapest.rationale.endswith('[ladder: knob:answer_model="claude-3-haiku-20240307"]')

    # with model failures too: the cheaper models still come first, then the stronger one, never twice
    both = climb(LadderProposer(transforms=[]), wt, diagnosis=MODEL_FAILURES, objective="latency")
    assert [p.meta["value"] for p in both] == ["claude-3-haiku-20240307", "claude-haiku-4-5", "claude-opus-4-5"]
    assert "objective is latency" in both[0].rationale and "diagnosis:" not in both[0].rationale
    assert "stronger model" in both[2].rationale and both[2].meta["aim"] == "score"


def test_a_cost_ladder_edits_the_knob_in_place_and_a_resumed_ladder_does_not_repeat_it(tmp_path):
    wt = model_worktree(tmp_path, ["claude-sonnet-4-5", "claude-haiku-4-5"], "claude-sonnet-4-5")
    ctx = make_ctx(wt, diagnosis=NO_FAILURES)
    ctx.manifest = with_objective(ctx.manifest, "cost")
    proposal = LadderProposer().propose(ctx)
    assert proposal is not None and answer_model(wt) == "claude-haiku-4-5"
    assert git(wt, "diff", "--name-only").split() == [f"{SUBDIR}/config.yaml"]
    assert "# the answer step's model" in (wt / SUBDIR / "config.yaml").read_text(), "comments are kept"
    git(wt, "checkout", "-q", "--", ".")
    history = [{"n": 1, "accepted": False, "rationale": proposal.rationale}]  # rationale only, as after a resume
    again = make_ctx(wt, n=2, diagnosis=NO_FAILURES, history=history)
    again.manifest = with_objective(again.manifest, "cost")
    assert LadderProposer().propose(again) is None


def test_without_an_objective_the_ladder_tries_no_cheaper_model(tmp_path):
    wt = model_worktree(tmp_path, ["claude-sonnet-4-5", "claude-haiku-4-5"], "claude-sonnet-4-5")
    assert climb(LadderProposer(), wt, diagnosis=NO_FAILURES) == []
    assert climb(LadderProposer(transforms=[]), wt, diagnosis=MODEL_FAILURES) == []


# --------------------------------------------------------------------------- through the optimize loop


@pytest.mark.slow  # a full optimize run; the unit tests above cover the ladder's model order and the allow-list
@pytest.mark.timeout(300)
def test_the_loop_serves_the_knob_models_and_the_ladder_fixes_a_weak_step_model(tmp_path):
    """A scripted answer-step model that answers wrong; the ladder switches the step to the echo model."""
    repo = tmp_path / "repo"
    target = copy_target(repo / "modelqa")
    script = tmp_path / "weak-model.yaml"
    script.write_text(yaml.safe_dump({"entries": [{"name": "wrong", "text": "Fact: I do not know"}]}))
    weak = f"scripted:{script}"
    set_model_knob(target, [weak, "simulated/echo"], weak)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "init")

    cfg = OptimizeConfig(target=str(target), proposer="ladder", proposer_options={"transforms": []},
                         sandbox="process", run_id="mr", reports_dir=str(tmp_path / "reports"), max_candidates=3)
    summary = run_optimize(cfg)
    assert summary.best is not None and summary.best["val"] == 1.0, [c.reasons for c in summary.candidates]
    kept = git(repo, "show", "pipemend/mr/best:modelqa/config.yaml")
    assert yaml.safe_load(kept)["steps"]["answer"]["model"] == "simulated/echo"
    run_dir = Path(summary.run_dir)
    proposal = json.loads((run_dir / "candidates" / "1" / "proposal.json").read_text())
    assert proposal["rung"] == "model"
    rationale = (run_dir / "candidates" / "1" / "rationale.md").read_text()
    assert f"from '{weak}' to 'simulated/echo'" in rationale
    assert "another model for this step, because the diagnosis puts failures on the model rung" in rationale
    calls = list(read_jsonl(run_dir / "gateway" / "calls.jsonl"))
    assert {c["model"] for c in calls if c["step"] == "answer"} == {weak, "simulated/echo"}
    assert all(c["error"] is None for c in calls), "every model the run's steps call is served"

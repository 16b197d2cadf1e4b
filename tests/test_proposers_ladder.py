"""The offline ladder proposer and its edits (knobs in YAML/TOML/JSON, prompt transforms)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jinja2
import pytest
import yaml

from support import DIAGNOSIS, SUBDIR, climb, git, make_ctx, make_worktree

from pipemend.configfile import ConfigFileError, set_config_value
from pipemend.errors import UsageError
from pipemend.manifest import load_manifest
from pipemend.proposers import get_proposer
from pipemend.proposers.ladder import LadderProposer, rungs_to_try
from pipemend.proposers.transforms import PROMPT_TRANSFORMS, insert_instruction


def render(path: Path) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    docs = [{"id": f"d{i}", "text": f"passage {i}"} for i in range(8)]
    return env.from_string(path.read_text()).render(question="Who?", docs=docs)


def commit(wt: Path, msg: str) -> None:
    git(wt, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-am", msg)


def test_ladder_climbs_one_change_at_a_time_and_ends_with_none(tmp_path):
    wt = make_worktree(tmp_path)
    root = wt / SUBDIR
    ladder = get_proposer("ladder")
    history: list[dict] = []
    seen_keys, rungs, changed_files = [], [], []
    for n in range(1, 30):
        ctx = make_ctx(wt, n=n, history=history)
        proposal = ladder.propose(ctx)
        if proposal is None:
            break
        diff_files = git(wt, "diff", "--name-only").split()
        assert len(diff_files) == 1, f"one change per candidate, got {diff_files}"
        changed_files.append(diff_files[0])
        key = proposal.meta["ladder_key"]
        assert key not in seen_keys
        seen_keys.append(key)
        rungs.append(proposal.rung)
        assert proposal.rationale and proposal.meta["proposer"] == "ladder"
        # every prompt still renders and the YAML comments survive
        for tpl in (root / "prompts").glob("*.j2"):
            render(tpl)
        assert "# passages fetched per hop" in (root / "config.yaml").read_text()
        assert "# Pipeline settings" in (root / "config.yaml").read_text()
        accepted = key in ("knob:answer_style=\"short\"", "transform:entity_only", "knob:top_k=5")
        if accepted:
            commit(wt, key)  # an accepted change becomes the base
        else:
            git(wt, "checkout", "-q", "--", ".")  # a rejected one is dropped
        history.append({"n": n, "accepted": accepted, "rationale": proposal.rationale, "rung": proposal.rung,
                        "meta": proposal.meta})
    else:
        pytest.fail("the ladder never ran out of options")

    assert rungs == sorted(rungs, key=["prompt", "retrieval", "context"].index), "climbs, never goes back down"
    assert seen_keys[0] == 'knob:answer_style="short"', "declared knobs of the rung come first"
    assert {"knob:top_k=5", "knob:top_k=8", "knob:max_docs=4"} <= set(seen_keys)
    assert "knob:top_k=3" not in seen_keys, "the current value is not a change"
    assert {"transform:entity_only", "transform:few_shot", "transform:truncate_docs"} <= set(seen_keys)
    assert all(f.endswith(("answer.j2", "config.yaml", "settings.toml")) for f in changed_files)
    assert "decompose.j2" not in " ".join(changed_files), "only the answer prompt is transformed"
    # the accepted changes are in the base, with comments intact
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    assert cfg["generation"]["style"] == "short" and cfg["retrieval"]["top_k"] == 5
    assert "Output format: answer with the entity" in (root / "prompts/answer.j2").read_text()


def test_a_knob_inside_a_list_passes_the_manifest_check_and_the_ladder_sets_it(tmp_path):
    """Issue 10: a knob key ``a.0.b`` passed the manifest check, then the ladder could not read it."""
    wt = make_worktree(tmp_path)
    root = wt / SUBDIR
    with open(root / "config.yaml", "a") as f:
        f.write("retrievers:\n  - name: bm25   # lexical\n    top_k: 3\n  - name: dense\n    top_k: 4\n")
    manifest = yaml.safe_load((root / "pipemend.yaml").read_text())
    manifest["knobs"] = {"first_k": {"file": "config.yaml", "key": "retrievers.0.top_k", "rung": "retrieval",
                                     "values": [3, 7]}}
    (root / "pipemend.yaml").write_text(yaml.safe_dump(manifest))
    commit(wt, "a knob inside a list")
    assert load_manifest(root).knobs["first_k"].key == "retrievers.0.top_k"  # the check passes

    diagnosis = {**DIAGNOSIS, "counts": {"prompt": 0, "retrieval": 3, "context": 0, "model": 0},
                 "recommended": "retrieval"}
    proposal = get_proposer("ladder").propose(make_ctx(wt, diagnosis=diagnosis))
    assert proposal is not None and proposal.meta["ladder_key"] == "knob:first_k=7"
    assert proposal.meta["previous"] == 3 and "from 3 to 7" in proposal.rationale
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    assert [r["top_k"] for r in cfg["retrievers"]] == [7, 4]
    assert "  - name: bm25   # lexical\n    top_k: 7\n" in (root / "config.yaml").read_text()


def test_a_fresh_ladder_does_not_repeat_what_history_holds(tmp_path):
    wt = make_worktree(tmp_path)
    first = LadderProposer().propose(make_ctx(wt, n=1))
    assert first is not None
    git(wt, "checkout", "-q", "--", ".")
    # a resumed run: new proposer instance, history as the loop records it (rationale only, no meta)
    history = [{"n": 1, "accepted": False, "rationale": first.rationale, "val_score": 0.4, "delta": -0.1}]
    second = LadderProposer().propose(make_ctx(wt, n=2, history=history))
    assert second is not None and second.meta["ladder_key"] != first.meta["ladder_key"]


def test_start_rung_follows_the_diagnosis(tmp_path):
    assert rungs_to_try(DIAGNOSIS) == ["prompt", "retrieval", "context"]
    only_retrieval = {"counts": {"prompt": 0, "retrieval": 2, "context": 0, "model": 0}}
    # the rung no failure pointed at comes last: the ladder is out of ideas only after every offline rung
    assert rungs_to_try(only_retrieval) == ["retrieval", "context", "prompt"]
    assert rungs_to_try({"counts": {"prompt": 0, "retrieval": 0, "context": 0, "model": 0}}) == []
    assert rungs_to_try({}) == ["prompt", "retrieval", "context"]
    assert rungs_to_try({"ids": {"context": ["t1"]}}) == ["context", "prompt", "retrieval"]
    # the diagnosis recommends retrieval (1 prompt failure is below its min_share): start there,
    # climb, and come back to the cheaper rung it stepped over last
    mostly_retrieval = {"counts": {"prompt": 1, "retrieval": 26, "context": 0, "model": 0}, "recommended": "retrieval"}
    assert rungs_to_try(mostly_retrieval) == ["retrieval", "context", "prompt"]
    assert rungs_to_try({**mostly_retrieval, "recommended": "model"}) == ["prompt", "retrieval", "context"]

    wt = make_worktree(tmp_path)
    proposal = LadderProposer().propose(make_ctx(wt, diagnosis=only_retrieval))
    assert proposal.rung == "retrieval" and proposal.meta["ladder_key"] == "knob:top_k=5"
    assert "(diagnosis: 2 train failures at the retrieval rung)" in proposal.rationale
    nothing = {"counts": {"prompt": 0, "retrieval": 0, "context": 0, "model": 0}}
    assert LadderProposer().propose(make_ctx(wt, diagnosis=nothing)) is None


def test_few_shot_uses_train_examples_only_and_renders(tmp_path):
    wt = make_worktree(tmp_path)
    ladder = LadderProposer(transforms=["few_shot"])
    tried = [{"n": 1, "accepted": False, "rationale": "x", "meta": {"ladder_key": 'knob:answer_style="short"'}}]
    ctx = make_ctx(wt, diagnosis={"counts": {"prompt": 1}}, history=tried)
    proposal = ladder.propose(ctx)
    assert proposal.meta["transform"] == "few_shot"
    text = (wt / SUBDIR / "prompts/answer.j2").read_text()
    assert "Question: Which river flows through town 1?\nAnswer: River 1" in text
    assert "ZEBRA" not in text and "OKAPI" not in text
    assert text.rstrip().endswith("Answer:"), "the final cue line stays last"
    assert "Answer: River 1" in render(wt / SUBDIR / "prompts/answer.j2")


def test_ladder_options_are_validated():
    with pytest.raises(UsageError, match="few_shot_k"):
        get_proposer("ladder", few_shot_k=0)
    with pytest.raises(UsageError, match="unknown transforms"):
        get_proposer("ladder", transforms=["nope"])
    with pytest.raises(UsageError, match="bogus"):
        get_proposer("ladder", bogus=1)


# --------------------------------------------------------------------------- knob edits


YAML_TEXT = """\
# top comment
retrieval:
  top_k: 3   # per hop
  index: "bm25"  # quoted
generation:
  style: sentence
list:
  - a
  - b
"""


def test_yaml_knob_edit_keeps_comments_and_everything_else():
    new = set_config_value(YAML_TEXT, "yaml", "retrieval.top_k", 8)
    assert new == YAML_TEXT.replace("top_k: 3   # per hop", "top_k: 8   # per hop")
    new = set_config_value(YAML_TEXT, "yaml", "retrieval.index", "dense: v2")
    assert yaml.safe_load(new)["retrieval"]["index"] == "dense: v2" and "# quoted" in new
    new = set_config_value(YAML_TEXT, "yaml", "generation.style", ["a", 1])
    assert yaml.safe_load(new)["generation"]["style"] == ["a", 1]
    with pytest.raises(ConfigFileError, match="not found"):
        set_config_value(YAML_TEXT, "yaml", "retrieval.missing", 1)
    with pytest.raises(ConfigFileError, match="block"):
        set_config_value(YAML_TEXT, "yaml", "retrieval", 1)


def test_toml_and_json_knob_edits():
    toml_text = '# c\ntop = 1\n[context]\nmax_docs = 10  # shown\norder = "score"\n[other]\nmax_docs = 2\n'
    new = set_config_value(toml_text, "toml", "context.max_docs", 4)
    assert "max_docs = 4  # shown" in new and tomllib.loads(new)["other"]["max_docs"] == 2
    assert tomllib.loads(set_config_value(toml_text, "toml", "context.order", 'a "q"'))["context"]["order"] == 'a "q"'
    assert tomllib.loads(set_config_value(toml_text, "toml", "top", True))["top"] is True
    json_text = '{\n    "a": {"b": 1},\n    "c": [1, 2]\n}\n'
    new = set_config_value(json_text, "json", "a.b", 2)
    assert json.loads(new) == {"a": {"b": 2}, "c": [1, 2]} and new.endswith("}\n") and '\n    "a"' in new


# --------------------------------------------------------------------------- prompt transforms


def test_every_transform_keeps_a_jinja_template_rendering(tmp_path):
    src = (Path(__file__).parent / "fixtures/targets/proposer_qa/prompts/answer.j2").read_text()
    options = {"few_shot_k": 2, "max_docs": 2,
               "train_examples": [{"id": "t1", "inputs": {"question": "Q1?"}, "expected": "A1"}]}
    json_src = src.replace("Answer:", 'Reply with a JSON object: {"answer": "..."}')
    tpl = tmp_path / "answer.j2"
    for transform in PROMPT_TRANSFORMS:
        applied = 0
        for text in (src, json_src):  # the output-format rules apply to one of them each
            new = transform.apply(text, "prompts/answer.j2", options)
            if new is None:
                continue
            applied += 1
            assert new != text, transform.name
            tpl.write_text(new)
            out = render(tpl)
            assert out, transform.name
            assert transform.apply(new, "prompts/answer.j2", options) is None, f"{transform.name} applied twice"
        assert applied, f"{transform.name} applies to neither prompt"
    tpl.write_text(next(t for t in PROMPT_TRANSFORMS if t.name == "truncate_docs").apply(src, "a.j2", options))
    assert "passage 1" in render(tpl) and "passage 2" not in render(tpl)


def test_instructions_are_not_applied_twice_and_go_before_the_cue():
    entity = next(t for t in PROMPT_TRANSFORMS if t.name == "entity_only")
    once = entity.apply("Q: {{ q }}\n\nAnswer:\n", "p.j2", {})
    assert once.endswith("\n\nAnswer:\n") and "Output format" in once
    assert entity.apply(once, "p.j2", {}) is None
    assert insert_instruction("no cue here", "X") == "no cue here\n\nX\n"


# --------------------------------------------------------------------------- failures that raise (issue 14, item 4)

ZERO = {"prompt": 0, "retrieval": 0, "context": 0, "model": 0}


def climb_all(wt: Path, diagnosis: dict) -> list:
    """Every proposal a fresh ladder makes on ``diagnosis`` until it is out of ideas (each one rejected)."""
    return climb(LadderProposer(), wt, diagnosis=diagnosis)


def test_runner_errors_alone_make_the_ladder_try_every_offline_rung_before_it_gives_up(tmp_path):
    """A diagnosis whose failures are all runner errors (exceptions outside any step) is not "nothing to do":
    the ladder tries each offline rung's knobs and transforms, and is out of ideas only after them."""
    only_errors = {"counts": ZERO, "errors": 3, "error_ids": ["t1", "t2", "t3"], "recommended": None}
    assert rungs_to_try(only_errors) == ["prompt", "retrieval", "context"]
    assert rungs_to_try({**only_errors, "errors": 0, "error_ids": []}) == []
    wt = make_worktree(tmp_path)
    proposals = climb_all(wt, only_errors)
    keys = [p.meta["ladder_key"] for p in proposals]
    assert {'knob:answer_style="short"', "knob:top_k=5", "knob:top_k=8", "knob:max_docs=4",
            "transform:entity_only", "transform:truncate_docs"} <= set(keys)
    assert [p.rung for p in proposals] == sorted((p.rung for p in proposals), key=["prompt", "retrieval",
                                                                                    "context"].index)
    retrieval = next(p for p in proposals if p.meta["ladder_key"] == "knob:top_k=5")
    assert "no train failure is on the retrieval rung" in retrieval.rationale


def test_a_ladder_past_its_diagnosed_rungs_tries_the_rest_before_none(tmp_path):
    """Failures on the retrieval rung only: once retrieval and context are spent, the prompt rung's options
    come too (last), each saying that no failure pointed there."""
    wt = make_worktree(tmp_path)
    proposals = climb_all(wt, {"counts": {**ZERO, "retrieval": 2}, "recommended": "retrieval"})
    rungs = [p.rung for p in proposals]
    assert rungs[0] == "retrieval" and rungs[-1] == "prompt" and "context" in rungs
    last = [p for p in proposals if p.rung == "prompt"]
    assert last and all("tried before the ladder declares itself out of ideas" in p.rationale for p in last)


def parse_failures(rule: str = "parse_error", n: int = 3) -> dict:
    details = {f"t{i}": {"rung": "prompt", "rule": rule, "evidence": "parse step 'parse' raised JSONDecodeError"}
               for i in range(1, n + 1)}
    return {"counts": {**ZERO, "prompt": n}, "ids": {"prompt": list(details)}, "recommended": "prompt",
            "details": details, "errors": 0}


def test_a_parse_step_that_raised_gets_the_output_format_rule_first(tmp_path):
    """The diagnosis says parse steps raised on the model's output: the transform aimed at that rule comes
    before the rung's knobs and other transforms; a prompt asking for JSON gets the bare-JSON rule, and the
    entity-only rule (which would break JSON) never applies to it."""
    wt = make_worktree(tmp_path)
    answer = wt / SUBDIR / "prompts" / "answer.j2"
    plain = LadderProposer().propose(make_ctx(wt, diagnosis=parse_failures()))
    assert plain.meta["ladder_key"] == "transform:plain_output", "a prompt without JSON: plain output, no fences"
    git(wt, "checkout", "-q", "--", ".")

    answer.write_text(answer.read_text().replace("Answer:", 'Reply with JSON: {"answer": "..."}'))
    commit(wt, "the answer prompt asks for JSON")
    first = LadderProposer().propose(make_ctx(wt, diagnosis=parse_failures("generation_raised")))
    assert first.rung == "prompt" and first.meta["ladder_key"] == "transform:bare_json"
    assert "no Markdown code fences" in answer.read_text() and "(diagnosis: 3 train failures" in first.rationale
    render(answer)
    git(wt, "checkout", "-q", "--", ".")
    keys = [p.meta["ladder_key"] for p in climb_all(wt, parse_failures())]
    assert keys[:2] == ["transform:bare_json", 'knob:answer_style="short"'], "the aimed transform, then the knobs"
    assert "transform:entity_only" not in keys and "transform:plain_output" not in keys
    assert {"knob:top_k=5", "knob:max_docs=4"} <= set(keys), "then the other rungs, before giving up"
    # without the rule in the diagnosis, the library order holds: knobs first
    unaimed = LadderProposer().propose(make_ctx(wt, diagnosis={"counts": {**ZERO, "prompt": 1}}))
    assert unaimed.meta["ladder_key"] == 'knob:answer_style="short"'

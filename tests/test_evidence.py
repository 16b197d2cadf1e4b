"""The gate's statistics on constructed rows: confirmation, regressions as count or share, must-pass, the
error budget, non-inferiority and savings, racing decisions (``pipemend.evidence``, ``optimize.race.race``)."""

from __future__ import annotations

import json
import math

import pytest

from pipemend import evidence
from pipemend.errors import ConfigError
from pipemend.evidence import Evidence
from pipemend.journal import fold
from pipemend.manifest import Gates, load_manifest
from pipemend.optimize.race import cuts, must_pass_ids, race


def _rows(scores, cost=0.0, latency=1.0):
    return [{"id": f"v{i}", "score": s, "cost_usd": cost, "latency_s": latency} for i, s in enumerate(scores)]


# --------------------------------------------------------------------------- confirmation


def test_a_flip_counts_as_a_regression_only_when_the_majority_of_each_side_confirms_it():
    base, cand = _rows([1, 1, 0, 0]), _rows([0, 0, 1, 1])
    ev = Evidence(base, cand,
                  base_more={"v0": [1, 1], "v1": [0, 1], "v2": [0, 0], "v3": [1, 1]},
                  cand_more={"v0": [0, 0], "v1": [1, 1], "v2": [1, 1], "v3": [1, 1]})
    out = evidence.compare(ev, Gates(max_regressions=0), alpha=0.5)
    assert out.regressions == ["v0"]          # base right 3/3, candidate wrong 3/3
    assert out.fixed == ["v2"]                # base wrong 3/3, candidate right 3/3
    assert sorted(out.noise_flips) == ["v1", "v3"]  # v1: candidate right 2/3; v3: base right 2/3
    assert [r.code for r in out.reasons][:1] == ["regressions"]
    assert out.confirm == {"runs": 2, "examples": 4}


def test_a_noise_flip_feeds_no_evidence_its_value_is_the_mean_of_its_re_runs():
    """First looks disagree by noise on every flipped example; the re-runs agree: delta 0, nothing to test."""
    base, cand = _rows([1, 0, 1, 0]), _rows([0, 1, 1, 0])
    ev = Evidence(base, cand, base_more={"v0": [1, 1], "v1": [0, 0]}, cand_more={"v0": [1, 1], "v1": [0, 0]})
    out = evidence.compare(ev, Gates(min_delta=0.0), alpha=0.5)
    assert out.delta == 0.0 and out.regressions == [] and sorted(out.noise_flips) == ["v0", "v1"]
    assert out.sign_test["wins"] == out.sign_test["losses"] == 0
    assert out.accepted_as is None


def test_without_confirmation_every_flip_is_confirmed():
    out = evidence.compare(Evidence(_rows([1, 0]), _rows([0, 1])), Gates(confirm_runs=0, max_regressions=0),
                           alpha=0.5)
    assert out.regressions == ["v0"] and out.fixed == ["v1"] and out.noise_flips == []


def test_flipped_lists_disagreeing_first_looks_and_counts_a_missing_candidate_row_as_wrong():
    assert evidence.flipped(_rows([1, 0, 1]), _rows([1, 1, 0])) == ["v1", "v2"]
    assert evidence.flipped(_rows([1, 0]), _rows([1, 0])[1:]) == ["v0"]


# --------------------------------------------------------------------------- regressions, must-pass


def test_max_regressions_takes_a_count_or_a_share_of_val():
    assert Gates(max_regressions=3).allowed_regressions(1000) == 3
    assert Gates(max_regressions="2%").allowed_regressions(300) == 6
    assert Gates(max_regressions="2.5%").allowed_regressions(100) == 2
    assert Gates(max_regressions="0%").allowed_regressions(300) == 0
    for bad in ("2", "x%", "120%", -1, True):
        with pytest.raises(ValueError):
            Gates(max_regressions=bad)


def test_regressions_within_the_share_pass_and_beyond_it_refuse():
    base = _rows([1] * 2 + [0] * 48)
    cand = _rows([0] * 2 + [1] * 20 + [0] * 28)
    assert not evidence.compare(Evidence(base, cand), Gates(confirm_runs=0, max_regressions="4%"), alpha=0.05).reasons
    out = evidence.compare(Evidence(base, cand), Gates(confirm_runs=0, max_regressions="2%"), alpha=0.05)
    assert [r.code for r in out.reasons] == ["regressions"] and "2 confirmed regression(s) > 1 allowed" in out.reasons[0].text


def test_a_must_pass_example_may_never_break_even_when_the_rest_improves():
    base, cand = _rows([1] + [0] * 19), _rows([0] + [1] * 19)
    gates = Gates(confirm_runs=0, max_regressions=5)
    assert evidence.compare(Evidence(base, cand), gates, alpha=0.05).accepted_as == "improvement"
    out = evidence.compare(Evidence(base, cand), gates, alpha=0.05, must_pass=frozenset({"v0"}))
    assert out.accepted_as is None and out.must_pass_broken == ["v0"]
    assert any(r.code == "must_pass" and r.example_ids == ("v0",) for r in out.reasons)


def test_must_pass_accepts_ids_learned_or_a_relative_file():
    assert Gates(must_pass=["a", "b"]).must_pass == ["a", "b"]
    assert Gates(must_pass="learned").must_pass == "learned"
    assert Gates(must_pass="gates/must.txt").must_pass == "gates/must.txt"
    for bad in ("/etc/passwd", "../x.txt", ""):
        with pytest.raises(ValueError):
            Gates(must_pass=bad)


# --------------------------------------------------------------------------- the error budget


def test_the_error_budget_sums_to_at_most_one_minus_confidence_and_a_kept_candidate_passes_its_level_on():
    levels = [evidence.alpha_for(0.9, [False] * k)[1] for k in range(5000)]
    assert sum(levels) <= 0.1 + 1e-12 and levels[0] == pytest.approx(0.1 * 6 / math.pi ** 2)
    assert all(a > b for a, b in zip(levels, levels[1:]))
    j, after_kept = evidence.alpha_for(0.9, [True])
    assert j == 2 and after_kept == pytest.approx(levels[0] + levels[1])
    _, chain = evidence.alpha_for(0.9, [True, True])
    assert chain == pytest.approx(levels[0] + levels[1] + levels[2])
    assert evidence.alpha_for(0.9, [True, False])[1] == pytest.approx(levels[2])


def test_a_later_candidate_needs_stronger_evidence():
    base, cand = _rows([0] * 12), _rows([1] * 5 + [0] * 7)  # sign test p = 1/32
    gates = Gates(confirm_runs=0)
    assert evidence.compare(Evidence(base, cand), gates, alpha=evidence.alpha_for(0.9, [])[1]).accepted_as
    late = evidence.compare(Evidence(base, cand), gates, alpha=evidence.alpha_for(0.9, [False] * 4)[1])
    assert late.accepted_as is None and [r.code for r in late.reasons] == ["not_confident"]
    assert "share of the run's error budget" in late.reasons[0].text


def test_the_guarantee_is_one_sentence_with_the_run_level_rate():
    text = evidence.guarantee(Gates(confidence=0.9))
    assert "at most 10%" in text and text.count(". ") == 0 and text.endswith(".")
    assert "saving" in evidence.guarantee(Gates(objective="cost"))


def test_the_sign_test_is_exact():
    assert evidence.sign_p([1, 1, 1]) == (3, 0, 0.125)
    assert evidence.sign_p([1, -1, 0]) == (1, 1, 0.75)
    assert evidence.sign_p([0, 0]) == (0, 0, 1.0)


# --------------------------------------------------------------------------- savings


def test_a_cheaper_candidate_at_non_inferior_score_is_kept_as_a_saving_under_objective_cost():
    base, cand = _rows([1] * 40 + [0] * 10, cost=0.010), _rows([1] * 40 + [0] * 10, cost=0.006)
    score = evidence.compare(Evidence(base, cand), Gates(), alpha=0.05)
    assert score.accepted_as is None and [r.code for r in score.reasons] == ["min_delta"]
    cost = evidence.compare(Evidence(base, cand), Gates(objective="cost"), alpha=0.05)
    assert cost.accepted_as == "saving" and cost.reasons == []
    assert cost.saving["ratio"] == pytest.approx(0.6) and cost.saving["non_inferior"]


def test_a_saving_must_be_large_enough_and_non_inferior():
    base = _rows([1] * 40 + [0] * 10, cost=0.010)
    small = evidence.compare(Evidence(base, _rows([1] * 40 + [0] * 10, cost=0.009)), Gates(objective="cost"),
                             alpha=0.05)
    assert [r.code for r in small.reasons] == ["min_delta", "saving_too_small"]
    worse = _rows([0] * 8 + [1] * 32 + [0] * 10, cost=0.005)  # 8 examples lost: 16 pp down
    out = evidence.compare(Evidence(base, worse), Gates(objective="cost", max_regressions="50%"), alpha=0.05)
    assert out.accepted_as is None and "not_non_inferior" in [r.code for r in out.reasons]


def test_non_inferiority_is_one_sided_against_the_margin():
    assert evidence.non_inferior_p([0.0] * 50, 0.01) == 0.0
    assert evidence.non_inferior_p([-0.05] * 50, 0.01) == 1.0
    noisy = [1, -1] * 100
    assert evidence.non_inferior_p(noisy, 0.01) > 0.05 and evidence.non_inferior_p(noisy, 0.2) < 0.01


def test_latency_savings_ignore_timer_noise():
    base = _rows([1] * 10, latency=0.010)
    fast = _rows([1] * 10, latency=0.004)
    out = evidence.compare(Evidence(base, fast), Gates(objective="latency"), alpha=0.05)
    assert [r.code for r in out.reasons] == ["min_delta", "saving_too_small"]
    real = evidence.compare(Evidence(_rows([1] * 10, latency=2.0), _rows([1] * 10, latency=1.0)),
                            Gates(objective="latency"), alpha=0.05)
    assert real.accepted_as == "saving"


# --------------------------------------------------------------------------- racing


def test_cuts_grow_and_end_at_n():
    assert cuts(300, [0.25, 0.5, 1.0]) == [75, 150, 300]
    assert cuts(3, [0.25, 0.5, 1.0]) == [1, 2, 3]
    assert cuts(1, [0.25, 0.5, 1.0]) == [1]
    assert cuts(10, [1.0]) == [10]


def test_racing_shares_must_grow_to_the_whole_of_val():
    for bad in ([0.5, 0.25, 1.0], [0.5], [0.0, 1.0], [0.5, 1.5]):
        with pytest.raises(ValueError):
            Gates(racing=bad)


class Scripted:
    """A strict evaluator over fixed outcomes: ``truth[side][id]`` per sample index; counts every call."""

    def __init__(self, base: dict[str, list[float]], cand: dict[str, list[float]]):
        self.truth = {"base": base, "cand": cand}
        self.calls: list[tuple[str, int, tuple[str, ...], int]] = []

    def __call__(self, side, look, ids, sample):
        self.calls.append((side, look, tuple(ids), sample))
        return [{"id": i, "score": self.truth[side][i][sample]} for i in ids]


def _race(base_first, cand_runs, base_runs=None, gates=Gates(), alpha=0.05, **kw):
    ids = [f"v{i}" for i in range(len(base_first))]
    base_runs = base_runs or {i: [s] * 9 for i, s in zip(ids, base_first)}
    ev = Scripted(base_runs, cand_runs)
    out = race(gates, ids, {i: {"id": i, "score": s} for i, s in zip(ids, base_first)}, ev, alpha=alpha, **kw)
    return out, ev


def test_a_candidate_that_cannot_beat_the_base_stops_at_the_first_look():
    base = [1] * 50 + [0] * 50
    out, ev = _race(base, {f"v{i}": [s] * 9 for i, s in enumerate(base)})  # identical: nothing flips
    assert out.accepted_as is None and out.reasons[0].code == "raced_out"
    assert out.evaluated == 25 and out.racing["saved"] == 75
    assert [c[0] for c in ev.calls] == ["cand"] and len(out.racing["looks"]) == 1
    assert out.racing["looks"][0]["stopped"] is True
    assert "after 25 of 100 val examples (25%)" in out.reasons[0].text


def test_a_look_at_a_few_examples_stops_nothing_for_lack_of_flips():
    """Ten examples without a flip say little: the first look goes on; the second, at 20, stops it."""
    base = [1] * 20 + [0] * 20
    out, _ = _race(base, {f"v{i}": [s] * 9 for i, s in enumerate(base)})
    assert out.evaluated == 20 and [lk["stopped"] for lk in out.racing["looks"]] == [False, True]
    small, _ = _race(base[:12], {f"v{i}": [s] * 9 for i, s in enumerate(base[:12])})
    assert small.evaluated == 12 and [r.code for r in small.reasons] == ["min_delta"]


def test_a_real_improvement_runs_every_look_and_confirms_its_flips_on_both_sides():
    base = [0] * 30 + [1] * 10
    cand = {f"v{i}": [1] * 9 if i < 20 else [float(base[i])] * 9 for i in range(40)}
    out, ev = _race(base, cand, alpha=0.05)
    assert out.accepted_as == "improvement" and out.evaluated == 40 and out.racing["saved"] == 0
    assert len(out.fixed) == 20 and out.regressions == []
    confirms = [c for c in ev.calls if c[3] > 0]
    assert {(side, sample) for side, _, _, sample in confirms} == {("base", 1), ("base", 2), ("cand", 1), ("cand", 2)}
    first = [c for c in ev.calls if c[0] == "cand" and c[3] == 0]
    assert [len(c[2]) for c in first] == [10, 10, 20], "each look pays only for its new examples"


def test_racing_stops_once_confirmed_regressions_exceed_what_the_whole_of_val_allows():
    base = [1] * 40
    cand = {f"v{i}": [0] * 9 if i < 4 else [1] * 9 for i in range(40)}
    ids = [f"v{i}" for i in range(40)]
    ev = Scripted({i: [1] * 9 for i in ids}, cand)
    out = race(Gates(max_regressions=1), ids, {i: {"id": i, "score": 1} for i in ids}, ev, alpha=0.05)
    assert out.reasons[0].code == "regressions" and "stopped after 10 of 40" in out.reasons[0].text
    assert out.evaluated == 10 and base[0] == 1


def test_racing_stops_on_a_broken_must_pass_example():
    base = [1] * 8 + [0] * 32
    cand = {f"v{i}": [0] * 9 if i == 0 else [1] * 9 for i in range(40)}
    out, _ = _race(base, cand, must_pass=frozenset({"v0"}), gates=Gates(max_regressions=5))
    assert out.reasons[0].code == "must_pass" and out.evaluated == 10


def test_sampled_noise_that_the_re_runs_do_not_confirm_is_set_aside():
    """The candidate's first look is wrong on v0 by noise (sample 0), right on its re-runs: no regression."""
    base = [1] * 10
    cand = {f"v{i}": [1] * 9 for i in range(10)}
    cand["v0"] = [0, 1, 1]
    out, ev = _race(base, cand, gates=Gates(racing=[1.0], max_regressions=0, min_delta=0.0), alpha=0.05)
    assert out.regressions == [] and out.noise_flips == ["v0"] and out.delta == 0.0
    assert sorted((c[0], c[3]) for c in ev.calls if c[3]) == [("base", 1), ("base", 2), ("cand", 1), ("cand", 2)]


# --------------------------------------------------------------------------- the manifest


def test_repeats_is_refused_with_a_pointer_to_confirm_runs(tmp_path):
    (tmp_path / "pipemend.yaml").write_text(
        "name: t\nentrypoint: p:run\ndataset: {path: d.jsonl, split: {train: 0.5, val: 0.25, test: 0.25}}\nmetric: exact_match\neditable: ['*.txt']\n"
        "llm: {model: simulated/echo}\ngates: {repeats: 2}\n")
    with pytest.raises(ConfigError, match="confirm_runs"):
        load_manifest(tmp_path, check_files=False)


# --------------------------------------------------------------------------- must-pass ids of a run


def _scored(run_dir, rel, scores):
    d = run_dir / rel
    d.mkdir(parents=True)
    (d / "scored.jsonl").write_text("".join(json.dumps({"id": i, "score": s}) + "\n" for i, s in scores.items()))


def test_learned_must_pass_is_what_every_accepted_base_got_right(tmp_path):
    run_dir = tmp_path / "run"
    _scored(run_dir, "evals/baseline-val", {"a": 1, "b": 1, "c": 0, "d": 1})
    _scored(run_dir, "candidates/1/evals/val", {"a": 1, "b": 0, "c": 1, "d": 1})  # refused: does not count
    _scored(run_dir, "candidates/2/evals/val", {"a": 1, "b": 1, "c": 1, "d": 0})
    st = fold([
        {"event": "baseline_done", "val_dir": "evals/baseline-val"},
        {"event": "candidate_done", "n": 1, "accepted": False, "val_dir": "candidates/1/evals/val"},
        {"event": "candidate_done", "n": 2, "accepted": True, "val_dir": "candidates/2/evals/val"},
    ])
    assert must_pass_ids("learned", frozen_dir=tmp_path, run_dir=run_dir, st=st) == {"a", "b"}
    only_base = fold([{"event": "baseline_done", "val_dir": "evals/baseline-val"}])
    assert must_pass_ids("learned", frozen_dir=tmp_path, run_dir=run_dir, st=only_base) == {"a", "b", "d"}


def test_must_pass_from_a_frozen_file_of_ids_and_a_clear_error_for_a_link(tmp_path):
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    (frozen / "must.txt").write_text("# examples the product promises\nval-1\n\nval-7  # the demo question\n")
    st = fold([])
    assert must_pass_ids("must.txt", frozen_dir=frozen, run_dir=tmp_path, st=st) == {"val-1", "val-7"}
    assert must_pass_ids(["x"], frozen_dir=frozen, run_dir=tmp_path, st=st) == {"x"}
    (frozen / "link.txt").symlink_to(frozen / "must.txt")
    with pytest.raises(ConfigError, match="gates.must_pass.*link.txt: not a regular file"):
        must_pass_ids("link.txt", frozen_dir=frozen, run_dir=tmp_path, st=st)

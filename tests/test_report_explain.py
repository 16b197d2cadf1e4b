"""``report.explain``: one plain sentence per verdict, on constructed verdict.json dicts (new and old formats)."""

from __future__ import annotations

from typing import Any

import pytest

from pipemend import evidence
from pipemend.manifest import Gates
from pipemend.report.explain import (allowed_regressions, explain, guarantee, per_candidate_note, reasons_with_codes,
                                     racing_saved)

M = "\u2212"  # the minus sign the sentences use

NEW_GATES = {"min_delta": 0.01, "max_regressions": "2%", "confirm_runs": 2, "confidence": 0.9, "test": "sign",
             "racing": [0.25, 0.5, 1.0], "objective": "score", "non_inferiority_margin": 0.01, "min_saving": 0.2,
             "max_cost_ratio": 1.5, "max_latency_ratio": 1.5, "must_pass": [], "repeats": 1}


def new_stats(**over: Any) -> dict[str, Any]:
    """verdict.json ``stats`` as the issue-12 gate writes them (see notes/gate-contract.md)."""
    stats = {"n": 300, "evaluated": 300, "base_mean": 0.5, "cand_mean": 0.547, "delta": 0.047, "test": "sign",
             "p_value": 0.012, "alpha": 0.061, "regressions": ["v3", "v9"], "noise_flips": ["v1", "v2", "v4", "v5", "v8"],
             "fixed": [f"f{i}" for i in range(16)], "must_pass_broken": [],
             "confirm": {"runs": 2, "examples": ["v1", "v2", "v3"]},
             "racing": {"looks": [{"share": 0.25, "n": 75, "delta": 0.04, "z": 1.1, "stopped": False},
                                  {"share": 0.5, "n": 150, "delta": 0.05, "z": 1.6, "stopped": False},
                                  {"share": 1.0, "n": 300, "delta": 0.047, "z": 2.2, "stopped": False}], "saved": 0},
             "objective": "score", "accepted_as": "improvement", "saving": None,
             "cost": {"base_usd": 1.0, "cand_usd": 1.02, "ratio": 1.02, "max_ratio": 1.5},
             "latency": {"base_mean_s": 1.0, "cand_mean_s": 1.0, "ratio": 1.0, "max_ratio": 1.5}, "reasons": []}
    stats.update(over)
    return stats


def verdict(accepted: bool, stats: dict[str, Any] | None, reasons: list[Any] = (), codes: list[str] | None = None,
            static: list[str] = (), gates: dict[str, Any] | None = None) -> dict[str, Any]:
    v = {"format": "pipemend-verdict-1", "candidate": 3, "accepted": accepted, "reasons": list(reasons),
         "changed_files": ["pipe/prompt.txt"], "static_reasons": list(static), "stats": stats,
         "gates": NEW_GATES if gates is None else gates}
    if codes is not None:
        v["reason_codes"] = codes
    return v


# --------------------------------------------------------------------------- kept


def test_a_kept_improvement_names_its_test_its_share_of_the_budget_and_the_regressions_it_may_have() -> None:
    assert explain(verdict(True, new_stats())) == (
        "kept: val +4.7 pp (p = 0.012 ≤ its α 0.061), 2 confirmed regressions (allowed 6), 5 noise flips set aside")


def test_a_kept_improvement_that_costs_more_says_so_and_a_tiny_alpha_stays_readable() -> None:
    stats = new_stats(p_value=0.0004, alpha=0.0025, noise_flips=[], regressions=[],
                      cost={"base_usd": 1.0, "cand_usd": 1.3, "ratio": 1.3, "max_ratio": 1.5})
    assert explain(verdict(True, stats)) == (
        "kept: val +4.7 pp (p < 0.001 ≤ its α 0.0025), 0 confirmed regressions (allowed 6), cost +30%")


def test_a_kept_saving_names_the_cut_and_the_margin() -> None:
    stats = new_stats(delta=-0.003, accepted_as="saving", objective="cost",
                      saving={"metric": "cost", "base": 1.0, "cand": 0.65, "ratio": 0.65, "min_saving": 0.2,
                              "margin": 0.01, "non_inferior": True, "p_value": 0.02})
    assert explain(verdict(True, stats)) == (
        f"kept as a saving: cost {M}35% at non-inferior score (val {M}0.3 pp, margin 1 pp, p = 0.020)")


def test_a_latency_saving_without_its_own_margin_takes_the_gates() -> None:
    stats = new_stats(delta=0.0, accepted_as="saving",
                      saving={"metric": "latency", "ratio": 0.5, "non_inferior": True})
    gates = {**NEW_GATES, "non_inferiority_margin": 0.02}
    assert explain(verdict(True, stats, gates=gates)) == (
        f"kept as a saving: latency {M}50% at non-inferior score (val +0.0 pp, margin 2 pp)")


# --------------------------------------------------------------------------- refused, new format


def test_raced_out_says_when_with_what_delta_and_what_it_saved() -> None:
    looks = [{"share": 0.25, "n": 75, "delta": -0.03, "z": -1.2, "stopped": True}]
    stats = new_stats(evaluated=75, delta=-0.03, regressions=[], noise_flips=[], racing={"looks": looks, "saved": 225})
    v = verdict(False, stats, ["stopped at 25% of val: cannot reach min_delta"], codes=["raced_out"])
    assert explain(v) == f"refused: raced out after 25% of val (delta {M}3.0 pp, 225 evaluations saved): it could no longer pass"
    assert racing_saved(stats) == 225


def test_a_race_without_looks_takes_its_share_from_the_examples_evaluated() -> None:
    stats = new_stats(evaluated=150, delta=-0.01, racing={"looks": [], "saved": 150})
    v = verdict(False, stats, [{"code": "raced_out", "text": "raced out"}])
    assert explain(v).startswith(f"refused: raced out after 50% of val (delta {M}1.0 pp, 150 evaluations saved)")


def test_must_pass_names_the_examples_it_breaks() -> None:
    stats = new_stats(must_pass_broken=["m1", "m2", "m3", "m4"])
    v = verdict(False, stats, [{"code": "must_pass", "text": "breaks 4 must-pass example(s): m1, m2, m3, m4"}])
    assert explain(v) == "refused: breaks 4 must-pass examples (m1, m2, m3 +1 more)"
    one = verdict(False, new_stats(must_pass_broken=[]), ["breaks must_pass"], codes=["must_pass"])
    assert explain(one) == "refused: breaks must-pass example(s)"


def test_confirmed_regressions_over_the_limit_count_apart_from_noise_flips() -> None:
    stats = new_stats(n=100, regressions=["a", "b", "c"], noise_flips=["d", "e", "f", "g"])
    v = verdict(False, stats, ["3 confirmed regression(s) > max_regressions 2% (2): a, b, c"], codes=["regressions"])
    assert explain(v) == "refused: 3 confirmed regressions (allowed 2), 4 noise flips set aside"


def test_the_resolved_allowance_in_stats_wins_over_the_share() -> None:
    stats = new_stats(n=100, regressions=["a", "b", "c"], noise_flips=[], max_regressions=1)
    assert explain(verdict(False, stats, ["too many"], codes=["regressions"])) == (
        "refused: 3 confirmed regressions (allowed 1)")


def test_not_significant_against_its_share_of_the_budget() -> None:
    stats = new_stats(delta=0.02, p_value=0.21, alpha=0.061)
    v = verdict(False, stats, ["p = 0.210 > alpha 0.061"], codes=["not_confident"])
    assert explain(v) == "refused: val +2.0 pp is not significant (p = 0.210 > its α 0.061)"


def test_a_saving_refused_as_inferior_or_too_small() -> None:
    inferior = new_stats(delta=-0.02, accepted_as=None, objective="cost",
                         saving={"metric": "cost", "ratio": 0.6, "min_saving": 0.2, "margin": 0.01,
                                 "non_inferior": False, "p_value": 0.3})
    v = verdict(False, inferior, ["score not non-inferior within 0.01", "val delta -0.0200 below min_delta 0.01"],
                codes=["not_non_inferior", "min_delta"])
    assert explain(v) == (f"refused: as a saving, its score may be more than 1 pp worse (val {M}2.0 pp, p = 0.300); "
                          f"val {M}2.0 pp, below the minimum gain of 1 pp")
    small = new_stats(delta=0.0, noise_flips=[], saving={"metric": "cost", "ratio": 0.88, "min_saving": 0.2,
                                                          "margin": 0.01, "non_inferior": True, "p_value": 0.01})
    assert explain(verdict(False, small, ["cost saving 12% < min_saving 20%"], codes=["saving_too_small"])) == (
        f"refused: as a saving, cost {M}12% is too small (needs {M}20%)")


def test_cost_and_latency_limits() -> None:
    stats = new_stats(noise_flips=[], cost={"base_usd": 1.0, "cand_usd": 1.8, "ratio": 1.8, "max_ratio": 1.5},
                      latency={"base_mean_s": 1.0, "cand_mean_s": 2.5, "ratio": 2.5, "max_ratio": 1.5})
    v = verdict(False, stats, ["cost ratio 1.80 > max_cost_ratio 1.5", "latency ratio 2.50 > max_latency_ratio 1.5"])
    assert explain(v) == "refused: cost ×1.80, over the allowed ×1.5; latency ×2.50, over the allowed ×1.5"


# --------------------------------------------------------------------------- refused before or without numbers


def test_static_reasons_refuse_before_evaluation() -> None:
    v = verdict(False, None, ["data/rows.jsonl: protected file", "app.py: adds 1 val/test expected answer(s) (label leak): v3"],
                static=["data/rows.jsonl: protected file", "app.py: adds 1 val/test expected answer(s) (label leak): v3"])
    assert explain(v) == ("refused before evaluation: data/rows.jsonl: protected file; "
                          "app.py: adds 1 val/test expected answer(s) (label leak): v3")
    coded = verdict(False, None, [{"code": "label_leak", "text": "p.txt: label leak: v1"}])
    assert explain(coded) == "refused before evaluation: p.txt: label leak: v1"


@pytest.mark.parametrize(("reasons", "codes", "expected"), [
    (["the proposal changed no file"], None, "refused: the proposal changed no file"),
    (["not evaluated"], None, "refused: it was not evaluated"),
    (["val evaluation failed: 12 of 40 examples errored"], ["eval_failed"],
     "refused: its evaluation failed (val evaluation failed: 12 of 40 examples errored)"),
    (["budget exhausted before the gate"], ["budget"],
     "refused: the budget ran out before it could be judged (budget exhausted before the gate)"),
    (["the moon was in the wrong phase"], None, "refused: the moon was in the wrong phase"),
    ([], None, "refused: no reason recorded"),
])
def test_refusals_without_stats(reasons: list[str], codes: list[str] | None, expected: str) -> None:
    assert explain(verdict(False, None, reasons, codes=codes)) == expected


def test_a_malformed_verdict_still_reads() -> None:
    assert explain({}) == "refused: no reason recorded"
    assert explain({"accepted": True}) == "kept"
    assert explain({"accepted": False, "stats": "garbage", "reasons": "not a list", "gates": 3}) == "refused: no reason recorded"


# --------------------------------------------------------------------------- verdicts written before issue 12


OLD_GATES = {"min_delta": 0.01, "max_regressions": 0, "max_cost_ratio": 1.5, "max_latency_ratio": 1.5,
             "confidence": 0.9, "test": "bootstrap", "repeats": 1}


def old_stats(**over: Any) -> dict[str, Any]:
    """verdict.json ``stats`` as the gate wrote them before confirmation, racing and alpha spending."""
    stats = {"n": 6, "base_mean": 0.5, "cand_mean": 0.6667, "delta": 0.1667, "test": "bootstrap",
             "bootstrap": {"ci_low": 0.0, "ci_high": 0.5, "prob_positive": 0.95, "mean": 0.1667},
             "ci_low": 0.0, "ci_high": 0.5, "regressions": [], "fixed": ["v2"],
             "cost": {"base_usd": 0.006, "cand_usd": 0.006, "ratio": 1.0, "max_ratio": 1.5},
             "latency": {"base_mean_s": 0.9, "cand_mean_s": 0.9, "ratio": 1.0, "max_ratio": 1.5}, "reasons": []}
    stats.update(over)
    return stats


def test_an_old_kept_verdict_reads_with_plain_regressions_and_the_runs_alpha() -> None:
    assert explain(verdict(True, old_stats(), gates=OLD_GATES)) == (
        "kept: val +16.7 pp (p = 0.050 ≤ α 0.100), 0 regressions (allowed 0)")
    sign = old_stats(test="sign", bootstrap=None, sign_test={"wins": 1, "losses": 0, "ties": 5, "n": 1, "p_value": 0.5})
    del sign["bootstrap"]
    assert explain(verdict(True, sign, gates={**OLD_GATES, "test": "sign"})) == (
        "kept: val +16.7 pp (p = 0.500 > α 0.100), 0 regressions (allowed 0)")  # the numbers as they are


def test_an_old_refusal_is_recognised_from_its_texts() -> None:
    stats = old_stats(delta=0.0, regressions=["v1"], bootstrap={"prob_positive": 0.5})
    v = verdict(False, stats, ["val delta +0.0000 below min_delta 0.01", "1 regression(s) > max_regressions 0: v1"],
                gates=OLD_GATES)
    assert reasons_with_codes(v) == [("min_delta", "val delta +0.0000 below min_delta 0.01"),
                                     ("regressions", "1 regression(s) > max_regressions 0: v1")]
    assert explain(v) == "refused: val +0.0 pp, below the minimum gain of 1 pp; 1 regression (allowed 0)"
    unsure = verdict(False, old_stats(delta=0.02, bootstrap={"prob_positive": 0.8}),
                     ["improvement not confident: P(delta > 0) = 0.800 < 0.9"], gates=OLD_GATES)
    assert explain(unsure) == "refused: val +2.0 pp is not significant (p = 0.200 > α 0.100)"
    assert racing_saved(old_stats()) == 0


# --------------------------------------------------------------------------- run level


@pytest.mark.parametrize(("value", "n", "expected"), [
    (3, 300, 3), ("2%", 300, 6), ("2%", 49, 0), ("2.5 %", 200, 5), ("4", 10, 4), ("two", 10, None), (True, 10, None),
    ("2%", None, None),
])
def test_allowed_regressions(value: Any, n: Any, expected: int | None) -> None:
    assert allowed_regressions(value, n) == expected


def test_the_guarantee_sentence_follows_the_confidence() -> None:
    assert guarantee({"confidence": 0.95}) == evidence.guarantee(Gates(confidence=0.95))
    assert "at most 5%" in guarantee({"confidence": 0.95})
    assert "at most 20%" in guarantee({"confidence": 0.8, "repeats": 2})  # an older run's gates: the same promise
    assert "at most 10%" in guarantee({}) and "at most 10%" in guarantee(None) and "at most 10%" in guarantee({"confidence": "x"})
    assert "tested on its own at confidence 0.8" in per_candidate_note({"confidence": 0.8})
    assert "can exceed 20%" in per_candidate_note({"confidence": 0.8})


# --------------------------------------------------------------------------- the issue-12 gate's own texts, no codes


@pytest.mark.parametrize(("stats_over", "text", "expected"), [
    ({"evaluated": 75, "delta": -0.03, "racing": {"looks": [{"share": 0.25, "n": 75, "delta": -0.03, "z": -1.0,
                                                             "stopped": True}], "saved": 225}},
     "raced out after 75 of 300 val examples (25%): delta -0.0300 cannot reach min_delta 0.01",
     f"refused: raced out after 25% of val (delta {M}3.0 pp, 225 evaluations saved): it could no longer pass"),
    ({"delta": 0.02, "p_value": 0.21},
     "improvement not confident: p = 0.2100 > 0.0610, this candidate's share of the run's error budget",
     "refused: val +2.0 pp is not significant (p = 0.210 > its α 0.061)"),
    ({"regressions": ["a", "b", "c", "d", "e", "f", "g"]},
     "7 confirmed regression(s) > 6 allowed (max_regressions 2% of 300 val examples): a, b, c, d, e, f, g",
     "refused: 7 confirmed regressions (allowed 6), 5 noise flips set aside"),
    ({"regressions": ["m1"], "must_pass_broken": ["m1"], "evaluated": 150, "noise_flips": [],
      "racing": {"looks": [{"share": 0.25, "n": 75, "delta": 0.0, "z": 0.0, "stopped": False},
                           {"share": 0.5, "n": 150, "delta": 0.0, "z": 0.0, "stopped": True}], "saved": 150}},
     "breaks 1 must-pass example(s) (stopped after 150 of 300 val examples): m1",
     "refused: breaks 1 must-pass example (m1); stopped after 50% of val (150 evaluations saved)"),
    ({"saving": {"metric": "cost", "ratio": 0.88, "min_saving": 0.2, "margin": 0.01, "non_inferior": True,
                 "p_value": 0.0}},
     "no cost saving: cut +12% < min_saving 20%", f"refused: as a saving, cost {M}12% is too small (needs {M}20%)"),
    ({"delta": -0.02, "saving": {"metric": "latency", "ratio": 0.5, "min_saving": 0.2, "margin": 0.01,
                                 "non_inferior": False, "p_value": 0.3}},
     "score not shown non-inferior: p = 0.3000 > 0.0610 (margin 0.01)",
     f"refused: as a saving, its score may be more than 1 pp worse (val {M}2.0 pp, p = 0.300)"),
])
def test_the_new_gates_reason_texts_are_recognised_without_codes(stats_over: dict[str, Any], text: str,
                                                                  expected: str) -> None:
    assert explain(verdict(False, new_stats(**stats_over), [text])) == expected

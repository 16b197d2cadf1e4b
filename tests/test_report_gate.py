"""What the user sees of the gate: the report (HTML, Markdown, candidate pages) and the CLI summary say why each
candidate was kept or refused, list confirmed regressions apart from noise flips, show what racing saved and the
cost/score trade, and state the run-level guarantee near the top. Runs are built by ``runbuilder`` and their
verdicts rewritten to the issue-12 format (or to the format before it: older run directories exist)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console
from runbuilder import build_run

from pipemend import evidence
from pipemend.cli.render import candidate_line, candidates_table, summary_footer, summary_table
from pipemend.fsutil import atomic_write_json, atomic_write_text, read_json
from pipemend.manifest import Gates
from pipemend.optimize import CandidateSummary, OptimizeSummary
from pipemend.report import render_report
from pipemend.report.load import gate_overview, load_run
from pipemend.review import list_candidates

GUARANTEE_5 = evidence.guarantee(Gates(confidence=0.95))


def _looks(stop_at: float | None, deltas: tuple[float, ...]) -> list[dict[str, Any]]:
    out = []
    for share, d in zip((0.25, 0.5, 1.0), deltas):
        out.append({"share": share, "n": round(6 * share), "delta": d, "z": 0.0, "stopped": share == stop_at})
        if share == stop_at:
            break
    return out


def _rewrite(run_dir: Path, n: int, *, stats: dict[str, Any] | None, reasons: list[str] = (),
             codes: list[str] | None = None) -> None:
    path = run_dir / "candidates" / str(n) / "verdict.json"
    v = read_json(path)
    if stats is not None:
        v["stats"] = {**(v.get("stats") or {}), **stats}
        for old in ("bootstrap", "sign_test"):
            v["stats"].pop(old, None)
    if reasons:
        v["reasons"] = list(reasons)
    if codes is not None:
        v["reason_codes"] = codes
    atomic_write_json(path, v)


def new_format_run(tmp_path: Path) -> Path:
    """The fixture run with issue-12 verdicts: 1 kept as an improvement (a noise flip set aside), 2 raced out
    at half of val (a confirmed regression and a noise flip), 3 kept as a saving; 4 refused before evaluation."""
    run = build_run(tmp_path)
    frozen = run.run_dir / "frozen" / "pipemend.yaml"
    atomic_write_text(frozen, frozen.read_text() + "gates: {confidence: 0.95, max_regressions: '2%'}\n")
    common = {"test": "sign", "confirm": {"runs": 2, "examples": 2}, "must_pass_broken": [], "objective": "score"}
    _rewrite(run.run_dir, 1, stats={**common, "evaluated": 6, "p_value": 0.03, "alpha": 0.05, "regressions": [],
                                    "noise_flips": ["v5"], "racing": {"looks": _looks(None, (0.2, 0.2, 0.1667)), "saved": 0},
                                    "accepted_as": "improvement", "saving": None})
    _rewrite(run.run_dir, 2, stats={**common, "evaluated": 3, "delta": -0.3333, "p_value": 0.9, "alpha": 0.025,
                                    "regressions": ["v1"], "noise_flips": ["v6"],
                                    "racing": {"looks": _looks(0.5, (-0.2, -0.3333)), "saved": 3}, "accepted_as": None,
                                    "saving": None},
             reasons=["raced out at 50% of val: delta -0.3333 cannot reach min_delta"], codes=["raced_out"])
    _rewrite(run.run_dir, 3, stats={**common, "evaluated": 6, "p_value": 0.01, "alpha": 0.0125, "regressions": [],
                                    "noise_flips": [], "racing": {"looks": _looks(None, (0.1, 0.1, 0.1667)), "saved": 0},
                                    "objective": "cost", "accepted_as": "saving",
                                    "saving": {"metric": "cost", "base": 0.006, "cand": 0.0036, "ratio": 0.6,
                                               "min_saving": 0.2, "margin": 0.01, "non_inferior": True, "p_value": 0.01},
                                    "cost": {"base_usd": 0.006, "cand_usd": 0.0036, "ratio": 0.6, "max_ratio": 1.5}})
    return run.run_dir


def test_the_report_says_why_and_states_the_guarantee_near_the_top(tmp_path: Path) -> None:
    run_dir = new_format_run(tmp_path)
    html_path, md_path = render_report(run_dir)
    html = html_path.read_text()
    top = html[:html.index("<h2>Summary</h2>")]
    assert f'<p class="guarantee">{GUARANTEE_5}</p>' in top
    table = re.search(r'<table class="candidates">.*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr class=.*?</tr>", table, re.S)
    assert len(rows) == 4
    assert "kept: val +16.7 pp (p = 0.030 ≤ its α 0.050), 0 confirmed regressions (allowed 0), 1 noise flip set aside" in rows[0]
    assert "refused: raced out after 50% of val (delta \u221233.3 pp, 3 evaluations saved): it could no longer pass" in rows[1]
    assert "kept as a saving: cost \u221240% at non-inferior score (val +16.7 pp, margin 1 pp, p = 0.010)" in rows[2]
    assert "refused before evaluation: data/rows.jsonl: protected file" in rows[3]
    # confirmed regressions and noise flips in their own columns
    assert '1: <span class="mono">v1</span>' in rows[1] and '1: <span class="mono muted">v6</span>' in rows[1]
    assert '1: <span class="mono muted">v5</span>' in rows[0] and "(not confirmed)" not in table
    # evaluations racing saved, per candidate and for the run (3 saved; 6 + 3 + 6 paid)
    assert [re.findall(r'<td class="num">(\d+|–)</td>\s*<td class="why">', r) for r in rows] == [["0"], ["3"], ["0"], ["–"]]
    assert "<dt>racing saved</dt><dd>3 of 18 candidate example evaluations (17%); 1 candidate(s) stopped early</dd>" in html
    # the cost/score trade of each evaluated candidate
    trade = re.search(r'<table class="trade">.*?</table>', html, re.S).group(0)
    assert trade.count("<tr><td") == 3
    assert re.search(r"<td class=\"num\">3</td>.*?\+0\.167.*?\$0\.0060 → \$0\.0036.*?0\.60×.*?a saving \(cost\)", trade, re.S)
    assert re.search(r"<td class=\"num\">1</td>.*?1\.00×.*?an improvement", trade, re.S)

    md = md_path.read_text()
    assert GUARANTEE_5 in "\n".join(md.splitlines()[:4])
    assert "| racing saved | 3 of 18 candidate evaluations (17%) |" in md
    assert "\n- Confirmed regressions: candidate 2: v1.\n" in md
    assert "\n- Noise flips set aside (flipped once, not on re-runs): candidate 1: v5; candidate 2: v6.\n\n" in md
    line2 = next(ln for ln in md.splitlines() if ln.startswith("| 2 |"))
    assert "| 1 (1) |" in line2 and "| 3 |" in line2 and "raced out after 50% of val" in line2
    line3 = next(ln for ln in md.splitlines() if ln.startswith("| 3 |"))
    assert "kept as a saving: cost \u221240%" in line3 and "`pipemend/optimize-fixture/cand-3`" in line3
    assert len(md.splitlines()) < 60


def test_a_candidate_page_lists_confirmed_regressions_apart_from_noise_flips(tmp_path: Path) -> None:
    run_dir = new_format_run(tmp_path)
    render_report(run_dir)
    page = (run_dir / "candidates/2/index.html").read_text()
    assert "<strong>Why:</strong> refused: raced out after 50% of val" in page
    assert "<dt>fixed / confirmed regressions</dt><dd>1 / 1</dd>" in page
    assert '<dt>noise flips set aside</dt><dd>1: <span class="mono">v6</span></dd>' in page
    assert "3 of 6 val examples; racing saved 3 evaluation(s)" in page
    assert "Examples it broke (1)" in page and "re-run 2 more time(s) on both sides" in page
    noise = page[page.index("<h2>Noise flips set aside (1)</h2>"):]
    assert "v6" in noise[:400] and "count neither as regressions nor as fixes" in noise[:400]
    page3 = (run_dir / "candidates/3/index.html").read_text()
    assert "($0.0060 → $0.0036 on val)" in page3 and "Noise flips set aside (0)" in page3


OLD_STATS = {  # verdict.json stats as the gate wrote them before issue 12
    1: {"delta": 0.1667, "regressions": [], "bootstrap": {"prob_positive": 0.97}},
    2: {"delta": 0.0, "regressions": ["v1"], "bootstrap": {"prob_positive": 0.5}},
    3: {"delta": 0.1667, "regressions": [], "bootstrap": {"prob_positive": 0.96}},
}


def test_an_old_run_directory_still_renders_with_what_it_promised(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    for n, stats in OLD_STATS.items():
        path = run.run_dir / "candidates" / str(n) / "verdict.json"
        v = read_json(path)
        v.pop("reason_codes", None)  # a verdict from before issue 12 named no rule codes
        keep = {k: v["stats"][k] for k in ("n", "base_mean", "cand_mean", "fixed", "cost", "latency")}
        v["stats"] = {**keep, "test": "bootstrap", "reasons": [], **stats}
        v["gates"] = {"min_delta": 0.01, "max_regressions": 0, "max_cost_ratio": 1.5, "max_latency_ratio": 1.5,
                      "confidence": 0.9, "test": "bootstrap", "repeats": 1}
        if n == 2:
            v["reasons"] = ["val delta +0.0000 below min_delta 0.01", "1 regression(s) > max_regressions 0: v1"]
        atomic_write_json(path, v)
    html_path, md_path = render_report(run.run_dir)
    html, md = html_path.read_text(), md_path.read_text()
    note = "This run was judged before the run-level error budget: each candidate was tested on its own at confidence 0.9"
    assert note in html[:html.index("<h2>Summary</h2>")] and note in md and "Across this run" not in html
    assert "kept: val +16.7 pp (p = 0.030 ≤ α 0.100), 0 regressions (allowed 0)" in html
    assert "refused: val +0.0 pp, below the minimum gain of 1 pp; 1 regression (allowed 0)" in html
    assert "<dt>racing saved</dt><dd>–</dd>" in html and "racing saved" not in md
    assert "Confirmed regressions" not in md and "Noise flips" not in md
    page2 = (run.run_dir / "candidates/2/index.html").read_text()
    assert "<dt>fixed / regressed</dt>" in page2 and "<h2>Noise flips set aside" not in page2


def test_a_candidate_known_only_from_the_journal_is_explained_from_its_reasons(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    (run.run_dir / "candidates/2/verdict.json").unlink()
    data = load_run(run.run_dir)
    c2 = next(c for c in data["candidates"] if c["n"] == 2)
    regression = next(r for r in c2["reasons"] if "regression" in r)
    assert c2["why"].startswith("refused: ")  # no stats: the min_delta rule in words, the regression text as is
    assert "val +0.0 pp, below the minimum gain" in c2["why"] and regression in c2["why"]
    assert c2["noise_flips"] == [] and not c2["raced"] and c2["racing_saved"] == 0


# --------------------------------------------------------------------------- the CLI


def _text(renderable: Any) -> str:
    console = Console(record=True, width=400, color_system=None)
    console.print(renderable)
    return console.export_text()


def _summary(run_dir: Path) -> OptimizeSummary:
    cands = [CandidateSummary(n=c["n"], accepted=c["accepted"], val_score=c["val_score"], delta=c["delta"],
                              reasons=c["reasons"], rationale=c["rationale"], ref=c["ref"])
             for c in load_run(run_dir)["candidates"]]
    return OptimizeSummary(run_id="optimize-fixture", run_dir=str(run_dir), status="done", stop_reason="limit",
                           baseline={"train": 0.4, "val": 0.5, "test": 0.333},
                           best={"n": 3, "branch": "pipemend/optimize-fixture/cand-3", "sha": "x", "val": 0.833,
                                 "test": 0.667},
                           candidates=cands, spent_usd=0.0015, llm_calls=2, cache_hits=3, wall_s=5)


def test_the_optimize_summary_says_why_what_racing_saved_and_the_guarantee(tmp_path: Path) -> None:
    run_dir = new_format_run(tmp_path)
    s = _summary(run_dir)
    table = _text(summary_table(s))
    assert "refused: raced out after 50% of val (delta \u221233.3 pp, 3 evaluations saved)" in table
    assert "kept as a saving: cost \u221240% at non-inferior score" in table
    assert "→ refs/heads/pipemend/optimize-fixture/cand-3" in table
    footer = summary_footer(s, "prompt 3 → 1")
    assert "racing saved 3 of 18 candidate example evaluations (17%); 1 candidate(s) stopped early" in footer
    assert footer[-1] == GUARANTEE_5
    assert gate_overview(run_dir)["why"][4] == "refused before evaluation: data/rows.jsonl: protected file"


def test_the_summary_of_an_unreadable_run_dir_falls_back_to_the_reasons(tmp_path: Path) -> None:
    s = _summary(new_format_run(tmp_path)).model_copy(update={"run_dir": str(tmp_path / "gone")})
    table = _text(summary_table(s))
    assert "raced out at 50% of val: delta -0.3333 cannot reach min_delta" in table
    assert summary_footer(s, None) == ["spent $0.0015, 2 LLM calls (3 from cache), 5 s; "
                                       "best: pipemend/optimize-fixture/cand-3"]


def test_the_candidate_line_and_the_branches_table_say_why(tmp_path: Path) -> None:
    run_dir = new_format_run(tmp_path)
    v2 = read_json(run_dir / "candidates/2/verdict.json")
    line = candidate_line(n=2, accepted=False, val_score=0.5, delta=-0.3333, reasons=v2["reasons"], verdict=v2)
    assert line.startswith("candidate 2 (val 0.500, delta -0.333): [red]refused[/]: raced out after 50% of val")
    kept = candidate_line(n=1, accepted=True, why="kept: val +16.7 pp")
    assert kept == "candidate 1: [green]kept[/]: val +16.7 pp"
    assert candidate_line(n=5, accepted=False, reasons=["[bold]x"]) == "candidate 5: [red]rejected[/]: \\[bold]x"
    rows = list_candidates(run_dir)
    for r in rows:
        r["why"] = gate_overview(run_dir)["why"][r["n"]]
    assert "refused: raced out after 50% of val" in _text(candidates_table("candidates", rows))

"""Rich renderings of the library's results: the failure ladder, eval scores, the optimize summary,
a candidate's verdict line, a run's candidates, the doctor's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..diagnose import Diagnosis
from ..manifest import RUNGS
from ..optimize import OptimizeSummary
from ..report.explain import explain
from ..report.load import gate_overview


def render_diagnosis(d: Diagnosis, *, max_ids: int = 5) -> Group:
    """A table (rung, count, share, first example ids) and a line with the recommendation."""
    table = Table(title=f"Failure ladder: {d.n_failed} of {d.n_examples} examples failed")
    table.add_column("rung")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    table.add_column("examples")
    shares = d.shares()

    def ids_cell(ids: list[str]) -> str:
        more = f" (+{len(ids) - max_ids})" if len(ids) > max_ids else ""
        return escape(", ".join(ids[:max_ids]) + more)

    for rung in RUNGS:
        style = "bold" if rung == d.recommended else ""
        table.add_row(rung, str(d.counts.get(rung, 0)), f"{shares[rung]:.0%}", ids_cell(d.ids.get(rung, [])),
                      style=style)
    if d.errors:
        table.add_row("error", str(d.errors), "-", ids_cell(d.error_ids), style="red")
    if d.unattributed:
        table.add_row("unattributed", str(d.unattributed), "-", ids_cell(d.unattributed_ids), style="yellow")
    if d.recommended:
        line = Text(f"Next: try the {d.recommended} rung "
                    f"(cheapest rung with ≥ {d.thresholds.min_share:.0%} of failures, else the largest).")
    elif d.errors:
        line = Text("Next: fix the runner errors; no example failed on a ladder rung.")
    elif d.unattributed:
        line = Text("No rung to recommend: retrieval cannot be judged (mark the retrieval step's doc_ids, or give "
                    "the rows `evidence_text` or the manifest a `dataset.corpus`).")
    else:
        line = Text("Nothing failed: no rung to recommend.")
    return Group(table, line)


def scores_table(summaries: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="scores")
    for col in ("split", "score", "95% CI", "n", "errors", "cost", "mean latency"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, s in summaries.items():
        table.add_row(
            split, f"{s.get('score', 0):.3f}", f"{s.get('ci_low', 0):.3f} – {s.get('ci_high', 0):.3f}",
            str(s.get("n", 0)), str(s.get("errors", 0)), f"${s.get('cost_usd', 0) or 0:.4f}",
            f"{s.get('latency_s_mean') or 0:.2f}s",
        )
    return table


def judge_line(summary: Mapping[str, Any]) -> str:
    """The judges' spend of an evaluation, apart from the pipeline's cost (``judge_*`` summary fields)."""
    return (f"judge {summary.get('judge_model')}: {summary.get('judge_calls', 0)} calls "
            f"({summary.get('judge_cache_hits', 0)} cached, {summary.get('judge_errors', 0)} failed), "
            f"${summary.get('judge_cost_usd') or 0:.4f} (not in the pipeline's cost)")


def agreement_lines(a: Mapping[str, Any]) -> list[str]:
    """``--judge-agreement`` as plain lines: agreement, kappa, confusion counts, the verdict."""
    kappa = "undefined" if a.get("kappa") is None else f"{a['kappa']:.3f}"
    lines = [
        f"{a['judge']} ({a['model']}) against {a['reference']} on {a['n']} labelled examples, pass at score >= 0.5",
        f"agreement {a['agreement']:.1%} ({a['agree']}/{a['n']}), Cohen's kappa {kappa}",
        f"both pass {a['both_pass']}, both fail {a['both_fail']}, only the judge passes {a['judge_only_pass']}, "
        f"only {a['reference']} passes {a['reference_only_pass']}",
    ]
    if a.get("errors"):
        lines.append(f"{a['errors']} judgment(s) failed (left out); see the run's judge/gateway/calls.jsonl")
    if a.get("disagreements"):
        shown = ", ".join(a["disagreements"][:10])
        lines.append(f"disagree on: {shown}{' …' if len(a['disagreements']) > 10 else ''}")
    lines.append(f"verdict: {a['verdict']}")
    return lines


def _verdict_markup(why: str) -> str:
    """A why-sentence with its first word (kept / refused) in colour (markup)."""
    head, sep, rest = why.partition(":")
    colour = "green" if head.startswith("kept") else "red"
    return f"[{colour}]{escape(head)}[/]{escape(sep + rest)}"


def candidate_line(*, n: int, accepted: bool, val_score: float | None = None, delta: float | None = None,
                   reasons: Sequence[str] = (), why: str | None = None, verdict: Mapping[str, Any] | None = None,
                   **_: Any) -> str:
    """``candidate 2 (val 0.500, delta -0.250): refused: ...`` with the verdict in colour (markup).

    ``why`` (or ``verdict``, a verdict.json dict, explained by ``report.explain``) is the plain-words reason;
    without either the gate's reason texts are shown.
    """
    if why is None and verdict is not None:
        why = explain(verdict)
    scores = f" (val {val_score:.3f}, delta {delta:+.3f})" if val_score is not None and delta is not None else ""
    if why:
        return f"candidate {n}{scores}: {_verdict_markup(why)}"
    line = f"candidate {n}: " + ("[green]accepted[/]" if accepted else "[red]rejected[/]") + scores
    if not accepted:
        line += escape(f": {'; '.join(reasons)[:300]}")
    return line


def _overview(run_dir: str | Path) -> dict[str, Any]:
    try:
        return gate_overview(Path(run_dir))
    except Exception:  # noqa: BLE001 - a summary never fails on a run directory it cannot read
        return {"why": {}, "racing": {"candidates": 0}, "guarantee": None}


def summary_table(s: OptimizeSummary, overview: Mapping[str, Any] | None = None) -> Table:
    """Baseline and candidates with val, test and why each was kept or refused (``overview``: ``gate_overview``
    of the run, read from ``s.run_dir`` when not given)."""
    why = (overview if overview is not None else _overview(s.run_dir)).get("why") or {}
    t = Table(title=escape(f"pipemend optimize {s.run_id}: {s.stop_reason}"))
    for col in ("", "val", "test", "why"):
        t.add_column(col)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    t.add_row("baseline", fmt(s.baseline.get("val")), fmt(s.baseline.get("test")), "")
    for c in s.candidates:
        note = why.get(c.n) or ("; ".join(c.reasons)[:80] if not c.accepted else "kept")
        if c.accepted and c.ref:
            note += f" → {c.ref}"
        t.add_row(f"cand-{c.n} " + ("[green]accepted[/]" if c.accepted else "[red]rejected[/]"),
                  fmt(c.val_score), fmt(s.best["test"]) if s.best and s.best["n"] == c.n else "", escape(note))
    return t


def summary_footer(s: OptimizeSummary, ladder: str | None, overview: Mapping[str, Any] | None = None) -> list[str]:
    """The lines under the summary table: spend, calls, the best branch, the evaluations racing saved,
    failures per rung, the run-level guarantee (plain text)."""
    ov = overview if overview is not None else _overview(s.run_dir)
    lines = [f"spent ${s.spent_usd:.4f}, {s.llm_calls} LLM calls ({s.cache_hits} from cache), "
             f"{s.wall_s:.0f} s; best: {s.best['branch'] if s.best else 'none accepted'}"]
    racing = ov.get("racing") or {}
    if racing.get("candidates"):
        share = racing.get("share")
        lines.append(f"racing saved {racing['saved']:,} of {racing['saved'] + racing['paid']:,} candidate example "
                     f"evaluations ({share:.0%}); {racing['raced_out']} candidate(s) stopped early"
                     if share is not None else "racing saved no evaluation")
    if ladder:
        lines.append(f"failures per rung on train, {'baseline → best' if s.best else 'baseline'}: {ladder}")
    if ov.get("guarantee"):
        lines.append(ov["guarantee"])
    return lines


def candidates_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """``pipemend branches``: verdict, val, delta, change and branch or ref per candidate."""
    table = Table(title=escape(title))
    for col, justify in (("#", "right"), ("verdict", "left"), ("val", "right"), ("delta", "right"), ("change", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_column("branch / ref", no_wrap=True)  # copied into git commands: never split
    colour = {"accepted": "green", "rejected": "red"}
    for r in rows:
        v = r["verdict"]
        table.add_row(str(r["n"]), f"[{colour.get(v, 'yellow')}]{v}[/]",
                      "-" if r["val_score"] is None else f"{r['val_score']:.3f}",
                      "-" if r["delta"] is None else f"{r['delta']:+.3f}",
                      escape(r["title"]) if r["accepted"]
                      else f"{escape(r['title'])} [dim]({escape((r.get('why') or (r['reasons'] or ['-'])[0])[:120])})[/]",
                      r["branch"] or "-")
    return table


def checks_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="pipemend doctor")
    for col in ("check", "ok", "detail", "fix"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(str(r["name"])), "[green]ok[/]" if r["ok"] else "[red]no[/]",
                      escape(str(r["detail"] or "")), escape(str(r["fix"] or "")))
    return table

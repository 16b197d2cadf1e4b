"""Rich renderings of the library's results: the failure ladder, eval scores, the optimize summary,
a candidate's verdict line, a run's candidates, the doctor's checks."""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..diagnose import Diagnosis
from ..manifest import RUNGS
from ..optimize import OptimizeSummary


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
    if d.recommended:
        line = Text(f"Next: try the {d.recommended} rung "
                    f"(cheapest rung with ≥ {d.thresholds.min_share:.0%} of failures, else the largest).")
    elif d.errors:
        line = Text("Next: fix the runner errors; no example failed on a ladder rung.")
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


def candidate_line(*, n: int, accepted: bool, val_score: float | None = None, delta: float | None = None,
                   reasons: Sequence[str] = (), **_: Any) -> str:
    """``candidate 2: rejected (val 0.500, delta -0.250): ...`` with the verdict in colour (markup)."""
    line = f"candidate {n}: " + ("[green]accepted[/]" if accepted else "[red]rejected[/]")
    if val_score is not None and delta is not None:
        line += f" (val {val_score:.3f}, delta {delta:+.3f})"
    if not accepted:
        line += escape(f": {'; '.join(reasons)[:300]}")
    return line


def summary_table(s: OptimizeSummary) -> Table:
    t = Table(title=escape(f"pipemend optimize {s.run_id}: {s.stop_reason}"))
    for col in ("", "val", "test", "note"):
        t.add_column(col)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    t.add_row("baseline", fmt(s.baseline.get("val")), fmt(s.baseline.get("test")), "")
    for c in s.candidates:
        note = c.ref or "" if c.accepted else "; ".join(c.reasons)[:80]
        t.add_row(f"cand-{c.n} " + ("[green]accepted[/]" if c.accepted else "[red]rejected[/]"),
                  fmt(c.val_score), fmt(s.best["test"]) if s.best and s.best["n"] == c.n else "", escape(note))
    return t


def summary_footer(s: OptimizeSummary, ladder: str | None) -> list[str]:
    """The lines under the summary table: spend, calls, the best branch, failures per rung (plain text)."""
    lines = [f"spent ${s.spent_usd:.4f}, {s.llm_calls} LLM calls ({s.cache_hits} from cache), "
             f"{s.wall_s:.0f} s; best: {s.best['branch'] if s.best else 'none accepted'}"]
    if ladder:
        lines.append(f"failures per rung on train, {'baseline → best' if s.best else 'baseline'}: {ladder}")
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
                      else f"{escape(r['title'])} [dim]({escape((r['reasons'] or ['-'])[0][:60])})[/]",
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

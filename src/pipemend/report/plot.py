"""The val-score-per-candidate plot as inline SVG (no JavaScript, no external files).

Accepted candidates are green dots, rejected ones red crosses, candidates
refused before evaluation grey rings on the floor; a dashed line marks the
baseline and a blue step line the best accepted score so far.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

W, H = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 20, 40
ACCEPTED, REJECTED, NOEVAL, BASELINE, BEST = "#1a7f37", "#cf222e", "#8c959f", "#57606a", "#0969da"


def _fmt(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:.0f}"


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if 0.0 <= lo and hi <= 1.0:  # scores in [0, 1]: pad to tenths, stay inside [0, 1]
        lo, hi = max(0.0, math.floor((lo - 0.05) * 10) / 10), min(1.0, math.ceil((hi + 0.05) * 10) / 10)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def score_plot(baseline: float | None, candidates: list[dict[str, Any]]) -> str:
    """SVG of val score per candidate; ``candidates`` are the loader's rows (n, status, val_score, delta)."""
    scored = [c["val_score"] for c in candidates if c.get("val_score") is not None]
    values = scored + ([baseline] if baseline is not None else [])
    if not values:
        values = [0.0, 1.0]
    lo, hi = _range(values)
    nmax = max([c["n"] for c in candidates], default=1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(n: float) -> float:
        return LEFT + pw * (n / max(nmax, 1))

    def y(v: float) -> float:
        return TOP + ph * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="score-plot" role="img" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="system-ui, sans-serif" font-size="12">',
           "<title>Validation score per candidate</title>",
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#f6f8fa" stroke="#d0d7de"/>']
    for i in range(6):  # y grid and ticks
        v = lo + (hi - lo) * i / 5
        yy = y(v)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eaeef2"/>')
        out.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#57606a">{_fmt(v)}</text>')
    step = max(1, math.ceil(nmax / 20))
    for n in range(0, nmax + 1, step):  # x ticks
        label = "base" if n == 0 else str(n)
        out.append(f'<text x="{x(n):.1f}" y="{TOP + ph + 16}" text-anchor="middle" fill="#57606a">{label}</text>')
    out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{H - 6}" text-anchor="middle" fill="#24292f">candidate</text>')
    out.append(f'<text x="14" y="{TOP + ph / 2:.1f}" text-anchor="middle" fill="#24292f" '
               f'transform="rotate(-90 14 {TOP + ph / 2:.1f})">val score</text>')

    if baseline is not None:
        yb = y(baseline)
        out.append(f'<line class="baseline" x1="{LEFT}" x2="{LEFT + pw}" y1="{yb:.1f}" y2="{yb:.1f}" '
                   f'stroke="{BASELINE}" stroke-width="1.5" stroke-dasharray="6 4"><title>baseline {_fmt(baseline)}'
                   f'</title></line>')
        # best accepted score so far, as a step line from the baseline
        pts, cur = [(x(0), yb)], baseline
        for c in sorted(candidates, key=lambda c: c["n"]):
            if c.get("status") == "accepted" and c.get("val_score") is not None:
                pts += [(x(c["n"]), y(cur)), (x(c["n"]), y(c["val_score"]))]
                cur = c["val_score"]
        pts.append((x(nmax), y(cur)))
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        out.append(f'<polyline class="best-line" points="{path}" fill="none" stroke="{BEST}" stroke-width="2" '
                   f'stroke-opacity="0.6"/>')

    for c in candidates:
        n, v, status = c["n"], c.get("val_score"), c.get("status")
        delta = c.get("delta")
        tip = escape(f"cand-{n}: {status}" + (f", val {_fmt(v)}" if v is not None else ", not evaluated")
                     + (f", delta {delta:+.3f}" if delta is not None else "")
                     + (f" — {c.get('reason')}" if status != "accepted" and c.get("reason") else ""))
        cx = x(n)
        if v is None:
            cy = TOP + ph - 6
            out.append(f'<circle class="pt-noeval" cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="white" '
                       f'stroke="{NOEVAL}" stroke-width="2"><title>{tip}</title></circle>')
        elif status == "accepted":
            out.append(f'<circle class="pt-accepted" cx="{cx:.1f}" cy="{y(v):.1f}" r="7" fill="{ACCEPTED}" '
                       f'stroke="white" stroke-width="1.5"><title>{tip}</title></circle>')
        else:
            cy, d = y(v), 6
            out.append(f'<g class="pt-rejected" stroke="{REJECTED}" stroke-width="3" stroke-linecap="round">'
                       f'<title>{tip}</title><line x1="{cx - d:.1f}" y1="{cy - d:.1f}" x2="{cx + d:.1f}" '
                       f'y2="{cy + d:.1f}"/><line x1="{cx - d:.1f}" y1="{cy + d:.1f}" x2="{cx + d:.1f}" '
                       f'y2="{cy - d:.1f}"/></g>')

    lx, ly = W - RIGHT + 16, TOP + 10  # legend
    out += ['<g class="legend" fill="#24292f">',
            f'<circle cx="{lx}" cy="{ly}" r="6" fill="{ACCEPTED}"/><text x="{lx + 14}" y="{ly + 4}">accepted</text>',
            f'<g stroke="{REJECTED}" stroke-width="3" stroke-linecap="round"><line x1="{lx - 5}" y1="{ly + 17}" '
            f'x2="{lx + 5}" y2="{ly + 27}"/><line x1="{lx - 5}" y1="{ly + 27}" x2="{lx + 5}" y2="{ly + 17}"/></g>'
            f'<text x="{lx + 14}" y="{ly + 26}">rejected</text>',
            f'<circle cx="{lx}" cy="{ly + 44}" r="5" fill="white" stroke="{NOEVAL}" stroke-width="2"/>'
            f'<text x="{lx + 14}" y="{ly + 48}">not evaluated</text>',
            f'<line x1="{lx - 8}" x2="{lx + 8}" y1="{ly + 66}" y2="{ly + 66}" stroke="{BASELINE}" stroke-width="1.5" '
            f'stroke-dasharray="6 4"/><text x="{lx + 14}" y="{ly + 70}">baseline</text>',
            f'<line x1="{lx - 8}" x2="{lx + 8}" y1="{ly + 88}" y2="{ly + 88}" stroke="{BEST}" stroke-width="2"/>'
            f'<text x="{lx + 14}" y="{ly + 92}">best so far</text>', "</g>"]
    if not candidates:
        out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{TOP + ph / 2:.1f}" text-anchor="middle" fill="#57606a">'
                   f'no candidate yet</text>')
    out.append("</svg>")
    return "\n".join(out)

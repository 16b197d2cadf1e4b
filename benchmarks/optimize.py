"""The ladder proposer against random search over the same knobs, with the same evaluation budget.

    .venv/bin/python benchmarks/optimize.py [--limit 3] [--max-candidates 6] [--model local/qwen2.5-coder-1.5b-instruct]

Runs ``pipemend optimize`` twice on a copy of ``target_pipelines/multihop_qa``
(outside any git repo, so the snapshot gets its own repo): once with the
``ladder`` proposer, once with ``RandomKnobs`` below (a uniformly random
declared knob and value per candidate, seeded). Each run has its own LLM cache
unless ``--shared-cache``. Prints, side by side: baseline and best val and
test, candidates tried and accepted, pipeline LLM calls made and served from
cache, and wall time. Slow with the local model (two cores): use ``--limit``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipemend.cli.progress import RichProgress
from pipemend.configfile import config_format, get_dotted, parse_config, set_config_value
from pipemend.optimize import OptimizeConfig, run_optimize
from pipemend.protocols import Proposal, ProposalContext

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "target_pipelines" / "multihop_qa"


class RandomKnobs:
    """Random search: each candidate sets one random declared knob to a random other value."""

    name = "random-knobs"

    def __init__(self, seed: int = 0, attempts: int = 50):
        self.rng = random.Random(seed)
        self.attempts = attempts

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        knobs = dict(ctx.manifest.knobs)
        for _ in range(self.attempts):
            if not knobs:
                return None
            name = self.rng.choice(sorted(knobs))
            knob = knobs[name]
            text = (ctx.tools.root / knob.file).read_text(encoding="utf-8")
            fmt = config_format(knob.file)
            current = get_dotted(parse_config(text, fmt), knob.key, None)
            others = [v for v in knob.values if v != current]
            if not others:
                continue
            value = self.rng.choice(others)
            ctx.tools.write_file(knob.file, set_config_value(text, fmt, knob.key, value))
            return Proposal(rationale=f"random search: {name} = {value!r} (was {current!r})", rung=knob.rung,
                            meta={"knob": name, "value": value})
        return None


def run_one(label: str, proposer: str, args: argparse.Namespace, work: Path, cache: Path | None) -> dict[str, Any]:
    target = work / f"target-{label}"
    shutil.copytree(TARGET, target, ignore=shutil.ignore_patterns("__pycache__", ".pipemend-cache"))
    cfg = OptimizeConfig(target=str(target), proposer=proposer, model=args.model, budget_usd=args.budget_usd,
                         max_candidates=args.max_candidates, limit=args.limit, sandbox=args.sandbox,
                         run_id=f"bench-{label}", reports_dir=str(work / "reports"),
                         cache_dir=str(cache) if cache else None,
                         proposer_options={"seed": args.seed} if proposer.endswith(":RandomKnobs") else {})
    t0 = time.perf_counter()
    with RichProgress(Console(stderr=True)) as progress:
        s = run_optimize(cfg, progress)
    return {"label": label, "summary": s, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=None, help="examples per split (default: all)")
    p.add_argument("--max-candidates", type=int, default=6)
    p.add_argument("--model", default="local/qwen2.5-coder-1.5b-instruct")
    p.add_argument("--sandbox", default="auto")
    p.add_argument("--budget-usd", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-cache", action="store_true", help="one LLM cache for both runs")
    p.add_argument("--keep", action="store_true", help="keep the work folder and print where it is")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pipemend-bench-optimize-"))
    cache = work / "cache" if args.shared_cache else None
    try:
        results = [run_one("ladder", "ladder", args, work, cache),
                   run_one("random", "__main__:RandomKnobs", args, work, cache)]
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = Table(title=f"optimize on multihop_qa ({args.model}, limit {args.limit}, {args.max_candidates} candidates)")
    for col in ("proposer", "base val", "base test", "best val", "best test", "tried", "accepted",
                "LLM calls", "from cache", "wall s"):
        table.add_column(col, justify="right")
    for r in results:
        s = r["summary"]
        best = s.best or {}
        table.add_row(r["label"], fmt(s.baseline.get("val")), fmt(s.baseline.get("test")),
                      fmt(best.get("val", s.baseline.get("val"))), fmt(best.get("test", s.baseline.get("test"))),
                      str(len(s.candidates)), str(sum(c.accepted for c in s.candidates)),
                      str(s.llm_calls), str(s.cache_hits), f"{r['wall_s']:.1f}")
    Console(width=160).print(table)
    for r in results:
        print(f"{r['label']}: stopped because {r['summary'].stop_reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The proposers side by side on multihop_qa: the ladder, the reflective rewrite and the agent, one budget.

    .venv/bin/python benchmarks/proposers.py [--limit 8] [--max-candidates 3] \
        [--agent-model local/qwen2.5-coder-1.5b-instruct] [--proposers ladder,reflect,claude]

Runs ``pipemend optimize`` once per proposer on a fresh copy of
``target_pipelines/multihop_qa`` (outside any git repo), with the same pipeline
model, examples per split (``--limit``), candidates (``--max-candidates``) and
pipeline dollars: ``ladder`` (offline, no LLM), ``reflect`` (one reflective
rewrite of a prompt per candidate, by ``--agent-model``) and ``claude`` (the
tool-use agent, driven by ``--agent-model`` too: the local model offline, a
``claude-*`` model when ANTHROPIC_API_KEY is set). Each run has its own LLM
cache unless ``--shared-cache``.

Prints one table: val and test of the base and of the best candidate and their
deltas, candidates tried and accepted, the agent's own tokens (its gateway's
call log, every call counted, failed proposals included), the pipeline's LLM
calls, and wall time. A proposer whose run fails gets its row with the error;
the others still run. The agent proposers' train runs cost pipeline calls on
top of the gate's evaluations: the "LLM calls" column shows it. Slow with the
local model on a laptop's CPU: start with ``--limit 4 --max-candidates 1``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipemend.cli.progress import RichProgress
from pipemend.fsutil import read_jsonl
from pipemend.optimize import OptimizeConfig, run_optimize
from pipemend.optimize.config import LLM_PROPOSERS

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "target_pipelines" / "multihop_qa"
PROPOSERS = ("ladder", "reflect", "claude")


def agent_tokens(run_dir: Path) -> tuple[int, int]:
    """(calls, input + output tokens) of the agent's own gateway in ``run_dir`` (0, 0 without one)."""
    log = run_dir / "agent" / "gateway" / "calls.jsonl"
    if not log.is_file():
        return 0, 0
    rows = [r for r in read_jsonl(log) if isinstance(r, dict)]
    return len(rows), sum(int(r.get("input_tokens") or 0) + int(r.get("output_tokens") or 0) for r in rows)


def run_one(proposer: str, args: argparse.Namespace, work: Path, cache: Path | None) -> dict[str, Any]:
    target = work / f"target-{proposer}"
    shutil.copytree(TARGET, target, ignore=shutil.ignore_patterns("__pycache__", ".pipemend-cache"))
    options: dict[str, Any] = {}
    if proposer == "claude":
        options["max_tokens"] = args.agent_max_tokens
    cfg = OptimizeConfig(target=str(target), proposer=proposer, model=args.model, budget_usd=args.budget_usd,
                         max_candidates=args.max_candidates, limit=args.limit, sandbox=args.sandbox,
                         agent_model=args.agent_model if proposer in LLM_PROPOSERS else None,
                         proposer_options=options, max_turns=args.max_turns, run_id=f"bench-{proposer}",
                         reports_dir=str(work / "reports"), cache_dir=str(cache) if cache else None)
    t0 = time.perf_counter()
    try:
        with RichProgress(Console(stderr=True)) as progress:
            summary = run_optimize(cfg, progress)
        error = None
    except Exception as e:  # noqa: BLE001 - one proposer's failure is its row, the others still run
        traceback.print_exc(file=sys.stderr)
        summary, error = None, f"{type(e).__name__}: {e}"
    calls, tokens = agent_tokens(work / "reports" / f"bench-{proposer}")
    return {"label": proposer, "summary": summary, "error": error, "agent_calls": calls, "agent_tokens": tokens,
            "wall_s": time.perf_counter() - t0}


def _num(v: float | None, sign: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if sign else f"{v:.3f}")


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    t = Table(title=(f"proposers on multihop_qa (pipeline {args.model}, agent {args.agent_model}, limit {args.limit}, "
                     f"{args.max_candidates} candidates, ${args.budget_usd:g})"))
    for col in ("proposer", "base val", "best val", "val delta", "base test", "best test", "test delta", "tried",
                "accepted", "agent calls", "agent tokens", "LLM calls", "wall s"):
        t.add_column(col, justify="right")
    for r in results:
        s = r["summary"]
        if s is None:
            t.add_row(r["label"], *(["-"] * 8), str(r["agent_calls"]), str(r["agent_tokens"]), "-", f"{r['wall_s']:.1f}")
            continue
        base_val, base_test = s.baseline.get("val"), s.baseline.get("test")
        best = s.best or {}
        val, test = best.get("val", base_val), best.get("test", base_test)
        delta = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
        t.add_row(r["label"], _num(base_val), _num(val), _num(delta(val, base_val), True), _num(base_test), _num(test),
                  _num(delta(test, base_test), True), str(len(s.candidates)),
                  str(sum(c.accepted for c in s.candidates)), str(r["agent_calls"]), str(r["agent_tokens"]),
                  str(s.llm_calls), f"{r['wall_s']:.1f}")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=None, help="examples per split (default: all)")
    p.add_argument("--max-candidates", type=int, default=3)
    p.add_argument("--model", default="local/qwen2.5-coder-1.5b-instruct", help="the pipeline's model")
    p.add_argument("--agent-model", default="local/qwen2.5-coder-1.5b-instruct", help="reflect's and claude's model")
    p.add_argument("--proposers", default=",".join(PROPOSERS), help="comma-separated, in order")
    p.add_argument("--max-turns", type=int, default=20, help="turns of the claude agent per candidate")
    p.add_argument("--agent-max-tokens", type=int, default=1024, help="max_tokens of each claude agent response")
    p.add_argument("--sandbox", default="auto")
    p.add_argument("--budget-usd", type=float, default=5.0)
    p.add_argument("--shared-cache", action="store_true", help="one LLM cache for every run")
    p.add_argument("--keep", action="store_true", help="keep the work folder and print where it is")
    args = p.parse_args(argv)
    chosen = [x.strip() for x in args.proposers.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(PROPOSERS))
    if unknown:
        p.error(f"unknown proposers {unknown}; choose from {', '.join(PROPOSERS)}")

    work = Path(tempfile.mkdtemp(prefix="pipemend-bench-proposers-"))
    cache = work / "cache" if args.shared_cache else None
    try:
        results = [run_one(name, args, work, cache) for name in chosen]
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    Console(width=200).print(table(results, args))
    for r in results:
        why = r["error"] or (r["summary"].stop_reason if r["summary"] else "")
        print(f"{r['label']}: {'failed: ' if r['error'] else 'stopped because '}{why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

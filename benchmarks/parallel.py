"""Parallel candidates on a latency-bound model: examples per second and candidates per hour for K = 1, 2, 4.

    .venv/bin/python benchmarks/parallel.py [--ks 1 2 4] [--candidates 8] [--val 40] [--sandbox process]
                                            [--executors local ray]

Runs ``pipemend optimize --parallel K`` once per K on a copy of the tinyqa test target whose model is
``simulated/slow-echo`` (every uncached call takes 0.3 s: the night is spent waiting on latency), with
``--val`` made-up countries in its corpus and val split (each prompt distinct, so none is a cache hit) and
one full look per judgement (``racing: [1.0]``, ``confirm_runs: 0``: every K pays the same per candidate). The
proposer (``prompt_words.PromptWords``) makes one distinct change per candidate to the answer prompt (a new word,
so no call is a cache hit), which changes no score: each candidate is raced on val and refused, so every
K does the same kind of work. Each run has its own LLM cache. Prints, per K, the loop's wall time
(from the baseline's end to the loop's stop), candidates per hour, example evaluations per second (rows
scored in the candidates' evaluations), and both as ratios to K = 1 of the same run (target: 3x
candidates per hour at K = 4). With ``--executors local ray`` every K runs on each executor (Ray: a local
Ray started in this process, ``pipemend[ray]``), and the table adds Ray's time per example over the local
executor's at the same K (target: within 1.2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipemend.fsutil import read_jsonl
from pipemend.optimize import OptimizeConfig, run_optimize

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "tests" / "fixtures" / "targets" / "tinyqa"


def widen(target: Path, n_val: int) -> None:
    """``n_val`` made-up countries in the corpus and the val split; one look per judgement, no re-runs."""
    corpus = json.loads((target / "corpus.json").read_text(encoding="utf-8"))
    rows = []
    for i in range(n_val):
        corpus[f"land{i:03d}"] = f"City{i:03d}"
        rows.append(json.dumps({"id": f"val-land{i:03d}", "inputs": {"country": f"land{i:03d}"},
                                "expected": f"City{i:03d}"}) + "\n")
    (target / "corpus.json").write_text(json.dumps(corpus, indent=1), encoding="utf-8")
    (target / "data" / "val.jsonl").write_text("".join(rows), encoding="utf-8")
    manifest = target / "pipemend.yaml"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace(
        "gates:\n", "gates:\n  racing: [1.0]\n  confirm_runs: 0\n"), encoding="utf-8")


def run_one(k: int, executor: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    target = work / f"target-{executor}-k{k}"
    shutil.copytree(TARGET, target, ignore=shutil.ignore_patterns("__pycache__"))
    widen(target, args.val)
    fields: dict[str, Any] = dict(target=str(target), proposer="prompt_words:PromptWords",
                                  model="simulated/slow-echo", budget_usd=5.0, max_candidates=args.candidates,
                                  sandbox=args.sandbox, run_id=f"bench-{executor}-k{k}", reports_dir=str(work / "reports"),
                                  parallel=k, executor=executor, ray_task_cpus=args.ray_task_cpus)
    cfg = OptimizeConfig(**fields)
    t0 = time.perf_counter()
    summary = run_optimize(cfg)
    run_dir = Path(summary.run_dir)
    events = list(read_jsonl(run_dir / "journal.jsonl"))
    start = next(e["t"] for e in events if e["event"] == "baseline_done")
    stop = next(e["t"] for e in events if e["event"] == "loop_stopped")
    rows = sum(1 for f in (run_dir / "candidates").glob("*/evals/*/scored.jsonl")
               if f.parent.name != "val" or not any(f.parent.parent.glob("val-look*"))
               for _ in read_jsonl(f))
    loop_s = max(stop - start, 1e-9)
    return {"k": k, "executor": executor, "candidates": len(summary.candidates), "loop_s": loop_s, "wall_s": time.perf_counter() - t0,
            "rows": rows, "cand_per_h": len(summary.candidates) * 3600 / loop_s, "ex_per_s": rows / loop_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--candidates", type=int, default=8, help="Candidates per run (a multiple of every K is fairest).")
    p.add_argument("--val", type=int, default=40, help="Val examples (made-up countries).")
    p.add_argument("--sandbox", default="process")
    p.add_argument("--executors", nargs="+", default=["local"], choices=["local", "ray"])
    p.add_argument("--ray-task-cpus", type=float, default=1.0,
                   help="CPUs each Ray task asks for (a fraction such as 0.25 for this latency-bound model).")
    p.add_argument("--json", action="store_true", help="Print the results as one JSON object.")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pipemend-bench-parallel-") as tmp:
        results = [run_one(k, ex, args, Path(tmp)) for ex in args.executors for k in args.ks]
    by = {(r["executor"], r["k"]): r for r in results}
    for r in results:
        base = by[(r["executor"], args.ks[0])]
        r["cand_per_h_ratio"] = r["cand_per_h"] / base["cand_per_h"]
        r["ex_per_s_ratio"] = r["ex_per_s"] / base["ex_per_s"]
        local = by.get(("local", r["k"]))
        r["s_per_example_vs_local"] = (local["ex_per_s"] / r["ex_per_s"]) if local and r["ex_per_s"] else None
    if args.json:
        print(json.dumps({"results": results}))
        return 0
    k0 = f"x K={args.ks[0]}"
    print(f"{'executor':>8} {'K':>3} {'cands':>5} {'loop s':>8} {'cand/h':>8} {k0:>7} {'ex/s':>7} {k0:>7} "
          f"{'s/ex vs local':>13}")
    for r in results:
        vs = r["s_per_example_vs_local"]
        print(f"{r['executor']:>8} {r['k']:>3} {r['candidates']:>5} {r['loop_s']:>8.1f} {r['cand_per_h']:>8.0f} "
              f"{r['cand_per_h_ratio']:>7.2f} {r['ex_per_s']:>7.2f} {r['ex_per_s_ratio']:>7.2f} "
              f"{'-' if vs is None else f'{vs:.2f}':>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

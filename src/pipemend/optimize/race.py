"""A candidate on val: racing looks, confirmation re-runs, the test at its share of the error budget.

The evaluations this module pays for (``pipemend.evidence`` says what they mean):

- the candidate's first look at each racing slice of val, in the fixed order of
  ``race_order`` (``candidates/<n>/evals/val-look<k>``; one look: straight into
  ``candidates/<n>/evals/val``);
- for every example that flipped in that slice, ``confirm_runs`` re-runs on both
  sides with sample index 1..k (``confirm-look<k>-base-r<r>``, ``...-cand-r<r>``);
- when it ran the whole of val, its looks merged into ``candidates/<n>/evals/val``
  (the scored rows a later candidate compares against when this one is kept).

Every evaluation is keyed (``evaluate.EvalKey``: commit tree, ids, split, model,
sample index), so a run killed in the middle of a look or a confirmation and
resumed reads back what finished and pays nothing twice; the decisions are
functions of those rows, so it ends in the same verdict.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable

from .. import evidence
from ..dataset import Example
from ..errors import ConfigError
from ..evidence import Evidence, Look
from ..fsutil import atomic_write_text, copy_regular, read_jsonl, read_regular
from ..journal import RunState
from ..manifest import Gates
from ..reasons import Reason
from ..scoring import summarize, write_eval
from .env import RunEnv

MAX_MUST_PASS_BYTES = 4 << 20


def race_order(examples: list[Example], seed: int) -> list[Example]:
    """Val in the fixed shuffled order the racing slices are cut from (the same for every candidate of a run)."""
    order = list(examples)
    random.Random(f"pipemend-race:{seed}").shuffle(order)
    return order


def cuts(n: int, shares: list[float]) -> list[int]:
    """Example counts at each look (growing, the last is ``n``; a look that would add nothing is dropped)."""
    out: list[int] = []
    for share in shares:
        c = n if share >= 1.0 else max(1, math.ceil(share * n))
        if not out or c > out[-1]:
            out.append(min(c, n))
    return out or [n]


def must_pass_ids(spec: list[str] | str, *, frozen_dir: Path, run_dir: Path, st: RunState) -> frozenset[str]:
    """The ids a candidate may never break (``gates.must_pass``): the manifest's list; its file of ids, as frozen
    at the run's start; or ``learned``: every val example that every accepted base so far (the baseline first)
    got right at its first look."""
    if isinstance(spec, list):
        return frozenset(spec)
    if spec != "learned":
        data = read_regular(frozen_dir / spec, max_bytes=MAX_MUST_PASS_BYTES)
        if data is None:
            raise ConfigError(frozen_dir / "pipemend.yaml", "gates.must_pass",
                              f"{spec}: not a regular file of at most {MAX_MUST_PASS_BYTES} bytes")
        lines = (ln.split("#", 1)[0].strip() for ln in data.decode("utf-8", "replace").splitlines())
        return frozenset(ln for ln in lines if ln)
    right: set[str] | None = None
    for d in [(st.baseline or {}).get("val_dir")] + [c.val_dir for c in st.accepted]:
        if not d or not (run_dir / d / "scored.jsonl").is_file():
            continue
        ids = {str(r["id"]) for r in read_jsonl(run_dir / d / "scored.jsonl")
               if evidence.is_right(evidence.score_of(r))}
        right = ids if right is None else right & ids
    return frozenset(right or ())


Evaluate = Callable[[str, int, list[str], int], list[dict[str, Any]]]
"""``(side, look, ids, sample) -> scored rows``: one evaluation of ``side`` ("cand" or "base") on those val ids."""


def race(gates: Gates, order: list[str], base_by_id: dict[str, dict[str, Any]], evaluate: Evaluate, *,
         alpha: float, must_pass: frozenset[str] = frozenset(), seed: int = 0) -> evidence.Comparison:
    """The candidate against its base's first-look rows ``base_by_id`` on the val ids ``order`` (already in
    racing order): look by look, flips re-run on both sides, stopped as soon as it cannot pass."""
    marks = cuts(len(order), gates.racing)
    ev = Evidence(base=[], cand=[])
    looks: list[Look] = []
    stop: Reason | None = None
    start = 0
    for k, end in enumerate(marks, 1):
        part = order[start:end]
        cand_rows = evaluate("cand", k, part, 0)
        base_rows = [base_by_id.get(i) or {"id": i, "score": 0.0} for i in part]
        ev.base += base_rows
        ev.cand += cand_rows
        flips = evidence.flipped(base_rows, cand_rows)
        for r in range(1, gates.confirm_runs + 1) if flips else ():
            for side, more in (("base", ev.base_more), ("cand", ev.cand_more)):
                got = {str(row["id"]): evidence.score_of(row) for row in evaluate(side, k, flips, r)}
                for i in flips:
                    more.setdefault(i, []).append(got.get(i, 0.0))
        if end < len(order):
            seen, stop = evidence.look(ev, gates, n_val=len(order), share=end / len(order), must_pass=must_pass)
            looks.append(seen)
            if stop is not None:
                break
        start = end
    return evidence.compare(ev, gates, alpha=alpha, n_val=len(order), must_pass=must_pass, looks=looks,
                            stopped=stop, seed=seed)


def gate_val(env: RunEnv, st: RunState, n: int, sha: str, base_sha: str, base_val_dir: str, *,
             alpha: float | None = None, evals: str | None = None) -> evidence.Comparison:
    """The candidate commit ``sha`` (clean checkouts of it) against its base on val, raced at its share of the
    run's error budget (``alpha``: a slot a parallel round reserved, else the next one); a dead evaluation is a
    reason to refuse. ``evals``: its evaluations' folder (default ``candidates/<n>/evals``)."""
    gates = env.manifest.gates
    if alpha is None:
        _, alpha = evidence.alpha_for(gates.confidence, st.kept_before)
    evals = evals or f"candidates/{n}/evals"
    val = env.splits["val"]
    by_id = {ex.id: ex for ex in val}
    order = [ex.id for ex in race_order(val, env.cfg.seed)]
    looks = len(cuts(len(order), gates.racing))

    def run(side: str, k: int, ids: list[str], sample: int) -> list[dict[str, Any]]:
        if side == "cand" and sample == 0:
            rel = f"{evals}/val" if looks == 1 else f"{evals}/val-look{k}"
            env.show(f"candidate {n}: val look {k}/{looks}")
        else:
            rel = f"{evals}/confirm-look{k}-{side}-r{sample}"
            env.show(f"candidate {n}: confirming {len(ids)} flip(s) on the {side}, run {sample}")
        return env.evaluate(f"cand-{n}-{Path(rel).name}", rel, sha if side == "cand" else base_sha, "val",
                            examples=[by_id[i] for i in ids], sample=sample)

    base_by_id = {str(r["id"]): r for r in read_jsonl(env.run_dir / base_val_dir / "scored.jsonl")}
    must_pass = must_pass_ids(gates.must_pass, frozen_dir=env.frozen.dir, run_dir=env.run_dir, st=st)
    stats = race(gates, order, base_by_id, run, alpha=alpha, must_pass=must_pass, seed=env.cfg.seed + n)
    if looks > 1 and stats.evaluated == stats.n:
        merge_looks(env.run_dir / evals, looks, val)
    died = [Reason("eval_failed", f"the candidate's evaluation failed: {why}")
            for rel, why in dict(env.failures).items() if rel.startswith(f"{evals}/")]
    if died:
        stats.reasons = died + stats.reasons
        stats.accepted_as = None
    return stats


def merge_looks(evals: Path, looks: int, val: list[Example]) -> None:
    """``evals/val``: the looks' scored rows in val order, their summary, inputs and traces (regular files only,
    by name: what a sandbox wrote is hostile)."""
    rows: dict[str, dict[str, Any]] = {}
    inputs: list[str] = []
    out = evals / "val"
    (out / "traces").mkdir(parents=True, exist_ok=True)
    for k in range(1, looks + 1):
        d = evals / f"val-look{k}"
        for row in read_jsonl(d / "scored.jsonl"):
            rows[str(row["id"])] = row
        if (d / "inputs.jsonl").is_file():
            inputs.append((d / "inputs.jsonl").read_text(encoding="utf-8"))
        traces = d / "traces"
        if traces.is_dir() and not traces.is_symlink():
            for f in traces.iterdir():
                if f.name.endswith(".json"):
                    copy_regular(f, out / "traces" / f.name)
    ordered = [rows[ex.id] for ex in val if ex.id in rows]
    atomic_write_text(out / "inputs.jsonl", "".join(inputs))
    write_eval(out, ordered, summarize(ordered, split="val"))

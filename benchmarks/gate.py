"""The gate on simulated val scores: false accepts, real improvements, the run-level error, racing savings.

    .venv/bin/python benchmarks/gate.py [--trials 200] [--run-trials 100] [--seed 0]
    .venv/bin/python benchmarks/gate.py --e2e [--val 120] [--sandbox process]

Drives pipemend's own gate code (``optimize.race.race``: racing looks,
confirmation re-runs, ``evidence.compare`` at the candidate's share of the
run's error budget from ``evidence.alpha_for``) with evaluations simulated at
the score level. The model (issue 12): a binary metric, base accuracy 0.5; each
evaluation of a side observes an example's true outcome flipped with
probability f, independently per side, example and sample index (the same
index gives the same answer: the gateway's cache); an "identical" candidate has
the base's true outcomes, the "real" change fixes 7.5 % of the examples and
breaks 2.5 % (net +5 pp). Gates: ``pipemend init``'s defaults.

Prints, per n (50, 100, 300) and f (0, 0.05, 0.10):
- identical accepted: the first candidate of a run (the largest share of the
  error budget) identical to its base; target at most 5 %;
- +5 pp accepted: the real change as the first candidate; as the fifth (after
  four refused); target at least 80 % at n = 300, f <= 0.05 (first);
- run-level: a run of 20 identical candidates, any kept; target at most 10 %;
- racing saved: the share of the candidate's first-look val evaluations that
  racing did not pay on refused candidates; target at least 40 %;
- racing = full: how often racing reached the verdict the full evaluation
  (``racing: [1.0]``) reaches on the same simulated evaluations; target 95 %.

``--e2e`` runs a short ``pipemend optimize`` end to end (real gateway, sandbox,
git, journal) with the ``ladder`` proposer on a small generated target whose
model is ``simulated/noisy`` (a sampled answer is noise 10 % of the time): one
knob is a real fix (aliases in retrieval), the others change nothing. It
prints each candidate's verdict: kept or refused and why, examples evaluated,
flips confirmed, evaluations racing saved.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipemend import evidence
from pipemend.manifest import Gates
from pipemend.optimize.race import race

GATES = Gates()


@dataclass
class World:
    """One trial's truth: per example, whether the base and the candidate are right, and the noise f."""

    base_true: list[bool]
    cand_true: list[bool]
    f: float
    seed: int

    def observe(self, side: str, i: int, sample: int) -> float:
        truth = self.base_true[i] if side == "base" else self.cand_true[i]
        noisy = random.Random(f"{self.seed}:{side}:{i}:{sample}").random() < self.f
        return float(truth != noisy)


def world(n: int, f: float, real: bool, rng: random.Random) -> World:
    base = [rng.random() < 0.5 for _ in range(n)]
    cand = list(base)
    if real:
        wrong = [i for i in range(n) if not base[i]]
        right = [i for i in range(n) if base[i]]
        for i in rng.sample(wrong, min(len(wrong), round(0.075 * n))):
            cand[i] = True
        for i in rng.sample(right, min(len(right), round(0.025 * n))):
            cand[i] = False
    return World(base, cand, f, rng.randrange(1 << 30))


def judge(w: World, gates: Gates, alpha: float) -> evidence.Comparison:
    n = len(w.base_true)
    ids = [str(i) for i in range(n)]
    base_first = {str(i): {"id": str(i), "score": w.observe("base", i, 0)} for i in range(n)}
    order = list(ids)
    random.Random(w.seed).shuffle(order)

    def evaluate(side: str, look: int, part: list[str], sample: int) -> list[dict[str, Any]]:
        return [{"id": i, "score": w.observe(side, int(i), sample)} for i in part]

    return race(gates, order, base_first, evaluate, alpha=alpha)


def cell(n: int, f: float, trials: int, run_trials: int, rng: random.Random) -> dict[str, float]:
    _, alpha1 = evidence.alpha_for(GATES.confidence, [])
    _, alpha5 = evidence.alpha_for(GATES.confidence, [False] * 4)
    full = GATES.model_copy(update={"racing": [1.0]})
    same = real1 = real5 = agree = judged = 0
    saved, refused = 0.0, 0
    for _ in range(trials):
        for real in (False, True):
            w = world(n, f, real, rng)
            raced = judge(w, GATES, alpha1)
            whole = judge(w, full, alpha1)
            judged += 1
            agree += int(raced.accepted_as == whole.accepted_as)
            if raced.accepted_as is None:
                refused += 1
                saved += raced.racing["saved"] / n
            if real:
                real1 += int(raced.accepted_as is not None)
                real5 += int(judge(w, GATES, alpha5).accepted_as is not None)
            else:
                same += int(raced.accepted_as is not None)
    any_kept = 0
    for _ in range(run_trials):
        kept: list[bool] = []
        for _ in range(20):
            _, alpha = evidence.alpha_for(GATES.confidence, kept)
            kept.append(judge(world(n, f, False, rng), GATES, alpha).accepted_as is not None)
        any_kept += int(any(kept))
    return {"identical": same / trials, "real1": real1 / trials, "real5": real5 / trials,
            "run": any_kept / run_trials, "saved": saved / refused if refused else 0.0, "agree": agree / judged}


# --------------------------------------------------------------------------- end to end

PIPELINE = '''"""Capitals with a noisy model: retrieve the fact (aliases optional), ask the model, answer its reply."""

import json
import os
from pathlib import Path

import anthropic
import yaml

from pipemend import trace

HERE = Path(__file__).resolve().parent


def run(inputs: dict) -> str:
    config = yaml.safe_load((HERE / "config.yaml").read_text(encoding="utf-8"))
    corpus = json.loads((HERE / "corpus.json").read_text(encoding="utf-8"))
    with trace.step("retrieve", kind="retrieval", query=inputs["country"]) as s:
        key = inputs["country"]
        if config["retrieval"]["aliases"]:
            key = corpus["aliases"].get(key, key)
        fact = corpus["facts"].get(key, "unknown")
        s.output(fact, doc_ids=[key])
    with trace.step("answer", kind="generation") as s:
        prompt = (HERE / "prompts" / f"{config['answer']['style']}.txt").read_text(encoding="utf-8")
        resp = anthropic.Anthropic(max_retries=0).messages.create(
            model=os.environ.get("PIPEMEND_MODEL", "simulated/noisy"), max_tokens=64,
            messages=[{"role": "user", "content": prompt.format(fact=fact)}],
            extra_body={"temperature": float(config["answer"]["temperature"])})  # this SDK names no temperature
        reply = "".join(b.text for b in resp.content if b.type == "text")
        s.output(reply)
    return reply
'''

MANIFEST = """name: noisy-capitals
entrypoint: pipeline:run
dataset:
  files: {train: data/train.jsonl, val: data/val.jsonl, test: data/test.jsonl}
metric: contains
editable: [config.yaml, prompts/**]
protected: [corpus.json]
knobs:
  style: {file: config.yaml, key: answer.style, rung: prompt, values: [plain, polite]}
  temperature: {file: config.yaml, key: answer.temperature, rung: prompt, values: [0.7, 0.9]}
  aliases: {file: config.yaml, key: retrieval.aliases, rung: retrieval, values: [false, true]}
llm: {model: simulated/noisy}
runner: {concurrency: 4, example_timeout_s: 30}
gates: {max_latency_ratio: 1000}
"""


def make_target(root: Path, n_val: int, seed: int) -> Path:
    """A target where 15 % of the questions name a country by an alias only the `aliases` knob resolves."""
    rng = random.Random(seed)
    t = root / "noisy-capitals"
    (t / "data").mkdir(parents=True)
    (t / "prompts").mkdir()
    facts, aliases = {}, {}
    sizes = {"train": 40, "val": n_val, "test": 60}
    for split, size in sizes.items():
        rows = []
        for i in range(size):
            country, city = f"{split}-land-{i}", f"{split.capitalize()}city{i}x"
            facts[country] = f"The capital is {city}."
            asked = country
            if rng.random() < 0.15:
                asked = f"old-{country}"
                aliases[asked] = country
            rows.append({"id": f"{split}-{i}", "inputs": {"country": asked}, "expected": city, "evidence": [country]})
        (t / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (t / "corpus.json").write_text(json.dumps({"facts": facts, "aliases": aliases}))
    (t / "prompts" / "plain.txt").write_text("Fact: {fact}")
    (t / "prompts" / "polite.txt").write_text("Please read this fact: {fact}")
    (t / "config.yaml").write_text("answer: {style: plain, temperature: 0.7}\nretrieval: {aliases: false}\n")
    (t / "pipeline.py").write_text(PIPELINE)
    (t / "pipemend.yaml").write_text(MANIFEST)
    return t


def end_to_end(args: argparse.Namespace) -> int:
    from pipemend.cli.progress import RichProgress
    from pipemend.optimize import OptimizeConfig, run_optimize

    work = Path(tempfile.mkdtemp(prefix="pipemend-bench-gate-"))
    try:
        target = make_target(work, args.val, args.seed)
        cfg = OptimizeConfig(target=str(target), proposer="ladder", max_candidates=args.max_candidates,
                             sandbox=args.sandbox, run_id="bench-gate", reports_dir=str(work / "reports"),
                             budget_usd=5.0, seed=args.seed)
        with RichProgress(Console(stderr=True)) as progress:
            s = run_optimize(cfg, progress)
        table = Table(title=f"optimize end to end, simulated/noisy (10 % noise on sampled calls), val {args.val}")
        for col in ("cand", "rationale", "kept", "val delta", "p", "alpha", "evaluated", "flips confirmed",
                    "noise flips", "saved", "why"):
            table.add_column(col)
        for c in s.candidates:
            v = json.loads((Path(s.run_dir) / "candidates" / str(c.n) / "verdict.json").read_text())
            st = v.get("stats") or {}
            fmt = lambda x, f="{:+.3f}": "-" if x is None else f.format(x)  # noqa: E731
            table.add_row(str(c.n), c.rationale.splitlines()[0][:40] if c.rationale else "", "yes" if c.accepted else "no",
                          fmt(st.get("delta")), fmt(st.get("p_value"), "{:.4f}"), fmt(st.get("alpha"), "{:.4f}"),
                          f"{st.get('evaluated', '-')}/{st.get('n', '-')}", str((st.get("confirm") or {}).get("examples", "-")),
                          str(len(st.get("noise_flips") or [])), str((st.get("racing") or {}).get("saved", "-")),
                          "; ".join(v.get("reasons") or [])[:90])
        Console(width=200).print(table)
        print(f"baseline val {s.baseline.get('val')}, best val {(s.best or {}).get('val')}; stopped: {s.stop_reason}")
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--run-trials", type=int, default=100, help="runs of 20 identical candidates per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--e2e", action="store_true", help="a short optimize end to end on a noisy simulated model")
    ap.add_argument("--val", type=int, default=120, help="--e2e: val examples")
    ap.add_argument("--max-candidates", type=int, default=4, help="--e2e: candidates")
    ap.add_argument("--sandbox", default="process", help="--e2e: sandbox")
    ap.add_argument("--keep", action="store_true", help="--e2e: keep the work folder")
    args = ap.parse_args(argv)
    if args.e2e:
        return end_to_end(args)
    rng = random.Random(args.seed)
    table = Table(title=f"the gate on simulated val ({args.trials} trials a cell; {args.run_trials} runs of 20 "
                        f"for the run level; confidence {GATES.confidence}, min_delta {GATES.min_delta}, "
                        f"max_regressions {GATES.max_regressions}, confirm_runs {GATES.confirm_runs}, "
                        f"racing {GATES.racing})")
    for col in ("n", "f", "identical accepted", "+5 pp accepted (1st)", "+5 pp accepted (5th)",
                "run-level (20 identical)", "racing saved (refused)", "racing = full"):
        table.add_column(col, justify="right")
    for n in (50, 100, 300):
        for f in (0.0, 0.05, 0.10):
            r = cell(n, f, args.trials, args.run_trials, rng)
            table.add_row(str(n), f"{f:.2f}", f"{r['identical']:.1%}", f"{r['real1']:.1%}", f"{r['real5']:.1%}",
                          f"{r['run']:.1%}", f"{r['saved']:.1%}", f"{r['agree']:.1%}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

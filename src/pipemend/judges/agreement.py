"""``pipemend eval --judge-agreement``: does a judge agree with the exact metric where the labels say?

After an evaluation, each labelled example that ran without error (an ``expected`` answer, no runner or
metric error) is judged once more by the chosen judge, through the run's judge gateway (cached: asking
again costs nothing), next to its exact score. Both are read as pass/fail at ``THRESHOLD``; the result is
the share of examples on which they agree, Cohen's kappa (agreement beyond chance), the confusion counts
and a one-line verdict on whether to trust the judge on this data. Judgments that fail (an unparseable
verdict, a failed call) are counted apart and left out of the statistics.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..dataset import FrozenTarget
from ..errors import UsageError
from ..evidence import RIGHT as THRESHOLD
from ..fsutil import read_json_object, read_jsonl
from ..metric_specs import load_metric_spec
from ..metrics import METRIC_ERROR_PREFIX, ScoreContext
from ..scoring import MAX_TRACE_BYTES, score_rows, trace_call_ids
from .client import JudgeClient
from .names import JUDGES

TRUST_KAPPA = 0.8
CHECK_KAPPA = 0.6
MIN_EXAMPLES = 20
"""Fewer labelled examples than this cannot tell a judge worth trusting from a lucky one."""
FORMAT = "pipemend-judge-agreement-1"


@dataclass
class Agreement:
    judge: str
    model: str
    reference: str
    n: int
    agree: int
    both_pass: int
    both_fail: int
    judge_only_pass: int
    reference_only_pass: int
    kappa: float | None
    errors: int
    disagreements: list[str] = field(default_factory=list)
    verdict: str = ""
    trust: bool = False
    judge_calls: int = 0
    judge_cache_hits: int = 0
    judge_cost_usd: float = 0.0

    @property
    def share(self) -> float:
        return self.agree / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "agreement": self.share}


def cohen_kappa(pairs: list[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa of two pass/fail raters; None when chance agreement is total (both always said the same
    single thing), where kappa is undefined."""
    n = len(pairs)
    if not n:
        return None
    observed = sum(1 for a, b in pairs if a == b) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0 - 1e-12:
        return None
    return (observed - chance) / (1 - chance)


def verdict_line(n: int, share: float, kappa: float | None) -> tuple[str, bool]:
    """``(one line, trust?)``: trust at kappa >= 0.8 on at least ``MIN_EXAMPLES`` examples."""
    k = "undefined" if kappa is None else f"{kappa:.2f}"
    if n < MIN_EXAMPLES:
        return (f"too few labelled examples to tell ({n} < {MIN_EXAMPLES}): agreement {share:.0%}, kappa {k}; "
                "judge more examples before trusting it"), False
    if kappa is None:
        return f"cannot tell: every example passed (or failed) on both sides (agreement {share:.0%})", False
    if kappa >= TRUST_KAPPA:
        return f"trust it: kappa {k} >= {TRUST_KAPPA} (agreement {share:.0%} on {n} examples)", True
    if kappa >= CHECK_KAPPA:
        return (f"use with care: kappa {k} is substantial but below {TRUST_KAPPA}; read the disagreements "
                f"(agreement {share:.0%} on {n} examples)"), False
    return f"do not trust it: kappa {k} < {CHECK_KAPPA} (agreement {share:.0%} on {n} examples)", False


def reference_spec(frozen: FrozenTarget) -> str:
    """The exact metric the judge is held against: the manifest's metric when no judge is part of it, else
    ``exact_match``."""
    specs = frozen.manifest.metric_specs()
    if isinstance(frozen.manifest.metric, str) and not frozen.manifest.judge_specs():
        return specs[0]
    return "exact_match"


def check_judge(name: str) -> str:
    """``name`` when it is a judge, else a ``UsageError`` listing them (``--judge``)."""
    if name not in JUDGES:
        raise UsageError(f"--judge {name!r}: expected one of {', '.join(JUDGES)}")
    return name


def judge_agreement(run_dir: Path, *, judge: str = "judge:correctness", model: str | None = None,
                    concurrency: int | None = None) -> Agreement:
    """The agreement of ``judge`` (on ``model``, default the manifest's judge model) with the exact metric on
    the labelled examples of the evaluations in ``run_dir`` (an eval run's ``evals/<split>/``)."""
    check_judge(judge)
    run_dir = Path(run_dir)
    frozen = FrozenTarget.open(run_dir)
    manifest = frozen.manifest
    ref_spec = reference_spec(frozen)
    reference = load_metric_spec(ref_spec, frozen.dir)
    model = manifest.judge_model(model)
    by_id = frozen.examples_by_id()
    client = JudgeClient.start(run_dir, model, concurrency=concurrency or manifest.runner.concurrency,
                                budget_usd=manifest.judge.budget_usd)
    try:
        # the judge's prompt: the run's frozen copy when the run froze one, else this pipemend's
        templates = frozen.dir / "judges" if (frozen.dir / "judges").is_dir() else None
        metric = load_metric_spec(judge, frozen.dir, judge=client, templates_dir=templates)
        token = f"agreement-{uuid.uuid4().hex}"
        pending, ref_scores = [], {}
        call_log = {str(c.get("call_id")): c for c in read_jsonl(run_dir / "gateway" / "calls.jsonl")
                    if isinstance(c, dict)}
        for scored in sorted((run_dir / "evals").glob("*/scored.jsonl")):
            for row in read_jsonl(scored):
                ex = by_id.get(str(row.get("id")))
                err = row.get("error")
                if ex is None or ex.expected is None or (err and not str(err).startswith(METRIC_ERROR_PREFIX)):
                    continue
                ref_scores[ex.id] = reference.safe(row.get("output"), ex.expected, ex.model_dump())[0]
                trace = read_json_object(scored.parent / "traces" / f"{ex.id}.json", max_bytes=MAX_TRACE_BYTES)
                calls = tuple(call_log[i] for i in trace_call_ids(trace or {}) if i in call_log)
                pending.append(({"id": ex.id, "output": row.get("output")}, ex,
                                ScoreContext(trace=trace, calls=calls, eval_token=token)))
        score_rows(metric, pending)
        usage = client.usage(token)
    finally:
        client.close()
    pairs, disagree, errors = [], [], 0
    counts = {"both_pass": 0, "both_fail": 0, "judge_only_pass": 0, "reference_only_pass": 0}
    for row, ex, _ in pending:
        if row.get("error"):
            errors += 1
            continue
        j, r = row["score"] >= THRESHOLD, ref_scores[ex.id] >= THRESHOLD
        pairs.append((j, r))
        key = "both_pass" if j and r else "both_fail" if not (j or r) else "judge_only_pass" if j else "reference_only_pass"
        counts[key] += 1
        if j != r:
            disagree.append(ex.id)
    n = len(pairs)
    kappa = cohen_kappa(pairs)
    share = (n - len(disagree)) / n if n else 0.0
    line, trust = verdict_line(n, share, kappa)
    return Agreement(judge=judge, model=model, reference=ref_spec, n=n, agree=n - len(disagree), kappa=kappa,
                     errors=errors, disagreements=disagree, verdict=line, trust=trust,
                     judge_calls=usage["judge_calls"], judge_cache_hits=usage["judge_cache_hits"],
                     judge_cost_usd=usage["judge_cost_usd"], **counts)


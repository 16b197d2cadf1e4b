"""What val says about a candidate against its base: confirmed flips, one test at the candidate's share of
the run's error budget, racing looks, and savings.

The rules, in the order a candidate meets them (``optimize/race.py`` runs the evaluations):

1. Confirmation. An example whose outcome flipped between base and candidate at
   the first look (right on one side, wrong on the other) is re-run
   ``gates.confirm_runs`` more times on BOTH sides, with fresh samples (sample
   index 1..k). It is a confirmed regression only when the candidate is wrong in
   the majority of its runs and the base right in the majority of its runs (and
   a confirmed fix the other way round); every other flip is noise. A flipped
   example's value on each side is the mean of its re-runs alone (its first look
   was picked for disagreeing; counting it would turn noise flips into evidence).
2. The test. ``sign`` (default): exact one-sided sign test on the per-example
   deltas; ``bootstrap``: the share of paired resampled mean deltas at or below 0.
   A candidate is an improvement when the mean delta is at least ``min_delta`` and
   the test's p-value is at most ``alpha``, its share of the run's error budget.
3. The error budget (run-level error control). The j-th candidate of a run to
   reach a val test may spend ``(1 - confidence) * 6 / (pi^2 j^2)`` (these shares
   sum to 1), plus the level of the candidate tested just before it when that one
   was kept (the fallback procedure). Candidates refused before val spend nothing.
   Each test holds its level given everything before it, and a level is used by
   one test only, so the chance that ANY kept candidate of the run is not a true
   improvement is at most ``1 - confidence`` (``guarantee``).
4. Racing. A candidate is looked at on growing prefixes of a fixed shuffle of val
   (``gates.racing``). At a look before the last it stops (``raced_out``) when it
   can no longer pass: more confirmed regressions than the whole of val allows, a
   broken must-pass example, or (on at least ``RACE_MIN_EXAMPLES`` examples) a mean
   delta that stays below ``min_delta`` (and, for a saving, below
   ``-non_inferiority_margin``) even one standard error up.
   Only the last look can accept, so stopping early never raises the level.
5. Limits and savings. Confirmed regressions at most ``max_regressions`` (count or
   share), no must-pass example broken, cost and latency within their ratios.
   With ``objective: cost`` (or ``latency``) a candidate that is no improvement may
   be kept as a saving: cost (latency) down by at least ``min_saving`` and its
   score non-inferior (one-sided test that the delta is above
   ``-non_inferiority_margin``, at the same ``alpha``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .manifest import Gates
from .reasons import Reason, texts
from .scoring import paired_bootstrap, sign_test

RIGHT = 0.5
"""An example is "right" when its score is at least this (binary metrics: 1)."""
LATENCY_FLOOR_S = 0.05
"""Latency differences below this are timer noise: never a limit breach, never a saving."""
RACE_SLACK_SE = 1.0
"""A racing look stops a candidate whose mean delta stays below the bar even this many standard errors up."""
RACE_MIN_EXAMPLES = 20
"""A look at fewer examples stops a candidate only for what can never pass (regressions, must-pass): a few
examples without a flip say little about a change."""
TIE = 1e-9


def is_right(score: float) -> bool:
    return score >= RIGHT


def majority_right(scores: Sequence[float]) -> bool:
    return 2 * sum(1 for s in scores if is_right(s)) > len(scores)


def score_of(row: dict[str, Any] | None) -> float:
    if not row:
        return 0.0
    try:
        v = float(row.get("score") or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def flipped(base_rows: Sequence[dict[str, Any]], cand_rows: Sequence[dict[str, Any]]) -> list[str]:
    """Ids whose outcome differs between the two sides' first looks (base order); a missing candidate row
    scores 0."""
    cand = {str(r["id"]): r for r in cand_rows}
    return [str(r["id"]) for r in base_rows if is_right(score_of(r)) != is_right(score_of(cand.get(str(r["id"]))))]


# --------------------------------------------------------------------------- the error budget


def budget_share(j: int) -> float:
    """The share of the run's error budget the j-th tested candidate may spend (the shares sum to 1)."""
    return 6.0 / (math.pi ** 2 * j * j)


def alpha_for(confidence: float, kept_before: Sequence[bool]) -> tuple[int, float]:
    """``(j, alpha)`` for the next candidate to reach a val test, given, in order, whether each candidate
    tested before it was kept (a kept one passes its level on to the next: the fallback procedure)."""
    total = 1.0 - confidence
    carried = 0.0
    for j, kept in enumerate(kept_before, 1):
        level = total * budget_share(j) + carried
        carried = level if kept else 0.0
    j = len(kept_before) + 1
    return j, total * budget_share(j) + carried


def guarantee(gates: Gates) -> str:
    """The run-level guarantee in one sentence."""
    saving = (f" (or, kept as a {gates.objective} saving, is worse than its base by more than "
              f"{gates.non_inferiority_margin:g})" if gates.objective != "score" else "")
    return (f"Across this run, the chance that any kept candidate is not a true improvement{saving} is at most "
            f"{1 - gates.confidence:.0%}: the error budget is split across the candidates that reach a val test "
            "(the j-th may spend 6/(π²j²) of it, plus the level of a kept candidate just before it).")


# --------------------------------------------------------------------------- tests


def sign_p(deltas: Sequence[float]) -> tuple[int, int, float]:
    """``(wins, losses, p)``: exact one-sided sign test that the candidate is better (ties dropped;
    ``scoring.sign_test`` on the deltas)."""
    res = sign_test([0.0] * len(deltas), list(deltas), tol=TIE)
    return res["wins"], res["losses"], res["p_value"]


def _normal_upper(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _se(deltas: Sequence[float]) -> float:
    return statistics.pstdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else 0.0


def non_inferior_p(deltas: Sequence[float], margin: float) -> float:
    """One-sided p-value of "the true mean delta is at most ``-margin``" (paired z-test). When every delta is
    the same the answer is exact: 0 when that delta is above ``-margin``, else 1."""
    if not deltas:
        return 1.0
    shifted = statistics.fmean(deltas) + margin
    se = _se(deltas)
    if se <= TIE:
        return 0.0 if shifted > TIE else 1.0
    return _normal_upper(shifted / se)


# --------------------------------------------------------------------------- what the rows say


@dataclass
class Evidence:
    """Both sides on the val examples evaluated so far: the first looks (rows in val order; the base's rows
    set the order) and the confirmation runs' scores by id."""

    base: list[dict[str, Any]]
    cand: list[dict[str, Any]]
    base_more: dict[str, list[float]] = field(default_factory=dict)
    cand_more: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class _Tally:
    ids: list[str]
    deltas: list[float]
    base_mean: float
    cand_mean: float
    regressions: list[str]
    fixed: list[str]
    noise_flips: list[str]
    confirmed_examples: int
    base_cost: float
    cand_cost: float
    base_latency: float
    cand_latency: float

    @property
    def delta(self) -> float:
        return self.cand_mean - self.base_mean

    @property
    def cost_ratio(self) -> float | None:
        return self.cand_cost / self.base_cost if self.base_cost > 0 else None

    @property
    def latency_ratio(self) -> float | None:
        return self.cand_latency / self.base_latency if self.base_latency > 0 else None


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _num(row: dict[str, Any] | None, key: str) -> float | None:
    try:
        v = float((row or {}).get(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _tally(ev: Evidence) -> _Tally:
    cand = {str(r["id"]): r for r in ev.cand}
    ids = [str(r["id"]) for r in ev.base]
    deltas, b_vals, c_vals = [], [], []
    regressions, fixed, noise = [], [], []
    confirmed = 0
    for row in ev.base:
        i = str(row["id"])
        b0, c0 = score_of(row), score_of(cand.get(i))
        b_runs, c_runs = [b0, *ev.base_more.get(i, [])], [c0, *ev.cand_more.get(i, [])]
        confirmed += int(len(b_runs) > 1 or len(c_runs) > 1)
        if is_right(b0) != is_right(c0):
            if is_right(b0) and majority_right(b_runs) and not majority_right(c_runs):
                regressions.append(i)
            elif is_right(c0) and majority_right(c_runs) and not majority_right(b_runs):
                fixed.append(i)
            else:
                noise.append(i)
        # a flipped example's first look was picked for disagreeing (the winner's curse): its value on each
        # side is the mean of the fresh re-runs alone, so noise flips cancel instead of feeding the test
        b, c = (_mean(b_runs[1:]), _mean(c_runs[1:])) if len(b_runs) > 1 and len(c_runs) > 1 else (b0, c0)
        b_vals.append(b)
        c_vals.append(c)
        deltas.append(c - b)
    lat_b = [v for v in (_num(r, "latency_s") for r in ev.base) if v is not None]
    lat_c = [v for v in (_num(cand.get(i), "latency_s") for i in ids) if v is not None]
    return _Tally(ids=ids, deltas=deltas, base_mean=_mean(b_vals), cand_mean=_mean(c_vals), regressions=regressions,
                  fixed=fixed, noise_flips=noise, confirmed_examples=confirmed,
                  base_cost=sum(_num(r, "cost_usd") or 0.0 for r in ev.base),
                  cand_cost=sum(_num(cand.get(i), "cost_usd") or 0.0 for i in ids),
                  base_latency=_mean(lat_b), cand_latency=_mean(lat_c))


def _limits(t: _Tally, gates: Gates, n_val: int, must_pass: frozenset[str]) -> list[Reason]:
    """What refuses a candidate whatever its score: confirmed regressions, must-pass examples broken."""
    reasons = []
    allowed = gates.allowed_regressions(n_val)
    if len(t.regressions) > allowed:
        reasons.append(Reason("regressions", f"{len(t.regressions)} confirmed regression(s) > {allowed} allowed "
                                             f"(max_regressions {gates.max_regressions} of {n_val} val examples)",
                              tuple(t.regressions)))
    broken = [i for i in t.regressions if i in must_pass]
    if broken:
        reasons.append(Reason("must_pass", f"breaks {len(broken)} must-pass example(s)", tuple(broken)))
    return reasons


# --------------------------------------------------------------------------- racing


@dataclass
class Look:
    """One racing look before the last: how far, what it saw, whether the candidate stopped there."""

    share: float
    n: int
    delta: float
    z: float
    stopped: bool

    def to_json(self) -> dict[str, Any]:
        return {"share": self.share, "n": self.n, "delta": self.delta, "z": self.z, "stopped": self.stopped}


def look(ev: Evidence, gates: Gates, *, n_val: int, share: float,
         must_pass: frozenset[str] = frozenset()) -> tuple[Look, Reason | None]:
    """A look at a prefix of val: the reason the candidate can no longer pass, or None to go on."""
    t = _tally(ev)
    se = _se(t.deltas)
    z = t.delta / se if se > TIE else 0.0
    reasons = _limits(t, gates, n_val, must_pass)
    reach = t.delta + RACE_SLACK_SE * se
    cannot_improve = reach < gates.min_delta
    cannot_save = (gates.objective == "score" or reach < -gates.non_inferiority_margin
                   or (gates.objective == "cost" and (t.cost_ratio is None or t.cost_ratio >= 1.0)))
    if not reasons and cannot_improve and cannot_save and len(t.ids) >= RACE_MIN_EXAMPLES:
        reasons.append(Reason("raced_out", f"raced out after {len(t.ids)} of {n_val} val examples ({share:.0%}): "
                                           f"delta {t.delta:+.4f} cannot reach min_delta {gates.min_delta}"))
    if reasons and reasons[0].code != "raced_out":
        r = reasons[0]
        reasons[0] = Reason(r.code, f"{r.text} (stopped after {len(t.ids)} of {n_val} val examples)", r.example_ids)
    return Look(share=share, n=len(t.ids), delta=t.delta, z=z, stopped=bool(reasons)), (reasons[0] if reasons else None)


# --------------------------------------------------------------------------- the comparison


@dataclass
class Comparison:
    """The gate's numbers for candidate vs base on the same val examples, and its reasons to refuse
    (``reasons`` empty: the statistics accept). ``to_json`` is verdict.json's ``stats``."""

    n: int
    """Val examples in the run."""
    evaluated: int
    """Val examples the candidate was run on (fewer when it raced out)."""
    base_mean: float
    cand_mean: float
    delta: float
    test: str
    p_value: float
    alpha: float
    regressions: list[str]
    """Confirmed regressions: right in the base and wrong in the candidate, in the majority of each side's runs."""
    fixed: list[str]
    """Confirmed fixes."""
    noise_flips: list[str]
    """Flips at the first look that the re-runs did not confirm."""
    must_pass_broken: list[str]
    confirm: dict[str, Any]
    racing: dict[str, Any]
    objective: str
    accepted_as: str | None
    saving: dict[str, Any] | None
    cost: dict[str, Any]
    latency: dict[str, Any]
    reasons: list[Reason] = field(default_factory=list)
    sign_test: dict[str, Any] | None = None
    bootstrap: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n, "evaluated": self.evaluated, "base_mean": self.base_mean, "cand_mean": self.cand_mean,
            "delta": self.delta, "test": self.test, "p_value": self.p_value, "alpha": self.alpha,
            "regressions": list(self.regressions), "fixed": list(self.fixed), "noise_flips": list(self.noise_flips),
            "must_pass_broken": list(self.must_pass_broken), "confirm": dict(self.confirm),
            "racing": dict(self.racing), "objective": self.objective, "accepted_as": self.accepted_as,
            "saving": self.saving, "cost": self.cost, "latency": self.latency, "reasons": texts(self.reasons)}
        if self.sign_test is not None:
            out["sign_test"] = self.sign_test
        if self.bootstrap is not None:
            out["bootstrap"] = self.bootstrap
            out["ci_low"], out["ci_high"] = self.bootstrap.get("ci_low"), self.bootstrap.get("ci_high")
        return out

    def aggregates(self) -> dict[str, Any]:
        """``to_json`` without example ids: id lists as counts, reasons as their id-free text."""
        return {**self.to_json(), "regressions": len(self.regressions), "fixed": len(self.fixed),
                "noise_flips": len(self.noise_flips), "must_pass_broken": len(self.must_pass_broken),
                "reasons": [r.text for r in self.reasons]}


def compare(ev: Evidence, gates: Gates, *, alpha: float, n_val: int | None = None,
            must_pass: frozenset[str] = frozenset(), looks: Sequence[Look] = (), stopped: Reason | None = None,
            seed: int = 0) -> Comparison:
    """The gate's numbers and its reasons to refuse, at the last look (or where racing ``stopped`` it)."""
    t = _tally(ev)
    n_val = len(t.ids) if n_val is None else n_val
    sign = boot = None
    if gates.test == "bootstrap" and t.deltas:
        boot = paired_bootstrap([0.0] * len(t.deltas), t.deltas, confidence=1 - alpha, seed=seed)
        p = 1.0 - float(boot["prob_positive"])
    else:
        wins, losses, p = sign_p(t.deltas)
        sign = {"wins": wins, "losses": losses, "ties": len(t.deltas) - wins - losses, "p_value": p}

    cost = {"base_usd": t.base_cost, "cand_usd": t.cand_cost, "ratio": t.cost_ratio, "max_ratio": gates.max_cost_ratio}
    latency = {"base_mean_s": t.base_latency, "cand_mean_s": t.cand_latency, "ratio": t.latency_ratio,
               "max_ratio": gates.max_latency_ratio}
    reasons: list[Reason] = []
    if not t.ids:
        reasons.append(Reason("no_examples", "no val examples to compare"))
    reasons += _limits(t, gates, n_val, must_pass)
    if t.cost_ratio is not None and t.cost_ratio > gates.max_cost_ratio:
        reasons.append(Reason("cost", f"cost ratio {t.cost_ratio:.2f} > max_cost_ratio {gates.max_cost_ratio}"))
    if (t.latency_ratio is not None and t.latency_ratio > gates.max_latency_ratio
            and t.cand_latency - t.base_latency > LATENCY_FLOOR_S):
        reasons.append(Reason("latency", f"latency ratio {t.latency_ratio:.2f} > max_latency_ratio "
                                         f"{gates.max_latency_ratio}"))

    improvement: list[Reason] = []
    if t.delta < gates.min_delta:
        improvement.append(Reason("min_delta", f"val delta {t.delta:+.4f} below min_delta {gates.min_delta}"))
    elif p > alpha:
        improvement.append(Reason("not_confident", f"improvement not confident: p = {p:.4f} > {alpha:.4f}, this "
                                                   "candidate's share of the run's error budget"))
    saving, saving_reasons = _saving(t, gates, alpha)
    accepted_as = "improvement" if not improvement else ("saving" if saving is not None and not saving_reasons
                                                         else None)
    if stopped is not None:
        reasons = [stopped]
        accepted_as = None
    elif accepted_as is None:
        reasons += improvement + saving_reasons
    if reasons:
        accepted_as = None
    evaluated = len(t.ids)
    return Comparison(
        n=n_val, evaluated=evaluated, base_mean=t.base_mean, cand_mean=t.cand_mean, delta=t.delta, test=gates.test,
        p_value=p, alpha=alpha, regressions=t.regressions, fixed=t.fixed, noise_flips=t.noise_flips,
        must_pass_broken=[i for i in t.regressions if i in must_pass],
        confirm={"runs": gates.confirm_runs, "examples": t.confirmed_examples},
        racing={"looks": [lk.to_json() for lk in looks], "saved": max(0, n_val - evaluated)},
        objective=gates.objective, accepted_as=accepted_as, saving=saving, cost=cost, latency=latency,
        reasons=reasons, sign_test=sign, bootstrap=boot)


def _saving(t: _Tally, gates: Gates, alpha: float) -> tuple[dict[str, Any] | None, list[Reason]]:
    """With ``objective`` cost or latency: the saving's numbers and the reasons it is not one."""
    if gates.objective == "score":
        return None, []
    if gates.objective == "cost":
        base, cand, ratio = t.base_cost, t.cand_cost, t.cost_ratio
        enough = ratio is not None and ratio <= 1.0 - gates.min_saving
    else:
        base, cand, ratio = t.base_latency, t.cand_latency, t.latency_ratio
        enough = ratio is not None and ratio <= 1.0 - gates.min_saving and base - cand > LATENCY_FLOOR_S
    p = non_inferior_p(t.deltas, gates.non_inferiority_margin)
    out = {"metric": gates.objective, "base": base, "cand": cand, "ratio": ratio, "min_saving": gates.min_saving,
           "margin": gates.non_inferiority_margin, "non_inferior": p <= alpha, "p_value": p}
    if not enough:
        shown = "n/a" if ratio is None else f"{1 - ratio:+.0%}"
        return out, [Reason("saving_too_small", f"no {gates.objective} saving: cut {shown} < min_saving "
                                                f"{gates.min_saving:.0%}")]
    if p > alpha:
        return out, [Reason("not_non_inferior", f"score not shown non-inferior: p = {p:.4f} > {alpha:.4f} "
                                                f"(margin {gates.non_inferiority_margin})")]
    return out, []

"""The gate: accept a candidate only if val improved, nothing regressed, and the diff is clean.

Two halves, run in this order so that a bad diff costs no evaluation:

``check_diff`` (static, before any evaluation) refuses a diff that
- touches a path outside the target folder, an absolute path or one with ``..``;
- touches a symlink, a protected file (data, metric, manifest, ``protected``
  globs) or a file no ``editable`` glob names;
- adds a val or test expected answer (a label leak; see ``_leak_rule`` below);
- adds a val or test example id (an answers-by-id table);
- adds a line of the metric's source (``metrics.metric_fingerprint``).

``compare`` (statistics, on the SAME val examples for base and candidate)
requires a mean paired delta of at least ``min_delta`` with ``confidence``
(paired bootstrap: the share of resampled mean deltas above 0; sign test:
``1 - p``), at most ``max_regressions`` examples that were right in the base
and are wrong in the candidate, and cost and latency within their ratios.

Label-leak rule. An expected val/test answer leaks when its SQuAD-normalized
form appears, as whole words, in the added lines of a file and not in the
base version of that file. Answers are skipped when they cannot carry
example-specific information: shorter than 3 characters (2 when they hold a
digit, so a year or a count is checked), or equal to a train example's answer
(the proposer may see train labels, and class labels such as "yes" are
legitimately written into instructions). "1887" pasted into a prompt is a leak.

The frozen metric and data score every candidate, so editing the candidate's
copies cannot raise its score; the static check still rejects such a diff.

Every reason to refuse is a ``Reason(code, text, example_ids)``: ``text`` never
names a val/test example, the ids ride apart, so what a proposer sees
(``Verdict.aggregates``) drops them by construction; ``str(reason)`` is the
full text (with ids) that verdict.json, the journal and the report show.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from .diffs import DiffError, FileDiff, added_by_path, parse_diff
from .fsutil import atomic_write_json
from .globs import matches_any
from .manifest import Gates
from .metrics import normalize_answer
from .scoring import paired_bootstrap, sign_test

VERDICT_FORMAT = "pipemend-verdict-1"
RIGHT = 0.5
"""An example is "right" when its score is at least this (binary metrics: 1)."""
LATENCY_FLOOR_S = 0.05
"""Latency ratios are judged only when the candidate is slower by more than this (timer noise)."""
SHOWN_IDS = 10
"""Example ids written into a reason's full text at most."""


@dataclass(frozen=True)
class Reason:
    """One reason to refuse a candidate.

    ``code`` names the rule (``protected``, ``label_leak``, ``regressions``...), ``text`` says what is wrong
    without naming any val/test example, ``example_ids`` are the examples concerned (kept out of what a
    proposer sees). ``str()`` is the full text: ``text`` then ``: id, id, ...``.
    """

    code: str
    text: str
    example_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.example_ids:
            return self.text
        more = len(self.example_ids) - SHOWN_IDS
        return f"{self.text}: {', '.join(self.example_ids[:SHOWN_IDS])}" + (f" (+{more} more)" if more > 0 else "")


def texts(reasons: Sequence[Reason]) -> list[str]:
    """The full texts (verdict.json, the journal, the report)."""
    return [str(r) for r in reasons]


# --------------------------------------------------------------------------- the diff


def _normalize(text: str) -> str:
    return normalize_answer(text)


def _answer_strings(expected: Any) -> list[str]:
    """Every string or number inside an expected value (alternatives, dict leaves, lists)."""
    if isinstance(expected, bool) or expected is None:
        return []
    if isinstance(expected, (str, int, float)):
        return [str(expected)]
    if isinstance(expected, dict):
        return [s for v in expected.values() for s in _answer_strings(v)]
    if isinstance(expected, (list, tuple)):
        return [s for v in expected for s in _answer_strings(v)]
    return []


def _checkable(norm: str) -> bool:
    return len(norm) >= 3 or (len(norm) >= 2 and any(ch.isdigit() for ch in norm))


def _contains_words(haystack: str, needle: str) -> bool:
    return f" {needle} " in f" {haystack} "


@dataclass
class Sealed:
    """What the static check needs to know about the labels it must keep out of a diff."""

    answers: dict[str, str] = field(default_factory=dict)
    """normalized val/test answer -> one example id that has it"""
    ids: set[str] = field(default_factory=set)
    """val/test example ids worth checking"""

    @classmethod
    def from_splits(cls, splits: dict[str, Sequence[Any]]) -> "Sealed":
        train = splits.get("train", [])
        train_answers = {_normalize(s) for ex in train for s in _answer_strings(ex.expected)}
        train_ids = {ex.id for ex in train}
        sealed = cls()
        for split in ("val", "test"):
            for ex in splits.get(split, []):
                for s in _answer_strings(ex.expected):
                    norm = _normalize(s)
                    if _checkable(norm) and norm not in train_answers:
                        sealed.answers.setdefault(norm, ex.id)
                if len(ex.id) >= 3 and ex.id not in train_ids:
                    sealed.ids.add(ex.id)
        return sealed


def check_diff(
    *,
    diff: str,
    changed: list[str],
    worktree: Path,
    target_subdir: str,
    editable: list[str],
    protected: list[str],
    sealed: Sealed,
    base_text: Callable[[str], str],
    metric_lines: Sequence[str] = (),
) -> list[Reason]:
    """Reasons to refuse the diff without evaluating it; empty when it is clean.

    ``changed`` are repo-relative paths; ``base_text(path)`` is that file's text
    in the base ('' when new or binary).
    """
    reasons: list[Reason] = []
    prefix = PurePosixPath(target_subdir) if target_subdir not in ("", ".") else None
    try:
        files: list[FileDiff] = parse_diff(diff)  # by its structure: hunk ranges, not line prefixes
    except DiffError as e:
        return [Reason("bad_diff", f"the candidate's diff could not be parsed: {e}")]
    symlinked = {p for f in files if f.is_symlink for p in (f.old_path, f.new_path) if p is not None}
    reasons += [Reason("binary", f"{f.path}: binary content is refused (text files only)") for f in files if f.is_binary]
    for path in changed:
        p = PurePosixPath(path)
        if p.is_absolute() or ".." in p.parts:
            reasons.append(Reason("path", f"{path}: absolute path or '..' refused"))
            continue
        if prefix is not None and prefix not in p.parents:
            reasons.append(Reason("outside_target", f"{path}: outside the target folder {target_subdir}/"))
            continue
        rel = str(p.relative_to(prefix)) if prefix is not None else str(p)
        if path in symlinked or _has_symlink(worktree, p):
            reasons.append(Reason("symlink", f"{path}: symlinks are refused"))
        elif matches_any(rel, protected):
            reasons.append(Reason("protected", f"{path}: protected file"))
        elif not matches_any(rel, editable):
            reasons.append(Reason("not_editable", f"{path}: not an editable path ({', '.join(editable)})"))

    fingerprint = [ln.strip() for ln in metric_lines if ln.strip()]
    for path, lines in added_by_path(files).items():
        base = base_text(path)
        added_norm = _normalize("\n".join(lines))
        base_norm = _normalize(base)
        leaked = sorted(a for a in sealed.answers if _contains_words(added_norm, a) and not _contains_words(base_norm, a))
        if leaked:
            ids = sorted({sealed.answers[a] for a in leaked})
            reasons.append(Reason("label_leak", f"{path}: adds {len(leaked)} val/test expected answer(s) (label leak)",
                                  tuple(ids)))
        added_raw = "\n".join(lines)
        ids = sorted(i for i in sealed.ids if _has_id(added_raw, i) and not _has_id(base, i))
        if ids:
            reasons.append(Reason("example_ids", f"{path}: mentions {len(ids)} val/test example id(s) "
                                                 "(hard-coded outputs)", tuple(ids)))
        copied = [f for f in fingerprint if f not in base and any(f in ln for ln in lines)]
        if copied:
            reasons.append(Reason("metric_copy", f"{path}: copies the metric's logic ({copied[0]!r})"))
    return reasons


def _has_id(text: str, example_id: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(example_id) + r"(?![\w-])", text) is not None


def _has_symlink(worktree: Path, rel: PurePosixPath) -> bool:
    cur = Path(worktree)
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            return True
    return False


# --------------------------------------------------------------------------- statistics


def _paired(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]]) -> tuple[list[str], list[float], list[float]]:
    cand = {str(r["id"]): float(r.get("score") or 0.0) for r in cand_rows}
    ids = [str(r["id"]) for r in base_rows]
    return ids, [float(r.get("score") or 0.0) for r in base_rows], [cand.get(i, 0.0) for i in ids]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass
class Comparison:
    """The gate's numbers for candidate vs base on the same val examples, and its reasons to refuse
    (``reasons`` empty: the statistics accept). ``to_json`` is verdict.json's ``stats``."""

    n: int
    base_mean: float
    cand_mean: float
    delta: float
    test: str
    regressions: list[str]
    """Ids right in the base and wrong in the candidate."""
    fixed: list[str]
    """Ids wrong in the base and right in the candidate."""
    cost: dict[str, Any]
    latency: dict[str, Any]
    reasons: list[Reason] = field(default_factory=list)
    sign_test: dict[str, Any] | None = None
    bootstrap: dict[str, Any] | None = None

    @property
    def ci_low(self) -> float | None:
        return None if self.bootstrap is None else self.bootstrap["ci_low"]

    @property
    def ci_high(self) -> float | None:
        return None if self.bootstrap is None else self.bootstrap["ci_high"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "base_mean": self.base_mean, "cand_mean": self.cand_mean,
                               "delta": self.delta, "test": self.test}
        if self.sign_test is not None:
            out["sign_test"] = self.sign_test
        if self.bootstrap is not None:
            out["bootstrap"] = self.bootstrap
            out["ci_low"], out["ci_high"] = self.ci_low, self.ci_high
        return {**out, "regressions": list(self.regressions), "fixed": list(self.fixed), "cost": self.cost,
                "latency": self.latency, "reasons": texts(self.reasons)}

    def aggregates(self) -> dict[str, Any]:
        """``to_json`` without example ids: regressions and fixed as counts, reasons as their id-free text."""
        return {**self.to_json(), "regressions": len(self.regressions), "fixed": len(self.fixed),
                "reasons": [r.text for r in self.reasons]}


def compare(base_rows: list[dict[str, Any]], cand_rows: list[dict[str, Any]], gates: Gates, *,
            seed: int = 0) -> Comparison:
    """The gate's numbers and its reasons to refuse."""
    ids, base, cand = _paired(base_rows, cand_rows)
    n = len(ids)
    delta = _mean(cand) - _mean(base)
    reasons: list[Reason] = []
    sign = boot = None
    if gates.test == "sign":
        sign = sign_test(base, cand)
        confident = sign["p_value"] <= 1.0 - gates.confidence
        conf_text = f"sign test p={sign['p_value']:.3f} > {1 - gates.confidence:.3f}"
    else:
        boot = paired_bootstrap(base, cand, confidence=gates.confidence, seed=seed)
        confident = boot["prob_positive"] >= gates.confidence
        conf_text = f"P(delta > 0) = {boot['prob_positive']:.3f} < {gates.confidence}"
    if n == 0:
        reasons.append(Reason("no_examples", "no val examples to compare"))
    if delta < gates.min_delta:
        reasons.append(Reason("min_delta", f"val delta {delta:+.4f} below min_delta {gates.min_delta}"))
    elif not confident:
        reasons.append(Reason("not_confident", f"improvement not confident: {conf_text}"))

    regressions = [i for i, b, c in zip(ids, base, cand) if b >= RIGHT and c < RIGHT]
    fixed = [i for i, b, c in zip(ids, base, cand) if b < RIGHT and c >= RIGHT]
    if len(regressions) > gates.max_regressions:
        reasons.append(Reason("regressions", f"{len(regressions)} regression(s) > max_regressions "
                                             f"{gates.max_regressions}", tuple(regressions)))

    base_cost = sum(float(r.get("cost_usd") or 0.0) for r in base_rows)
    cand_cost = sum(float(r.get("cost_usd") or 0.0) for r in cand_rows)
    cost_ratio = cand_cost / base_cost if base_cost > 0 else None
    cost = {"base_usd": base_cost, "cand_usd": cand_cost, "ratio": cost_ratio, "max_ratio": gates.max_cost_ratio}
    if cost_ratio is not None and cost_ratio > gates.max_cost_ratio:
        reasons.append(Reason("cost", f"cost ratio {cost_ratio:.2f} > max_cost_ratio {gates.max_cost_ratio}"))

    base_lat = _mean([float(r["latency_s"]) for r in base_rows if r.get("latency_s") is not None])
    cand_lat = _mean([float(r["latency_s"]) for r in cand_rows if r.get("latency_s") is not None])
    lat_ratio = cand_lat / base_lat if base_lat > 0 else None
    latency = {"base_mean_s": base_lat, "cand_mean_s": cand_lat, "ratio": lat_ratio,
               "max_ratio": gates.max_latency_ratio}
    if lat_ratio is not None and lat_ratio > gates.max_latency_ratio and cand_lat - base_lat > LATENCY_FLOOR_S:
        reasons.append(Reason("latency", f"latency ratio {lat_ratio:.2f} > max_latency_ratio "
                                         f"{gates.max_latency_ratio}"))
    return Comparison(n=n, base_mean=_mean(base), cand_mean=_mean(cand), delta=delta, test=gates.test,
                      regressions=regressions, fixed=fixed, cost=cost, latency=latency, reasons=reasons,
                      sign_test=sign, bootstrap=boot)


def average_repeats(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-example mean score, cost and latency over repeated evaluations (``gates.repeats``).

    Rows are matched by example id, in the first run's order; an example missing
    from a later run counts as a score of 0 there (it produced no result).
    """
    if len(runs) == 1:
        return runs[0]
    by_id = [{r["id"]: r for r in run} for run in runs]
    out = []
    for row in runs[0]:
        same = [run.get(row["id"]) for run in by_id]
        merged = dict(row)
        merged["score"] = _mean([float((r or {}).get("score") or 0.0) for r in same])
        merged["cost_usd"] = _mean([float(r.get("cost_usd") or 0.0) for r in same if r is not None])
        lats = [float(r["latency_s"]) for r in same if r is not None and r.get("latency_s") is not None]
        merged["latency_s"] = _mean(lats) if lats else None
        out.append(merged)
    return out


# --------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    candidate: int
    accepted: bool
    reasons: list[Reason]
    changed_files: list[str] = field(default_factory=list)
    static_reasons: list[Reason] = field(default_factory=list)
    stats: Comparison | None = None
    gates: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """verdict.json: reasons as their full texts (the report reads ``reasons``, ``stats``, ``changed_files``)."""
        return {"format": VERDICT_FORMAT, "candidate": self.candidate, "accepted": self.accepted,
                "reasons": texts(self.reasons), "changed_files": list(self.changed_files),
                "static_reasons": texts(self.static_reasons),
                "stats": None if self.stats is None else self.stats.to_json(), "gates": dict(self.gates)}

    def aggregates(self) -> dict[str, Any]:
        """The verdict without per-example ids: what a proposer may see of val."""
        return {"format": VERDICT_FORMAT, "candidate": self.candidate, "accepted": self.accepted,
                "reasons": [r.text for r in self.reasons], "changed_files": list(self.changed_files),
                "stats": {} if self.stats is None else self.stats.aggregates()}

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def decide(candidate: int, *, changed: list[str], static_reasons: Sequence[Reason], stats: Comparison | None,
           gates: Gates, extra_reasons: Sequence[Reason] = ()) -> Verdict:
    """Accept only when there are changes, no static reason, no statistical reason and no extra reason."""
    reasons = list(extra_reasons) + list(static_reasons)
    if not changed and not reasons:
        reasons.append(Reason("no_change", "the proposal changed no file"))
    if stats is not None:
        reasons += stats.reasons
    elif not reasons:
        reasons.append(Reason("not_evaluated", "not evaluated"))
    return Verdict(candidate=candidate, accepted=not reasons, reasons=reasons, changed_files=list(changed),
                   static_reasons=list(static_reasons), stats=stats, gates=gates.model_dump())

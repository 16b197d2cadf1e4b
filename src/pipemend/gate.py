"""The gate: accept a candidate only if val improved, nothing regressed, and the diff is clean.

Two halves, run in this order so that a bad diff costs no evaluation:

``check_diff`` (static, before any evaluation) refuses a diff that
- touches a path outside the target folder, an absolute path or one with ``..``;
- touches a symlink, a protected file (data, metric, manifest, ``protected``
  globs) or a file no ``editable`` glob names;
- adds a val or test expected answer (a label leak; see ``_leak_rule`` below);
- adds a val or test example id (an answers-by-id table);
- adds a line of the metric's source (``metrics.metric_fingerprint``).

The statistics (confirmation re-runs, the test at the candidate's share of the
run's error budget, racing, savings) are ``pipemend.evidence``; ``decide`` turns
both halves into the ``Verdict``.

Label-leak rule. An expected val/test answer leaks when its SQuAD-normalized
form appears, as whole words, in the added lines of a file and not in the
base version of that file. Answers are skipped when they cannot carry
example-specific information: shorter than 3 characters (2 when they hold a
digit, so a year or a count is checked), or equal to a train example's answer
(the proposer may see train labels, and class labels such as "yes" are
legitimately written into instructions). "1887" pasted into a prompt is a leak.

The frozen metric and data score every candidate, so editing the candidate's
copies cannot raise its score; the static check still rejects such a diff.

Every reason to refuse is a ``Reason(code, text, example_ids)`` (``pipemend.reasons``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from .diffs import DiffError, FileDiff, added_by_path, parse_diff
from .evidence import Comparison, guarantee
from .fsutil import atomic_write_json
from .globs import matches_any
from .manifest import Gates
from .metrics import normalize_answer
from .reasons import Reason, texts

__all__ = ["Comparison", "Reason", "Sealed", "Verdict", "check_diff", "decide", "guarantee", "texts"]

VERDICT_FORMAT = "pipemend-verdict-2"


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
                "reasons": texts(self.reasons), "reason_codes": [r.code for r in self.reasons],
                "changed_files": list(self.changed_files), "static_reasons": texts(self.static_reasons),
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

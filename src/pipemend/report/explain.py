"""Plain words for the gate's numbers: why a candidate was kept or refused, and what the run guarantees.

``explain(verdict)`` turns one ``candidates/<n>/verdict.json`` into one
sentence ("kept: val +4.7 pp (p = 0.012 ≤ its α 0.061), 2 confirmed
regressions (allowed 6), 5 noise flips set aside"). It reads the verdict's
``accepted``, ``reasons`` (full texts), ``static_reasons``, ``stats`` and
``gates``; the rule behind each reason comes from ``reason_codes`` (or
reasons written as ``{"code", "text"}``) when the verdict carries them, else
from the numbers in ``stats`` and the wording of the text. Verdicts written
before the gate confirmed regressions, raced candidates or spent an error
budget (no ``alpha``, ``noise_flips``, ``racing`` in ``stats``) still read
right: their regressions are called plain regressions and their test is
judged against ``1 - confidence``.

``guarantee(gates)`` is the run-level sentence the report states near its top.

Everything here is pure: dicts in, strings out.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from .. import evidence
from ..manifest import Gates

STATIC_CODES = frozenset({"static", "protected", "label_leak", "example_ids", "metric_copy", "not_editable", "symlink",
                          "path", "outside_target", "binary", "bad_diff"})
"""Reasons found in the diff, before any evaluation."""
MINUS = "\u2212"
SHOWN_IDS = 3
"""Example ids named in a sentence at most."""

_TEXT_RULES: tuple[tuple[str, str], ...] = (
    # the wording of reason texts, old and new, for verdicts that do not name their rules
    (r"changed no file", "no_change"),
    (r"not evaluated", "not_evaluated"),
    (r"no val examples", "no_examples"),
    (r"must[-_ ]pass", "must_pass"),
    (r"raced|futil|cannot pass|could not pass", "raced_out"),
    (r"inferior", "not_non_inferior"),
    (r"saving|min_saving", "saving_too_small"),
    (r"below min_delta|min_delta", "min_delta"),
    (r"not confident|confiden|p-value|\bp ?= ?[0-9.]+ ?>|α|alpha", "not_confident"),
    (r"regression", "regressions"),
    (r"cost ratio|max_cost_ratio", "cost"),
    (r"latency ratio|max_latency_ratio", "latency"),
    (r"budget", "budget"),
    (r"evaluation failed|eval(uation)? .*fail|failed systemically", "eval_failed"),
)


# --------------------------------------------------------------------------- small formatting


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _signed(text: str) -> str:
    return text.replace("-", MINUS, 1) if text.startswith("-") else text


def pp(delta: float | None) -> str:
    """A score difference in percentage points: ``+4.7 pp``, ``−3.0 pp``."""
    return "?" if delta is None else _signed(f"{delta * 100:+.1f} pp")


def _margin_pp(value: float) -> str:
    return f"{value * 100:g} pp"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _alpha(a: float) -> str:
    return f"{a:.3f}" if a >= 0.01 else f"{a:.2g}"


def _share(x: float) -> str:
    return f"{x:.0%}"


def _change_pct(ratio: float) -> str:
    """A ratio as a signed change: 0.65 -> ``−35%``, 1.2 -> ``+20%``."""
    return _signed(f"{(ratio - 1) * 100:+.0f}%")


def _ids(ids: Sequence[Any]) -> str:
    ids = [str(i) for i in ids]
    more = f" +{len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return ", ".join(ids[:SHOWN_IDS]) + more


def _plural(k: int, one: str, many: str | None = None) -> str:
    return f"{k} {one if k == 1 else (many or one + 's')}"


# --------------------------------------------------------------------------- reading a verdict


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def allowed_regressions(max_regressions: Any, n: Any) -> int | None:
    """``gates.max_regressions`` as a count on ``n`` val examples: a count as is, a share (``"2%"``) floored."""
    if isinstance(max_regressions, bool):
        return None
    if isinstance(max_regressions, int):
        return max_regressions
    text = str(max_regressions or "").strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    size = _num(n)
    if m and size is not None:
        return int(math.floor(float(m.group(1)) / 100 * size + 1e-9))
    return int(text) if text.isdigit() else None


def _p_and_alpha(stats: Mapping[str, Any], gates: Mapping[str, Any]) -> tuple[float | None, float | None, bool]:
    """(p-value, the α it is judged against, whether α is this candidate's share of a run budget)."""
    p = _num(stats.get("p_value"))
    if p is None:
        p = _num(_dict(stats.get("sign_test")).get("p_value"))
    if p is None and _dict(stats.get("bootstrap")).get("prob_positive") is not None:
        p = 1.0 - float(stats["bootstrap"]["prob_positive"])
    alpha = _num(stats.get("alpha"))
    if alpha is not None:
        return p, alpha, True
    conf = _num(gates.get("confidence"))
    return p, None if conf is None else 1.0 - conf, False


def _codes_given(verdict: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    reasons = _list(verdict.get("reasons"))
    if reasons and all(isinstance(r, dict) and r.get("code") for r in reasons):
        return [(str(r["code"]), str(r.get("text") or r["code"])) for r in reasons]
    codes = _list(verdict.get("reason_codes"))
    if codes and len(codes) == len(reasons):
        return [(str(c), str(t)) for c, t in zip(codes, reasons)]
    return None


def _code_of_text(text: str, static: set[str]) -> str:
    if text in static:
        return "static"
    low = text.lower()
    for pattern, code in _TEXT_RULES:
        if re.search(pattern, low):
            return code
    return "other"


def reasons_with_codes(verdict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The verdict's reasons as (rule code, full text), named by the verdict or recognised from its text."""
    given = _codes_given(verdict)
    if given is not None:
        return given
    static = {str(t) for t in _list(verdict.get("static_reasons"))}
    return [(_code_of_text(str(t), static), str(t)) for t in _list(verdict.get("reasons"))]


def racing_saved(stats: Mapping[str, Any] | None) -> int:
    """Candidate example-evaluations that racing did not pay for (0 for a verdict without racing)."""
    return int(_num(_dict(_dict(stats).get("racing")).get("saved")) or 0)


def raced_out_look(stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The look at which racing stopped the candidate, if it did."""
    for look in _list(_dict(_dict(stats).get("racing")).get("looks")):
        if isinstance(look, dict) and look.get("stopped"):
            return look
    return None


def is_confirmed_format(stats: Mapping[str, Any] | None) -> bool:
    """Whether ``stats`` come from a gate that confirms regressions by re-running flips."""
    stats = _dict(stats)
    return "noise_flips" in stats or "confirm" in stats


# --------------------------------------------------------------------------- the sentences


def _regressions_phrase(stats: Mapping[str, Any], gates: Mapping[str, Any]) -> str:
    regs = _list(stats.get("regressions"))
    confirmed = is_confirmed_format(stats)
    allowed = _num(stats.get("max_regressions")) if isinstance(stats.get("max_regressions"), (int, float)) else None
    if allowed is None:
        allowed = allowed_regressions(gates.get("max_regressions"), stats.get("n"))
    text = _plural(len(regs), "confirmed regression" if confirmed else "regression")
    if allowed is not None:
        text += f" (allowed {int(allowed)})"
    flips = _list(stats.get("noise_flips"))
    if flips:
        text += f", {_plural(len(flips), 'noise flip')} set aside"
    return text


def _test_phrase(stats: Mapping[str, Any], gates: Mapping[str, Any]) -> str:
    """``p = 0.012 ≤ its α 0.061``: the comparison as the numbers have it."""
    p, alpha, share = _p_and_alpha(stats, gates)
    if p is None:
        return ""
    if alpha is None:
        return _p(p)
    sign = "≤" if p <= alpha else ">"
    return f"{_p(p)} {sign} {'its ' if share else ''}α {_alpha(alpha)}"


def _saving_phrase(saving: Mapping[str, Any]) -> str:
    metric = str(saving.get("metric") or "cost")
    ratio = _num(saving.get("ratio"))
    return f"{metric} {_change_pct(ratio)}" if ratio is not None else metric


def _kept(verdict: Mapping[str, Any], stats: Mapping[str, Any], gates: Mapping[str, Any]) -> str:
    saving = _dict(stats.get("saving"))
    if stats.get("accepted_as") == "saving" and saving:
        margin = _num(saving.get("margin"))
        if margin is None:
            margin = _num(gates.get("non_inferiority_margin"))
        inner = [f"val {pp(_num(stats.get('delta')))}"]
        if margin is not None:
            inner.append(f"margin {_margin_pp(margin)}")
        if _num(saving.get("p_value")) is not None:
            inner.append(_p(float(saving["p_value"])))
        return f"kept as a saving: {_saving_phrase(saving)} at non-inferior score ({', '.join(inner)})"
    if not stats:
        return "kept"
    parts = [f"val {pp(_num(stats.get('delta')))}"]
    test = _test_phrase(stats, gates)
    if test:
        parts[0] += f" ({test})"
    parts.append(_regressions_phrase(stats, gates))
    cost = _num(_dict(stats.get("cost")).get("ratio"))
    if cost is not None and abs(cost - 1) >= 0.05:
        parts.append(f"cost {_change_pct(cost)}")
    return "kept: " + ", ".join(parts)


def _refusal(code: str, text: str, stats: Mapping[str, Any], gates: Mapping[str, Any]) -> str:
    delta = _num(stats.get("delta"))
    if code == "raced_out":
        look = raced_out_look(stats)
        share = _num((look or {}).get("share"))
        if share is None and _num(stats.get("evaluated")) and _num(stats.get("n")):
            share = float(stats["evaluated"]) / float(stats["n"])
        at = f" after {_share(share)} of val" if share is not None else ""
        d = _num((look or {}).get("delta"))
        inner = [f"delta {pp(d if d is not None else delta)}"]
        saved = racing_saved(stats)
        if saved:
            inner.append(f"{_plural(saved, 'evaluation')} saved")
        return f"raced out{at} ({', '.join(inner)}): it could no longer pass"
    if code == "must_pass":
        broken = _list(stats.get("must_pass_broken"))
        return (f"breaks {_plural(len(broken), 'must-pass example')} ({_ids(broken)})" if broken
                else "breaks must-pass example(s)")
    if code == "regressions":
        return _regressions_phrase(stats, gates) if "regressions" in stats else text
    if code == "min_delta":
        md = _num(gates.get("min_delta"))
        return f"val {pp(delta)}, below the minimum gain" + (f" of {_margin_pp(md)}" if md is not None else "")
    if code == "not_confident":
        test = _test_phrase(stats, gates)
        return f"val {pp(delta)} is not significant" + (f" ({test})" if test else "")
    if code == "not_non_inferior":
        saving = _dict(stats.get("saving"))
        margin = _num(saving.get("margin"))
        if margin is None:
            margin = _num(gates.get("non_inferiority_margin"))
        inner = [f"val {pp(delta)}"] + ([_p(float(saving["p_value"]))] if _num(saving.get("p_value")) is not None else [])
        worse = f"more than {_margin_pp(margin)}" if margin is not None else "more than the margin"
        return f"as a saving, its score may be {worse} worse ({', '.join(inner)})"
    if code == "saving_too_small":
        saving = _dict(stats.get("saving"))
        need = _num(saving.get("min_saving"))
        if need is None:
            need = _num(gates.get("min_saving"))
        if not saving:
            return text
        return f"as a saving, {_saving_phrase(saving)} is too small" + (f" (needs {_change_pct(1 - need)})" if need is not None else "")
    if code in ("cost", "latency"):
        block = _dict(stats.get(code))
        ratio, cap = _num(block.get("ratio")), _num(block.get("max_ratio"))
        if ratio is None:
            return text
        return f"{code} ×{ratio:.2f}" + (f", over the allowed ×{cap:g}" if cap is not None else "")
    if code == "no_change":
        return "the proposal changed no file"
    if code == "not_evaluated":
        return "it was not evaluated"
    if code == "no_examples":
        return "there were no val examples to compare"
    if code == "budget":
        return f"the budget ran out before it could be judged ({text})"
    if code == "eval_failed":
        return f"its evaluation failed ({text})"
    return text


def explain(verdict: Mapping[str, Any]) -> str:
    """One plain sentence: why this candidate was kept or refused, from its verdict.json content."""
    stats, gates = _dict(verdict.get("stats")), _dict(verdict.get("gates"))
    if verdict.get("accepted"):
        return _kept(verdict, stats, gates)
    reasons = reasons_with_codes(verdict)
    static = [t for c, t in reasons if c in STATIC_CODES]
    if static:
        return "refused before evaluation: " + "; ".join(static)
    phrases: list[str] = []
    seen: set[str] = set()
    for code, text in reasons:
        if code in seen and code != "other":
            continue
        seen.add(code)
        phrase = _refusal(code, text, stats, gates)
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    look = raced_out_look(stats)
    if look is not None and "raced_out" not in seen and _num(look.get("share")) is not None:
        saved = racing_saved(stats)
        phrases.append(f"stopped after {_share(float(look['share']))} of val"
                       + (f" ({_plural(saved, 'evaluation')} saved)" if saved else ""))
    return "refused: " + ("; ".join(phrases) if phrases else "no reason recorded")


def confidence_of(gates: Mapping[str, Any] | None) -> float:
    """The run's ``gates.confidence`` (the manifest's default when it is not given or not a number)."""
    conf = _num(_dict(gates).get("confidence"))
    if conf is None or not 0 < conf < 1:
        conf = float(Gates.model_fields["confidence"].default)
    return conf


def guarantee(gates: Mapping[str, Any] | None) -> str:
    """The run-level guarantee in one sentence, from the run's ``gates`` (``evidence.guarantee``; gates that do
    not validate, from an older or damaged run, get the same promise from their confidence alone)."""
    try:
        return evidence.guarantee(Gates.model_validate(dict(gates or {})))
    except (ValidationError, TypeError, ValueError):
        pass
    return (f"Across this run, the chance that any kept candidate is not a true improvement is at most "
            f"{1 - confidence_of(gates):.0%} (the error budget is split across candidates: candidate n may "
            f"spend a share of it).")


def per_candidate_note(gates: Mapping[str, Any] | None) -> str:
    """What a run judged before the run-level error budget existed promised instead."""
    return (f"This run was judged before the run-level error budget: each candidate was tested on its own at "
            f"confidence {confidence_of(gates):g}, so across many candidates the chance that some kept candidate is "
            f"not a true improvement can exceed {1 - confidence_of(gates):.0%}.")

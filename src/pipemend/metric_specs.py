"""The manifest's ``metric`` loaded as one ``Metric``: a built-in, a custom function, a judge, or weights.

``load_metric_spec(spec, base_dir, judge=..., templates_dir=...)``: a name goes to ``metrics.load_metric``
(built-ins and ``file.py:function``) or, for ``judge:*``, to a ``judges.metric.JudgeMetric`` reading its
template from ``templates_dir`` (the run's frozen copy) and asking ``judge``; ``{weights: ...}`` is a
``WeightedMetrics``: the weighted mean of its parts, the weights normalized to sum to 1. A part that fails
(a metric error, an unparseable verdict) counts 0 in the mean, and the row carries its error; the row keeps
every part's score (``Scored.parts`` -> ``metric_parts``). ``fingerprint`` is the gate's "no copy of the
metric" list of the whole thing, the judges' frozen prompts included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .judges.client import JudgeClient
from .judges.metric import JudgeMetric
from .judges.names import JUDGE_PREFIX
from .judges.prompts import read_template
from .manifest import WeightedMetric
from .metrics import METRIC_ERROR_PREFIX, Metric, ScoreContext, Scored, load_metric, metric_fingerprint


class WeightedMetrics(Metric):
    """The weighted mean of ``parts`` (``weights``: normalized, same keys)."""

    def __init__(self, weights: dict[str, float], parts: dict[str, Metric], label: str):
        super().__init__(label, self._called_directly, takes_example=True)
        self.weights = weights
        self.parts = parts
        self.concurrency = max(p.concurrency for p in parts.values())

    def _called_directly(self, output: Any, expected: Any, example: Any = None) -> float:
        return self.score(output, expected, example).score

    def safe(self, output: Any, expected: Any, example: dict[str, Any] | None = None) -> tuple[float, str | None]:
        got = self.score(output, expected, example)
        return got.score, got.error

    def score(self, output: Any, expected: Any, example: dict[str, Any] | None = None,
              ctx: ScoreContext | None = None) -> Scored:
        values: dict[str, float] = {}
        errors: list[str] = []
        judgments: dict[str, dict[str, Any]] = {}
        for name, metric in self.parts.items():
            got = metric.score(output, expected, example, ctx)
            values[name] = got.score
            if got.error:
                errors.append(got.error.removeprefix(METRIC_ERROR_PREFIX) if got.error.startswith(
                    METRIC_ERROR_PREFIX + name) else f"{name}: {got.error.removeprefix(METRIC_ERROR_PREFIX)}")
            judgments.update(got.judgments or {})
        total = sum(self.weights[n] * v for n, v in values.items())
        return Scored(min(1.0, max(0.0, total)), METRIC_ERROR_PREFIX + "; ".join(errors) if errors else None,
                      parts=values, judgments=judgments or None)


def load_metric_spec(spec: str | WeightedMetric, base_dir: Path, *, judge: JudgeClient | None = None,
                     templates_dir: Path | None = None) -> Metric:
    """``spec`` (the manifest's ``metric``) as one ``Metric``. ``base_dir``: where custom metric files are (the
    run's frozen copy); ``templates_dir``: the judges' templates (the run's frozen copy; None: pipemend's own);
    ``judge``: the run's judge (None: a judge metric scores every example 0 with an error saying so)."""
    if isinstance(spec, WeightedMetric):
        parts = {name: load_metric_spec(name, base_dir, judge=judge, templates_dir=templates_dir)
                 for name in spec.weights}
        return WeightedMetrics(spec.normalized(), parts, spec.label())
    spec = spec.strip()
    if spec.startswith(JUDGE_PREFIX):
        return JudgeMetric(spec, read_template(spec, templates_dir), judge)
    return load_metric(spec, base_dir)


def fingerprint(spec: str | WeightedMetric, base_dir: Path, templates_dir: Path | None = None) -> list[str]:
    """``metrics.metric_fingerprint`` of every part; for a judge, the lines of its (frozen) prompt that hold no
    template syntax, at least 16 characters long, so a diff that copies the judge's rubric is suspect."""
    names = list(spec.weights) if isinstance(spec, WeightedMetric) else [spec]
    lines: dict[str, None] = {}
    for name in names:
        if name.startswith(JUDGE_PREFIX):
            for raw in read_template(name, templates_dir).splitlines():
                line = raw.strip().lstrip("-").strip()
                if len(line) >= 16 and "{" not in line and "<" not in line:
                    lines[line] = None
        else:
            lines.update(dict.fromkeys(metric_fingerprint(name, base_dir)))
    return list(lines)

"""Metrics: the built-ins and ``file.py:function`` custom metrics.

A metric scores one example: ``metric(output, expected, example) -> float`` in
[0, 1]. ``example`` is the full row as a dict (``id``, ``inputs``,
``expected``, ``evidence``, ``split``).

Conventions of the built-ins:

- Text is normalized SQuAD-style (``normalize_answer``): lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace.
- ``expected`` may be one value or a list of acceptable values; the score is
  the best over them.
- An output that is a dict is scored on its ``"answer"`` key by the textual
  metrics (exact_match, f1, contains); a dict without that key is scored as
  its JSON text. ``json_match`` uses the dict itself.
- ``json_match``: the output is a dict, or text holding a JSON object (the
  whole text, a ```json fenced block, or the first ``{...}`` that parses).
  Score = fraction of the expected object's keys whose values match (equal
  JSON values; strings compared normalized). An empty expected object scores
  1 for any object. No object found scores 0.

Custom metrics are loaded from the run's frozen copy of the target
(``load_metric(spec, frozen_dir)``), never from a candidate's worktree. They
may take ``(output, expected)`` or ``(output, expected, example)``; which one
is told from the signature. ``Metric.safe`` turns a raising or out-of-range
metric into a score of 0 plus an error string, so one example never crashes a
run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError

METRIC_ERROR_PREFIX = "metric error: "
"""Prefix of the ``error`` of a scored row when the metric (not the pipeline) failed."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


# --------------------------------------------------------------------------- text helpers


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_text(value: Any) -> str:
    """The text a textual metric scores: a dict's ``"answer"``, else the value as text (None → '')."""
    if value is None:
        return ""
    if isinstance(value, dict):
        if "answer" in value:
            return answer_text(value["answer"])
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def expected_answers(expected: Any) -> list[Any]:
    """``expected`` as a list of acceptable answers (a list is taken as alternatives)."""
    if isinstance(expected, (list, tuple)):
        return list(expected) or [""]
    return [expected]


# --------------------------------------------------------------------------- built-ins


def exact_match(output: Any, expected: Any, example: dict[str, Any] | None = None) -> float:
    """1.0 when the normalized output equals a normalized expected answer."""
    got = normalize_answer(answer_text(output))
    return max(float(got == normalize_answer(answer_text(e))) for e in expected_answers(expected))


def _f1_one(got: str, want: str) -> float:
    got_toks, want_toks = got.split(), want.split()
    if not got_toks or not want_toks:
        return float(got_toks == want_toks)
    common = Counter(got_toks) & Counter(want_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(got_toks), same / len(want_toks)
    return 2 * precision * recall / (precision + recall)


def f1(output: Any, expected: Any, example: dict[str, Any] | None = None) -> float:
    """Token F1 between the normalized output and the best normalized expected answer."""
    got = normalize_answer(answer_text(output))
    return max(_f1_one(got, normalize_answer(answer_text(e))) for e in expected_answers(expected))


def _contains_one(got: str, want: str) -> float:
    if not want:
        return float(not got)
    return float(f" {want} " in f" {got} ")


def contains(output: Any, expected: Any, example: dict[str, Any] | None = None) -> float:
    """1.0 when a normalized expected answer appears (on word boundaries) in the normalized output."""
    got = normalize_answer(answer_text(output))
    return max(_contains_one(got, normalize_answer(answer_text(e))) for e in expected_answers(expected))


def extract_json_object(value: Any) -> dict[str, Any] | None:
    """A dict from an output: the dict itself, or the JSON object inside text (whole, fenced, or first ``{``)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None
    candidates = [value.strip()] + [m.group(1).strip() for m in _FENCE.finditer(value)]
    for text in candidates:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", value):
        try:
            obj, _ = decoder.raw_decode(value, m.start())
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _values_match(got: Any, want: Any) -> bool:
    if isinstance(got, str) and isinstance(want, str):
        return normalize_answer(got) == normalize_answer(want)
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    return got == want


def _json_match_one(got: dict[str, Any] | None, want: Any) -> float:
    if isinstance(want, str):
        want = extract_json_object(want)
    if not isinstance(want, dict) or got is None:
        return 0.0
    if not want:
        return 1.0
    hits = sum(1 for k, v in want.items() if k in got and _values_match(got[k], v))
    return hits / len(want)


def json_match(output: Any, expected: Any, example: dict[str, Any] | None = None) -> float:
    """Fraction of the expected object's keys that the output's JSON object matches (best over alternatives)."""
    got = extract_json_object(output)
    return max(_json_match_one(got, e) for e in expected_answers(expected))


BUILTINS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "f1": f1,
    "contains": contains,
    "json_match": json_match,
}


# --------------------------------------------------------------------------- the Metric wrapper


@dataclass(frozen=True)
class ScoreContext:
    """What the host knows of an example besides its output, for metrics that read more (the judges)."""

    trace: dict[str, Any] | None = None
    """The example's trace (joined with its model calls when the pipeline marked no step)."""
    calls: Sequence[dict[str, Any]] = ()
    """The pipeline gateway's call-log rows charged to the example (``request``/``response`` included)."""
    eval_token: str | None = None
    """The evaluation's token (``x-pipemend-eval``): a judge's calls are logged under it."""


@dataclass
class Scored:
    """One example's score as scoring stores it."""

    score: float
    error: str | None = None
    parts: dict[str, float] | None = None
    """A weighted metric's parts: each metric's own score (``metric_parts`` of the scored row)."""
    judgments: dict[str, dict[str, Any]] | None = None
    """Per judge: ``{"score", "reason", "call_id", "cache", "error"}`` (``judgments`` of the scored row)."""


class Metric:
    """A loaded metric with one calling convention: ``metric(output, expected, example)``.

    ``score`` is what scoring calls: ``Scored`` from ``safe`` here; the judges and weighted metrics override
    it (they read the ``ScoreContext``). ``concurrency``: how many examples scoring may score at once (1 for a
    Python function, which need not be thread-safe; a judge's calls run side by side).
    """

    concurrency = 1

    def __init__(self, spec: str, fn: Callable[..., float], *, takes_example: bool | None = None):
        self.spec = spec
        self.fn = fn
        if takes_example is None:
            takes_example = accepts_example(fn) is not False
        self.takes_example = takes_example

    def __call__(self, output: Any, expected: Any, example: dict[str, Any] | None = None) -> float:
        if self.takes_example:
            return self.fn(output, expected, example)
        return self.fn(output, expected)

    def safe(self, output: Any, expected: Any, example: dict[str, Any] | None = None) -> tuple[float, str | None]:
        """``(score, None)``, or ``(0.0, "metric error: ...")`` when the metric raised or returned a non-score."""
        try:
            value = self(output, expected, example)
        except Exception as e:  # noqa: BLE001 - one example's metric failure is data
            return 0.0, f"{METRIC_ERROR_PREFIX}{type(e).__name__}: {e}"
        if isinstance(value, bool):
            return float(value), None
        try:
            score = float(value)
        except (TypeError, ValueError):
            return 0.0, f"{METRIC_ERROR_PREFIX}returned {value!r}, expected a number in [0, 1]"
        if not (0.0 <= score <= 1.0):  # also catches NaN
            return 0.0, f"{METRIC_ERROR_PREFIX}returned {score!r}, outside [0, 1]"
        return score, None

    def score(self, output: Any, expected: Any, example: dict[str, Any] | None = None,
              ctx: ScoreContext | None = None) -> Scored:
        """``Scored`` of one example (``safe``: never raises)."""
        value, error = self.safe(output, expected, example)
        return Scored(value, error)

    def __repr__(self) -> str:
        return f"Metric({self.spec!r})"


def _split_custom(spec: str) -> tuple[str, str] | None:
    file, sep, func = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not func:
        return None
    return file, func


def _custom_path(file: str, base_dir: Path) -> Path:
    base = Path(base_dir).resolve()
    path = (base / file).resolve()
    if Path(file).is_absolute() or not path.is_relative_to(base):
        raise ConfigError(base / "pipemend.yaml", "metric", f"metric file {file!r} lies outside {base}",
                          "a path relative to the target folder")
    return path


def load_metric(spec: str, base_dir: Path) -> Metric:
    """A built-in by name, or ``file.py:function`` from ``base_dir`` (the run's frozen copy of the target).

    Raises ``ConfigError`` for an unknown name (listing the built-ins), a missing
    file or function, or a file that does not import.
    """
    spec = spec.strip()
    if spec in BUILTINS:
        return Metric(spec, BUILTINS[spec], takes_example=True)
    manifest = Path(base_dir) / "pipemend.yaml"
    parts = _split_custom(spec)
    if parts is None:
        raise ConfigError(manifest, "metric", f"unknown metric {spec!r}",
                          f"one of {', '.join(BUILTINS)} or `file.py:function`")
    file, func = parts
    path = _custom_path(file, base_dir)
    if not path.is_file():
        raise ConfigError(path, "metric", f"metric file {file!r} not found (for function {func!r})",
                          "an existing .py file relative to the target folder")
    fn = getattr(_import_file(path, func), func, None)
    if not callable(fn):
        raise ConfigError(path, "metric", f"no function {func!r} in metric file {file!r}",
                          f"`def {func}(output, expected[, example])`")
    takes = accepts_example(fn)
    if takes is None:
        raise ConfigError(path, "metric", f"function {func!r} has signature {inspect.signature(fn)}",
                          "(output, expected) or (output, expected, example)")
    return Metric(spec, fn, takes_example=takes)


def _import_file(path: Path, func: str) -> Any:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"_pipemend_metric_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(path, "metric", f"cannot import metric file for function {func!r}", "a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported as a config error with the cause
        raise ConfigError(path, "metric", f"metric file fails to import ({type(e).__name__}: {e})",
                          f"a file defining {func!r}") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def accepts_example(fn: Callable[..., Any]) -> bool | None:
    """True for ``fn(output, expected, example)``, False for ``fn(output, expected)``, None for neither."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    for args, takes in (((None, None, None), True), ((None, None), False)):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return takes
    return None


# --------------------------------------------------------------------------- fingerprints for the gate

_BORING = re.compile(r"^(import |from |@|\"\"\"|''')")


def metric_fingerprint(spec: str, base_dir: Path) -> list[str]:
    """Distinctive source lines of the metric, for the gate's "no copy of the metric" check.

    Custom metric: every line of its file, stripped, that is at least 16
    characters long and is not a comment, an import, a decorator or a line
    opening with docstring quotes; in file order, without repeats.
    Built-ins: the literals of their normalization (the articles regex and
    the fence regex). A diff that adds any of these lines is suspect.
    """
    parts = _split_custom(spec.strip())
    if spec.strip() in BUILTINS or parts is None:
        return [_ARTICLES.pattern, _FENCE.pattern]
    path = _custom_path(parts[0], base_dir)
    try:
        source = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines: dict[str, None] = {}
    for raw in source.splitlines():
        line = raw.strip()
        if len(line) < 16 or line.startswith("#") or _BORING.match(line):
            continue
        lines[line] = None
    return list(lines)

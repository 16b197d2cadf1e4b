"""The failure ladder: which rung (prompt, retrieval, context, model) each failed example points at.

For every example scoring below ``pass_threshold``, the rules run in this
order and the first that fires names its rung:

1. **error** (not a rung): the example timed out (``timeout``), or ended in an exception raised outside any
   traced step (``runner_error``: also a missing result, an output that is not JSON), from a model call that
   failed (``gateway_error``: a generation step whose call got no answer or an error status, an API,
   connection or timeout exception), or from a ``tool`` or ``other`` step (``step_raised``). An exception
   that escaped from inside a traced step is otherwise a failure at that step (the innermost step whose
   recorded ``error`` is the example's exception, or a cause in its chain):
   - a ``retrieval`` step that raised: **retrieval**, rule ``retrieval_raised``, at once;
   - a ``parse`` step that raised: an output-format failure, judged by the rules below like any other
     (its ``parse_error`` fires unless retrieval explains the failure first);
   - a ``generation`` step that raised after its model call answered (the code reading the answer failed
     on it): **prompt**, rule ``generation_raised``, unless retrieval explains the failure first.
2. **retrieval** (only with evidence labels), judged from either signal:
   - ids, when the trace declares any ``doc_ids``: some gold evidence id never
     reached a generation step — the union of the generation steps' ``doc_ids``
     (or, when no generation step declares any, of the retrieval steps') lacks
     it (``missing_gold``; ``dropped_before_generation`` when it was retrieved
     and then dropped);
   - text, when the example's gold passages have text (``evidence_text``: the
     row's, or the corpus's for its ``evidence`` ids) and the trace holds model
     prompts (the generation steps joined from the call log for a pipeline
     that marks no steps, ``trace_join``): some gold passage reached no
     model call's prompt (``gold_text_missing``). A passage reached a prompt
     when, both normalized (NFKC, case-folded, cut into word tokens), the
     passage's tokens appear there as one run (a substring on token
     boundaries), or at least ``evidence_text_overlap`` (0.7) of its word
     3-grams appear there: a near copy, re-wrapped, lightly edited or cut
     short (one changed word in a 16-word passage costs 3 of its 14 3-grams;
     losing a third of it is a miss). It is containment, not similarity, so a
     long prompt holding many passages still holds this one, while the same
     words scattered over other passages do not. Passages under three tokens
     need the exact run.
   When the example has evidence labels but neither signal, retrieval cannot
   be judged: the example is **unattributed** (not a rung, like errors) unless
   a rule below shows that the answer itself was known or its format broke
   (``parse_error``, ``generation_raised``, ``form``, ``extra_text``, ``dropped_answer``), since
   missing evidence explains every other failure as well as the prompt,
   context or model would.
3. **prompt**, first matching rule: ``generation_raised`` (above), ``parse_error`` (a ``parse`` step
   errored, raised, or returned nothing), ``empty_output``, ``form`` (the output equals an
   expected answer once normalized, yet the metric failed it), ``extra_text``
   (the final output holds an expected answer wrapped in other words),
   ``dropped_answer`` (a generation step's output held an expected answer,
   the final output does not) or ``verbose`` (the answer is over
   ``max_answer_tokens_ratio`` × the expected length and over
   ``min_tokens_for_verbose`` tokens). The last four need a textual label.
4. **context**: ``too_many_docs`` (the answering generation step saw more
   than ``context_max_docs`` documents) or ``gold_buried`` (its first gold
   document sits after position ``context_gold_position``, 1-based).
5. **model**: none of the above; rule ``still_wrong``.

The recommended rung is the cheapest (prompt, retrieval, context, model)
whose share of the rung failures reaches ``min_share``, else the largest;
errors and unattributed failures never count towards it. Each example's
``unjudged`` lists the rungs whose rules lacked the signal to run
(``retrieval``: no doc_ids and no checkable evidence text; ``context``: no
document list).

``DIAGNOSIS_FORMAT`` is ``pipemend-diagnosis-2`` (adds ``unattributed``,
``unattributed_ids``, ``unjudged`` per example and the
``evidence_text_overlap`` threshold); ``Diagnosis.from_json`` reads ``-1`` too.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .dataset import Example, FrozenTarget
from .errors import ConfigError, UsageError
from .fsutil import atomic_write_json, read_json, read_jsonl
from .manifest import RUNGS
from .metrics import METRIC_ERROR_PREFIX, answer_text, expected_answers, normalize_answer
from .trace_join import prompt_texts

DIAGNOSIS_FORMAT = "pipemend-diagnosis-2"
READABLE_FORMATS = ("pipemend-diagnosis-1", DIAGNOSIS_FORMAT)
SHINGLE = 3
ANSWER_RULES = ("generation_raised", "parse_error", "form", "extra_text", "dropped_answer")
"""Prompt rules that hold whether or not the evidence reached the model (it knew the answer, or broke format)."""


class LadderThresholds(BaseModel):
    """The numbers the ladder's rules use; every one can be overridden by the user."""

    model_config = ConfigDict(extra="forbid")

    pass_threshold: float = Field(
        1.0, ge=0.0, le=1.0,
        description="An example scoring below this failed (1.0 suits exact_match; lower it for f1 or json_match).")
    max_answer_tokens_ratio: float = Field(
        3.0, gt=0.0, description="`verbose` fires when the answer has more than this many times the expected tokens...")
    min_tokens_for_verbose: int = Field(
        5, ge=0, description="...and more than this many tokens (normalized), so short answers are never 'verbose'.")
    context_max_docs: int = Field(
        6, ge=1, description="`too_many_docs` fires when the answering generation step saw more documents than this.")
    context_gold_position: int = Field(
        3, ge=1, description="`gold_buried` fires when the first gold document sits after this 1-based position.")
    min_share: float = Field(
        0.15, ge=0.0, le=1.0,
        description="Recommend the cheapest rung holding at least this share of the rung failures.")
    evidence_text_overlap: float = Field(
        0.7, gt=0.0, le=1.0,
        description="A gold passage reached a prompt when this share of its word 3-grams is there (or it is "
                    "there whole, normalized).")


class ExampleDiagnosis(BaseModel):
    """Why one failed example failed."""

    model_config = ConfigDict(extra="forbid")

    rung: Literal["prompt", "retrieval", "context", "model", "error", "unattributed"]
    rule: str = Field(description="The rule that fired, e.g. `verbose` or `missing_gold`.")
    evidence: str = Field("", description="A short human-readable reason.")
    score: float = 0.0
    unjudged: list[str] = Field(default_factory=list, description=(
        "Rungs whose rules lacked the signal to run: `retrieval` (no doc_ids, no checkable evidence text), "
        "`context` (no document list)."))


class Diagnosis(BaseModel):
    """The ladder's verdict on one evaluation."""

    model_config = ConfigDict(extra="forbid")

    counts: dict[str, int] = Field(default_factory=lambda: {r: 0 for r in RUNGS})
    errors: int = Field(0, description=(
        "Failed examples with no rung: a timeout, an exception outside any step, a failed model call, a tool "
        "or other step that raised, or no result."))
    n_examples: int = 0
    n_failed: int = Field(0, description="Examples below pass_threshold, errors included.")
    ids: dict[str, list[str]] = Field(default_factory=lambda: {r: [] for r in RUNGS})
    error_ids: list[str] = Field(default_factory=list)
    unattributed: int = Field(0, description=(
        "Failed examples with evidence labels whose retrieval cannot be judged (no doc_ids, no evidence text "
        "reaching a known prompt) and no answer-level prompt rule: not a rung, never recommended."))
    unattributed_ids: list[str] = Field(default_factory=list)
    details: dict[str, ExampleDiagnosis] = Field(default_factory=dict)
    recommended: str | None = Field(None, description="The rung to try next; None when nothing failed on a rung.")
    thresholds: LadderThresholds = Field(default_factory=LadderThresholds)

    def shares(self) -> dict[str, float]:
        """Each rung's share of the rung failures (errors excluded)."""
        total = sum(self.counts.values())
        return {r: (self.counts.get(r, 0) / total if total else 0.0) for r in RUNGS}

    def to_json(self) -> dict[str, Any]:
        return {"format": DIAGNOSIS_FORMAT, **self.model_dump(mode="json")}

    def brief(self) -> dict[str, Any]:
        """Counts per rung, the failures on no rung (``errors``, ``unattributed``) and the recommendation
        (``eval --json``'s ``diagnosis``, the journal's event)."""
        return {"counts": {r: int(self.counts.get(r, 0)) for r in RUNGS}, "errors": int(self.errors),
                "unattributed": int(self.unattributed), "recommended": self.recommended}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Diagnosis":
        """Read a ``pipemend-diagnosis-2`` (or ``-1``: no unattributed bucket) object."""
        if data.get("format", DIAGNOSIS_FORMAT) not in READABLE_FORMATS:
            raise UsageError(f"diagnosis format {data.get('format')!r}: expected one of {', '.join(READABLE_FORMATS)}")
        return cls.model_validate({k: v for k, v in data.items() if k != "format"})


# --------------------------------------------------------------------------- thresholds from the user


def load_thresholds(path: str | Path | None = None, **overrides: Any) -> LadderThresholds:
    """Thresholds from a YAML/JSON file (flat, or under a ``diagnosis:`` key), then keyword overrides.

    Raises ``ConfigError`` naming the file and key for a bad value or an unknown key.
    """
    values: dict[str, Any] = {}
    source: str | Path = "thresholds"
    if path is not None:
        source = Path(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(path, None, f"cannot read thresholds file ({e.strerror})", "a YAML or JSON file") from e
        except yaml.YAMLError as e:
            raise ConfigError(path, None, f"not valid YAML/JSON ({e})", "a mapping of threshold names") from e
        if isinstance(data, dict) and set(data) == {"diagnosis"}:
            data = data["diagnosis"]
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path, None, "thresholds file is not a mapping", _known_keys())
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return LadderThresholds(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err.get("loc", ())) or None
        raise ConfigError(source, key, err.get("msg", "invalid value"), _known_keys()) from e


def _known_keys() -> str:
    return "keys among " + ", ".join(LadderThresholds.model_fields)


# --------------------------------------------------------------------------- the rules


def _steps(trace: dict[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    steps = (trace or {}).get("steps") or []
    return [s for s in steps if isinstance(s, dict) and s.get("kind") == kind]


def _ids(step: dict[str, Any]) -> list[str] | None:
    doc_ids = step.get("doc_ids")
    if doc_ids is None:
        return None
    return [str(d) for d in doc_ids]


def _union(steps: Iterable[dict[str, Any]]) -> list[str] | None:
    """Ordered, de-duplicated ``doc_ids`` of the steps that declare any; None when none declares."""
    declared = [ids for ids in (_ids(s) for s in steps) if ids is not None]
    if not declared:
        return None
    return list(dict.fromkeys(d for ids in declared for d in ids))


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, dict, tuple)):
        return not value
    return False


def _text_answers(expected: Any) -> list[str]:
    """The normalized expected answers when they are textual; [] for dicts or no label."""
    if expected is None:
        return []
    answers = expected_answers(expected)
    if any(isinstance(a, dict) for a in answers):
        return []
    return [n for n in (normalize_answer(answer_text(a)) for a in answers) if n]


def _contains(text: str, want: str) -> bool:
    return f" {want} " in f" {text} "


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(answer_text(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _declared_docs(trace: dict[str, Any] | None) -> tuple[list[str] | None, list[str] | None]:
    """The ``doc_ids`` the trace's generation and retrieval steps declare (None: none declares any)."""
    return _union(_steps(trace, "generation")), _union(_steps(trace, "retrieval"))


def _retrieval_rule(gold: list[str], trace: dict[str, Any] | None) -> ExampleDiagnosis | None:
    gen, ret = _declared_docs(trace)
    reached = gen if gen is not None else ret
    if reached is None:  # the trace says nothing about documents: can't tell
        return None
    missing = [g for g in gold if g not in set(reached)]
    if not missing:
        return None
    evidence = f"gold {missing} never reached generation"
    rule = "missing_gold"
    if gen is not None and ret is not None:
        dropped = [g for g in missing if g in set(ret)]
        if dropped:
            rule = "dropped_before_generation"
            evidence += f"; {dropped} were retrieved but dropped before generation (context assembly)"
    return ExampleDiagnosis(rung="retrieval", rule=rule, evidence=evidence)


def text_tokens(text: str) -> list[str]:
    """Word tokens of ``text``, NFKC-normalized and case-folded (punctuation and spacing drop out)."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())


def _shingles(tokens: list[str]) -> Iterator[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(SHINGLE)))


class ParsedPrompt:
    """One model call's prompt, tokenized once for all the passages checked against it (its 3-grams are
    scanned, never stored: a huge prompt costs time linear in its size, and memory for its tokens only)."""

    def __init__(self, text: str):
        self.tokens = text_tokens(text)
        self.joined = f" {' '.join(self.tokens)} "


def passage_reached(passage: str, prompt: str | ParsedPrompt, overlap: float) -> bool:
    """Whether a gold passage's text is in a prompt: as one normalized run of tokens, or (3+ tokens) with at
    least ``overlap`` of its word 3-grams there (module docstring)."""
    if isinstance(prompt, str):
        prompt = ParsedPrompt(prompt)
    tokens = text_tokens(passage)
    if not tokens:
        return True  # an empty passage cannot be missing
    if f" {' '.join(tokens)} " in prompt.joined:
        return True
    mine = set(_shingles(tokens))
    if not mine:
        return False
    found = {g for g in _shingles(prompt.tokens) if g in mine}
    return len(found) / len(mine) >= overlap


def _text_rule(texts: list[str], gold: list[str], prompts: list[str], t: LadderThresholds) -> ExampleDiagnosis | None:
    parsed = [ParsedPrompt(p) for p in prompts]
    missing = [i for i, text in enumerate(texts) if not any(passage_reached(text, p, t.evidence_text_overlap) for p in parsed)]
    if not missing:
        return None
    names = [gold[i] for i in missing] if len(gold) == len(texts) else [f"#{i + 1}" for i in missing]
    return ExampleDiagnosis(
        rung="retrieval", rule="gold_text_missing",
        evidence=f"{len(missing)} of {len(texts)} gold passage(s) ({', '.join(names)}) in none of the "
                 f"{len(prompts)} model prompt(s)")


def _unjudged_reason(trace: dict[str, Any] | None, texts: list[str]) -> str:
    if trace is None:
        return "no trace" + ("" if texts else " and no evidence text")
    if texts:
        return "no model prompt in the trace to check the evidence text against, and no doc_ids"
    if _steps(trace, "retrieval"):
        return "the retrieval steps declare no doc_ids and there is no evidence text"
    return "no retrieval step and no evidence text"


# --------------------------------------------------------------------------- examples that ended in an exception

STATUS_KEY = "http.response.status_code"
_TIMEOUT_TYPE = re.compile(r"timeout|timed_?out", re.I)
MODEL_CALL_ERRORS = frozenset({
    "APIError", "APIStatusError", "APIConnectionError", "APITimeoutError", "APIResponseValidationError",
    "RateLimitError", "InternalServerError", "ServiceUnavailableError", "OverloadedError",
    "HTTPError", "HTTPStatusError", "RequestError", "TransportError", "NetworkError", "ConnectError",
    "ReadError", "WriteError", "CloseError", "ProtocolError", "RemoteProtocolError", "LocalProtocolError",
    "ProxyError", "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
})
"""Exception type names of a model call that got no usable answer (the anthropic, openai, LiteLLM and httpx
families, and the socket errors under them): a step raising one failed at the gateway, not in its own code."""


def error_line(err: Any) -> str | None:
    """``Type: message`` of a recorded error dict (the form of the runner's row ``error``); None for no error."""
    if not isinstance(err, dict) or not err.get("type"):
        return None
    message = str(err.get("message") or "")
    return f"{err['type']}: {message}" if message else str(err["type"])


def _list(value: Any) -> list[Any]:
    """``value`` when it is a list, else [] (a trace is the sandbox's output: any shape may come)."""
    return value if isinstance(value, list) else []


def _bare(line: str | None) -> str:
    return (line or "").rstrip().rstrip(":")


def escaped_step(trace: dict[str, Any] | None, runner_error: str | None) -> dict[str, Any] | None:
    """The innermost traced step the example's exception escaped from: a step whose recorded ``error`` is the
    trace's final error (or a cause or context in its chained traceback), else, with no final error in the
    trace, the runner's ``Type: message``. None when the exception arose outside every step."""
    raised = [s for s in _list((trace or {}).get("steps")) if isinstance(s, dict) and error_line(s.get("error"))]
    if not raised:
        return None
    final = (trace or {}).get("error")
    final_line = error_line(final)
    chain = str(final.get("traceback") or "") if isinstance(final, dict) else ""

    def escaped(step: dict[str, Any]) -> bool:
        line = error_line(step["error"]) or ""
        if final_line is not None:
            return line == final_line or (bool(chain) and line in chain)
        return bool(runner_error) and _bare(line) == _bare(runner_error)

    hits = [s for s in raised if escaped(s)]
    return hits[-1] if hits else None  # steps are in start order: a nested step starts after its parent


def _model_call_failed(step: dict[str, Any]) -> bool:
    """Whether a generation step's exception came from its model call: its last call got an error status, it
    got no answer at all, or the exception is an API, connection or HTTP error."""
    calls = [c for c in _list(step.get("llm_calls")) if isinstance(c, dict)]
    status = calls[-1].get(STATUS_KEY) if calls else None
    if not isinstance(status, int) or not 200 <= status < 300:
        return True
    return str((step.get("error") or {}).get("type")) in MODEL_CALL_ERRORS


def _raised_rule(step: dict[str, Any] | None, runner_error: str) -> ExampleDiagnosis | None:
    """The diagnosis of an example that ended in an exception, given the step it escaped from; None when the
    ladder's rules judge it (a parse step, or a generation step whose model call answered)."""
    if step is None:
        return ExampleDiagnosis(rung="error", rule="runner_error", evidence=_short(runner_error))
    name, kind = step.get("name"), step.get("kind")
    err = step["error"]
    said = f"step {name!r} ({kind}) raised {_short(error_line(err))}"
    if _TIMEOUT_TYPE.search(str(err.get("type"))):
        return ExampleDiagnosis(rung="error", rule="timeout", evidence=f"{said}: a timeout, not a rung")
    if kind == "retrieval":
        return ExampleDiagnosis(rung="retrieval", rule="retrieval_raised",
                                evidence=f"{said}; the example ended in it, so no evidence reached the model")
    if kind == "parse":
        return None
    if kind == "generation":
        if not _model_call_failed(step):
            return None
        return ExampleDiagnosis(rung="error", rule="gateway_error",
                                evidence=f"{said}: its model call failed (no answer, an error status, or an API "
                                         "error), not a rung")
    return ExampleDiagnosis(rung="error", rule="step_raised", evidence=f"{said}; no rung judges a {kind} step")


def _raised_in_step(escaped: dict[str, Any] | None) -> ExampleDiagnosis | None:
    """The prompt rule of an exception that escaped from a parse step or from an answered generation step."""
    if escaped is None:
        return None
    said = f"{escaped.get('kind')} step {escaped.get('name')!r} raised {_short(error_line(escaped.get('error')))}"
    if escaped.get("kind") == "parse":
        return ExampleDiagnosis(rung="prompt", rule="parse_error",
                                evidence=f"{said} and the example ended in it: the model's output broke its format")
    return ExampleDiagnosis(rung="prompt", rule="generation_raised",
                            evidence=f"{said} after the model answered: the code reading the answer failed on it")


def _prompt_rule(
    output: Any, expected: Any, trace: dict[str, Any] | None, t: LadderThresholds,
    escaped: dict[str, Any] | None = None,
) -> ExampleDiagnosis | None:
    found = _raised_in_step(escaped)
    if found is not None:
        return found
    for step in _steps(trace, "parse"):
        if step.get("error"):
            err = step["error"]
            msg = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else str(err)
            return ExampleDiagnosis(rung="prompt", rule="parse_error",
                                    evidence=f"parse step {step.get('name')!r} raised {_short(msg)}")
        if _is_empty(step.get("output")):
            return ExampleDiagnosis(rung="prompt", rule="parse_error",
                                    evidence=f"parse step {step.get('name')!r} returned nothing")
    if _is_empty(output) or not normalize_answer(answer_text(output)):
        return ExampleDiagnosis(rung="prompt", rule="empty_output", evidence="the final output is empty")
    answers = _text_answers(expected)
    if not answers:
        return None
    final = normalize_answer(answer_text(output))
    if final in answers:
        return ExampleDiagnosis(rung="prompt", rule="form",
                                evidence="equals the expected answer only after normalization (case, punctuation, "
                                         "articles); the metric wants another form")
    hit = next((a for a in answers if _contains(final, a)), None)
    if hit is not None:
        return ExampleDiagnosis(rung="prompt", rule="extra_text",
                                evidence=f"the output holds {hit!r} wrapped in other text: {_short(output)!r}")
    for step in _steps(trace, "generation"):
        said = normalize_answer(answer_text(step.get("output")))
        hit = next((a for a in answers if _contains(said, a)), None)
        if hit is not None:
            return ExampleDiagnosis(
                rung="prompt", rule="dropped_answer",
                evidence=f"step {step.get('name')!r} said {hit!r} but the final output is {_short(output)!r}")
    n_out, n_want = len(final.split()), max(len(a.split()) for a in answers)
    if n_out > t.max_answer_tokens_ratio * n_want and n_out > t.min_tokens_for_verbose:
        return ExampleDiagnosis(rung="prompt", rule="verbose",
                                evidence=f"answer has {n_out} tokens, expected about {n_want}")
    return None


def _context_docs(trace: dict[str, Any] | None, gold: list[str]) -> tuple[str, list[str]] | None:
    """The answering step's documents: the last generation step declaring doc_ids (preferring one with gold)."""
    declared = [s for s in _steps(trace, "generation") if _ids(s) is not None]
    if declared:
        with_gold = [s for s in declared if set(gold) & set(_ids(s) or [])]
        step = (with_gold or declared)[-1]
        return str(step.get("name")), _ids(step) or []
    ret = _union(_steps(trace, "retrieval"))
    return ("retrieved documents", ret) if ret is not None else None


def _context_rule(trace: dict[str, Any] | None, gold: list[str], t: LadderThresholds) -> ExampleDiagnosis | None:
    found = _context_docs(trace, gold)
    if found is None:
        return None
    name, docs = found
    if len(docs) > t.context_max_docs:
        return ExampleDiagnosis(rung="context", rule="too_many_docs",
                                evidence=f"{name!r} saw {len(docs)} documents (> {t.context_max_docs})")
    positions = [i for i, d in enumerate(docs, start=1) if d in set(gold)]
    if positions and positions[0] > t.context_gold_position:
        return ExampleDiagnosis(rung="context", rule="gold_buried",
                                evidence=f"first gold document at position {positions[0]} of {len(docs)} "
                                         f"in {name!r} (> {t.context_gold_position})")
    return None


def diagnose_example(
    *,
    output: Any,
    expected: Any,
    evidence: list[str] | None,
    trace: dict[str, Any] | None,
    runner_error: str | None = None,
    thresholds: LadderThresholds | None = None,
    evidence_text: list[str] | None = None,
    timed_out: bool = False,
) -> ExampleDiagnosis:
    """The rung of one failed example (the caller decides that it failed); ``unattributed`` when the example
    has evidence labels but retrieval cannot be judged; an example that ended in an exception by the step it
    escaped from (module docstring)."""
    t = thresholds or LadderThresholds()
    escaped = None
    if timed_out:
        return ExampleDiagnosis(rung="error", rule="timeout", evidence=_short(runner_error or "timed out"))
    if runner_error:
        escaped = escaped_step(trace, runner_error)
        raised = _raised_rule(escaped, runner_error)
        if raised is not None:
            return raised
    gold = [str(g) for g in evidence or []]
    texts = [str(x) for x in evidence_text or []]
    judged = False
    if gold:
        found = _retrieval_rule(gold, trace)
        if found:
            return found
        judged = _declared_docs(trace) != (None, None)
    if not judged and texts:
        prompts = prompt_texts(trace)
        if prompts:
            found = _text_rule(texts, gold, prompts, t)
            if found:
                return found
            judged = True
    unjudged = [] if judged or not (gold or texts) else ["retrieval"]
    if _context_docs(trace, gold) is None:
        unjudged.append("context")
    found = _prompt_rule(output, expected, trace, t, escaped)
    if unjudged[:1] == ["retrieval"] and (found is None or found.rule not in ANSWER_RULES):
        return ExampleDiagnosis(
            rung="unattributed", rule="no_retrieval_signal", unjudged=unjudged,
            evidence=f"unattributed: {_unjudged_reason(trace, texts)}; whether the gold evidence reached the model "
                     "cannot be told, so the failure is put on no rung")
    found = found or _context_rule(trace, gold, t) or ExampleDiagnosis(
        rung="model", rule="still_wrong", evidence=f"answered {_short(output, 40)!r}, expected {_short(expected, 40)!r}")
    found.unjudged = unjudged
    return found


def recommend(counts: dict[str, int], min_share: float) -> str | None:
    """The cheapest rung whose share of rung failures is at least ``min_share``, else the largest; None if none."""
    total = sum(counts.get(r, 0) for r in RUNGS)
    if total == 0:
        return None
    for rung in RUNGS:
        if counts.get(rung, 0) / total >= min_share and counts.get(rung, 0) > 0:
            return rung
    return max(RUNGS, key=lambda r: counts.get(r, 0))  # ties: the cheaper rung (max keeps the first)


def _is_runner_error(row: dict[str, Any]) -> str | None:
    err = row.get("error")
    if row.get("timed_out"):
        return str(err or "timed out")
    if err and not str(err).startswith(METRIC_ERROR_PREFIX):
        return str(err)
    return None


def diagnose(
    rows: Iterable[dict[str, Any]],
    examples: Iterable[Example],
    traces: dict[str, dict[str, Any] | None],
    thresholds: LadderThresholds | None = None,
) -> Diagnosis:
    """Diagnose scored rows (``scored.jsonl`` shape) with their labels and traces (by example id)."""
    t = thresholds or LadderThresholds()
    by_id = {ex.id: ex for ex in examples}
    d = Diagnosis(thresholds=t)
    for row in rows:
        d.n_examples += 1
        example_id = str(row.get("id"))
        score = float(row.get("score") or 0.0)
        runner_error = _is_runner_error(row)
        if score >= t.pass_threshold - 1e-9 and not runner_error:
            continue
        d.n_failed += 1
        ex = by_id.get(example_id)
        found = diagnose_example(
            output=row.get("output"),
            expected=ex.expected if ex else None,
            evidence=ex.evidence if ex else None,
            trace=traces.get(example_id),
            runner_error=runner_error,
            thresholds=t,
            evidence_text=ex.evidence_text if ex else None,
            timed_out=bool(row.get("timed_out")),
        )
        found.score = score
        d.details[example_id] = found
        if found.rung == "error":
            d.errors += 1
            d.error_ids.append(example_id)
        elif found.rung == "unattributed":
            d.unattributed += 1
            d.unattributed_ids.append(example_id)
        else:
            d.counts[found.rung] += 1
            d.ids[found.rung].append(example_id)
    d.recommended = recommend(d.counts, t.min_share)
    return d


def diagnose_eval_dir(
    eval_dir: Path, examples: list[Example], thresholds: LadderThresholds | None = None
) -> Diagnosis:
    """Diagnose one evaluation folder (``scored.jsonl`` + ``traces/<id>.json``) with the host's labels."""
    eval_dir = Path(eval_dir)
    scored = eval_dir / "scored.jsonl"
    if not scored.is_file():
        raise UsageError(f"{scored}: no scored results to diagnose (run the evaluation first)")
    rows = list(read_jsonl(scored))
    traces_dir = eval_dir / "traces"
    traces: dict[str, dict[str, Any] | None] = {}
    for row in rows:
        example_id = str(row.get("id"))
        path = traces_dir / f"{example_id}.json"
        trace = None
        if path.parent == traces_dir and path.is_file():
            try:
                loaded = read_json(path)
                trace = loaded if isinstance(loaded, dict) else None
            except (OSError, ValueError):
                trace = None  # a torn trace: diagnose from the output alone
        traces[example_id] = trace
    return diagnose(rows, examples, traces, thresholds)


# --------------------------------------------------------------------------- a run's evaluations


def primary_split(splits: list[str]) -> str:
    """The split whose diagnosis is the run's: val when evaluated (the split the gate optimizes), else the first."""
    return "val" if "val" in splits else splits[0]


def diagnose_run(run_dir: Path, evals: dict[str, Path], frozen: FrozenTarget,
                 thresholds: LadderThresholds | None = None) -> tuple[Diagnosis, dict[str, Diagnosis]]:
    """Diagnose each split's eval dir on its own; write ``evals/<x>/diagnosis.json`` and the run's ``diagnosis.json``.

    Per split, because the failure mix differs between splits and the ladder's
    recommendation is read against the split one optimizes on: the run-level
    ``diagnosis.json`` is val's, or the only split's.
    Returns ``(diagnosis of the primary split, {split: diagnosis})``.
    """
    by_id = frozen.examples_by_id()
    per_split: dict[str, Diagnosis] = {}
    for split, eval_dir in evals.items():
        ids = [r["id"] for r in read_jsonl(eval_dir / "inputs.jsonl")]
        d = diagnose_eval_dir(eval_dir, [by_id[i] for i in ids if i in by_id], thresholds)
        atomic_write_json(eval_dir / "diagnosis.json", d.to_json())
        per_split[split] = d
    primary = per_split[primary_split(list(per_split))]
    atomic_write_json(Path(run_dir) / "diagnosis.json", primary.to_json())
    return primary, per_split


@dataclass
class Rediagnosis:
    """``pipemend diagnose``: each split's ``summary.json`` and diagnosis, and the run's (primary) diagnosis."""

    summaries: dict[str, dict[str, Any]]
    diagnosis: Diagnosis
    per_split: dict[str, Diagnosis]


def rediagnose(run_dir: Path, thresholds: LadderThresholds | None = None) -> Rediagnosis:
    """Re-diagnose an existing run from its frozen labels and its eval traces (one eval per split: the first
    by name, e.g. ``baseline-val``)."""
    frozen = FrozenTarget.open(run_dir)
    evals: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for eval_dir in sorted((Path(run_dir) / "evals").glob("*/")):
        if not (eval_dir / "summary.json").is_file():
            continue
        summary = read_json(eval_dir / "summary.json")
        s = summary.get("split") or eval_dir.name
        if s not in evals:
            evals[s], summaries[s] = eval_dir, summary
    if not evals:
        raise UsageError(f"{run_dir}: no scored evaluations under evals/ (run `pipemend eval` first)")
    primary, per_split = diagnose_run(run_dir, evals, frozen, thresholds)
    return Rediagnosis(summaries=summaries, diagnosis=primary, per_split=per_split)

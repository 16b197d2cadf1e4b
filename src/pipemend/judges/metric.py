"""``judge:correctness``, ``judge:faithfulness``, ``judge:relevance``: one model call per example, on the host.

Each renders its frozen template with what it judges and asks the run's judge (``client.JudgeClient``):

- correctness: the question (the example's inputs), the expected answer(s) and the output;
- faithfulness: the context the pipeline's model calls saw (their prompts, in call order, from the calls
  charged to the example: ``generation_context``) and the output;
- relevance: the question and the output.

An unparseable verdict, a failed judge call, or nothing to judge against (no expected answer, no model call
or generation step) scores 0 with a ``metric error`` naming the judge; the scored row keeps the judgment
(``judgments``: score, reason, call id, cache).
"""

from __future__ import annotations

import json
from typing import Any

from ..metrics import METRIC_ERROR_PREFIX, Metric, ScoreContext, Scored, expected_answers
from ..trace_join import call_prompt, prompt_texts
from .client import JudgeClient
from .prompts import inputs_text, render
from .verdict import VerdictError, parse_verdict


def _call_text(request: Any) -> str:
    prompt = call_prompt(request)
    parts = [f"[system]\n{prompt['system']}"] if prompt.get("system") else []
    parts += [f"[{m['role']}]\n{m['content']}" for m in prompt.get("messages") or []]
    return "\n".join(parts)


def generation_context(ctx: ScoreContext | None) -> str:
    """What the pipeline's generation steps saw: the prompt of each model call charged to the example, in
    call order; without logged calls, the prompts joined or hooked into its trace, else its generation steps'
    inputs. Empty when there is none."""
    if ctx is None:
        return ""
    calls = sorted((c for c in ctx.calls if isinstance(c, dict) and c.get("request") is not None),
                   key=lambda c: float(c.get("t") or 0.0) if isinstance(c.get("t"), (int, float)) else 0.0)
    texts = [_call_text(c["request"]) for c in calls]
    if not texts:
        texts = prompt_texts(ctx.trace)
    if not texts:
        steps = (ctx.trace or {}).get("steps") or []
        texts = [json.dumps(s.get("inputs"), ensure_ascii=False, default=str) for s in steps
                 if isinstance(s, dict) and s.get("kind") == "generation" and s.get("inputs")]
    texts = [t for t in texts if t.strip()]
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"--- model call {i} ---\n{t}" for i, t in enumerate(texts, 1))


class JudgeMetric(Metric):
    """A judge metric of one run: its frozen ``template`` and the run's ``client``."""

    def __init__(self, spec: str, template: str, client: JudgeClient | None):
        super().__init__(spec, self._called_directly, takes_example=True)
        self.template = template
        self.client = client
        self.concurrency = client.concurrency if client is not None else 1

    def _called_directly(self, output: Any, expected: Any, example: Any = None) -> float:
        raise TypeError(f"{self.spec} is scored with its context: call .score(...)")

    def safe(self, output: Any, expected: Any, example: dict[str, Any] | None = None) -> tuple[float, str | None]:
        got = self.score(output, expected, example)
        return got.score, got.error

    def fields(self, output: Any, expected: Any, example: dict[str, Any], ctx: ScoreContext | None) -> dict[str, Any]:
        """The template's values; ``ValueError`` when there is nothing to judge against."""
        fields: dict[str, Any] = {"output": output, "question": inputs_text(example.get("inputs"))}
        if self.spec == "judge:correctness":
            if expected is None:
                raise ValueError("the example has no expected answer to judge against")
            fields["expected"] = expected_answers(expected)
        if self.spec == "judge:faithfulness":
            fields["context"] = generation_context(ctx)
            if not fields["context"].strip():
                raise ValueError("the example's trace shows no model call or generation step: no context to judge")
        return fields

    def score(self, output: Any, expected: Any, example: dict[str, Any] | None = None,
              ctx: ScoreContext | None = None) -> Scored:
        example = example or {}
        fail = f"{METRIC_ERROR_PREFIX}{self.spec}: "
        if self.client is None:
            return Scored(0.0, fail + "no judge gateway in this evaluation")
        try:
            fields = self.fields(output, expected, example, ctx)
        except ValueError as e:
            return Scored(0.0, fail + str(e))
        prompt = render(self.template, self.spec, **fields)
        answer = self.client.ask(prompt, example_id=str(example.get("id", "")), judge=self.spec,
                                 eval_token=ctx.eval_token if ctx else None)
        judgment: dict[str, Any] = {"score": None, "reason": None, "call_id": answer.call_id,
                                    "cache": "hit" if answer.hit else "miss", "error": None}
        if answer.error is not None:
            judgment["error"] = f"the judge's call failed: {answer.error}"
        else:
            try:
                verdict = parse_verdict(answer.response)
            except VerdictError as e:
                judgment["error"] = str(e)
            else:
                judgment.update(score=verdict.score, reason=verdict.reason)
                return Scored(verdict.score, None, judgments={self.spec: judgment})
        return Scored(0.0, fail + judgment["error"], judgments={self.spec: judgment})

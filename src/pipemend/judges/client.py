"""The run's judge: its own gateway (``RUN_DIR/judge/``) and one Messages call per judgment.

The judge's calls go through a gateway of their own, as an LLM proposer's do (``RUN_DIR/agent/``), not
through the pipeline's: the pipeline's budget, spend and per-evaluation charging read the pipeline
gateway's call log, and a judge call there would be charged to the candidate (its time window takes every
call in it) and would spend the pipeline's budget. Its own gateway serves only the judge's model, logs every
judgment to ``RUN_DIR/judge/gateway/calls.jsonl`` (``example_id``: the example judged, ``step``: the judge,
``eval``: the evaluation's token) and shares the run's response cache, so the same judgment is never paid
twice, a resumed run's included. Judge requests are greedy (temperature 0): a cached verdict is the verdict.

The calls are made in process (``GatewayService.call``: allow-list, backend, cache, budget, call log), not
over HTTP: the judge runs on the host, and only the pipeline needs a socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsutil import read_jsonl
from ..gateway import Gateway, GatewayConfig
from ..gateway.backends import BackendError
from ..gateway.service import EVAL_HEADER, MESSAGES_API
from ..gateway.validate import parse_request
from .verdict import TOOL_NAME, VERDICT_TOOL

JUDGE_DIR = "judge"
"""The judge gateway's run dir inside the run's: ``RUN_DIR/judge/gateway/calls.jsonl``."""
MAX_TOKENS = 512
DEFAULT_CONCURRENCY = 4


@dataclass(frozen=True)
class JudgeAnswer:
    call_id: str
    response: dict[str, Any] | None
    error: str | None
    hit: bool


class JudgeClient:
    """Asks ``model`` for verdicts through a started judge ``gateway``; ``close`` stops the gateway."""

    def __init__(self, gateway: Gateway, model: str, *, concurrency: int = DEFAULT_CONCURRENCY):
        self.gateway = gateway
        self.model = model
        self.concurrency = max(1, int(concurrency))

    @classmethod
    def start(cls, run_dir: Path, model: str, *, cache_dir: Path | None = None,
              concurrency: int = DEFAULT_CONCURRENCY, budget_usd: float | None = None) -> "JudgeClient":
        """The judge of the run in ``run_dir``: a gateway serving only ``model`` (its call log in
        ``RUN_DIR/judge/``, its cache ``cache_dir``: the run's LLM cache, its dollar limit ``budget_usd``:
        the manifest's ``judge.budget_usd``, counting what the run's judge already spent), started."""
        gateway = Gateway(GatewayConfig(run_dir=Path(run_dir) / JUDGE_DIR, cache_dir=cache_dir, models=[model],
                                        budget_usd=budget_usd))
        return cls(gateway.start(), model, concurrency=concurrency)

    @property
    def calls_path(self) -> Path:
        return self.gateway.calls_path

    def request(self, prompt: str) -> dict[str, Any]:
        """The judgment's Messages request: the prompt, greedy, the verdict tool forced."""
        return {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}],
                "tools": [VERDICT_TOOL], "tool_choice": {"type": "tool", "name": TOOL_NAME}}

    def ask(self, prompt: str, *, example_id: str, judge: str, eval_token: str | None) -> JudgeAnswer:
        """One judgment, through the gateway (cached, logged under ``example_id``/``judge``/``eval_token``);
        a failed call comes back as ``error``, never raised."""
        service = self.gateway.service
        if service is None:
            return JudgeAnswer("", None, "the judge's gateway is not started", False)
        raw = json.dumps(self.request(prompt), ensure_ascii=False).encode("utf-8")
        headers = {"x-pipemend-example": example_id, "x-pipemend-step": judge}
        if eval_token:
            headers[EVAL_HEADER] = eval_token
        outcome = service.call(lambda: parse_request(raw), raw, headers, api=MESSAGES_API)
        error = outcome.error
        return JudgeAnswer(outcome.call_id, outcome.response, _error_text(error) if error else None, outcome.hit)

    def usage(self, eval_token: str) -> dict[str, Any]:
        """What judging the evaluation ``eval_token`` cost, apart from the pipeline: the summary's ``judge_*``
        fields (calls, cache hits, failed calls, dollars and tokens of the calls the cache did not answer)."""
        self.gateway.flush()
        rows = [r for r in read_jsonl(self.calls_path) if isinstance(r, dict) and r.get("eval") == eval_token]
        paid = [r for r in rows if r.get("cache") != "hit"]
        return {
            "judge_model": self.model,
            "judge_calls": len(rows),
            "judge_cache_hits": len(rows) - len(paid),
            "judge_errors": sum(1 for r in rows if r.get("error")),
            "judge_cost_usd": float(sum(_num(r.get("cost_usd")) for r in paid)),
            "judge_input_tokens": int(sum(_num(r.get("input_tokens")) for r in paid)),
            "judge_output_tokens": int(sum(_num(r.get("output_tokens")) for r in paid)),
        }

    def close(self) -> None:
        self.gateway.stop()


def _error_text(error: BackendError) -> str:
    return f"{error.status} {error.error_type}: {error.message}"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0

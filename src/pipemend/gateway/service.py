"""One call, start to end, independent of HTTP: parse, pick the backend, look in the cache, check
the budget, call the backend, log the call, and build the reply. ``GatewayService.call`` is the part
both APIs share (a Messages request in, a Messages response out); ``handle_messages`` is the
Messages front end and ``openai_api.handle_chat_completions`` the Chat Completions one.

Sampled requests (an explicit temperature > 0 to a backend that is not deterministic) are cached
per draw. Inside an evaluation (the request carries ``x-pipemend-eval``) the n-th identical request
of that evaluation is draw n of the series named by its sample index (``x-pipemend-sample``,
``runtime/sampling.py``): an evaluation re-run with the same index replays its draws from the cache,
whatever else the gateway served meanwhile or whether it restarted; another index draws fresh ones;
and base and candidate at the same index share the draws of their unchanged steps. A request without
an evaluation token (a proposer's, an agent's) is the n-th identical one this gateway has seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..runtime.sampling import SAMPLE_HEADER, sample_index
from .backends import BackendError, BackendRegistry, ModelAllowList, backend_kind, forward_headers
from .backends.base import estimate_tokens, request_text
from .budget import Budget
from .cache import ResponseCache, cache_key
from .calllog import CallLog
from .pricing import cost_usd, tokens_of
from .sse import sse_body
from .validate import parse_json, parse_request

log = logging.getLogger("pipemend.gateway")
FORWARDED = ("anthropic-version", "anthropic-beta")
RAW_LOG_LIMIT = 65536
HEADER_LOG_LIMIT = 1024  # characters of an example or step header kept in the call log
EVAL_HEADER = "x-pipemend-eval"
MESSAGES_API = "anthropic-messages"
"""The call log's ``api`` of a ``POST /v1/messages`` call (``openai_api.CHAT_API`` for Chat Completions)."""
SAMPLE_SERIES = 1 << 16
"""Series of identical sampled requests whose count the gateway remembers (``SampleCounters``)."""


def _clip(value: str | None) -> str | None:
    return value if value is None or len(value) <= HEADER_LOG_LIMIT else value[:HEADER_LOG_LIMIT]


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """One call as the API front ends see it: the parsed (Messages-shaped) request, the answer or the
    error, and the ``x-pipemend-*`` headers every reply carries."""

    call_id: str
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    error: BackendError | None
    hit: bool
    headers: dict[str, str]


def json_reply(status: int, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), headers=headers or {})


def error_reply(error: BackendError, headers: dict[str, str] | None = None) -> Reply:
    # The gateway has already retried what is worth retrying; the SDK should not retry on top.
    return json_reply(error.status, error.body(), {"x-should-retry": "false", **(headers or {})})


class SampleCounters:
    """How many identical sampled requests came before this one, per series (one request in one
    evaluation at one sample index, or one request outside any evaluation), for at most ``limit``
    series: the least recently used is forgotten past that, so memory stays bounded whatever a
    pipeline sends. A forgotten series starts again at draw 0 (its next request replays a cached
    draw); forgetting one takes more distinct sampled requests than an evaluation makes."""

    def __init__(self, limit: int = SAMPLE_SERIES):
        if limit < 1:
            raise ValueError(f"SampleCounters limit must be >= 1, got {limit}")
        self.limit = limit
        self._next: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._next)

    def take(self, series: str) -> int:
        """The number of earlier requests of ``series`` (0 for the first), counting this one."""
        with self._lock:
            n = self._next.pop(series, 0)
            self._next[series] = n + 1
            if len(self._next) > self.limit:
                self._next.popitem(last=False)
            return n


def _series(base: str, eval_token: str | None, index: int) -> str:
    """The series a sampled request counts in: its cache key outside an evaluation (as before evaluations
    had tokens), else a fixed-size digest of key, evaluation token and sample index (a long hostile token
    costs no memory)."""
    if not eval_token:
        return base
    material = json.dumps([base, index, eval_token], ensure_ascii=True)
    return hashlib.sha256(material.encode()).hexdigest()


class GatewayService:
    def __init__(self, registry: BackendRegistry, cache: ResponseCache, calls: CallLog, budget: Budget,
                 models: ModelAllowList | None = None):
        self.registry = registry
        self.models = models or ModelAllowList()
        self.cache = cache
        self.calls = calls
        self.budget = budget
        self.samples = SampleCounters()
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "cache_hits": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "errors": 0}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def _key(self, backend: Any, body: dict[str, Any], eval_token: str | None, index: int) -> str:
        namespace = getattr(backend, "cache_namespace", type(backend).__name__)
        # Only an explicit temperature > 0 asks for distinct samples. A request that names no
        # temperature is served from the cache like a greedy one, so an unchanged pipeline step
        # costs nothing when a later candidate re-runs it (the API's own default is 1.0).
        temperature = body.get("temperature", 0)
        base = cache_key(namespace, body)
        if getattr(backend, "deterministic", False) or not temperature:
            return base
        return cache_key(namespace, body, self.samples.take(_series(base, eval_token, index)), index)

    def handle_messages(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        """``POST /v1/messages``: one Messages call, answered as JSON or as Messages SSE."""
        outcome = self.call(lambda: parse_request(raw), raw, headers, api=MESSAGES_API)
        if outcome.error is not None:
            return error_reply(outcome.error, outcome.headers)
        assert outcome.response is not None and outcome.request is not None
        if outcome.request.get("stream") is True:
            return Reply(200, sse_body(outcome.response), "text/event-stream; charset=utf-8", outcome.headers)
        return json_reply(200, outcome.response, outcome.headers)

    def call(self, parse: Callable[[], dict[str, Any]], raw: bytes, headers: Mapping[str, str], *,
             api: str) -> Outcome:
        """One call, whatever API it came in by: ``parse()`` turns the body into a Messages request (or
        raises a 400 ``BackendError``); then allow-list, backend, cache, budget, and one call-log row
        that records ``api``. Errors come back in the outcome, never raised."""
        started, t0 = time.time(), time.perf_counter()
        call_id = f"c-{uuid.uuid4().hex}"
        eval_token = headers.get(EVAL_HEADER) or None
        # the sample index counts inside an evaluation only; hostile input: anything odd reads as 0
        index = sample_index(headers.get(SAMPLE_HEADER)) if eval_token else 0
        request: Any = None
        model = backend_name = None
        response: dict[str, Any] | None = None
        error: BackendError | None = None
        hit = False
        origin_latency: float | None = None
        try:
            request = parse()
            model = request["model"]
            self.models.check(model)  # before anything looks at the name: no import, no file read
            backend_name = backend_kind(model)
            backend = self.registry.get(model)
            body = {k: v for k, v in request.items() if k != "stream"}
            fwd = {k: headers[k] for k in FORWARDED if headers.get(k)}

            def compute() -> dict[str, Any]:
                if reason := self.budget.exhausted():
                    raise BackendError(429, reason, "rate_limit_error")
                token = forward_headers.set(fwd)
                try:
                    answer = backend.complete(body)
                finally:
                    forward_headers.reset(token)
                if not isinstance(answer, dict) or not isinstance(answer.get("content"), list):
                    raise BackendError(502, f"backend {backend_name} returned a malformed response")
                tin, tout = tokens_of(answer.get("usage"))
                self.budget.charge(cost_usd(model, answer.get("usage")), tin + tout)
                return answer

            key = self._key(backend, body, eval_token, index)
            response, hit, origin_latency = self.cache.get_or_compute(key, compute, model)
        except BackendError as e:
            error = e
        except ConfigError as e:  # e.g. a bad script file
            error = BackendError(400, str(e))
        except Exception as e:  # a bug must cost this call, never the server
            log.exception("gateway call %s failed", call_id)
            error = BackendError(500, f"gateway internal error: {type(e).__name__}: {e}")
        latency = time.perf_counter() - t0

        usage = (response or {}).get("usage")
        tin, tout = tokens_of(usage)
        cost = 0.0 if hit or response is None or model is None else cost_usd(model, usage)
        with self._lock:
            s = self._stats
            s["calls"] += 1
            s["cache_hits"] += hit
            s["errors"] += error is not None
            if response is not None and not hit:
                s["input_tokens"] += tin
                s["output_tokens"] += tout
                s["cost_usd"] += cost
        parsed = request if isinstance(request, dict) else None
        if request is None:
            request = raw[:RAW_LOG_LIMIT].decode("utf-8", errors="replace")
        self.calls.append({
            "call_id": call_id, "t": started, "api": api,
            "example_id": _clip(headers.get("x-pipemend-example")), "step": _clip(headers.get("x-pipemend-step")),
            "eval": _clip(headers.get(EVAL_HEADER)), "sample": index,
            "model": model, "backend": backend_name, "request": request, "response": response,
            "input_tokens": tin, "output_tokens": tout, "latency_s": round(latency, 6), "cost_usd": cost,
            "cache": "hit" if hit else "miss", "origin_latency_s": origin_latency,
            "error": None if error is None else {"status": error.status, "type": error.error_type, "message": error.message},
        })
        out_headers = {
            "x-pipemend-call-id": call_id, "request-id": call_id,
            "x-pipemend-cache": "hit" if hit else "miss",
            "x-pipemend-input-tokens": str(tin), "x-pipemend-output-tokens": str(tout),
        }
        return Outcome(call_id, parsed, response, error, hit, out_headers)

    def count_tokens(self, raw: bytes) -> Reply:
        """``/v1/messages/count_tokens``: an estimate (4 characters a token); no backend call."""
        try:
            body = parse_json(raw)
        except BackendError as e:
            return error_reply(BackendError(400, f"invalid count_tokens request: {e.message}"))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return error_reply(BackendError(400, "invalid count_tokens request: expected an object with messages"))
        return json_reply(200, {"input_tokens": estimate_tokens(request_text(body))})

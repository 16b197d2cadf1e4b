"""``optimize --otlp-endpoint URL``: each evaluated example sent as OpenTelemetry spans while the run goes.

``OtlpObserver`` is a ``protocols.RunObserver``: after the baseline it sends the baseline's finished evaluations,
after each candidate that candidate's, at the end the test split and whatever was not sent yet. What reached the
collector is kept in ``RUN_DIR/observers/otlp/sent.json`` (trace ids per endpoint, written atomically after each
accepted request), so a resumed run sends what a kill or a refusing collector left unsent, and nothing twice.
A collector that refuses raises ``ExportFailed``, which the loop turns into a warning (the run goes on).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..fsutil import atomic_write_json, read_json_object
from .otlp import BASELINE, RunContext, candidate_label, example_traces, finished_evaluations, request_of, run_id_of, split_request
from .otlp_push import (Encoding, check_url, otlp_encoding_from_env, otlp_headers_from_env, post_traces,
                        to_protobuf)

if TYPE_CHECKING:
    from ..optimize.config import OptimizeConfig

SENT_FORMAT = "pipemend-otlp-sent-1"
SENT_FILE = Path("observers") / "otlp" / "sent.json"


class OtlpObserver:
    """Streams a run's evaluations to one OTLP/HTTP traces endpoint."""

    name = "otlp"

    def __init__(self, endpoint: str, *, headers: Mapping[str, str] | None = None, encoding: Encoding = "json",
                 include_messages: bool = False, timeout_s: float = 10.0):
        self.endpoint = check_url(endpoint)
        if encoding == "protobuf":
            to_protobuf({"resourceSpans": []})  # a missing opentelemetry-proto fails the run's start, not each send
        self.headers = dict(headers or {})
        self.encoding: Encoding = encoding
        self.include_messages = include_messages
        self.timeout_s = timeout_s

    @classmethod
    def from_config(cls, cfg: OptimizeConfig, run_dir: Path) -> OtlpObserver:
        """The run's ``otlp_endpoint``, with headers from ``OTEL_EXPORTER_OTLP_HEADERS`` and the encoding from
        ``OTEL_EXPORTER_OTLP_PROTOCOL`` (JSON when unset)."""
        assert cfg.otlp_endpoint is not None
        return cls(cfg.otlp_endpoint, headers=otlp_headers_from_env(), encoding=otlp_encoding_from_env())

    def baseline_done(self, run_dir: Path) -> None:
        self.send(run_dir, {BASELINE})

    def candidate_done(self, run_dir: Path, n: int) -> None:
        self.send(run_dir, {candidate_label(n)})

    def run_done(self, run_dir: Path) -> None:
        self.send(run_dir, None)

    def send(self, run_dir: Path, labels: set[str] | None) -> int:
        """Send the unsent examples of the finished evaluations of ``labels`` (None: all); how many traces went."""
        run_dir = Path(run_dir)
        sent = read_sent(run_dir)
        done = set(sent.get(self.endpoint, []))
        ctx = RunContext.of(run_dir, run_id=run_id_of(run_dir), include_messages=self.include_messages)
        count = 0
        for label, eval_dir in finished_evaluations(run_dir):
            if labels is not None and label not in labels:
                continue
            fresh = [(tid, spans) for tid, spans in example_traces(ctx, eval_dir, candidate=label) if tid not in done]
            if not fresh:
                continue
            for request in split_request(request_of(ctx, label, [s for _, spans in fresh for s in spans])):
                post_traces(self.endpoint, request, headers=self.headers, encoding=self.encoding,
                            timeout_s=self.timeout_s)
                ids = {s["traceId"] for rs in request["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]}
                done |= ids
                count += len(ids)
                sent[self.endpoint] = sorted(done)
                write_sent(run_dir, sent)
        return count


def read_sent(run_dir: Path) -> dict[str, list[str]]:
    """``{endpoint: [trace ids]}`` already accepted by each endpoint; {} when missing, unreadable or another format."""
    data = read_json_object(Path(run_dir) / SENT_FILE)
    if not data or data.get("format") != SENT_FORMAT or not isinstance(data.get("endpoints"), dict):
        return {}
    return {str(k): [str(i) for i in v] for k, v in data["endpoints"].items() if isinstance(v, list)}


def write_sent(run_dir: Path, sent: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / SENT_FILE, {"format": SENT_FORMAT, "endpoints": sent})

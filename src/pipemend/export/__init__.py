"""Sending a run to the tools a team already uses.

    otlp.py           a run's evaluations as OTLP/JSON ``ExportTraceServiceRequest`` dicts: one trace per example
                      and candidate, a span per step, a ``chat {model}`` span per LLM call (GenAI conventions),
                      the score as a ``gen_ai.evaluation.result`` event (``evaluation_request``, ``run_requests``)
    otlp_push.py      OTLP/HTTP: ``post_traces`` (JSON, or protobuf with opentelemetry-proto),
                      ``otlp_headers_from_env`` (``OTEL_EXPORTER_OTLP_HEADERS``)
    otlp_observer.py  ``OtlpObserver``: ``optimize --otlp-endpoint`` streams each candidate as it is judged
                      (what was sent: ``RUN_DIR/observers/otlp/sent.json``)

``pipemend export RUN --otlp FILE.jsonl [--otlp-endpoint URL]`` (``cli/export.py``) drives them for a finished run.
"""

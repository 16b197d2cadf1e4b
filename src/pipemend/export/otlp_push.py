"""OTLP/HTTP: POST an ``ExportTraceServiceRequest`` to a collector's traces URL (``http://host:4318/v1/traces``).

JSON (``application/json``, the request as ``export/otlp.py`` builds it) needs nothing beyond the standard library.
Protobuf (``application/x-protobuf``) needs ``opentelemetry-proto`` (``pip install 'pipemend[otlp]'``); MLflow's
``/v1/traces`` accepts only protobuf (it refuses any other content type with a 400). Headers come from the caller
and, for the CLI and ``optimize``, from ``OTEL_EXPORTER_OTLP_HEADERS`` / ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``
(``otlp_headers_from_env``).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from .. import __version__
from ..errors import ExportFailed, UsageError

Encoding = Literal["json", "protobuf"]
ENCODINGS: tuple[str, ...] = ("json", "protobuf")
CONTENT_TYPES = {"json": "application/json", "protobuf": "application/x-protobuf"}
HEADER_VARS = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
"""Read in this order: the traces-only variable overrides the general one, key by key (the OTLP exporter spec)."""
BODY_HEAD = 300
"""How much of a refusing collector's answer an error quotes."""
ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def otlp_headers_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers from ``OTEL_EXPORTER_OTLP_HEADERS`` then ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``: ``k=v,k2=v2``,
    keys and values URL-decoded and stripped; an entry without ``=`` or with an empty key is skipped."""
    env = os.environ if environ is None else environ
    headers: dict[str, str] = {}
    for var in HEADER_VARS:
        for item in (env.get(var) or "").split(","):
            key, sep, value = item.partition("=")
            key = unquote(key).strip()
            if sep and key:
                headers[key] = unquote(value).strip()
    return headers


PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
PROTOCOLS: dict[str, Encoding] = {"http/json": "json", "http/protobuf": "protobuf"}


def otlp_encoding_from_env(environ: Mapping[str, str] | None = None) -> Encoding:
    """The encoding ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (else ``OTEL_EXPORTER_OTLP_PROTOCOL``) names:
    ``http/json`` or ``http/protobuf``; JSON when neither is set. ``grpc`` or anything else is a UsageError."""
    env = os.environ if environ is None else environ
    for var in PROTOCOL_VARS:
        value = (env.get(var) or "").strip()
        if value:
            if value not in PROTOCOLS:
                raise UsageError(f"{var}={value!r}: pipemend sends OTLP over HTTP; expected one of {', '.join(PROTOCOLS)}")
            return PROTOCOLS[value]
    return "json"


def check_url(url: str) -> str:
    """An http(s) URL with a host, else a UsageError naming it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"OTLP endpoint {url!r}: expected an http:// or https:// URL such as http://localhost:4318/v1/traces")
    return url


def to_protobuf(request: dict[str, Any]) -> bytes:
    """The request in OTLP's protobuf encoding (needs ``opentelemetry-proto``): hex ids become bytes."""
    try:
        from google.protobuf.json_format import ParseDict
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    except ImportError:
        raise UsageError("OTLP protobuf encoding needs the opentelemetry-proto package: "
                         "pip install 'pipemend[otlp]' (or use the JSON encoding)") from None
    return ParseDict(_ids_as_bytes(request), ExportTraceServiceRequest()).SerializeToString()


def _ids_as_bytes(request: dict[str, Any]) -> dict[str, Any]:
    """A copy of the request whose hex ids are bytes as protobuf's JSON mapping spells them (base64)."""

    def convert(span: dict[str, Any]) -> dict[str, Any]:
        out = dict(span)
        for key in ID_FIELDS:
            if isinstance(out.get(key), str):
                out[key] = base64.b64encode(bytes.fromhex(out[key])).decode()
        if isinstance(out.get("links"), list):
            out["links"] = [convert(link) for link in out["links"]]
        return out

    return {"resourceSpans": [
        {**rs, "scopeSpans": [{**ss, "spans": [convert(s) for s in ss.get("spans") or []]}
                              for ss in rs.get("scopeSpans") or []]}
        for rs in request.get("resourceSpans") or []]}


def encode(request: dict[str, Any], encoding: Encoding) -> bytes:
    if encoding == "json":
        return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()
    if encoding == "protobuf":
        return to_protobuf(request)
    raise UsageError(f"OTLP encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")


def post_traces(url: str, request: dict, *, headers: Mapping[str, str] | None = None,
                encoding: Literal["json", "protobuf"] = "json", timeout_s: float = 10.0) -> None:
    """POST one ``ExportTraceServiceRequest`` to an OTLP/HTTP traces URL. A refusal (an HTTP error, a partial
    success that rejected spans) or an unreachable collector is an ``ExportFailed`` naming the URL and what the
    collector answered; a bad URL or encoding is a ``UsageError``."""
    check_url(url)
    body = encode(request, encoding)
    sent = {"Content-Type": CONTENT_TYPES[encoding], "User-Agent": f"pipemend/{__version__}", **(headers or {})}
    req = urllib.request.Request(url, data=body, method="POST", headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            answer = resp.read(1024 * 1024)
            ctype = resp.headers.get("Content-Type") or ""
    except urllib.error.HTTPError as e:
        raise ExportFailed(f"OTLP export to {url} refused: HTTP {e.code} {e.reason}: {_head(_read(e))}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ExportFailed(f"OTLP export to {url} failed: {reason}") from None
    rejected = _rejected(answer, ctype)
    if rejected:
        raise ExportFailed(f"OTLP export to {url}: the collector rejected {rejected}")


def _read(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read(BODY_HEAD * 4)
    except OSError:
        return b""


def _head(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return (text[:BODY_HEAD] + "…") if len(text) > BODY_HEAD else (text or "(empty body)")


def _rejected(answer: bytes, ctype: str) -> str | None:
    """What a JSON ``ExportTraceServiceResponse``'s ``partialSuccess`` rejected, or None."""
    if "json" not in ctype or not answer.strip():
        return None
    try:
        partial = (json.loads(answer) or {}).get("partialSuccess") or {}
        count = int(partial.get("rejectedSpans") or 0)
    except (ValueError, AttributeError, TypeError):
        return None
    if count <= 0:
        return None
    return f"{count} span(s): {_head(str(partial.get('errorMessage') or '').encode())}"

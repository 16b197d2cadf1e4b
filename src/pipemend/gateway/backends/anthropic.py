"""``claude-*``: forwards to the Anthropic API with the key the gateway holds.

The key comes from the gateway (``ANTHROPIC_API_KEY`` at start, or a key
file); pipelines in a sandbox only ever see a dummy. Retries 429, 5xx and
connection failures with exponential backoff (honouring ``retry-after``).
The key never appears in a log line, an error message or the call log.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import httpx

from .base import BackendError, forward_headers

log = logging.getLogger("pipemend.gateway")

DEFAULT_UPSTREAM = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504, 529}


class AnthropicBackend:
    cache_namespace = "anthropic-1"
    deterministic = False

    def __init__(
        self,
        api_key: str | None,
        *,
        upstream_url: str | None = None,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
    ):
        self.name = "anthropic"
        self._key = api_key
        self.upstream_url = (upstream_url or os.environ.get("ANTHROPIC_UPSTREAM_URL") or DEFAULT_UPSTREAM).rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.calls = 0
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def __repr__(self) -> str:  # never show the key
        return f"AnthropicBackend(upstream_url={self.upstream_url!r}, key={'set' if self._key else 'missing'})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self._key:
            raise BackendError(
                401,
                "the gateway holds no Anthropic API key: set ANTHROPIC_API_KEY before starting it, "
                "or give it a key file (api_key_file)",
                "authentication_error",
            )
        self.calls += 1
        body = {k: v for k, v in request.items() if k != "stream"}
        extra = forward_headers.get()
        headers = {
            "x-api-key": self._key,
            "anthropic-version": extra.get("anthropic-version", API_VERSION),
            "content-type": "application/json",
        }
        if "anthropic-beta" in extra:
            headers["anthropic-beta"] = extra["anthropic-beta"]
        url = f"{self.upstream_url}/v1/messages"
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                resp = self._client.post(url, json=body, headers=headers)
            except httpx.HTTPError as e:
                if last:
                    raise BackendError(502, f"Anthropic API unreachable at {self.upstream_url}: {self._scrub(str(e))}")
                self._sleep(attempt, None, f"connection error ({type(e).__name__})")
                continue
            if resp.status_code == 200:
                try:
                    return resp.json()
                except ValueError:
                    raise BackendError(502, "Anthropic API answered 200 with a body that is not JSON")
            if resp.status_code in RETRY_STATUSES and not last:
                self._sleep(attempt, resp.headers.get("retry-after"), f"HTTP {resp.status_code}")
                continue
            raise self._error(resp)
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: str | None, why: str) -> None:
        delay = self.backoff_s * (2**attempt)
        if retry_after:
            try:
                delay = min(float(retry_after), 60.0)
            except ValueError:
                pass
        log.warning("anthropic upstream: %s; retry %d/%d in %.2fs", why, attempt + 1, self.max_retries, delay)
        time.sleep(delay)

    def _error(self, resp: httpx.Response) -> BackendError:
        message, kind = f"Anthropic API answered HTTP {resp.status_code}", None
        try:
            err = resp.json().get("error") or {}
            message += f": {err.get('message', '')}"
            kind = err.get("type")
        except (ValueError, AttributeError):
            message += f": {resp.text[:300]}"
        return BackendError(resp.status_code, self._scrub(message), kind)

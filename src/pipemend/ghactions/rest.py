"""A small GitHub REST client on ``urllib``: JSON in and out, bounded reads, errors that say what failed.

Only what ``pipemend ci`` calls: repository, collaborator permission, pulls, issue comments, refs.
``api_url`` is ``$GITHUB_API_URL`` (``https://api.github.com``, or ``https://HOST/api/v3`` on
GitHub Enterprise Server).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator

from ..errors import RunFailed, UsageError

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
PAGE_SIZE = 100
MAX_PAGES = 50
API_VERSION = "2022-11-28"


class GitHubError(RunFailed):
    """A REST call answered with an error status (or not at all)."""

    def __init__(self, method: str, path: str, status: int | None, message: str, errors: list[Any] | None = None):
        self.method, self.path, self.status, self.message = method, path, status, message
        self.errors = errors or []
        where = f"GitHub API {method} {path}"
        super().__init__(f"{where}: {status} {message}" if status is not None else f"{where}: {message}")

    def mentions(self, text: str) -> bool:
        """Whether the message or one of the validation errors contains ``text`` (case-insensitive)."""
        blob = (self.message + " " + json.dumps(self.errors)).lower()
        return text.lower() in blob


class GitHubClient:
    """``request(method, path, body=None, query=None)`` → the decoded JSON (None for 204)."""

    def __init__(self, api_url: str, token: str | None, *, timeout_s: float = 30.0):
        parsed = urllib.parse.urlsplit(api_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"$GITHUB_API_URL={api_url!r}: expected an http(s) URL")
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with /")
        url = self.api_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION,
                   "User-Agent": "pipemend-ci"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - http(s) checked above
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
        except urllib.error.HTTPError as e:
            raw = e.read(MAX_RESPONSE_BYTES)
            message, errors = _error_text(raw, e.reason)
            raise GitHubError(method, path, e.code, message, errors) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise GitHubError(method, path, None, f"cannot reach {self.api_url} ({reason})") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise GitHubError(method, path, status, f"response larger than {MAX_RESPONSE_BYTES} bytes")
        if status == 204 or not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise GitHubError(method, path, status, "response is not JSON") from None

    def paginate(self, path: str, query: dict[str, Any] | None = None) -> Iterator[Any]:
        """Every item of a list endpoint, page by page (``per_page=100``) until a short page."""
        for page in range(1, MAX_PAGES + 1):
            items = self.request("GET", path, query={**(query or {}), "per_page": PAGE_SIZE, "page": page})
            if not isinstance(items, list):
                raise GitHubError("GET", path, 200, "expected a JSON list")
            yield from items
            if len(items) < PAGE_SIZE:
                return

    # ------------------------------------------------------------------ the calls pipemend makes

    def repository(self, repo: str) -> dict[str, Any]:
        return self.request("GET", f"/repos/{repo}")

    def permission(self, repo: str, user: str) -> dict[str, Any]:
        return self.request("GET", f"/repos/{repo}/collaborators/{_seg(user)}/permission")

    def pull(self, repo: str, number: int) -> dict[str, Any]:
        return self.request("GET", f"/repos/{repo}/pulls/{int(number)}")

    def open_pulls(self, repo: str, head: str) -> list[dict[str, Any]]:
        """Open PRs whose head is ``owner:branch``."""
        return list(self.paginate(f"/repos/{repo}/pulls", {"state": "open", "head": head}))

    def create_pull(self, repo: str, **fields: Any) -> dict[str, Any]:
        return self.request("POST", f"/repos/{repo}/pulls", fields)

    def update_pull(self, repo: str, number: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/repos/{repo}/pulls/{int(number)}", fields)

    def comments(self, repo: str, issue: int) -> list[dict[str, Any]]:
        return list(self.paginate(f"/repos/{repo}/issues/{int(issue)}/comments"))

    def create_comment(self, repo: str, issue: int, body: str) -> dict[str, Any]:
        return self.request("POST", f"/repos/{repo}/issues/{int(issue)}/comments", {"body": body})

    def update_comment(self, repo: str, comment_id: int, body: str) -> dict[str, Any]:
        return self.request("PATCH", f"/repos/{repo}/issues/comments/{int(comment_id)}", {"body": body})

    def delete_branch(self, repo: str, branch: str) -> None:
        self.request("DELETE", f"/repos/{repo}/git/refs/heads/{urllib.parse.quote(branch, safe='/')}")


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _error_text(raw: bytes, reason: Any) -> tuple[str, list[Any]]:
    try:
        data = json.loads(raw)
    except ValueError:
        return (raw.decode("utf-8", "replace").strip()[:500] or str(reason)), []
    if not isinstance(data, dict):
        return str(reason), []
    message = str(data.get("message") or reason)
    errors = data.get("errors") if isinstance(data.get("errors"), list) else []
    if data.get("documentation_url"):
        message += f" (see {data['documentation_url']})"
    return message, errors

"""``pipemend ci publish ARTIFACT``: the job with write access. It turns the optimize job's artifact into
a pull request, and trusts the artifact no further than its shape.

- improved: the best patch is applied onto the checked-out default branch in a throw-away worktree (a
  patch touching ``.github/workflows`` is refused), committed, and force-pushed to ``pipemend/<target>``;
  a draft PR is opened against the default branch, or the open one updated (create, then update on 422
  "already exists"); its body is ``report.md`` cut to GitHub's 65,536 characters with a link to the
  artifact; one sticky comment (found by a hidden marker) says which run updated it.
- no-improvement: the PR pipemend opened before is closed with a word why, and its branch deleted.
- failed: a failure comment on the issue the command came from, or else on the target's open PR; exit 1.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunFailed, UsageError
from ..fsutil import read_regular
from .artifact import PATCH, REPORT, CiResult, read_result
from .env import ActionsEnv, append_summary, write_outputs
from .gitcmd import git
from .optimize_job import outputs
from .rest import GitHubClient, GitHubError

BODY_LIMIT = 65_536
"""GitHub refuses a PR body or comment longer than this many characters."""
FORBIDDEN_PREFIX = ".github/workflows/"
BOT_IDENTITY = ("-c", "user.name=pipemend", "-c", "user.email=pipemend@users.noreply.github.com",
                "-c", "commit.gpgsign=false")


@dataclass(frozen=True)
class PublishJob:
    artifact_dir: Path
    repo_root: Path
    remote: str = "origin"
    artifact_url: str | None = None
    """Where the full artifact can be downloaded (upload-artifact's ``artifact-url``); default the run page."""


@dataclass
class Published:
    conclusion: str
    pr_url: str = ""
    exit_code: int = 0


def sticky_marker(target: str | None) -> str:
    return f"<!-- pipemend:ci:sticky {target or ''} -->"


def pr_marker(target: str | None) -> str:
    return f"<!-- pipemend:ci:pr {target or ''} -->"


def ci_publish(env: ActionsEnv, job: PublishJob, client: GitHubClient) -> Published:
    """Publish the artifact; writes the outputs and the Step Summary. Errors of the GitHub API or git end
    as ``conclusion: failed`` (exit 1) with the reason in the summary."""
    result = read_result(job.artifact_dir)
    if result.repository != env.repository:
        raise UsageError(f"{job.artifact_dir}: the artifact is for {result.repository}, not {env.repository}")
    try:
        done = _publish(env, job, client, result)
    except (RunFailed, UsageError) as e:
        append_summary(env, f"## pipemend: publishing failed\n\n> {e}\n")
        done = Published("failed", exit_code=1)
        _note_failure(env, client, result, f"publishing failed: {e}")
    write_outputs(env, outputs(result.model_copy(update={"conclusion": done.conclusion}), done.pr_url))
    return done


def _publish(env: ActionsEnv, job: PublishJob, client: GitHubClient, result: CiResult) -> Published:
    link = job.artifact_url or env.run_url
    if result.conclusion == "skipped":
        append_summary(env, f"## pipemend: nothing to publish\n\n> {result.error or 'no command'}\n")
        return Published("skipped")
    if result.conclusion == "failed":
        what = "refused" if result.refused else "failed"
        _note_failure(env, client, result, f"{what}: {result.error or 'unknown error'}")
        append_summary(env, f"## pipemend: the run {what}\n\n> {result.error}\n\nNothing was published.")
        return Published("failed", exit_code=1)
    if not result.target or not result.branch:
        raise UsageError(f"{job.artifact_dir}: ci.json names no target or branch")
    git(job.repo_root, "check-ref-format", f"refs/heads/{result.branch}")
    pr = find_pr(env, client, result)
    if result.conclusion == "no-improvement":
        return _withdraw(env, client, result, pr, link)
    return _propose(env, job, client, result, pr, link)


def find_pr(env: ActionsEnv, client: GitHubClient, result: CiResult) -> dict[str, Any] | None:
    """The open PR pipemend opened from the target's branch (its body carries the hidden marker)."""
    for pr in client.open_pulls(env.repository, f"{env.owner}:{result.branch}"):
        if (pr.get("head") or {}).get("ref") == result.branch and pr_marker(result.target) in (pr.get("body") or ""):
            return pr
    return None


def _propose(env: ActionsEnv, job: PublishJob, client: GitHubClient, result: CiResult,
             pr: dict[str, Any] | None, link: str) -> Published:
    sha = push_patch(job, result)
    report = read_regular(job.artifact_dir / REPORT)
    body = pr_body(report.decode("utf-8", "replace") if report else "(report.md missing from the artifact)",
                   link, result.target or "")
    title = f"pipemend: {result.target}" + (f" (val {result.best_delta:+.4f})" if result.best_delta is not None else "")
    default_branch = client.repository(env.repository).get("default_branch")
    if not isinstance(default_branch, str) or not default_branch:
        raise RunFailed(f"GitHub API GET /repos/{env.repository}: no default_branch in the answer")
    if pr is None:
        try:
            pr = client.create_pull(env.repository, title=title, head=result.branch, base=default_branch,
                                    body=body, draft=True)
        except GitHubError as e:
            if e.status != 422 or not e.mentions("already exists"):
                raise
            pr = next((p for p in client.open_pulls(env.repository, f"{env.owner}:{result.branch}")), None)
            if pr is None:
                raise
            pr = client.update_pull(env.repository, pr["number"], title=title, body=body)
    else:
        pr = client.update_pull(env.repository, pr["number"], title=title, body=body)
    url = str(pr.get("html_url") or "")
    upsert_sticky(client, env.repository, int(pr["number"]), result.target,
                  f"Run `{result.run_id}` ([workflow run]({env.run_url})) force-pushed `{result.branch}` to "
                  f"`{sha[:12]}`: val {_delta(result.best_delta)}, test {_delta(result.test_delta)}. "
                  f"[Full report and run directory]({link}).")
    if result.issue is not None and result.issue != pr.get("number"):
        client.create_comment(env.repository, result.issue, f"pipemend improved `{result.target}`: {url}")
    append_summary(env, f"## pipemend: draft PR {url}\n\nBranch `{result.branch}` at `{sha[:12]}`, "
                        f"val {_delta(result.best_delta)}, test {_delta(result.test_delta)}.")
    return Published("improved", pr_url=url)


def _withdraw(env: ActionsEnv, client: GitHubClient, result: CiResult, pr: dict[str, Any] | None, link: str) -> Published:
    why = f"run `{result.run_id}` accepted no candidate ([report]({link}))"
    if pr is not None:
        upsert_sticky(client, env.repository, int(pr["number"]), result.target,
                      f"Closed: {why}, so this change is no longer proposed.")
        client.update_pull(env.repository, pr["number"], state="closed")
        try:
            client.delete_branch(env.repository, result.branch or "")
        except GitHubError as e:
            if e.status not in (404, 422):  # already gone
                raise
        said = f"Closed {pr.get('html_url')} and deleted `{result.branch}`."
    else:
        said = "No pipemend PR was open for this target; nothing to close."
    if result.issue is not None:
        client.create_comment(env.repository, result.issue, f"pipemend: {why}. {said}")
    append_summary(env, f"## pipemend: no improvement for `{result.target}`\n\nThe {why}. {said}")
    return Published("no-improvement")


def _note_failure(env: ActionsEnv, client: GitHubClient, result: CiResult, text: str) -> None:
    """Say it where the asker looks: the command's issue, or else the target's open PR (sticky)."""
    body = f"pipemend {text}\n\n[Workflow run]({env.run_url})"
    try:
        if result.issue is not None:
            client.create_comment(env.repository, result.issue, body[:BODY_LIMIT])
        elif result.target and result.branch:
            pr = find_pr(env, client, result)
            if pr is not None:
                upsert_sticky(client, env.repository, int(pr["number"]), result.target, body)
    except GitHubError as e:
        append_summary(env, f"(could not post the failure comment: {e})")


def upsert_sticky(client: GitHubClient, repo: str, issue: int, target: str | None, text: str) -> dict[str, Any]:
    """Create or update the one comment carrying the target's hidden marker."""
    marker = sticky_marker(target)
    body = (marker + "\n" + text)[:BODY_LIMIT]
    for comment in client.comments(repo, issue):
        if marker in (comment.get("body") or ""):
            return client.update_comment(repo, int(comment["id"]), body)
    return client.create_comment(repo, issue, body)


def pr_body(report: str, link: str, target: str) -> str:
    """``report.md`` cut so that the whole body, marker and link included, fits GitHub's limit."""
    footer = f"\n\n---\nFull report, run directory and patch: {link}\n{pr_marker(target)}\n"
    cut_note = "\n\n… (report cut to fit GitHub's limit; the full report is in the artifact)"
    room = BODY_LIMIT - len(footer)
    if len(report) > room:
        report = report[: room - len(cut_note)] + cut_note
    return report + footer


def push_patch(job: PublishJob, result: CiResult) -> str:
    """Apply ``best.patch`` onto HEAD in a throw-away worktree, refuse workflow files, commit, force-push
    to ``refs/heads/<branch>`` on the remote; returns the pushed commit."""
    patch = job.artifact_dir / PATCH
    if read_regular(patch) is None:
        raise UsageError(f"{patch}: missing or not a regular file, but ci.json says improved")
    tmp = Path(tempfile.mkdtemp(prefix="pipemend-publish-"))
    work = tmp / "work"
    git(job.repo_root, "worktree", "add", "-q", "--detach", str(work), "HEAD")
    try:
        git(work, "apply", "--index", "--binary", str(patch.resolve()))
        changes = staged_changes(work)
        names = list(changes)
        touched = [n for n in names if n.lower().startswith(FORBIDDEN_PREFIX)]
        if touched:
            raise RunFailed(f"the patch touches {', '.join(touched)}: pipemend never writes under .github/workflows")
        odd = [n for n, mode in changes.items() if mode in ("120000", "160000")]
        if odd:
            raise RunFailed(f"the patch makes {', '.join(odd)} a symbolic link or submodule: refused")
        if not names:
            raise RunFailed("the patch changes nothing on the default branch (already merged?)")
        message = (f"pipemend: {result.target}, val {_delta(result.best_delta)}\n\n"
                   f"Optimize run {result.run_id} ({result.workflow_run_url}).")
        git(work, *BOT_IDENTITY, "commit", "-q", "--no-verify", "-m", message)
        sha = git(work, "rev-parse", "HEAD").strip()
        git(job.repo_root, "push", "-q", "--force", job.remote, f"{sha}:refs/heads/{result.branch}")
        return sha
    finally:
        git(job.repo_root, "worktree", "remove", "--force", str(work))
        shutil.rmtree(tmp, ignore_errors=True)


def staged_changes(work: Path) -> dict[str, str]:
    """Every staged path with its new mode (``git diff --cached --raw -z``; ``000000`` for a deletion)."""
    fields = git(work, "diff", "--cached", "--raw", "-z", "--no-renames").split("\0")
    out: dict[str, str] = {}
    for meta, path in zip(fields[0::2], fields[1::2]):
        if meta.startswith(":"):
            out[path] = meta[1:].split()[1]
    return out


def _delta(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"

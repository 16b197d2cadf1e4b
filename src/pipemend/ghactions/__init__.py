"""``pipemend ci``: pipemend on demand in GitHub Actions (no typer or rich here; ``cli/ci.py`` presents it).

    env.py           the GITHUB_* environment; $GITHUB_OUTPUT (multiline-safe) and the Step Summary
    rest.py          a small GitHub REST client on urllib
    request.py       the event's request: dispatch inputs, schedule, the /pipemend optimize comment (writers only)
    optimize_job.py  the read-only job: run or resume within the job's deadline, write the artifact
    artifact.py      ci.json and the artifact's files
    publish.py       the write job: branch pipemend/<target>, draft PR, sticky comment, close when nothing won
    gitcmd.py        git as a subprocess
"""

from __future__ import annotations

from .artifact import CiResult, publish_branch, read_result
from .env import ActionsEnv, output_block, read_env
from .optimize_job import OptimizeJob, ci_optimize, default_deadline
from .publish import PublishJob, Published, ci_publish
from .request import Caps, CiRequest, parse_command
from .rest import GitHubClient, GitHubError

__all__ = ["ActionsEnv", "Caps", "CiRequest", "CiResult", "GitHubClient", "GitHubError", "OptimizeJob",
           "PublishJob", "Published", "ci_optimize", "ci_publish", "default_deadline", "output_block",
           "parse_command", "publish_branch", "read_env", "read_result"]

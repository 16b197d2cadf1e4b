"""A target's prompt files in MLflow's prompt registry, one version per text, tagged with the git commit.

Which files are prompts: the editable files (``editable`` globs of the frozen manifest) that the proposers
treat as prompt templates (``proposers.transforms.is_prompt_file``: ``prompts/…``, ``*.j2``, ``*.txt``, …),
never a protected or sealed one. Their text is read from the run's snapshot repo at the commit (a git blob,
never a file a candidate left on disk): regular blobs only (no links), UTF-8, at most ``MAX_PROMPT_BYTES``.

Registering is idempotent: a prompt version already tagged with the commit is reused, and so is the latest
version when its text is the same (a resumed run, or a later run of an unchanged prompt), so a prompt's
versions are its distinct texts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from pathlib import PurePosixPath

import git
from mlflow import MlflowClient
from mlflow.entities.model_registry import PromptVersion
from mlflow.prompt.constants import PROMPT_EXPERIMENT_IDS_TAG_KEY

from ..globs import matches_any
from ..manifest import Manifest
from ..proposers.transforms import is_prompt_file
from ..sandbox.worktrees import Snapshot

MAX_PROMPT_BYTES = 256 * 1024
"""A bigger file is not a prompt template worth versioning (and a candidate could make one huge)."""
MAX_PROMPTS = 50
"""Prompt files registered per commit at most."""
TAG_SHA = "pipemend.git_sha"
TAG_PATH = "pipemend.path"
_LINK_MODE = 0o120000
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def prompt_name(target_name: str, rel: str) -> str:
    """The registry name of target-relative ``rel``: ``<target>.<path with dots>`` in MLflow's name charset."""
    return _NAME_CHARS.sub("_", f"{target_name}.{rel.replace('/', '.')}")


def prompt_files(snap: Snapshot, sha: str, manifest: Manifest, sealed: Collection[str],
                 only: Collection[str] | None = None) -> dict[str, str]:
    """Target-relative path -> text of the prompt files at commit ``sha`` (``only``: these paths, if prompts)."""
    commit = git.Repo(snap.repo).commit(sha)
    tree = commit.tree / snap.target_subdir if snap.target_subdir else commit.tree
    protected = manifest.all_protected()
    sealed = set(sealed)
    out: dict[str, str] = {}
    for item in tree.traverse():
        if item.type != "blob" or item.mode == _LINK_MODE or item.size > MAX_PROMPT_BYTES:
            continue
        rel = str(PurePosixPath(item.path).relative_to(snap.target_subdir)) if snap.target_subdir else item.path
        if (only is not None and rel not in only) or rel in sealed or not is_prompt_file(rel) \
                or not matches_any(rel, manifest.editable) or matches_any(rel, protected):
            continue
        try:
            out[rel] = item.data_stream.read().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(out) >= MAX_PROMPTS:
            break
    return out


def register(client: MlflowClient, name: str, text: str, *, sha: str, rel: str, message: str,
             tags: dict[str, str], experiment_id: str) -> PromptVersion:
    """The prompt version of ``text`` under ``name``: found (tagged with ``sha``, or the latest with the same
    text) or registered with the version tags ``pipemend.git_sha`` = ``sha``, ``pipemend.path`` and ``tags``."""
    existing = client.get_prompt(name)
    if existing is not None:
        versions = list(client.search_prompt_versions(name, max_results=1000))
        for v in versions:
            if v.tags.get(TAG_SHA) == sha and v.template == text:
                return v
        latest = max(versions, key=lambda v: int(v.version), default=None)
        if latest is not None and latest.template == text:
            return latest
    version = client.register_prompt(name, text, commit_message=message[:500],
                                     tags={**tags, TAG_SHA: sha, TAG_PATH: rel})
    wait_linked(client, name, experiment_id)
    return version


def linked(client: MlflowClient, name: str, experiment_id: str) -> bool:
    prompt = client.get_prompt(name)
    tag = prompt.tags.get(PROMPT_EXPERIMENT_IDS_TAG_KEY, "") if prompt else ""
    return experiment_id in tag.strip(",").split(",")


def wait_linked(client: MlflowClient, name: str, experiment_id: str, timeout_s: float = 10.0) -> None:
    """``register_prompt`` lists a new version in the Prompts tab of the active experiment (``mlflow.set_experiment``,
    which the observer sets), in a thread of its own: wait for it, else link it here."""
    deadline = time.monotonic() + timeout_s
    while not linked(client, name, experiment_id):
        if time.monotonic() > deadline:
            prompt = client.get_prompt(name)
            current = (prompt.tags.get(PROMPT_EXPERIMENT_IDS_TAG_KEY, "") if prompt else "").strip(",")
            ids = [i for i in current.split(",") if i] + [experiment_id]
            client.set_prompt_tag(name, PROMPT_EXPERIMENT_IDS_TAG_KEY, "," + ",".join(ids) + ",")
            return
        time.sleep(0.1)

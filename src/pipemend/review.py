"""Review a run's candidates and bring a kept change into the user's own branch.

``list_candidates`` reads the run directory (journal + verdicts). ``apply_candidate``
applies one accepted candidate's change (its diff relative to its parent
commit), or with ``"best"`` all the run's accepted changes (the diff from the
run's base snapshot to the best candidate), as ONE new commit:

- Target inside a git repo: the candidate commits live in that repo. The
  user's working tree must be clean (no staged or unstaged change to a tracked
  file; untracked files are left alone). The change is cherry-picked onto the
  current branch (or onto ``onto``, checked out first) in a temporary
  worktree, so a conflict is found without touching the user's tree; only a
  clean result becomes a commit, and the user's branch is fast-forwarded to
  it (``git merge --ff-only``). A conflict or any refusal changes nothing:
  same HEAD, same branch, same index, same files.
- Target outside any repo (the run snapshotted it into ``RUN_DIR/repo``):
  there is no branch to commit on, so the changed files' new contents are
  written into the target folder (deleted files removed). The "dirty" and
  "conflict" check is per file: every file the change touches must still
  hold exactly its content at the change's parent; if any differs (the user
  edited it since the run started) nothing is written. Returns the applied
  candidate commit's sha.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import git

from .errors import UsageError
from .fsutil import atomic_write_bytes, read_json
from .journal import replay
from .report.load import branch_of, candidate_numbers, first_line, journal_state, load_candidate, resolve_run_dir
from .rundir import read_run
from .sandbox.worktrees import Snapshot, _git

__all__ = ["list_candidates", "apply_candidate", "parse_candidate"]


def list_candidates(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every candidate of the run: n, verdict, val score, delta, ci, branch or ref, sha, title, reasons."""
    run_dir = resolve_run_dir(run_dir)
    st = journal_state(run_dir)
    out = []
    for n in candidate_numbers(run_dir, st):
        c = load_candidate(run_dir, n, st)
        out.append({"n": n, "verdict": c["status"], "accepted": c["accepted"], "val_score": c["val_score"],
                    "delta": c["delta"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
                    "regressions": len(c["regressions"]), "branch": c["branch"], "ref": c["ref"], "sha": c["sha"],
                    "title": c["title"], "reasons": c["reasons"], "why": c.get("why")})
    return out


def parse_candidate(value: str | int) -> int | str:
    """``"best"``, ``3``, ``"3"`` or ``"cand-3"`` -> ``"best"`` or 3."""
    if isinstance(value, int):
        return value
    v = str(value).strip().lower()
    if v == "best":
        return "best"
    v = v.removeprefix("cand-")
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise UsageError(f"candidate {value!r}: expected a candidate number (e.g. 3 or cand-3) or 'best'")


def _snapshot(run_dir: Path) -> Snapshot:
    st = replay(run_dir)
    data = st.snapshot
    if data is None:
        run = read_json(run_dir / "run.json")
        data = run.get("snapshot") or (run.get("config") or {}).get("snapshot")
    if not data and (run_dir / "snapshot.json").is_file():
        data = read_json(run_dir / "snapshot.json")
    if not data:
        raise UsageError(f"{run_dir}: the run has no snapshot yet (it stopped before making its base branch)")
    snap = Snapshot.from_json(data)
    if not Path(snap.repo).exists():
        raise UsageError(f"{snap.repo}: the run's git repo is gone")
    return snap


def _pick(run_dir: Path, candidate: int | str) -> tuple[list[int], str, str]:
    """(accepted candidate numbers applied, parent sha or '' for the candidate's own parent, candidate sha)."""
    st = replay(run_dir)
    which = parse_candidate(candidate)
    if which == "best":
        if st.best is None:
            raise UsageError(f"{run_dir}: no candidate was accepted in this run; nothing to apply")
        if not st.base_sha or not st.best.sha:
            raise UsageError(f"{run_dir}: the journal lacks the base or best commit")
        return [c.n for c in st.accepted], st.base_sha, st.best.sha
    rec = st.candidates.get(which)
    if rec is None:
        known = ", ".join(str(n) for n in sorted(st.candidates)) or "none"
        raise UsageError(f"candidate {which}: not a finished candidate of {run_dir.name} (finished: {known})")
    if not rec.accepted:
        why = "; ".join(rec.reasons)[:300]
        raise UsageError(f"candidate {which} was rejected ({why}); only accepted changes are applied")
    if not rec.sha:
        raise UsageError(f"candidate {which}: no commit recorded")
    return [which], "", rec.sha


def _message(run_dir: Path, nums: list[int], cand_sha: str, best: bool) -> str:
    st = journal_state(run_dir)
    rows = [load_candidate(run_dir, n, st) for n in nums]
    last = rows[-1]
    run_id = run_dir.name
    if best and len(rows) > 1:
        head = f"pipemend: apply {run_id} best (candidates {', '.join(str(n) for n in nums)})"
    else:
        head = f"pipemend: apply {run_id} cand-{last['n']}: {last['title']}"
    lines = [head[:100], ""]
    for c in rows:
        ci = f", CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c["ci_low"] is not None and c["ci_high"] is not None else ""
        val = (f"val {c['base_mean']:.4f} -> {c['val_score']:.4f} (delta {c['delta']:+.4f}{ci})"
               if c["val_score"] is not None and c["base_mean"] is not None and c["delta"] is not None else "val: n/a")
        lines.append(f"cand-{c['n']}: {first_line(c['rationale'], 200) or '(no rationale)'}")
        lines.append(f"  {val}; branch {c['branch'] or c['ref'] or '-'}")
    lines += ["", f"Source: {'branch ' + branch_of(rows[-1]['ref']) if rows[-1]['ref'] else 'commit'} "
                  f"({cand_sha[:12]}) of pipemend run {run_id}."]
    return "\n".join(lines) + "\n"


def apply_candidate(run_dir: str | Path, candidate: int | str, onto: str | None = None) -> str:
    """Apply an accepted candidate (or ``"best"``) as one new commit; returns the new commit's sha.

    For a target outside any git repo the files are written into the target
    folder instead and the applied candidate commit's sha is returned (see the
    module docstring). Raises ``UsageError`` (changing nothing) on a dirty
    tree, a conflict, a rejected or unknown candidate, or a bad ``onto``.
    """
    run_dir = resolve_run_dir(run_dir)
    snap = _snapshot(run_dir)
    nums, parent, cand_sha = _pick(run_dir, candidate)
    best = parse_candidate(candidate) == "best"
    repo = Path(snap.repo)
    parent = parent or _git(repo, "rev-parse", f"{cand_sha}^")
    if _is_bare(repo):
        if onto:
            raise UsageError(f"--onto {onto}: the target was outside any git repo, so there is no branch to apply onto")
        return _apply_to_folder(run_dir, snap, parent, cand_sha)
    return _apply_in_repo(repo, parent, cand_sha, _message(run_dir, nums, cand_sha, best), onto)


def _is_bare(repo: Path) -> bool:
    return _git(repo, "rev-parse", "--is-bare-repository") == "true"


# --------------------------------------------------------------------------- the user's repo


def _dirty(repo: Path) -> list[str]:
    out = _git(repo, "status", "--porcelain=v1", "--untracked-files=no")
    return [line for line in out.splitlines() if line.strip()]


def _current_branch(repo: Path) -> str | None:
    try:
        return _git(repo, "symbolic-ref", "--quiet", "--short", "HEAD")
    except git.GitCommandError:
        return None  # detached


def _apply_in_repo(repo: Path, parent: str, cand_sha: str, message: str, onto: str | None) -> str:
    dirty = _dirty(repo)
    if dirty:
        raise UsageError(f"{repo}: the working tree has uncommitted changes ({', '.join(d[3:] for d in dirty[:5])}"
                         f"{' ...' if len(dirty) > 5 else ''}); commit or stash them, then apply again")
    start_branch = _current_branch(repo)
    start_head = _git(repo, "rev-parse", "HEAD")
    if onto:
        try:
            onto_sha = _git(repo, "rev-parse", "--verify", f"refs/heads/{onto}^{{commit}}")
        except git.GitCommandError:
            raise UsageError(f"--onto {onto}: no such branch in {repo}") from None
    else:
        onto_sha = start_head
    new_sha = _cherry_pick(repo, parent, cand_sha, onto_sha, message)
    switched = bool(onto) and onto != start_branch
    try:
        if switched:
            _git(repo, "checkout", "--quiet", onto)
        _git(repo, "merge", "--ff-only", "--quiet", new_sha)
    except git.GitCommandError as e:
        if switched:
            _git(repo, "checkout", "--quiet", start_branch or start_head)
        raise UsageError(f"{repo}: could not bring the change in: {_stderr(e)}; nothing was changed") from None
    return new_sha


def _cherry_pick(repo: Path, parent: str, cand_sha: str, onto_sha: str, message: str) -> str:
    """The commit of ``parent..cand_sha`` picked onto ``onto_sha``, made in a throwaway worktree."""
    with tempfile.TemporaryDirectory(prefix="pipemend-apply-") as tmp:
        wt = Path(tmp) / "wt"
        _git(repo, "worktree", "add", "--detach", "--quiet", str(wt), onto_sha)
        try:
            try:
                if _git(repo, "rev-parse", f"{cand_sha}^") == parent:
                    _git(wt, "cherry-pick", "--no-commit", cand_sha)
                else:
                    _git(wt, "cherry-pick", "--no-commit", f"{parent}..{cand_sha}")
            except git.GitCommandError as e:
                conflicted = _git(wt, "diff", "--name-only", "--diff-filter=U")
                files = ", ".join(conflicted.split()) or _stderr(e)
                raise UsageError(f"the change conflicts with {onto_sha[:12]} ({files}); nothing was changed") from None
            if not _git(wt, "diff", "--cached", "--name-only"):
                raise UsageError(f"the change is already in {onto_sha[:12]}; nothing to apply")
            _git(wt, "commit", "--quiet", "--no-verify", "-m", message)
            return _git(wt, "rev-parse", "HEAD")
        finally:
            try:
                _git(repo, "worktree", "remove", "--force", "--force", str(wt))
            except git.GitCommandError:
                pass
            _git(repo, "worktree", "prune")


def _stderr(e: git.GitCommandError) -> str:
    text = (e.stderr or str(e)).strip()
    return " ".join(text.replace("stderr:", "").split())[:400]


# --------------------------------------------------------------------------- a target outside any repo


def _apply_to_folder(run_dir: Path, snap: Snapshot, parent: str, cand_sha: str) -> str:
    target = Path(read_run(run_dir).get("target") or "")
    if not target.is_dir():
        raise UsageError(f"{target}: the run's target folder is gone")
    repo = Path(snap.repo)
    changes = _git(repo, "diff", "--name-status", "--no-renames", "-z", parent, cand_sha).split("\0")
    pairs = [(changes[i], changes[i + 1]) for i in range(0, len(changes) - 1, 2) if changes[i]]
    plan: list[tuple[Path, bytes | None]] = []
    conflicts: list[str] = []
    root = target.resolve()
    for status, rel in pairs:
        dest = (target / rel).resolve()
        if root not in dest.parents:
            raise UsageError(f"{rel}: outside the target folder; refusing to apply")
        old = None if status.startswith("A") else _blob(repo, parent, rel)
        current = dest.read_bytes() if dest.is_file() else None
        if current != old:
            conflicts.append(rel)
        plan.append((dest, None if status.startswith("D") else _blob(repo, cand_sha, rel)))
    if conflicts:
        raise UsageError(f"{target}: {', '.join(conflicts[:5])} changed since the run's snapshot "
                         f"(the target is not in git, so pipemend will not overwrite it); nothing was written")
    for dest, data in plan:
        if data is None:
            dest.unlink(missing_ok=True)
        else:
            atomic_write_bytes(dest, data)
    return cand_sha


def _blob(repo: Path, sha: str, rel: str) -> bytes:
    return git.Repo(repo).git.show(f"{sha}:{rel}", stdout_as_string=False, strip_newline_in_stdout=False)

"""``TrainBench``: what a proposer may run for one candidate, on train only (``ProposerTools`` serves it).

``run`` evaluates the candidate's worktree on train examples through the run's
one evaluation path (``candidates/<n>/train/<k>``); ``trace`` reads an example's
latest train trace (this candidate's runs first, then the base's train run);
``diagnose`` is the ladder on the latest run (the base's diagnosis before any);
``diff`` is the candidate commit against its base, as the gate will judge it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dataset import Example
from ..diagnose import diagnose_eval_dir
from ..errors import UsageError
from ..fsutil import read_json_object
from .env import RunEnv


@dataclass
class TrainBench:
    env: RunEnv
    n: int
    """The candidate."""
    worktree: Path
    base_sha: str
    base_train_dir: Path
    """The base's train evaluation (its traces answer ``trace`` before the candidate's first run)."""
    base_diagnosis: dict[str, Any]
    runs: list[tuple[Path, list[Example]]] = field(default_factory=list)
    """This candidate's train runs so far: (eval dir, examples)."""

    @property
    def train(self) -> list[Example]:
        return self.env.splits["train"]

    @property
    def by_id(self) -> dict[str, Example]:
        return {ex.id: ex for ex in self.train}

    def run(self, ids: list[str] | None) -> list[dict[str, Any]]:
        """Scored rows of the candidate on these train ids (all of train when None)."""
        by_id = self.by_id
        unknown = [i for i in ids or [] if i not in by_id]
        if unknown:
            raise UsageError(f"not train example ids: {', '.join(unknown[:5])}")
        exs = self.train if ids is None else [by_id[i] for i in ids]
        k = len(self.runs) + 1
        rel = f"candidates/{self.n}/train/{k}"
        rows = self.env.evaluate(f"cand-{self.n}-train-{k}", rel, self.base_sha, "train", worktree=self.worktree,
                                 diff=self.diff(), examples=exs, writable=True)
        self.runs.append((self.env.run_dir / rel, exs))
        return rows

    def trace(self, example_id: str) -> dict[str, Any] | None:
        if example_id not in self.by_id:
            return None
        for d in [r for r, _ in reversed(self.runs)] + [self.base_train_dir]:
            path = d / "traces" / f"{example_id}.json"
            if path.exists() or path.is_symlink():
                return read_json_object(path)  # written by a sandbox: a regular file, never through a link
        return None

    def diagnose(self) -> dict[str, Any]:
        if not self.runs:
            return self.base_diagnosis
        d, exs = self.runs[-1]
        return diagnose_eval_dir(d, exs).to_json()

    def diff(self) -> str:
        """The candidate as the gate will judge it: the diff of the commit ``build_candidate`` makes from the
        worktree, then every change it would leave out (each one rejects the candidate as it stands)."""
        tree = self.env.snap.build_candidate(self.worktree, self.base_sha,
                                             message=f"pipemend {self.env.run_id} cand-{self.n} (preview)\n",
                                             is_editable=self.env.is_editable, sealed=self.env.sealed_in_repo)
        if not tree.refusals:
            return tree.diff
        left_out = "".join(f"#   {r}\n" for r in tree.refusals)
        return f"{tree.diff}# left out of the candidate; as it stands the gate rejects it:\n{left_out}"

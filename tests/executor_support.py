"""Shared by the executor tests: sandbox jobs over `fixtures/targets/executor_toy`, and a folder its pipelines
(run as uid 65534 by the process sandbox when the tests run as root) may write their logs and markers in."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipemend.protocols import SandboxJob

TOY = Path(__file__).parent / "fixtures" / "targets" / "executor_toy"


def shared_dir() -> Path:
    """A fresh folder anyone may write (the pipeline's uid differs from the test's); the caller removes it."""
    d = Path(tempfile.mkdtemp(prefix="pipemend-executor-test-"))
    os.chmod(d, 0o777)
    return d


def toy_job(tmp: Path, rows: list[dict], *, concurrency: int = 1, example_timeout_s: float = 60.0,
            env: dict[str, str] | None = None) -> SandboxJob:
    """A job of `rows` (`{"id", **inputs}`) on a copy of the executor toy target; its out_dir is `tmp/out`."""
    target = tmp / "target"
    if not target.exists():
        shutil.copytree(TOY, target, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "out").mkdir(exist_ok=True)
    inputs = tmp / "out" / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": r["id"], "inputs": r}) + "\n" for r in rows))
    return SandboxJob(worktree=target, target_subdir="", entrypoint="pipeline:run", inputs_file=inputs,
                      out_dir=tmp / "out", gateway_url="http://127.0.0.1:9", gateway_socket=None, model="none",
                      concurrency=concurrency, example_timeout_s=example_timeout_s, env=env or {})


def ran(log: Path) -> list[str]:
    """The example ids the pipeline started, in order (one line each time)."""
    return log.read_text().split() if log.exists() else []

"""Shared test set-up.

Tests that need Docker, bubblewrap, Chromium, Claude Code or the local model skip themselves
with a reason when that is missing. In CI (`PIPEMEND_REQUIRE_SANDBOXES=1`, set by
`.ci/run`, which installs all of them) such a skip is turned into a failure, so a
broken install step cannot hide behind a green run.

Toy targets live in ``fixtures/targets/<name>``; the helper modules of the tests (``optimize_harness``,
``drive``, ``optimize_plugins``, ``support``, ``runbuilder``) are importable by name through the
``pythonpath`` option in pyproject.toml. Fixtures shared by several test files are defined here.

`.ci/run` spreads the tests over pytest-xdist workers with ``--dist loadfile``: a module's tests share one
worker, so a module-scoped optimize run (or server) is built once. The ``xdist_group`` marks say the same for
``--dist loadgroup``, which pytest 9 with xdist 3.8 does not honour yet (the group suffix is lost). ``reap(None)``
(``doctor --clean``) takes every dead owner's containers on the machine, so its tests run with no Docker engine
in reach and never take an orphan another test counts. Everything else a test makes is its own: ``tmp_path``,
run ids, scratch folders (``$PIPEMEND_SCRATCH`` per test where it counts them), free ports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Session, make_worktree

_REQUIRED_MARKERS = ("docker", "bwrap", "chromium", "slow", "claude_code")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("PIPEMEND_REQUIRE_SANDBOXES"):
        return
    if report.skipped and any(item.get_closest_marker(m) for m in _REQUIRED_MARKERS):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where everything it needs is installed: {reason}"


@pytest.fixture
def wt(tmp_path: Path) -> Path:
    """A real git repo holding the ``proposer_qa`` toy target in ``target/``, committed."""
    return make_worktree(tmp_path)


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    """Scripted-agent sessions a test starts (``support.start``); each one's gateway is stopped afterwards."""
    made: list[Session] = []
    yield made
    for s in made:
        s.close()

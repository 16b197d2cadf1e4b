"""Shared test set-up.

Tests that need Docker, bubblewrap, Chromium, Claude Code or the local model skip themselves
with a reason when that is missing. In CI (`PIPEMEND_REQUIRE_SANDBOXES=1`, set by
`.ci/run`, which installs all of them) such a skip is turned into a failure, so a
broken install step cannot hide behind a green run.

Toy targets live in ``fixtures/targets/<name>``; the helper modules of the tests (``optimize_harness``,
``drive``, ``optimize_plugins``, ``support``, ``runbuilder``) are importable by name through the
``pythonpath`` option in pyproject.toml. Fixtures shared by several test files are defined here.

`.ci/run` spreads the tests over pytest-xdist workers with ``--dist loadgroup``: each test goes to any
worker, except that tests marked ``xdist_group(NAME)`` share one. A module whose module-scoped fixture is a
whole optimize run (or a server) is one group, so the run is built once; the ``reap`` group holds the tests
that leave orphans on purpose and count what ``reap`` removed, with ``doctor --clean`` (``reap(None)`` takes
every dead owner's containers and scratch folders on the machine). Everything else a test makes is its own:
``tmp_path``, run ids, scratch folders (``$PIPEMEND_SCRATCH`` per test where it counts them), free ports.
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

"""Shared test set-up.

Tests that need Docker, bubblewrap, Chromium, Claude Code or the local model skip themselves
with a reason when that is missing. In CI (`PIPEMEND_REQUIRE_SANDBOXES=1`, set by
`.ci/run`, which installs all of them) such a skip is turned into a failure, so a
broken install step cannot hide behind a green run.
"""

from __future__ import annotations

import os

import pytest

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

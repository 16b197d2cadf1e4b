"""``pipemend doctor``: what this machine can run, and how to fix what it cannot.

The sandbox checks live beside the sandboxes (``sandbox/doctor.py``); this adds
the model side: the local model (llama-cpp-python and its GGUF file, then one
real completion in a subprocess, so a crash inside llama.cpp is reported with
its signal and its fix instead of killing a run), the Anthropic key the
gateway would forward with, and the claude-code proposer.
"""

from __future__ import annotations

import importlib.util
import os
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

from .gateway.local_guard import PROBE_COMMAND, PROBE_TIMEOUT_S, probe
from .sandbox.doctor import Check
from .sandbox.doctor import check_all as sandbox_checks

_probe_results: dict[tuple[str, ...], Check] = {}


def check_local_model() -> Check:
    from .gateway.model_files import (
        INSTALL_HINT,
        MODEL_SHA256,
        ModelFileError,
        default_model_path,
        part_paths_from_packages,
        verified_by_sidecar,
    )

    if importlib.util.find_spec("llama_cpp") is None:
        return Check("local model", False, "llama-cpp-python is not installed", INSTALL_HINT)
    path = default_model_path()
    if path.is_file() and verified_by_sidecar(path, MODEL_SHA256):
        return Check("local model", True, f"{path.name} checked (sha256) in {path.parent}")
    try:
        part_paths_from_packages()
    except ModelFileError as e:
        if path.is_file():
            return Check("local model", True, f"{path} present, checked by sha256 on first use")
        return Check("local model", False, str(e), INSTALL_HINT)
    return Check("local model", True, "the model's parts are installed; assembled and checked on first use")


def check_local_completion(command: Sequence[str] | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> Check:
    """Run one real completion of the local model in a subprocess (``command``, default
    ``local_guard.PROBE_COMMAND``). A child that dies by a signal (SIGILL, SIGSEGV, ...) is reported
    with the signal and its fix; the default probe runs once per process (the doctor asks once)."""
    argv = tuple(command or PROBE_COMMAND)
    if command is None and argv in _probe_results:
        return _probe_results[argv]
    outcome = probe(argv, timeout_s)
    result = Check("local model runs", outcome.ok, outcome.detail, outcome.fix)
    if command is None:
        _probe_results[argv] = result
    return result


def check_anthropic_key() -> Check:
    if os.environ.get("ANTHROPIC_API_KEY"):
        return Check("anthropic key", True,
                     "ANTHROPIC_API_KEY is set: claude-* models and the claude and claude-code proposers work")
    return Check("anthropic key", False, "ANTHROPIC_API_KEY is not set: only local, scripted and simulated models",
                 "export ANTHROPIC_API_KEY=... to use Claude (it stays in the gateway, never in a sandbox)")


def check_claude_code() -> Check:
    """claude-agent-sdk importable, and the Claude Code CLI it bundles present and executable."""
    fix = "scripts/install --claude-code (or pip install 'pipemend[claude-code]')"
    if importlib.util.find_spec("claude_agent_sdk") is None:
        return Check("claude-code proposer", False, "claude-agent-sdk is not installed", fix)

    import claude_agent_sdk

    cli = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if not os.access(cli, os.X_OK):
        return Check("claude-code proposer", False, f"the bundled Claude Code CLI is missing ({cli})", fix)
    return Check("claude-code proposer", True, f"claude-agent-sdk {version('claude-agent-sdk')} with its bundled CLI")


def check_all() -> list[Check]:
    local = check_local_model()
    runs = [check_local_completion()] if local.ok else []
    return [*sandbox_checks(), local, *runs, check_anthropic_key(), check_claude_code()]

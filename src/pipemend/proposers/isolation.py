"""Plugin proposers run in their own sandbox, with the tools served to them (issue 11, seal 9).

A plugin (``--proposer package.module:Class``) is code pipemend did not write.
Run in pipemend's process it could read anything the user can: the frozen
labels in the run directory, the dataset in the user's folder. So it never runs
there. ``IsolatedProposer`` starts ``python -m pipemend.proposers.plugin_child``
under bubblewrap, as uid 65534 with no network and no capabilities, seeing:

- the candidate worktree at ``/sandbox/work`` (writable; it holds no label files),
- the history folder at ``/sandbox/history`` (read-only: diffs, rationales,
  aggregate verdicts, train traces),
- the plugin's own code (its top-level module file or package folder) and
  pipemend's package and Python, read-only,

and nothing else of the host: not the run directory, not the user's folder,
not the home folder. Everything else a plugin may use comes through the guarded
tools (``ProposerTools``), called over a JSON-lines pipe and answered here, so
the same editable/protected rules and train-only runs apply as for the
built-in proposers. Every message from the child is hostile input: size-capped,
shape-checked, and only the tools in ``TOOL_NAMES`` can be called.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import SandboxUnavailable, UsageError
from ..protocols import Proposal, ProposalContext
from ..sandbox.bwrap import bwrap_binary, probe, python_binds, system_binds
from ..sandbox.common import NOBODY, pipemend_package_dir
from .budget import ProposerBudgetExhausted

PROTOCOL = "pipemend-plugin-1"
SKIP_REASONS = frozenset({"turns", "tokens", "usd", "time"})
"""Budget reasons a plugin may report: each costs its own candidate only (``optimize.stops.ON_BUDGET``)."""
TOOL_NAMES = frozenset({"list_files", "read_file", "search", "write_file", "edit_file", "describe", "is_writable",
                        "run_train", "read_trace", "read_trace_raw", "diagnose", "show_diff"})
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_RATIONALE_CHARS = 20_000
MAX_META_BYTES = 256 * 1024
IN_WORK = "/sandbox/work"
IN_HISTORY = "/sandbox/history"
IN_PLUGIN = "/sandbox/plugin"
IN_PIPEMEND = "/opt/pipemend"


class PluginFailed(Exception):
    """The plugin crashed, broke the protocol or ran out of time: this candidate is rejected.

    The message is one line (``RuntimeError: what it said``); ``details`` holds the plugin's traceback or
    its stderr, for the candidate's ``error.txt``."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def plugin_code_path(spec: str) -> Path:
    """Where the plugin's top-level module lives (a ``.py`` file or a package folder), found without importing it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"proposer {spec!r}: not a dotted path package.module:Class")
    top = module_name.split(".")[0]
    found = importlib.machinery.PathFinder.find_spec(top, sys.path)
    if found is None:
        raise UsageError(f"proposer {spec!r}: cannot find module {top!r} on the Python path")
    if found.submodule_search_locations:
        locations = list(found.submodule_search_locations)
        if len(locations) != 1:
            raise UsageError(f"proposer {spec!r}: namespace package {top!r} spans several folders; "
                             "give the plugin a regular package")
        return Path(locations[0]).resolve()
    if not found.origin or not found.origin.endswith(".py"):
        raise UsageError(f"proposer {spec!r}: module {top!r} is not Python source ({found.origin})")
    return Path(found.origin).resolve()


class IsolatedProposer:
    """A plugin proposer run in its own bubblewrap sandbox; see the module docstring."""

    def __init__(self, spec: str, options: dict[str, Any] | None = None, *, session_timeout_s: float = 1800.0,
                 memory_mb: int = 4096, guard: list[Path] | None = None):
        self.spec = spec
        self.options = dict(options or {})
        self.name = spec
        self.session_timeout_s = float(session_timeout_s)
        self.memory_mb = int(memory_mb)
        self.code = plugin_code_path(spec)
        self.guard = [Path(p).resolve() for p in guard or []]
        """Folders the plugin must never see (the run directory, the user's target folder)."""
        try:
            json.dumps(self.options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"proposer {spec!r}: options must be JSON values ({e})") from None
        for g in self.guard:
            if g == self.code or g in self.code.parents or (self.code.is_dir() and self.code in g.parents):
                raise UsageError(f"proposer {spec!r}: its code at {self.code} overlaps {g}, which a plugin must "
                                 "not see; move the plugin to a package of its own")
        self._check()

    # ------------------------------------------------------------------ the sandbox

    def _command(self, worktree: Path | None, history_dir: Path | None) -> list[str]:
        try:
            probe()
        except SandboxUnavailable as e:
            raise UsageError(f"proposer {self.spec!r}: plugin proposers run in a bubblewrap sandbox, which is not "
                             f"available here ({e}); install bubblewrap (apt-get install bubblewrap)") from None
        args = [bwrap_binary(), "--unshare-all", "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL",
                "--die-with-parent", "--new-session", *system_binds(), "--proc", "/proc", "--dev", "/dev",
                "--tmpfs", "/tmp", "--tmpfs", "/run", *python_binds(Path(sys.executable)),
                "--ro-bind", str(pipemend_package_dir()), f"{IN_PIPEMEND}/pipemend",
                "--ro-bind", str(self.code), f"{IN_PLUGIN}/{self.code.name}"]
        if worktree is not None:
            args += ["--bind", str(worktree.resolve()), IN_WORK]
        if history_dir is not None:
            args += ["--ro-bind", str(history_dir.resolve()), IN_HISTORY]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{IN_PIPEMEND}:{IN_PLUGIN}"}
        args += ["--remount-ro", "/", "--clearenv", "--chdir", "/tmp"]
        for k, v in env.items():
            args += ["--setenv", k, v]
        return args + [sys.executable, "-m", "pipemend.proposers.plugin_child"]

    def _hello(self, ctx: ProposalContext | None) -> dict[str, Any]:
        hello: dict[str, Any] = {"format": PROTOCOL, "spec": self.spec, "options": self.options}
        if ctx is None:
            return {**hello, "check_only": True}
        budget = ctx.budget.model_dump() if hasattr(ctx.budget, "model_dump") else dict(ctx.budget or {})
        return {
            **hello, "worktree": IN_WORK, "history_dir": IN_HISTORY if _history(ctx) else None,
            "context": {
                "candidate_index": ctx.candidate_index, "target_subdir": ctx.target_subdir,
                "manifest": ctx.manifest.model_dump(mode="json"), "diagnosis": ctx.diagnosis,
                "history": ctx.history, "train_examples": ctx.train_examples, "budget": budget,
                "in_flight": ctx.in_flight,
            },
        }

    def _limits(self) -> None:
        mem = self.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def _check(self) -> None:
        """Build the plugin once in its sandbox, so a bad name or option is a usage error before any run."""
        try:
            self._session(None, timeout_s=120.0)
        except PluginFailed as e:
            raise UsageError(f"proposer {self.spec!r}: {e}") from None

    # ------------------------------------------------------------------ the session

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        return self._session(ctx, timeout_s=self.session_timeout_s)

    def _session(self, ctx: ProposalContext | None, *, timeout_s: float) -> Proposal | None:
        worktree = Path(ctx.worktree) if ctx is not None else None
        cmd = self._command(worktree, _history(ctx) if ctx is not None else None)
        hello = json.dumps(self._hello(ctx), default=str) + "\n"
        with tempfile.TemporaryDirectory(prefix="pipemend-plugin-") as tmp:
            err_path = Path(tmp) / "stderr"
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                        cwd="/", env={"PATH": "/usr/bin:/bin"}, preexec_fn=self._limits)
            try:
                assert proc.stdin is not None
                proc.stdin.write(hello.encode())
                proc.stdin.flush()
                return self._serve(proc, ctx, err_path, timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for f in (proc.stdin, proc.stdout):
                    if f is not None:
                        f.close()

    def _serve(self, proc: subprocess.Popen[bytes], ctx: ProposalContext | None, err_path: Path,
               timeout_s: float) -> Proposal | None:
        deadline = time.monotonic() + timeout_s
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stdin is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PluginFailed(f"the plugin did not finish within {timeout_s:g} s")
            if not sel.select(timeout=min(left, 5.0)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PluginFailed(f"the plugin exited without an answer (exit {proc.wait()})", _tail(err_path))
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                reply = self._handle(line, ctx, err_path)
                if isinstance(reply, _Done):
                    return reply.proposal
                proc.stdin.write((json.dumps(reply, default=str) + "\n").encode())
                proc.stdin.flush()
            if len(buf) > MAX_MESSAGE_BYTES:
                raise PluginFailed(f"the plugin sent a message over {MAX_MESSAGE_BYTES} bytes")

    def _handle(self, line: bytes, ctx: ProposalContext | None, err_path: Path) -> dict[str, Any] | "_Done":
        try:
            msg = json.loads(line)
        except ValueError:
            raise PluginFailed(f"the plugin broke the protocol (not JSON): {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise PluginFailed("the plugin broke the protocol (not a JSON object)")
        if "unusable" in msg:
            raise PluginFailed(str(msg["unusable"])[:2000])
        if ctx is None:
            if msg.get("usable") is True:
                return _Done(None)
            raise PluginFailed(f"the plugin broke the protocol while being checked: {line[:200]!r}")
        if "log" in msg:
            ctx.log(str(msg["log"])[:2000])
            return {"ok": None}
        if "call" in msg:
            return self._call(msg, ctx)
        if "done" in msg:
            return _Done(_proposal(msg["done"]))
        if "budget" in msg:
            b = msg["budget"] if isinstance(msg["budget"], dict) else {}
            # the child's word decides nothing beyond its own candidate: a skip, never a stop of the run
            reason = b.get("reason") if b.get("reason") in SKIP_REASONS else "turns"
            raise ProposerBudgetExhausted(reason, str(b.get("message"))[:500],
                                          b.get("meta") if isinstance(b.get("meta"), dict) else {})
        if "failed" in msg:
            f = msg["failed"] if isinstance(msg["failed"], dict) else {}
            raise PluginFailed(f"{str(f.get('type'))[:100]}: {str(f.get('message'))[:2000]}",
                               str(f.get("traceback"))[-8000:])
        raise PluginFailed(f"the plugin broke the protocol (unknown message {sorted(msg)[:5]})")

    def _call(self, msg: dict[str, Any], ctx: ProposalContext) -> dict[str, Any]:
        name, args, kwargs = msg.get("call"), msg.get("args", []), msg.get("kwargs", {})
        if name not in TOOL_NAMES or not isinstance(args, list) or not isinstance(kwargs, dict):
            return {"error": {"type": "ToolError", "message": f"no such tool {str(name)[:100]!r}; "
                                                              f"tools: {', '.join(sorted(TOOL_NAMES))}"}}
        try:
            return {"ok": getattr(ctx.tools, name)(*args, **kwargs)}
        except Exception as e:  # noqa: BLE001 - a refused or failed tool call is the plugin's answer, not ours
            return {"error": {"type": type(e).__name__, "message": str(e)[:4000]}}


class _Done:
    def __init__(self, proposal: Proposal | None):
        self.proposal = proposal


def _proposal(done: Any) -> Proposal | None:
    if done is None:
        return None
    if not isinstance(done, dict) or not isinstance(done.get("rationale", ""), str):
        raise PluginFailed("the plugin's proposal is not {rationale, rung, meta}")
    rung = done.get("rung")
    meta = done.get("meta") if isinstance(done.get("meta"), dict) else {}
    if len(json.dumps(meta, default=str)) > MAX_META_BYTES:
        meta = {"truncated": True}
    return Proposal(rationale=done.get("rationale", "")[:MAX_RATIONALE_CHARS],
                    rung=rung if isinstance(rung, str) else None, meta=meta)


def _history(ctx: ProposalContext) -> Path | None:
    return Path(ctx.history_dir) if ctx.history_dir is not None and Path(ctx.history_dir).is_dir() else None


def _tail(path: Path, n: int = 2000) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()



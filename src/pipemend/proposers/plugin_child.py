"""The child side of an isolated plugin proposer: ``python -m pipemend.proposers.plugin_child``.

Runs inside the plugin's sandbox (see ``isolation.py``). It reads one hello
message on stdin (the plugin's dotted path, its options and the proposal
context as JSON), loads the plugin, calls ``propose(ctx)`` with tools that are
served by the host over the same pipe, and sends back the proposal. The
protocol is JSON lines on the process's original stdout; the plugin's own
prints are sent to stderr, so they cannot garble it.

Nothing here is trusted by the host: every message is validated there.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from ..errors import BudgetExhausted, UsageError
from ..manifest import Manifest
from ..plugins import load_object
from ..protocols import Proposal, ProposalContext
from .budget import ProposerBudget

PROTOCOL = "pipemend-plugin-1"


class RemoteToolError(Exception):
    """A tool call the host refused or that failed there; ``kind`` is the host's error class name."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


class _Channel:
    def __init__(self, out: TextIO, inp: TextIO):
        self.out = out
        self.inp = inp

    def send(self, msg: dict[str, Any]) -> None:
        self.out.write(json.dumps(msg, default=str) + "\n")
        self.out.flush()

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.send({"call": name, "args": list(args), "kwargs": kwargs})
        line = self.inp.readline()
        if not line:
            raise RemoteToolError("Closed", "the host closed the tool channel")
        reply = json.loads(line)
        if "error" in reply:
            err = reply["error"]
            raise RemoteToolError(str(err.get("type")), str(err.get("message")))
        return reply.get("ok")


class RemoteTools:
    """The guarded tools of ``ProposerTools``, each a call to the host; ``root`` is the target folder here."""

    def __init__(self, channel: _Channel, root: Path):
        self._channel = channel
        self.root = root

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._channel.call(name, *args, **kwargs)

        return call


class _Unusable(Exception):
    """The plugin cannot be built as named: the host turns this into a UsageError."""


def _build(spec: str, options: dict[str, Any]) -> Any:
    """The plugin object, or ``_Unusable`` saying what is wrong (the same words as ``get_proposer``)."""
    try:
        obj = load_object(spec, kind="proposer")
    except UsageError as e:
        raise _Unusable(str(e)) from None
    if not callable(obj) or not callable(getattr(obj, "propose", None)):
        raise _Unusable(f"proposer {spec!r}: {spec} has no propose(ctx) method")
    try:
        return obj(**options)
    except TypeError as e:
        raise _Unusable(f"proposer {spec!r}: bad options {sorted(options)}: {e}") from None


def main() -> int:
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the plugin's prints (and C-level writes to fd 1) go to stderr
    sys.stdout = sys.stderr
    channel = _Channel(proto_out, sys.stdin)
    hello = json.loads(sys.stdin.readline())
    try:
        proposer = _build(hello["spec"], hello["options"])
    except _Unusable as e:
        channel.send({"unusable": str(e)})
        return 0
    except BaseException as e:  # noqa: BLE001 - the plugin's constructor crashed
        channel.send({"unusable": f"proposer {hello['spec']!r}: building it failed: {type(e).__name__}: {e}"})
        return 0
    if hello.get("check_only"):
        channel.send({"usable": True})
        return 0
    c = hello["context"]
    worktree = Path(hello["worktree"])
    root = worktree / c["target_subdir"] if c["target_subdir"] else worktree
    ctx = ProposalContext(
        candidate_index=int(c["candidate_index"]), worktree=worktree, target_subdir=c["target_subdir"],
        manifest=Manifest.model_validate(c["manifest"]), diagnosis=c["diagnosis"], history=c["history"],
        in_flight=list(c.get("in_flight") or []),
        history_dir=Path(hello["history_dir"]) if hello.get("history_dir") else None,
        tools=RemoteTools(channel, root), budget=ProposerBudget.model_validate(c["budget"]),
        train_examples=c["train_examples"], log=lambda text: channel.send({"log": str(text)}),
    )
    try:
        proposal = proposer.propose(ctx)
    except BudgetExhausted as e:
        channel.send({"budget": {"reason": getattr(e, "reason", None), "message": str(e),
                                 "meta": getattr(e, "meta", {})}})
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the host, which rejects the candidate
        channel.send({"failed": {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}})
        return 0
    if proposal is None:
        channel.send({"done": None})
    elif isinstance(proposal, Proposal):
        channel.send({"done": {"rationale": proposal.rationale, "rung": proposal.rung, "meta": proposal.meta}})
    else:
        channel.send({"failed": {"type": "TypeError", "message": f"propose() returned {type(proposal).__name__}, "
                                                                 "not a Proposal or None", "traceback": ""}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

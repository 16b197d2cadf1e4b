"""The ``claude-code`` proposer: Claude Code (through ``claude-agent-sdk``) driving pipemend's tools.

One ``propose`` call is one Claude Code session, in the candidate's target
folder, whose only tools are pipemend's (``agent_tools``: the same guarded set
as the ``claude`` proposer), served in-process as the MCP server ``pipemend``.
Claude Code's own tools (Bash, Read, Edit, ...) are switched off, and the
session is refused if the CLI still offers one: they would reach val labels in
the worktree and bypass the editable globs. Claude Code brings its agent loop,
context management and prompting; pipemend keeps the tools, limits and verdict.

The CLI talks to ``base_url`` (the optimize loop's agent-side gateway, so calls
are logged and cached and the real key never leaves the gateway); its side
requests (the "small fast model") use the same model. User and project
settings, CLAUDE.md files and ``~/.claude`` are not read: each session gets a
fresh config folder.

Limits are ``ProposerBudget``'s, charged from each response's usage at
``pipemend.gateway.pricing`` prices; a spent limit interrupts the session and
raises ``ProposerBudgetExhausted``. When the agent ends its turn without
``submit`` or ``give_up`` it is reminded, at most ``max_reminders`` times. The
transcript is the ``claude`` proposer's format (``pipemend-transcript-1``).

Needs the ``claude-code`` extra: ``pip install 'pipemend[claude-code]'``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ..errors import BudgetReason, PipemendError, UsageError
from ..gateway.pricing import tokens_of
from ..protocols import Proposal, ProposalContext
from . import parse_options
from .agent_tools import (
    ENDING_TOOLS,
    TOOL_SPECS,
    AgentProposerConfig,
    AgentSession,
    tool_schema,
)
from .budget import cost_usd
from .claude import render_system_prompt

SERVER = "pipemend"
PREFIX = f"mcp__{SERVER}__"

SESSION_NOTE = """

## How this session works
You are running inside Claude Code, but your only tools are pipemend's, named
`{prefix}<tool>` (for example `{prefix}read_file`). Paths are relative to the
target folder. Edit files only with `{prefix}edit_file` / `{prefix}write_file`.
End the session by calling `{prefix}submit` (or `{prefix}give_up`); ending your
turn without one of them does not submit anything.
"""

REMINDER = (f"You ended your turn without submitting. Call `{PREFIX}submit` with a rationale and rung once the change "
            f"is in place, or `{PREFIX}give_up` if nothing is worth trying.")


class ClaudeCodeProposerConfig(AgentProposerConfig):
    """Options of the ``claude-code`` proposer (``get_proposer("claude-code", **options)``)."""

    cli_path: str | None = Field(None, description="The Claude Code CLI; default: the one claude-agent-sdk bundles.")
    max_reminders: int = Field(2, ge=0, description="Times the agent is reminded to submit after ending its turn.")
    session_timeout_s: float = Field(3600.0, gt=0, description="Wall-clock limit of one session.")


class ClaudeCodeProposer:
    name = "claude-code"

    def __init__(self, **options: Any):
        self.config = parse_options(ClaudeCodeProposerConfig, options, "claude-code")
        try:
            import claude_agent_sdk  # noqa: F401
        except ImportError:
            raise UsageError("the claude-code proposer needs claude-agent-sdk: pip install 'pipemend[claude-code]' "
                             "(or use --proposer claude)") from None

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        return asyncio.run(CodeSession(self.config, ctx).run())


class CodeSession(AgentSession):
    proposer_name = "claude-code"

    def __init__(self, cfg: ClaudeCodeProposerConfig, ctx: ProposalContext):
        super().__init__(ctx, model=cfg.model, transcript_dir=cfg.transcript_dir,
                         max_tool_output_chars=cfg.max_tool_output_chars, config=cfg)
        self.cfg = cfg
        self.finished = False  # set by an accepted submit or give_up
        self.outcome: Proposal | None = None  # the submitted proposal (None after give_up)
        self.spent_reason: BudgetReason | None = None
        self.charged: set[str] = set()
        self.stderr: list[str] = []
        self.pending: dict[str, Any] | None = None

    # ----------------------------------------------------------------- set-up

    def options(self, config_dir: str) -> Any:
        from claude_agent_sdk import (
            ClaudeAgentOptions,
            SdkMcpTool,
            create_sdk_mcp_server,
        )

        names = self.box.names()
        server = create_sdk_mcp_server(SERVER, tools=[
            SdkMcpTool(name=n, description=TOOL_SPECS[n][1], input_schema=tool_schema(TOOL_SPECS[n][0]),
                       handler=self.handler(n))
            for n in names])
        system = render_system_prompt(self.ctx, Path(self.cfg.system_template) if self.cfg.system_template else None)
        self.system = system + SESSION_NOTE.format(prefix=PREFIX)
        return ClaudeAgentOptions(
            system_prompt=self.system,
            tools=[],  # none of Claude Code's own tools
            mcp_servers={SERVER: server},
            allowed_tools=[PREFIX + n for n in names],
            cwd=str(Path(self.ctx.worktree) / self.ctx.target_subdir),
            model=self.cfg.model,
            max_turns=max(1, self.budget.max_turns - self.budget.turns),
            setting_sources=[],
            env=self.env(config_dir),
            cli_path=self.cfg.cli_path,
            stderr=self.stderr.append,
        )

    def env(self, config_dir: str) -> dict[str, str]:
        key = self.cfg.api_key or os.environ.get("ANTHROPIC_API_KEY") or "pipemend-gateway"
        env = {
            "ANTHROPIC_API_KEY": key,
            "ANTHROPIC_SMALL_FAST_MODEL": self.cfg.model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": self.cfg.model,
            "CLAUDE_CONFIG_DIR": config_dir,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
            # a train run may take minutes; the per-tool limit is enforced by ProposerTools
            "MCP_TOOL_TIMEOUT": str(int((self.budget.per_tool_timeout_s + 60) * 1000)),
        }
        if self.cfg.base_url:
            env["ANTHROPIC_BASE_URL"] = self.cfg.base_url
        return env

    # ----------------------------------------------------------------- tools

    def handler(self, name: str) -> Any:
        async def handle(args: dict[str, Any]) -> dict[str, Any]:
            if self.finished or self.spent_reason or self.box.ending:
                return _result("The session is over; end your turn now.", True)
            if name in ENDING_TOOLS:
                outcome = self._finish(name, args)
                if isinstance(outcome, str):
                    self.record("tool", name=name, input=args, output=outcome, is_error=True)
                    return _result(outcome, True)
                self.finished, self.outcome = True, outcome
                return _result("Done: the session is over. End your turn now, without further tool calls.", False)
            started = time.monotonic()
            output, is_error = await asyncio.to_thread(self.box.call, name, args)
            self.record("tool", name=name, input=args, output=output, is_error=is_error,
                        duration_s=round(time.monotonic() - started, 3))
            return _result(output, is_error)

        return handle

    # ----------------------------------------------------------------- the session

    async def run(self) -> Proposal | None:
        try:
            return await asyncio.wait_for(self._run(), self.cfg.session_timeout_s)
        except asyncio.TimeoutError:
            limit = self.cfg.session_timeout_s
            raise self.exhausted("time", f"the claude-code session ran past {limit:.0f} s") from None

    async def _run(self) -> Proposal | None:
        from claude_agent_sdk import ClaudeSDKClient

        ctx = self.ctx
        prompt = (f"Propose one change for candidate {ctx.candidate_index}. There are {len(self.train)} train "
                  "examples. Start from the diagnosis, read failing traces, make one scoped change, check it on "
                  "train, then submit.")
        with tempfile.TemporaryDirectory(prefix="pipemend-claude-code-") as config_dir:
            options = self.options(config_dir)
            self.record("start", model=self.cfg.model, system=self.system, tools=[PREFIX + n for n in self.box.names()],
                        budget=self.budget.model_dump())
            async with ClaudeSDKClient(options=options) as client:
                for reminder in range(self.cfg.max_reminders + 1):
                    if reminder:
                        self.record("notice", message=prompt)
                    await client.query(prompt)
                    result = None
                    async for message in client.receive_response():
                        result = self.on_message(message) or result
                        if (self.spent_reason or self.box.ending) and not self.finished:
                            await client.interrupt()
                            break
                    if self.finished:
                        return self.outcome
                    if self.box.ending:  # the toolbox saw the agent looping or sending malformed calls
                        raise self.ended(*self.box.ending)
                    if self.spent_reason:
                        raise self.exhausted(self.spent_reason, f"proposer budget exhausted before submit "
                                             f"({self.spent_reason}): {self.budget.describe()}")
                    if result is not None and result.get("subtype") == "error_max_turns":
                        raise self.exhausted("turns", f"Claude Code stopped at its turn limit: "
                                                      f"{self.budget.describe()}")
                    prompt = REMINDER
        raise self.exhausted("turns", f"the agent ended its turn {self.cfg.max_reminders + 1} times without submit "
                                      "or give_up")

    def on_message(self, message: Any) -> dict[str, Any] | None:
        """Record one message of the stream and charge its usage; the ResultMessage's fields, if it is one."""
        from claude_agent_sdk import AssistantMessage, ResultMessage, SystemMessage

        data = _jsonable(message)
        if isinstance(message, SystemMessage):
            self.record("system", subtype=message.subtype, data=data.get("data"))
            if message.subtype == "init":
                foreign = [t for t in message.data.get("tools", []) if not str(t).startswith(PREFIX)]
                if foreign:
                    self.record("end", outcome="error", error=f"Claude Code offered its own tools: {foreign}")
                    raise PipemendError(f"refusing the claude-code session: the CLI offered tools other than "
                                        f"pipemend's ({', '.join(map(str, foreign))}), which could read labels")
            return None
        if isinstance(message, AssistantMessage):
            if message.error:
                text = " ".join(getattr(b, "text", "") for b in message.content)
                self.record("end", outcome="error", error=f"{message.error}: {text}", spent=self.budget.spent())
                raise PipemendError(f"claude-code: the agent's request failed ({message.error}): {text[:500]}")
            self.charge(message)
            blocks = [_block(b) for b in message.content]
            if self.pending is not None and message.message_id and self.pending["id"] == message.message_id:
                self.pending["content"] += blocks  # Claude Code streams one response as a message per block
            else:
                self.flush()
                self.pending = {"id": message.message_id, "role": "assistant", "model": message.model,
                                "content": blocks, "usage": message.usage}
            return None
        if isinstance(message, ResultMessage):
            self.record("result", result=data)
            return data
        self.record("message", kind=type(message).__name__, message=data)
        return None

    def record(self, event: str, **fields: Any) -> None:
        if event != "response":
            self.flush()  # the response being assembled came first
        super().record(event, **fields)

    def flush(self) -> None:
        """Record the response being assembled from its per-block messages."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.record("response", response=pending)

    def charge(self, message: Any) -> None:
        """One turn and its tokens per API response (Claude Code may split a response into several messages)."""
        msg_id = message.message_id or f"anon-{len(self.charged)}"
        if msg_id in self.charged or not message.usage:
            return
        self.charged.add(msg_id)
        usage = message.usage
        tokens_in, tokens_out = tokens_of(usage)
        self.turn += 1
        self.budget.charge(turns=1, input_tokens=tokens_in, output_tokens=tokens_out,
                           usd=cost_usd(self.cfg.model, usage, self.cfg.price_per_mtok))
        if not self.finished:
            self.spent_reason = self.budget.exhausted()


def _result(text: str, is_error: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if is_error:
        out["is_error"] = True
    return out


_BLOCK_TYPES = {"TextBlock": "text", "ToolUseBlock": "tool_use", "ThinkingBlock": "thinking",
                "ToolResultBlock": "tool_result"}


def _block(block: Any) -> dict[str, Any]:
    """An SDK content block in the Messages API's shape (``{"type": "text", "text": ...}``)."""
    fields = dataclasses.asdict(block) if dataclasses.is_dataclass(block) else {"repr": repr(block)[:2000]}
    return {"type": _BLOCK_TYPES.get(type(block).__name__, type(block).__name__), **fields}


def _jsonable(message: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(message):
        return {"type": type(message).__name__, **dataclasses.asdict(message)}
    return {"type": type(message).__name__, "repr": repr(message)[:2000]}

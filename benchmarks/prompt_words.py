"""The proposer of ``benchmarks/parallel.py``: candidate n adds one word to tinyqa's answer prompt.

A module of its own, importing only ``pipemend.protocols``: a plugin proposer runs in its own sandbox and
imports its module once per proposal, so what the module imports is paid for every candidate (as it is
for a user's plugin).
"""

from __future__ import annotations

from pipemend.protocols import Proposal, ProposalContext

WORDS = ["briefly", "clearly", "plainly", "simply", "exactly", "directly", "kindly", "calmly", "neatly", "quickly",
         "gently", "boldly", "firmly", "fairly", "truly", "warmly"]


class PromptWords:
    """Candidate n adds the word ``WORDS[n-1]`` to the sentence prompt: a new prompt, the same score."""

    name = "prompt-words"

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        i = ctx.candidate_index - 1
        if i >= len(WORDS):
            return None
        text = (ctx.tools.root / "prompts" / "sentence.txt").read_text(encoding="utf-8")
        ctx.tools.write_file("prompts/sentence.txt", text.replace("Reply", f"Reply {WORDS[i]}", 1))
        return Proposal(rationale=f"say {WORDS[i]}", rung="prompt")

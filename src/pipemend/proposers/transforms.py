"""Prompt rewrites the offline ladder makes (knobs are set through ``pipemend.configfile``).

Prompt transforms take a template's text and return the new text, or None when
the transform does not apply (already there, nothing to act on). Jinja2
templates are checked to still parse and render (``check_template``). A
transform's ``rules`` name the diagnosis rules it addresses (``bare_json`` and
``plain_output``: a parse step that failed or raised on the model's output);
the ladder tries those first when they fired on its rung.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable

import jinja2


class TransformError(ValueError):
    """An edit that could not be made safely; the ladder skips it."""


# --------------------------------------------------------------------------- prompt templates

PROMPT_SUFFIXES = (".j2", ".jinja", ".jinja2", ".txt", ".md", ".prompt")
JINJA_SUFFIXES = (".j2", ".jinja", ".jinja2")
_NOT_PROMPTS = re.compile(r"^(readme|changelog|license|notes|requirements.*)\.", re.I)
DOC_LIST_NAMES = ("docs", "documents", "passages", "paragraphs", "contexts", "context", "chunks", "hits", "results")
QUESTION_NAMES = ("question", "query", "q", "input")


def is_prompt_file(rel: str) -> bool:
    p = PurePosixPath(rel)
    if _NOT_PROMPTS.match(p.name):
        return False
    return "prompts" in p.parts[:-1] or p.suffix.lower() in PROMPT_SUFFIXES


def is_jinja(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() in JINJA_SUFFIXES


def check_template(text: str, rel: str) -> None:
    """Raise ``TransformError`` if a Jinja2 template no longer parses or renders (unknown names allowed)."""
    if not is_jinja(rel):
        return
    env = jinja2.Environment(undefined=jinja2.ChainableUndefined)
    try:
        env.from_string(text).render()
    except jinja2.TemplateError as e:
        raise TransformError(f"{rel}: the template would not render: {e}") from None


def insert_instruction(text: str, block: str) -> str:
    """Add ``block`` before a final cue line such as ``Answer:``, else at the end."""
    trailing = text[len(text.rstrip("\n")):] or "\n"
    lines = text.rstrip("\n").split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=None)
    if last is not None and lines[last].rstrip().endswith(":") and "{%" not in lines[last] and last > 0:
        head = "\n".join(lines[:last]).rstrip("\n")
        return f"{head}\n\n{block}\n\n" + "\n".join(lines[last:]) + trailing
    return text.rstrip("\n") + f"\n\n{block}" + trailing


@dataclass
class PromptTransform:
    """One named rewrite of a prompt template, acting on one ladder rung."""

    name: str
    rung: str
    describe: str
    apply: Callable[[str, str, dict[str, Any]], str | None]
    """(text, relative path, options) -> new text, or None when it does not apply."""
    rules: tuple[str, ...] = ()
    """The diagnosis rules (``pipemend.diagnose``) it addresses: the ladder tries it first when they fired."""


_JSON_WORD = re.compile(r"\bjson\b", re.I)


def asks_for_json(text: str) -> bool:
    """Whether a prompt asks for JSON output (it names JSON)."""
    return _JSON_WORD.search(text) is not None


def _instruction(marker: str, block: str, *, when: Callable[[str], bool] | None = None
                 ) -> Callable[[str, str, dict[str, Any]], str | None]:
    def apply(text: str, rel: str, options: dict[str, Any]) -> str | None:
        if marker in text or (when is not None and not when(text)):
            return None
        return insert_instruction(text, block)

    return apply


ENTITY_ONLY = (
    "Output format: answer with the entity or short phrase only (a name, date or number), "
    "no full sentence, no explanation, no trailing period."
)
UNKNOWN_RULE = "If the passages do not contain the answer, reply with exactly: unknown"
GROUND_RULE = (
    "Use only the passages given. Before answering, find the sentence in the passages that "
    "supports the answer, and copy the answer's wording from it."
)
CONTEXT_FOCUS = (
    "Some passages may be irrelevant or repeated. Read all of them, pick the passages that "
    "mention the entities in the question, and answer from those."
)
FEW_SHOT_HEADING = "Examples of questions and their expected answers:"
BARE_JSON = (
    "Output format: reply with the JSON object only, as plain text: no Markdown code fences (no ```), "
    "no text before or after it."
)
PLAIN_OUTPUT = (
    "Output format: reply in exactly the format asked for above, as plain text: no Markdown, no code "
    "fences (no ```), no text before or after it."
)
FORMAT_RULES = ("parse_error", "generation_raised")
"""Diagnosis rules of an output the pipeline's code could not read (a parse step that failed or raised)."""


def _question_text(inputs: dict[str, Any]) -> str | None:
    for k in QUESTION_NAMES:
        if isinstance(inputs.get(k), str):
            return inputs[k]
    return next((v for v in inputs.values() if isinstance(v, str)), None)


def _few_shot(text: str, rel: str, options: dict[str, Any]) -> str | None:
    if FEW_SHOT_HEADING in text:
        return None
    k = int(options.get("few_shot_k", 3))
    shots: list[str] = []
    for ex in sorted(options.get("train_examples") or [], key=lambda e: str(e.get("id"))):
        q = _question_text(ex.get("inputs") or {})
        a = ex.get("expected")
        if not isinstance(q, str) or not isinstance(a, (str, int, float)) or isinstance(a, bool):
            continue
        a = str(a)
        if len(q) > 300 or len(a) > 80 or any(c in q + a for c in "{}%#\n"):
            continue  # braces could break Jinja or str.format templates
        shots.append(f"Question: {q}\nAnswer: {a}")
        if len(shots) >= k:
            break
    if not shots:
        return None
    return insert_instruction(text, FEW_SHOT_HEADING + "\n\n" + "\n\n".join(shots))


_FOR_DOCS = re.compile(r"(\{%-?\s*for\s+\w+(?:\s*,\s*\w+)?\s+in\s+)(" + "|".join(DOC_LIST_NAMES) + r")(\s*-?%\})")


def _truncate_docs(text: str, rel: str, options: dict[str, Any]) -> str | None:
    if not is_jinja(rel):
        return None
    n = int(options.get("max_docs", 5))
    new, count = _FOR_DOCS.subn(lambda m: f"{m.group(1)}{m.group(2)}[:{n}]{m.group(3)}", text)
    return new if count else None


def _question_last(text: str, rel: str, options: dict[str, Any]) -> str | None:
    """Repeat the question after the passages when the template puts it before them."""
    if not is_jinja(rel) or "Remember the question:" in text:
        return None
    q = next((m for m in re.finditer(r"\{\{-?\s*(\w+)\s*-?\}\}", text) if m.group(1) in QUESTION_NAMES), None)
    docs = re.search(r"(\{%-?\s*for\s[^%]*\bin\s+|\{\{-?\s*)(" + "|".join(DOC_LIST_NAMES) + r")\b", text)
    if q is None or docs is None or q.start() > docs.start():
        return None
    return insert_instruction(text, f"Remember the question: {{{{ {q.group(1)} }}}}")


PROMPT_TRANSFORMS: list[PromptTransform] = [
    PromptTransform("entity_only", "prompt", "add an output-format rule: the entity only, no sentence",
                    _instruction("Output format: answer with the entity", ENTITY_ONLY,
                                 when=lambda text: not asks_for_json(text))),
    PromptTransform("bare_json", "prompt", "add an output-format rule: bare JSON, no code fences or other text",
                    _instruction("Output format: reply with the JSON object only", BARE_JSON, when=asks_for_json),
                    rules=FORMAT_RULES),
    PromptTransform("plain_output", "prompt",
                    "add an output-format rule: the asked format as plain text, no Markdown or code fences",
                    _instruction("Output format: reply in exactly the format asked for", PLAIN_OUTPUT,
                                 when=lambda text: not asks_for_json(text)),
                    rules=FORMAT_RULES),
    PromptTransform("few_shot", "prompt", "append few-shot examples drawn from train examples", _few_shot),
    PromptTransform("ground_in_evidence", "prompt", "tell the model to find the supporting sentence first",
                    _instruction("find the sentence in the passages that", GROUND_RULE)),
    PromptTransform("unknown_rule", "prompt", "add an explicit rule for unanswerable questions",
                    _instruction("reply with exactly: unknown", UNKNOWN_RULE)),
    PromptTransform("question_last", "context", "repeat the question after the passages", _question_last),
    PromptTransform("context_focus", "context", "tell the model that some passages are distractors",
                    _instruction("Some passages may be irrelevant or repeated", CONTEXT_FOCUS)),
    PromptTransform("truncate_docs", "context", "cap the passages shown to the model", _truncate_docs),
]

"""Edits the offline ladder makes: set a knob in a config file, and rewrite prompt templates.

Knobs: ``set_config_value`` sets a dotted key in YAML, JSON or TOML text. YAML and
TOML are edited on the one line that holds the key, so comments, order and
formatting survive; JSON is re-dumped with its indent. Every edit is checked by
parsing the result: the key must hold the new value and everything else must be
unchanged, else ``TransformError``.

Prompt transforms take a template's text and return the new text, or None when
the transform does not apply (already there, nothing to act on). Jinja2
templates are checked to still parse and render (``check_template``).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable

import yaml

_MISSING = object()


class TransformError(ValueError):
    """An edit that could not be made safely; the ladder skips it."""


# --------------------------------------------------------------------------- config knobs


def config_format(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    if suffix == ".toml":
        return "toml"
    raise TransformError(f"{path}: unsupported config format {suffix!r} (expected .yaml, .yml, .json or .toml)")


def parse_config(text: str, fmt: str) -> Any:
    try:
        if fmt == "yaml":
            return yaml.safe_load(text) or {}
        if fmt == "json":
            return json.loads(text)
        return tomllib.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise TransformError(f"not valid {fmt}: {e}") from None


def get_dotted(data: Any, key: str, default: Any = _MISSING) -> Any:
    cur = data
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if default is _MISSING:
                raise TransformError(f"key {key!r} not found")
            return default
        cur = cur[part]
    return cur


def _with_value(data: Any, key: str, value: Any) -> Any:
    """A deep copy of ``data`` with ``key`` set (intermediate mappings created)."""
    data = json.loads(json.dumps(data, default=str)) if data is not None else {}
    cur = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[parts[-1]] = value
    return data


def _split_comment(rest: str) -> tuple[str, str]:
    """Split ``value  # comment`` into the value and the trailing spacing+comment, quotes respected."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote and (quote == "'" or rest[i - 1] != "\\"):
                quote = None
        elif ch in "\"'" and rest[:i].strip() == "":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            j = i
            while j > 0 and rest[j - 1] in " \t":
                j -= 1
            return rest[:j], rest[j:]
    return rest.rstrip(), rest[len(rest.rstrip()):]


def _unquote(key: str) -> str:
    key = key.strip()
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        return key[1:-1]
    return key


_YAML_KEY = re.compile(r"^(\s*)((?:\"[^\"]*\"|'[^']*'|[^\s#:\-\"'][^:#]*?))\s*:(?=\s|$)(.*)$")


def _yaml_scalar(value: Any) -> str:
    out = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    if out.endswith("\n..."):
        out = out[: -len("\n...")].strip()
    elif out.endswith("..."):
        out = out[:-3].strip()
    return out


def _set_yaml(text: str, key: str, value: Any) -> str:
    parts = key.split(".")
    lines = text.split("\n")
    stack: list[tuple[int, str]] = []
    for n, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _YAML_KEY.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = _unquote(m.group(2))
        path = [k for _, k in stack] + [name]
        stack.append((indent, name))
        if path != parts:
            continue
        rest = m.group(3)
        lead = rest[: len(rest) - len(rest.lstrip())] or " "
        old_value, comment = _split_comment(rest.lstrip())
        if not old_value or old_value[0] in "|>&*!":
            raise TransformError(f"key {key!r} holds a block, anchor or tagged value; only one-line values are edited")
        lines[n] = f"{line[: m.start(3)]}{lead}{_yaml_scalar(value)}{comment}"
        return "\n".join(lines)
    raise TransformError(f"key {key!r} not found as a one-line mapping entry")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TransformError(f"cannot write {value!r} as TOML")


_TOML_TABLE = re.compile(r"^\s*\[([^\[\]]+)\]\s*(?:#.*)?$")
_TOML_ARRAY_TABLE = re.compile(r"^\s*\[\[")
_TOML_KEY = re.compile(r"^(\s*)((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*=(.*)$")


def _toml_parts(dotted: str) -> list[str]:
    return [_unquote(p) for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)]


def _set_toml(text: str, key: str, value: Any) -> str:
    parts = key.split(".")
    lines = text.split("\n")
    table: list[str] | None = []
    for n, line in enumerate(lines):
        if _TOML_ARRAY_TABLE.match(line):
            table = None
            continue
        t = _TOML_TABLE.match(line)
        if t:
            table = _toml_parts(t.group(1))
            continue
        m = _TOML_KEY.match(line)
        if not m or table is None:
            continue
        if table + _toml_parts(m.group(2)) != parts:
            continue
        rest = m.group(3)
        lead = rest[: len(rest) - len(rest.lstrip())] or " "
        old_value, comment = _split_comment(rest.lstrip())
        if old_value.startswith(('"""', "'''")) or (old_value.startswith("[") and not old_value.endswith("]")):
            raise TransformError(f"key {key!r} holds a multi-line value; only one-line values are edited")
        lines[n] = f"{line[: m.start(3)]}{lead}{_toml_value(value)}{comment}"
        return "\n".join(lines)
    raise TransformError(f"key {key!r} not found as a one-line `key = value`")


def set_config_value(text: str, fmt: str, key: str, value: Any) -> str:
    """``text`` with dotted ``key`` set to ``value``; checked by re-parsing (see module docstring)."""
    before = parse_config(text, fmt)
    if fmt == "json":
        indent_m = re.search(r"\n( +)\S", text)
        indent = len(indent_m.group(1)) if indent_m else 2
        new = json.dumps(_with_value(before, key, value), indent=indent, ensure_ascii=False)
        new += "\n" if text.endswith("\n") else ""
    elif fmt == "yaml":
        new = _set_yaml(text, key, value)
    elif fmt == "toml":
        new = _set_toml(text, key, value)
    else:
        raise TransformError(f"unsupported config format {fmt!r}")
    after = parse_config(new, fmt)
    if json.dumps(after, sort_keys=True, default=str) != json.dumps(_with_value(before, key, value), sort_keys=True, default=str):
        raise TransformError(f"setting {key!r} would change more than that key; not edited")
    return new


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
    import jinja2

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


def _instruction(marker: str, block: str) -> Callable[[str, str, dict[str, Any]], str | None]:
    def apply(text: str, rel: str, options: dict[str, Any]) -> str | None:
        if marker in text:
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
                    _instruction("Output format: answer with the entity", ENTITY_ONLY)),
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

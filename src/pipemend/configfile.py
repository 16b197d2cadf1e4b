"""A target's config files (YAML, JSON, TOML): parse them, and get or set a dotted key, lists included.

A dotted key walks mappings by key and lists by index: ``retrieval.top_k``,
``retrievers.0.top_k``. The manifest check of a knob (``manifest_checks``) and
the ladder's edit of it read keys with this one ``lookup``, so a key that
passes the check is one the ladder can read and set.

``set_config_value`` edits the text, not a re-dump, so comments, order and
formatting survive: YAML by replacing the one value's characters (located by
PyYAML's composer, so values inside lists and flow collections are found
too), TOML on the one line that holds the key (or the inline array or table
that holds it), JSON by re-dumping with the file's indent. Every edit is
checked by parsing the result: the key must hold the new value and everything
else must be unchanged, else ``ConfigFileError``.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}
_MISSING = object()


class ConfigFileError(ValueError):
    """A config file that cannot be read, a key that is not there, or an edit that cannot be made safely."""


# --------------------------------------------------------------------------- parse


def config_format(path: str | Path) -> str:
    """``yaml``, ``json`` or ``toml`` from the file's extension."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise ConfigFileError(f"{path}: unsupported config format {suffix or '(no extension)'!r} (expected .yaml, .yml, .json or .toml)")
    return fmt


def parse_config(text: str, fmt: str) -> Any:
    """The parsed content (an empty YAML file is ``{}``)."""
    try:
        if fmt == "yaml":
            data = yaml.safe_load(text)
            return {} if data is None else data
        if fmt == "json":
            return json.loads(text)
        if fmt == "toml":
            return tomllib.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigFileError(f"not valid {fmt}: {e}") from None
    raise ConfigFileError(f"unsupported config format {fmt!r}")


def read_config_file(path: str | Path) -> Any:
    """Parse a YAML, JSON or TOML file by its extension."""
    path = Path(path)
    fmt = config_format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"cannot read {path}: {e}") from None
    return parse_config(text, fmt)


# --------------------------------------------------------------------------- get


def _step(cur: Any, part: str) -> tuple[bool, Any]:
    """One step of a dotted key: a mapping's key (or a key that prints as ``part``), or a list's index."""
    if isinstance(cur, dict):
        if part in cur:
            return True, cur[part]
        for k, v in cur.items():
            if not isinstance(k, str) and str(k) == part:
                return True, v
        return False, None
    if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
        return True, cur[int(part)]
    return False, None


def lookup(data: Any, dotted: str) -> tuple[bool, Any]:
    """Follow ``a.b.0.c`` through mappings and lists: ``(found, value)``."""
    cur = data
    for part in dotted.split("."):
        found, cur = _step(cur, part)
        if not found:
            return False, None
    return True, cur


def get_dotted(data: Any, key: str, default: Any = _MISSING) -> Any:
    """The value at ``key``; ``default`` when it is missing, or ``ConfigFileError`` without one."""
    found, value = lookup(data, key)
    if found:
        return value
    if default is _MISSING:
        raise ConfigFileError(f"key {key!r} not found")
    return default


# --------------------------------------------------------------------------- set


def with_value(data: Any, key: str, value: Any) -> Any:
    """A deep copy of ``data`` with ``key`` set: missing mapping keys are created, list indices must exist."""
    data = json.loads(json.dumps(data, default=str)) if data is not None else {}
    if not key:
        return value
    cur = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not (part.isdigit() and int(part) < len(cur)):
                raise ConfigFileError(f"key {key!r}: {part!r} is not an index of a list of {len(cur)} items")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                if not isinstance(cur.get(part), (dict, list)):
                    cur[part] = {}
                cur = cur[part]
        else:
            raise ConfigFileError(f"key {key!r}: {'.'.join(parts[:i])!r} holds a {type(cur).__name__}, not a mapping or list")
    return data


def _yaml_flow(value: Any) -> str:
    out = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    if out.endswith("\n..."):
        out = out[: -len("\n...")].strip()
    elif out.endswith("..."):
        out = out[:-3].strip()
    return out


def _yaml_node(text: str, key: str) -> yaml.Node:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigFileError(f"not valid yaml: {e}") from None
    for part in key.split("."):
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == part:
                    nxt = v  # the last duplicate wins, as in safe_load
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            nxt = node.value[int(part)]
        if nxt is None:
            raise ConfigFileError(f"key {key!r} not found")
        node = nxt
    return node


def _set_yaml(text: str, key: str, value: Any) -> str:
    node = _yaml_node(text, key)
    start, end = node.start_mark, node.end_mark
    span = text[start.index : end.index]
    one_line = start.line == end.line
    if isinstance(node, yaml.ScalarNode):
        if node.style in ("|", ">") or not one_line or span[:1] in ("&", "!", "*"):
            raise ConfigFileError(f"key {key!r} holds a block, multi-line, anchored or tagged value; only one-line values are edited")
    elif not (getattr(node, "flow_style", False) and one_line) or span[:1] in ("&", "!"):
        raise ConfigFileError(f"key {key!r} holds a block mapping or list; only one-line values are edited")
    new = _yaml_flow(value)
    if not span:  # `key:` with no value
        new = " " + new
    return text[: start.index] + new + text[end.index :]


def _split_comment(rest: str) -> tuple[str, str]:
    """Split ``value  # comment`` into the value and the trailing spacing+comment, quotes respected."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote and (quote == "'" or rest[i - 1] != "\\"):
                quote = None
        elif ch in "\"'":
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
    raise ConfigFileError(f"cannot write {value!r} as TOML")


_TOML_TABLE = re.compile(r"^\s*\[([^\[\]]+)\]\s*(?:#.*)?$")
_TOML_ARRAY_TABLE = re.compile(r"^\s*\[\[([^\[\]]+)\]\]\s*(?:#.*)?$")
_TOML_KEY = re.compile(r"^(\s*)((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*=(.*)$")


def _toml_parts(dotted: str) -> list[str]:
    return [_unquote(p) for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)]


def _set_toml(text: str, key: str, value: Any, before: Any) -> str:
    parts = key.split(".")
    lines = text.split("\n")
    table: list[str] = []
    seen_arrays: dict[tuple[str, ...], int] = {}
    for n, line in enumerate(lines):
        a = _TOML_ARRAY_TABLE.match(line)
        if a:
            name = tuple(_toml_parts(a.group(1)))
            seen_arrays[name] = seen_arrays.get(name, -1) + 1
            table = [*name, str(seen_arrays[name])]
            continue
        t = _TOML_TABLE.match(line)
        if t:
            table = _toml_parts(t.group(1))
            continue
        m = _TOML_KEY.match(line)
        if not m:
            continue
        path = table + _toml_parts(m.group(2))
        if path != parts[: len(path)]:
            continue
        rest = m.group(3)
        lead = rest[: len(rest) - len(rest.lstrip())] or " "
        old_value, comment = _split_comment(rest.lstrip())
        if old_value.startswith(('"""', "'''")) or (old_value[:1] in "[{" and old_value[-1:] not in "]}"):
            raise ConfigFileError(f"key {key!r} holds a multi-line value; only one-line values are edited")
        inner = ".".join(parts[len(path):])
        new_value = with_value(get_dotted(before, ".".join(path)), inner, value) if inner else value
        lines[n] = f"{line[: m.start(3)]}{lead}{_toml_value(new_value)}{comment}"
        return "\n".join(lines)
    raise ConfigFileError(f"key {key!r} not found as a one-line `key = value`")


def set_config_value(text: str, fmt: str, key: str, value: Any) -> str:
    """``text`` with dotted ``key`` set to ``value``; checked by re-parsing (see the module docstring)."""
    before = parse_config(text, fmt)
    if fmt == "json":
        indent_m = re.search(r"\n( +)\S", text)
        indent = len(indent_m.group(1)) if indent_m else 2
        new = json.dumps(with_value(before, key, value), indent=indent, ensure_ascii=False)
        new += "\n" if text.endswith("\n") else ""
    elif fmt == "yaml":
        new = _set_yaml(text, key, value)
    elif fmt == "toml":
        new = _set_toml(text, key, value, before)
    else:
        raise ConfigFileError(f"unsupported config format {fmt!r}")
    after = parse_config(new, fmt)
    if json.dumps(after, sort_keys=True, default=str) != json.dumps(with_value(before, key, value), sort_keys=True, default=str):
        raise ConfigFileError(f"setting {key!r} would change more than that key; not edited")
    return new


__all__ = [
    "ConfigFileError", "FORMATS", "config_format", "get_dotted", "lookup", "parse_config", "read_config_file",
    "set_config_value", "with_value",
]

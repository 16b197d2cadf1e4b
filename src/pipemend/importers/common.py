"""What every importer shares: source records with their place, the field mapping, rows, splits.

A format module turns its source into ``Record``s: the source's own fields plus a few it derives
(HotpotQA's ``supporting_titles``, BEIR's ``relevant``), each with where it came from (``line 3``,
``record 2``). ``build_rows`` maps them onto dataset rows with ``fields`` (row field <- source field,
the manifest's ``dataset.source.fields``). Every problem is a ``ConfigError`` naming the source file,
the line or record and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..dataset import SPLITS, json_objects
from ..errors import ConfigError, UsageError

ROW_ID = "#row"
"""Source field that stands for the record's 1-based number, for sources without ids."""
UNMAPPED = "-"
"""``--map -=TARGET`` leaves TARGET out of the rows."""
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test"}


@dataclass(frozen=True)
class Record:
    """One source record: its fields (the source's and the format's derived ones) and where it is."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Corpus:
    """Corpus rows ``{"id", "text"}`` a format produces beside the dataset (BEIR's corpus.jsonl)."""

    rows: list[dict[str, str]]


@dataclass(frozen=True)
class Format:
    """An importer: how to read the source, and the mapping to use when the user gives none."""

    name: str
    read: Callable[[Path], list[Record]]
    default_fields: Callable[[Path, list[Record], dict[str, str]], dict[str, str]]
    """The mapping to lay ``--map``'s over: the format's own, or one inferred from the columns ``--map`` leaves open."""
    derived: dict[str, str] = field(default_factory=dict)
    """Fields the format adds to each record, with what they hold (printed beside the mapping)."""
    corpus: Callable[[Path], Corpus] | None = None


@dataclass
class Rows:
    """Converted rows as JSONL lines, each with the source place it came from, by split (or ``None``: unsplit)."""

    lines: dict[str | None, list[str]] = field(default_factory=dict)
    wheres: dict[str | None, list[str]] = field(default_factory=dict)

    def add(self, split: str | None, line: str, where: str) -> None:
        self.lines.setdefault(split, []).append(line)
        self.wheres.setdefault(split, []).append(where)

    def count(self) -> int:
        return sum(len(v) for v in self.lines.values())


# --------------------------------------------------------------------------- reading


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found", "the source file to convert") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a folder", "a file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})", "a UTF-8 file") from None


def read_jsonl_objects(path: Path, text: str | None = None) -> list[Record]:
    """One JSON object per line (blank lines skipped), each a ``Record`` at ``line N``."""
    text = read_text(path) if text is None else text
    return [Record(f"line {n}", obj) for n, obj in json_objects(text.splitlines(), path)]


def read_json_objects(path: Path) -> list[Record]:
    """A JSON array of objects (``record N``) or, when the file does not start with ``[``, JSONL (``line N``)."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return read_jsonl_objects(path, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"line {e.lineno}", f"not valid JSON ({e.msg} at column {e.colno})", "a JSON array of objects, or JSONL") from None
    out: list[Record] = []
    for n, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise ConfigError(path, f"record {n}", f"a JSON {type(obj).__name__}, not an object", "a JSON array of objects")
        out.append(Record(f"record {n}", obj))
    return out


def require(path: Path, rec: Record, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``rec.fields[key]``, which must be of ``kind``."""
    if key not in rec.fields:
        raise ConfigError(path, rec.where, f"no `{key}`", what)
    value = rec.fields[key]
    if not isinstance(value, kind):
        raise ConfigError(path, rec.where, f"`{key}` is a {type(value).__name__}", what)
    return value


# --------------------------------------------------------------------------- mapping


def parse_map(items: list[str]) -> dict[str, str]:
    """``--map SRC=TARGET[,SRC=TARGET...]`` (repeatable) as ``{target: source}``; ``-=TARGET`` drops TARGET."""
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            src, sep, target = pair.partition("=")
            src, target = src.strip(), target.strip()
            if not sep or not src or not target:
                raise UsageError(f"--map {pair!r}: expected SOURCE=TARGET, e.g. question=inputs.question,answer=expected")
            out[target] = src
    return out


def merge_fields(defaults: dict[str, str], given: dict[str, str]) -> dict[str, str]:
    """The default mapping with ``given`` laid over it (``-`` removes a target)."""
    merged = {**defaults, **given}
    return {t: s for t, s in merged.items() if s != UNMAPPED}


def lookup(fields: dict[str, Any], source: str) -> tuple[bool, Any]:
    """A source field by name, or by dotted path into nested objects and lists (``meta.answer``, ``answers.0``)."""
    if source in fields:
        return True, fields[source]
    cur: Any = fields
    for part in source.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return False, None
    return True, cur


def _id_list(value: Any) -> list[str] | None:
    if isinstance(value, str):  # a CSV cell: a JSON list, or ids separated by |
        value = json.loads(value) if value.lstrip().startswith("[") else [v.strip() for v in value.split("|") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        return None
    return [str(v) for v in value]


def _text_list(value: Any) -> list[str] | None:
    if isinstance(value, str):  # a CSV cell: a JSON list, or one text
        value = json.loads(value) if value.lstrip().startswith("[") else [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _convert(path: Path, where: str, target: str, source: str, value: Any) -> Any:
    bad = None
    try:
        if target == "id":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                bad = "a string or integer id"
            value = str(value)
        elif target == "evidence":
            value = _id_list(value)
            bad = None if value is not None else "a list of document ids (in a CSV cell: a JSON list or ids separated by |)"
        elif target == "evidence_text":
            value = _text_list(value)
            bad = None if value is not None else "a list of strings (in a CSV cell: a JSON list or one text)"
        elif target == "split":
            value = SPLIT_NAMES.get(str(value).strip().lower())
            bad = None if value is not None else f"one of {', '.join(sorted(SPLIT_NAMES))}"
    except json.JSONDecodeError as e:
        bad = f"valid JSON ({e.msg})"
    if bad is not None:
        raise ConfigError(path, where, f"field {source!r} (mapped to {target}) cannot be used", bad)
    return value


def build_rows(path: Path, records: list[Record], fields: dict[str, str]) -> Rows:
    """Dataset rows ``{"id", "inputs", "expected"?, "evidence"?, "evidence_text"?}`` as JSONL, by split."""
    out = Rows()
    for number, rec in enumerate(records, start=1):
        row: dict[str, Any] = {"id": None, "inputs": {}}
        split: str | None = None
        for target, source in fields.items():
            if source == ROW_ID:
                found, value = True, number
            else:
                found, value = lookup(rec.fields, source)
            if not found:
                raise ConfigError(path, rec.where, f"no field {source!r} (mapped to {target})",
                                  f"one of {', '.join(sorted(map(str, rec.fields)))}, or another mapping (--map SOURCE={target})")
            value = _convert(path, rec.where, target, source, value)
            if target == "split":
                split = value
            elif target.startswith("inputs."):
                row["inputs"][target.removeprefix("inputs.")] = value
            else:
                row[target] = value
        ev, texts = row.get("evidence"), row.get("evidence_text")
        if texts is not None and ev is not None and len(ev) != len(texts):
            raise ConfigError(path, rec.where, f"{len(texts)} evidence text(s) for {len(ev)} evidence id(s)",
                              "`evidence_text` parallel to `evidence` (one text per id), or texts without ids")
        out.add(split, json.dumps(row, ensure_ascii=False), rec.where)
    if not out.count():
        raise ConfigError(path, None, "no records", "at least one record to convert")
    if "split" in fields:
        missing = [s for s in SPLITS if not out.lines.get(s)]
        if missing:
            raise ConfigError(path, f"fields.split <- {fields['split']}", f"no rows for {', '.join(missing)}",
                              "rows in each of train, val and test, or `--map -=split` to split them by seed")
    return out


def describe(fields: dict[str, str], derived: dict[str, str]) -> list[str]:
    """The mapping as lines ``target <- source  (what a derived source holds)``."""
    width = max(len(t) for t in fields)
    lines = []
    for target, source in fields.items():
        note = derived.get(source) or ("the record's number" if source == ROW_ID else "")
        lines.append(f"{target.ljust(width)} <- {source}" + (f"   ({note})" if note else ""))
    return lines

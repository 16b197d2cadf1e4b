"""HotpotQA: a JSON array (or JSONL) of ``{_id, question, answer, supporting_facts, context}``.

``supporting_facts`` are ``[title, sentence index]`` pairs and ``context`` is ``[title, [sentences]]``
paragraphs (the Hugging Face copy's column form, ``{"title": [...], "sentences": [...]}``, is read too).
Each record gains ``supporting_titles`` (the supporting paragraphs' titles, once each, in order: the
evidence ids) and ``supporting_texts`` (each of those paragraphs' whole text: the evidence texts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import Format, Record, read_json_objects

DERIVED = {
    "supporting_titles": "titles of the supporting paragraphs, once each",
    "supporting_texts": "the text of each supporting paragraph",
}


def _pairs(value: Any, a: str, b: str) -> Any:
    """The column form ``{a: [...], b: [...]}`` as a list of ``[a, b]`` pairs; anything else as it is."""
    if isinstance(value, dict) and isinstance(value.get(a), list) and isinstance(value.get(b), list):
        return [list(p) for p in zip(value[a], value[b])]
    return value


def _paragraphs(path: Path, rec: Record) -> dict[str, str]:
    context = _pairs(rec.fields.get("context"), "title", "sentences")
    if not isinstance(context, list):
        raise ConfigError(path, rec.where, "`context` is missing or not a list", "[[title, [sentence, ...]], ...]")
    out: dict[str, str] = {}
    for item in context:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], list) and all(isinstance(s, str) for s in item[1])):
            raise ConfigError(path, rec.where, f"a `context` entry is {str(item)[:60]!r}", "[title, [sentence, ...]]")
        out.setdefault(item[0], "".join(item[1]))
    return out


def read(path: Path) -> list[Record]:
    out = []
    for rec in read_json_objects(path):
        facts = _pairs(rec.fields.get("supporting_facts"), "title", "sent_id")
        if facts is None:  # the test set has none: mapping `evidence` then names what is missing
            out.append(rec)
            continue
        if not isinstance(facts, list) or not all(isinstance(f, list) and f and isinstance(f[0], str) for f in facts):
            raise ConfigError(path, rec.where, "`supporting_facts` is not a list of [title, sentence] pairs",
                              "[[title, sentence index], ...]")
        paragraphs = _paragraphs(path, rec)
        titles = list(dict.fromkeys(f[0] for f in facts))
        for title in titles:
            if title not in paragraphs:
                raise ConfigError(path, rec.where, f"supporting fact {title!r} is not one of its `context` paragraphs",
                                  "supporting facts that name context paragraphs")
        out.append(Record(rec.where, {**rec.fields, "supporting_titles": titles,
                                      "supporting_texts": [paragraphs[t] for t in titles]}))
    return out


def default_fields(path: Path, records: list[Record], given: dict[str, str]) -> dict[str, str]:
    id_key = "_id" if not records or "_id" in records[0].fields else "id"
    return {"id": id_key, "inputs.question": "question", "expected": "answer",
            "evidence": "supporting_titles", "evidence_text": "supporting_texts"}


FORMAT = Format(name="hotpotqa", read=read, default_fields=default_fields, derived=DERIVED)

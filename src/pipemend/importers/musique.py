"""MuSiQue: JSONL (or a JSON array) of ``{id, question, answer, paragraphs, question_decomposition}``.

``paragraphs`` are ``{idx, title, paragraph_text, is_supporting}``. Each record gains
``supporting_titles`` (the titles of the paragraphs flagged ``is_supporting``, in order: the evidence
ids) and ``supporting_texts`` (their ``paragraph_text``: the evidence texts).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .common import Format, Record, read_json_objects, require

DERIVED = {
    "supporting_titles": "titles of the paragraphs flagged is_supporting",
    "supporting_texts": "the text of each of those paragraphs",
}
_PARAGRAPH = "{idx, title, paragraph_text, is_supporting}"


def read(path: Path) -> list[Record]:
    out = []
    for rec in read_json_objects(path):
        paragraphs = require(path, rec, "paragraphs", list, f"a list of {_PARAGRAPH}")
        titles, texts = [], []
        for n, p in enumerate(paragraphs):
            if not (isinstance(p, dict) and isinstance(p.get("title"), str) and isinstance(p.get("paragraph_text"), str)):
                raise ConfigError(path, f"{rec.where}, paragraphs[{n}]", "not a paragraph", _PARAGRAPH)
            if p.get("is_supporting") is True:
                titles.append(p["title"])
                texts.append(p["paragraph_text"])
        out.append(Record(rec.where, {**rec.fields, "supporting_titles": titles, "supporting_texts": texts}))
    return out


def default_fields(path: Path, records: list[Record], given: dict[str, str]) -> dict[str, str]:
    return {"id": "id", "inputs.question": "question", "expected": "answer",
            "evidence": "supporting_titles", "evidence_text": "supporting_texts"}


FORMAT = Format(name="musique", read=read, default_fields=default_fields, derived=DERIVED)

"""Guess a mapping from the column names of a CSV or JSONL source (printed, and written to the manifest)."""

from __future__ import annotations

from ..errors import UsageError
from pathlib import Path

from .common import ROW_ID, Record

CANDIDATES: dict[str, tuple[str, ...]] = {
    "id": ("id", "_id", "qid", "question_id", "example_id", "uid", "key"),
    "inputs": ("question", "query", "input", "prompt", "text", "q"),
    "expected": ("answer", "expected", "output", "target", "label", "gold", "answers", "reference"),
    "evidence": ("evidence", "evidence_ids", "doc_ids", "supporting_ids", "gold_ids", "relevant"),
    "evidence_text": ("evidence_text", "evidence_texts", "supporting_texts", "gold_passages"),
    "split": ("split",),
}


def infer_fields(file: object, columns: list[str], given: dict[str, str]) -> dict[str, str]:
    """The obvious mapping for ``columns`` (case-insensitive names), for each row field ``given`` leaves open.

    Without an id column the record's number is the id; without an input column it is a ``UsageError``.
    """
    lower = {c.lower(): c for c in reversed(columns)}
    used = set(given.values())
    fields: dict[str, str] = {}
    for target, names in CANDIDATES.items():
        if target == "inputs":
            if any(t.startswith("inputs.") for t in given):
                continue
            hit = next((lower[n] for n in names if n in lower and lower[n] not in used), None)
            if hit is None:
                raise UsageError(f"{file}: no column looks like the pipeline's input (columns: {', '.join(columns)}); "
                                 "name it with --map COLUMN=inputs.NAME")
            name = hit if hit.isidentifier() else "question"
            fields[f"inputs.{name}"] = hit
            continue
        if target in given:
            continue
        hit = next((lower[n] for n in names if n in lower and lower[n] not in used), None)
        if hit is not None:
            fields[target] = hit
        elif target == "id":
            fields["id"] = ROW_ID
    return fields


def from_columns(path: Path, records: list[Record], given: dict[str, str]) -> dict[str, str]:
    """``infer_fields`` over the first record's columns (a CSV's header, a JSONL row's keys)."""
    return infer_fields(path, list(records[0].fields) if records else [], given)

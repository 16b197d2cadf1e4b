"""JSONL (or a JSON array) of objects; each object is one record, its keys the columns (dotted paths reach
nested values: ``meta.answer``, ``answers.0``). Keys map to row fields by ``--map`` or ``infer.infer_fields``.
"""

from __future__ import annotations

from .common import Format, read_json_objects
from .infer import from_columns


FORMAT = Format(name="jsonl", read=read_json_objects, default_fields=from_columns)

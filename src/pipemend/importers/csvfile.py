"""CSV (or, for a ``.tsv`` file, tab-separated) with a header row; each later row is one record of strings.

Columns map to row fields by ``--map`` or by ``infer.infer_fields``. A list cell (``evidence``,
``evidence_text``) is a JSON list, or ids separated by ``|`` (one text, for ``evidence_text``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import ConfigError
from .common import Format, Record, read_text
from .infer import from_columns


def read(path: Path) -> list[Record]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ConfigError(path, "line 1", "no header row", "a first row naming the columns")
        header = [h.strip() for h in header]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes or "" in header:
            raise ConfigError(path, "line 1", f"column names {'repeat: ' + ', '.join(dupes) if dupes else 'include an empty one'}",
                              "unique, non-empty column names")
        out = []
        for cells in reader:
            where = f"line {reader.line_num}"
            if not cells:
                continue
            if len(cells) != len(header):
                raise ConfigError(path, where, f"{len(cells)} column(s), the header has {len(header)}",
                                  f"{len(header)} columns: {', '.join(header)}")
            out.append(Record(where, dict(zip(header, cells))))
    except csv.Error as e:
        raise ConfigError(path, f"line {reader.line_num}", f"not valid CSV ({e})", "comma-separated rows with a header") from None
    return out


FORMAT = Format(name="csv", read=read, default_fields=from_columns)

"""Datasets as they come: ``pipemend init DIR --from FORMAT FILE`` converts a source into dataset rows.

    common.py    records, the field mapping, rows      infer.py     a mapping guessed from column names
    hotpotqa.py  musique.py  beir.py  csvfile.py  jsonlfile.py: one reader per format

``import_dataset`` converts and writes a new manifest whose ``dataset.source`` records the format, the
file and the field mapping (row field <- source field); ``reimport`` converts again from that record,
so an edited mapping is one command away. Rows are checked by ``dataset.load_rows`` before anything is
written, every file is written atomically, and an existing dataset is replaced only with ``force``
(an identical one is left as it is).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..dataset import SPLITS, load_rows
from ..errors import ConfigError, UsageError
from ..fsutil import atomic_write_text
from ..init_template import manifest_path, render
from ..manifest import MANIFEST_NAME, DatasetSource, load_manifest
from ..manifest_checks import inside
from . import beir, csvfile, hotpotqa, jsonlfile, musique
from .common import Corpus, Format, Rows, build_rows, describe, merge_fields, parse_map

__all__ = ["FORMATS", "Conversion", "ImportResult", "convert", "import_dataset", "parse_map", "reimport"]

FORMATS: dict[str, Format] = {f.name: f for f in (hotpotqa.FORMAT, musique.FORMAT, beir.FORMAT, csvfile.FORMAT,
                                                   jsonlfile.FORMAT)}
DEFAULT_OUT = "data.jsonl"
CORPUS_OUT = "corpus.jsonl"
DEFAULT_SPLIT = {"train": 0.4, "val": 0.4, "test": 0.2}


@dataclass
class Conversion:
    """A source converted in memory: its rows (by split when the source has splits) and corpus."""

    format: str
    source: Path
    fields: dict[str, str]
    rows: Rows
    corpus: Corpus | None = None

    @property
    def split_by_source(self) -> bool:
        return "split" in self.fields

    def mapping_lines(self) -> list[str]:
        return describe(self.fields, FORMATS[self.format].derived)


@dataclass
class ImportResult:
    """What ``import_dataset``/``reimport`` did: the conversion, the files written and the ones left unchanged."""

    conversion: Conversion
    manifest: Path
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        c = self.conversion
        counts = ", ".join(f"{s} {len(c.rows.lines.get(s, []))}" for s in SPLITS) if c.split_by_source else None
        head = f"{c.format} {c.source}: {c.rows.count()} rows" + (f" ({counts})" if counts else "")
        out = [head, "field mapping (row field <- source field):"]
        out += [f"  {line}" for line in c.mapping_lines()]
        out += [f"wrote {p}" for p in self.written] + [f"unchanged {p}" for p in self.unchanged] + self.notes
        return out


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UsageError(f"--from {name!r}: unknown format (expected one of {', '.join(FORMATS)})")
    return FORMATS[name]


def convert(fmt: str, source: str | Path, given: dict[str, str] | None = None, *,
            exact: dict[str, str] | None = None) -> Conversion:
    """Read ``source`` as ``fmt`` and map it onto rows.

    ``given`` (``{row field: source field}``, from ``--map``) is laid over the format's default or
    inferred mapping; ``exact`` (a manifest's recorded ``fields``) is used as it is.
    """
    form = get_format(fmt)
    source = Path(source)
    records = form.read(source)
    fields = dict(exact) if exact is not None else merge_fields(form.default_fields(source, records, given or {}), given or {})
    try:
        DatasetSource(format=fmt, file=str(source), fields=fields)  # row fields named as the manifest accepts them
    except ValidationError as e:
        raise UsageError(f"--map: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    rows = build_rows(source, records, fields)
    return Conversion(fmt, source, fields, rows, form.corpus(source) if form.corpus else None)


# --------------------------------------------------------------------------- writing


def _check_rows(conv: Conversion) -> None:
    """Load each split's rows with ``dataset.load_rows``; a problem names the source record it came from."""
    with tempfile.TemporaryDirectory(prefix="pipemend-import-") as tmp:
        for split, lines in conv.rows.lines.items():
            probe = Path(tmp) / f"{split or 'rows'}.jsonl"
            probe.write_text("\n".join(lines) + "\n", encoding="utf-8")
            try:
                load_rows(probe)
            except ConfigError as e:
                where = e.where or ""
                n = int(where.removeprefix("line ")) if where.startswith("line ") else None
                origin = conv.rows.wheres[split][n - 1] if n else None
                raise ConfigError(conv.source, origin, e.problem, e.expected) from None


def _outputs(conv: Conversion, path: str | None, files: dict[str, str] | None, corpus: str | None) -> dict[str, str]:
    """Target-relative file -> text, for every file the conversion writes."""
    texts: dict[str, str] = {}
    if files is not None:
        for split in SPLITS:
            texts[files[split]] = "\n".join(conv.rows.lines[split]) + "\n"
    else:
        assert path is not None
        texts[path] = "\n".join(line for lines in conv.rows.lines.values() for line in lines) + "\n"
    if corpus is not None and conv.corpus is not None:
        texts[corpus] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in conv.corpus.rows)
    return texts


def _write(target_dir: Path, texts: dict[str, str], force: bool, result: ImportResult) -> None:
    """Write every file, or none: an existing different file needs ``force``; an identical one stays."""
    todo = []
    for rel, text in texts.items():
        dst = inside(target_dir, rel)
        if dst is None:
            raise ConfigError(target_dir / MANIFEST_NAME, "dataset", f"{rel!r} is outside the target folder",
                              "paths relative to the target, without '..'")
        if dst.is_symlink() or (dst.exists() and not dst.is_file()):
            raise UsageError(f"{dst}: not a regular file; remove it or choose another --out")
        if dst.is_file():
            if dst.read_bytes() == text.encode("utf-8"):
                result.unchanged.append(dst)
                continue
            if not force:
                raise UsageError(f"{dst}: a dataset file already exists and would change; pass --force to replace it "
                                 "(or --out to write elsewhere)")
        todo.append((dst, text))
    for dst, text in todo:
        atomic_write_text(dst, text)
        result.written.append(dst)


def _split_paths(out: str) -> dict[str, str]:
    stem, dot, ext = out.rpartition(".")
    return {s: f"{stem}.{s}.{ext}" if dot else f"{out}.{s}" for s in SPLITS}


def _recorded_file(target_dir: Path, source: Path) -> str:
    """The source as the manifest records it: relative to the target when inside it, else absolute."""
    resolved = source.resolve()
    try:
        return resolved.relative_to(target_dir.resolve()).as_posix()
    except ValueError:
        return str(resolved)


def dataset_block(conv: Conversion, recorded: str, *, path: str | None, files: dict[str, str] | None,
                  corpus: str | None, seed: int) -> str:
    """The manifest's ``dataset:`` entries for a conversion (indented YAML lines, commented)."""
    q = json.dumps
    lines = [f"  # JSONL rows converted by `pipemend init --from {conv.format}` (see `source` below)."]
    if files is not None:
        lines += ["  # The source's own splits.", f"  files: {{train: {q(files['train'])}, val: {q(files['val'])}, "
                  f"test: {q(files['test'])}}}"]
    else:
        fr = DEFAULT_SPLIT
        lines += ["  # The source has no splits: a seeded shuffle of the ids cuts them (stable for a seed).",
                  f"  path: {q(path)}",
                  f"  split: {{train: {fr['train']}, val: {fr['val']}, test: {fr['test']}, seed: {seed}}}"]
    if corpus is not None:
        lines.append(f"  corpus: {q(corpus)}   # {{id, text}} rows: the documents evidence ids name")
    lines += ["  # Where the rows came from. Edit `fields` (row field: source field), then run",
              "  # `pipemend init DIR --reimport --force` to convert again.",
              "  source:", f"    format: {conv.format}", f"    file: {q(recorded)}", "    fields:"]
    lines += [f"      {q(t)}: {q(s)}" for t, s in conv.fields.items()]
    return "\n".join(lines) + "\n"


def import_dataset(target_dir: str | Path, fmt: str, source: str | Path, map_items: list[str] | None = None, *,
                   out: str = DEFAULT_OUT, seed: int = 0, force: bool = False) -> ImportResult:
    """Convert ``source`` into rows under ``target_dir`` and write a new manifest recording how.

    Refuses an existing manifest (``reimport`` re-converts from it) and, without ``force``, a dataset file
    that exists with other content. Returns what was written; ``ImportResult.lines()`` says it for people.
    """
    target_dir = Path(target_dir)
    mpath = manifest_path(target_dir)
    conv = convert(fmt, source, parse_map(map_items or []))
    _check_rows(conv)
    files = _split_paths(out) if conv.split_by_source else None
    corpus = CORPUS_OUT if conv.corpus is not None else None
    recorded = _recorded_file(target_dir, conv.source)
    result = ImportResult(conv, mpath)
    sealed = None
    if not Path(recorded).is_absolute():  # the raw source inside the target holds the labels: seal it
        sealed = [f"{recorded}/**" if conv.source.is_dir() else recorded]
        result.notes.append(f"sealed {sealed[0]}: the source inside the target holds the labels")
    _write(target_dir, _outputs(conv, None if files else out, files, corpus), force, result)
    block = dataset_block(conv, recorded, path=None if files else out, files=files, corpus=corpus, seed=seed)
    val_size = len(conv.rows.lines.get("val", [])) if files else round(conv.rows.count() * DEFAULT_SPLIT["val"])
    atomic_write_text(mpath, render(target_dir, dataset_block=block, sealed=sealed, val_size=val_size))
    result.written.append(mpath)
    result.notes.append(f"mapping written to {mpath} (dataset.source); edit it, then "
                        f"`pipemend init {target_dir} --reimport --force` converts again")
    return result


def reimport(target_dir: str | Path, *, force: bool = False) -> ImportResult:
    """Convert again from the manifest's ``dataset.source``, into the files its ``dataset`` names."""
    target_dir = Path(target_dir)
    manifest = load_manifest(target_dir, check_files=False)
    mpath = target_dir / MANIFEST_NAME
    ds = manifest.dataset
    if ds.source is None:
        raise ConfigError(mpath, "dataset.source", "no source recorded",
                          "a manifest written by `pipemend init DIR --from FORMAT FILE`")
    src = Path(ds.source.file)
    conv = convert(ds.source.format, src if src.is_absolute() else target_dir / src, exact=ds.source.fields)
    if conv.split_by_source != (ds.files is not None):
        raise ConfigError(mpath, "dataset.source.fields.split",
                          "the mapping " + ("splits by the source, but the dataset is one `path`" if conv.split_by_source
                                            else "has no `split`, but the dataset names per-split `files`"),
                          "`split` mapped with `files`, or no `split` with `path` + `split` fractions")
    _check_rows(conv)
    files = ds.files.model_dump() if ds.files is not None else None
    corpus = ds.corpus
    result = ImportResult(conv, mpath)
    _write(target_dir, _outputs(conv, ds.path, files, corpus), force, result)
    return result

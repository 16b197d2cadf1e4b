"""Dataset rows, splits and the frozen copy of data and metric a run scores with.

``load_rows`` reads a JSONL file strictly (errors name the file and line);
``load_splits`` cuts it into train/val/test by a seeded shuffle of ids, or
reads explicit per-split files. Gold evidence comes as ids (``evidence``) and,
optionally, as text: a row's own ``evidence_text`` (a list of strings), or,
when the manifest names a corpus (``dataset.corpus``: JSONL rows ``{"id",
"text"}``), the corpus text of each ``evidence`` id, which ``load_splits`` puts
into ``Example.evidence_text`` of the rows that carry none (``load_corpus``).
``freeze_target`` copies the manifest, the data (the corpus too), a custom metric and the prompts of the
judge metrics (``frozen/judges/<name>.md.j2``) into ``RUN_DIR/frozen/`` at the run's start: every
score of the run comes from that copy, never from a candidate's files or a later pipemend's prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, UsageError
from .fsutil import atomic_write_json, read_json
from .manifest import MANIFEST_NAME, load_manifest
from .judges.client import JudgeClient
from .judges.prompts import FROZEN_SUBDIR as JUDGES_SUBDIR, frozen_template_paths, packaged_template
from .metric_specs import load_metric_spec

SPLITS = ("train", "val", "test")
ROW_KEYS = ("id", "inputs", "expected", "evidence", "evidence_text")
CORPUS_KEYS = ("id", "text", "title")
FROZEN_DIR = "frozen"
FROZEN_FORMAT = "pipemend-frozen-1"
MAX_ID_LEN = 200


class Example(BaseModel):
    """One dataset row. ``expected``, ``evidence`` and ``evidence_text`` are labels: they stay on the host."""

    model_config = ConfigDict(extra="forbid")

    id: str
    inputs: dict[str, Any]
    expected: Any = None
    evidence: list[str] | None = Field(None, description="Ids of gold supporting documents, if known.")
    evidence_text: list[str] | None = Field(None, description=(
        "Texts of the gold supporting passages, if known: the row's own, else the corpus text of each `evidence` "
        "id (`dataset.corpus`). The diagnosis checks whether each reached a model call's prompt."))
    split: str | None = None

    def sealed(self) -> dict[str, Any]:
        """What may cross into a sandbox: id and inputs only."""
        return {"id": self.id, "inputs": self.inputs}


# --------------------------------------------------------------------------- rows


def _check_id(value: Any, path: Path, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(path, where, f"`id` is {type(value).__name__}", "a string (or integer) id")
    sid = str(value)
    if not sid or len(sid) > MAX_ID_LEN or sid in (".", "..") or any(c in sid for c in "/\\\0\n"):
        raise ConfigError(path, where, f"`id` {sid!r} cannot name a trace file", f"1-{MAX_ID_LEN} characters without '/', '\\\\' or newlines, not '.' or '..'")
    if sid.startswith("<") and sid.endswith(">"):  # the runner tags calls outside examples <startup>, <outside>
        raise ConfigError(path, where, f"`id` {sid!r} is reserved", "an id that is not of the form <name> (pipemend's tags for calls outside examples)")
    return sid


def json_objects(lines: Iterable[str], path: Path, keys: tuple[str, ...] | None = None,
                 shape: str = "per line") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank JSONL line, each an object holding only ``keys`` (any keys
    when None); errors name the file and line. The one JSONL reader of datasets, corpora and importers."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(path, where, f"not valid JSON ({e.msg} at column {e.colno})", "one JSON object per line") from None
        if not isinstance(raw, dict):
            raise ConfigError(path, where, f"a JSON {type(raw).__name__}, not an object", f"an object {shape}")
        unknown = sorted(set(raw) - set(keys)) if keys is not None else []
        if unknown:
            raise ConfigError(path, where, f"unknown key(s) {', '.join(map(repr, unknown))}", f"only {', '.join(keys)}")
        yield n, raw


def load_rows(path: str | Path) -> list[Example]:
    """Read JSONL rows ``{"id", "inputs", "expected"?, "evidence"?, "evidence_text"?}``; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "dataset file not found", "a JSONL file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})", "a UTF-8 JSONL file") from None
    rows: list[Example] = []
    seen: dict[str, int] = {}
    for n, raw in json_objects(text.splitlines(), path, ROW_KEYS, '{"id", "inputs", ...}'):
        where = f"line {n}"
        for key in ("id", "inputs"):
            if key not in raw:
                raise ConfigError(path, where, f"row has no `{key}`", 'rows {"id", "inputs", "expected", "evidence"?}')
        sid = _check_id(raw["id"], path, where)
        if not isinstance(raw["inputs"], dict):
            raise ConfigError(path, where, f"`inputs` is a {type(raw['inputs']).__name__}", "`inputs` as a JSON object (the entrypoint's keyword dict)")
        ev = raw.get("evidence")
        if ev is not None and (not isinstance(ev, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in ev)):
            raise ConfigError(path, where, "`evidence` is not a list of ids", "a list of document id strings, or no `evidence`")
        texts = raw.get("evidence_text")
        if texts is not None and (not isinstance(texts, list) or not all(isinstance(x, str) for x in texts)):
            got = f"a {type(texts).__name__}" if not isinstance(texts, list) else "a list holding " + ", ".join(
                sorted({type(x).__name__ for x in texts if not isinstance(x, str)}))
            raise ConfigError(path, where, f"`evidence_text` is {got}",
                              "a list of strings (the gold passages' texts), or no `evidence_text`")
        if sid in seen:
            raise ConfigError(path, where, f"duplicate id {sid!r} (first on line {seen[sid]})", "unique ids")
        seen[sid] = n
        rows.append(Example(id=sid, inputs=raw["inputs"], expected=raw.get("expected"),
                            evidence=[str(x) for x in ev] if ev is not None else None, evidence_text=texts))
    if not rows:
        raise ConfigError(path, None, "no rows", "at least one JSONL row")
    return rows


def load_corpus(path: str | Path, wanted: set[str] | None = None) -> dict[str, str]:
    """The texts of a corpus file of JSONL rows ``{"id", "text", "title"?}`` (``dataset.corpus``), by id.

    Read line by line and checked strictly (errors name the file and line); only the ids in ``wanted`` are
    kept (all when None), so a large corpus costs the gold passages' memory, not its own.
    """
    path = Path(path)
    out: dict[str, str] = {}
    seen: set[str] = set()
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "corpus file not found", 'a JSONL file of {"id", "text"} rows') from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read the corpus file ({e.strerror})", 'a JSONL file of {"id", "text"} rows') from None
    with f:
        try:
            for n, raw in json_objects(f, path, CORPUS_KEYS, '{"id", "text"}'):
                where = f"line {n}"
                doc_id = raw.get("id")
                if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                    raise ConfigError(path, where, f"`id` is {type(doc_id).__name__}", "a document id string")
                if not isinstance(raw.get("text"), str):
                    raise ConfigError(path, where, f"`text` is {type(raw.get('text')).__name__}", "the document's text as a string")
                sid = str(doc_id)
                if sid in seen:
                    raise ConfigError(path, where, f"duplicate id {sid!r}", "unique document ids")
                seen.add(sid)
                if wanted is None or sid in wanted:
                    out[sid] = raw["text"]
        except UnicodeDecodeError as e:
            raise ConfigError(path, None, f"not UTF-8 text ({e.reason})", "a UTF-8 JSONL file") from None
    if not seen:
        raise ConfigError(path, None, "no rows", 'at least one {"id", "text"} row')
    return out


def _with_corpus_texts(rows: dict[str, list[Example]], corpus: Path) -> None:
    """Fill ``evidence_text`` from the corpus for rows that carry ``evidence`` ids and no text of their own;
    an ``evidence`` id the corpus lacks is a ``ConfigError`` naming it and its example."""
    wanted = {g for split in rows.values() for ex in split for g in ex.evidence or []}
    texts = load_corpus(corpus, wanted)
    for split in rows.values():
        for i, ex in enumerate(split):
            missing = [g for g in ex.evidence or [] if g not in texts]
            if missing:
                raise ConfigError(corpus, f"id {missing[0]!r}", f"evidence id of example {ex.id!r} is not in the corpus",
                                  "every `evidence` id of the dataset among the corpus rows' ids")
            if ex.evidence and ex.evidence_text is None:
                split[i] = ex.model_copy(update={"evidence_text": [texts[g] for g in ex.evidence]})


def split_ids(ids: list[str], train: float, val: float, seed: int) -> dict[str, set[str]]:
    """Seeded shuffle of the sorted ids, cut at the cumulative fractions (stable for a given id set and seed)."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n = len(order)
    b1 = round(train * n)
    b2 = max(b1, round((train + val) * n))
    return {"train": set(order[:b1]), "val": set(order[b1:b2]), "test": set(order[b2:])}


def load_splits(manifest: Any, target_dir: str | Path) -> dict[str, list[Example]]:
    """``{"train": [...], "val": [...], "test": [...]}``, each in file order, each Example's ``split`` set (and its
    ``evidence_text`` from the corpus, when the manifest names one and the row carries none)."""
    target_dir = Path(target_dir)
    ds = manifest.dataset
    out: dict[str, list[Example]] = {}
    if ds.files is not None:
        where_seen: dict[str, str] = {}
        for split in SPLITS:
            rel = getattr(ds.files, split)
            rows = load_rows(target_dir / rel)
            for ex in rows:
                if ex.id in where_seen:
                    other = where_seen[ex.id]
                    raise ConfigError(target_dir / rel, f"id {ex.id!r}", f"also in the {other} split ({getattr(ds.files, other)})", "each id in one split only")
                where_seen[ex.id] = split
                ex.split = split
            out[split] = rows
    else:
        rows = load_rows(target_dir / ds.path)
        cut = split_ids([r.id for r in rows], ds.split.train, ds.split.val, ds.split.seed)
        for split in SPLITS:
            out[split] = [r.model_copy(update={"split": split}) for r in rows if r.id in cut[split]]
    if ds.corpus is not None:
        _with_corpus_texts(out, target_dir / ds.corpus)
    return out


def limit_splits(splits: dict[str, list[Example]], n: int | None) -> dict[str, list[Example]]:
    """The first ``n`` examples of each split (``--limit N``); all of them when ``n`` is None."""
    if n is None:
        return dict(splits)
    if n < 1:
        raise UsageError(f"--limit must be at least 1, got {n}")
    return {k: v[:n] for k, v in splits.items()}


# --------------------------------------------------------------------------- the frozen copy


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def frozen_files(manifest: Any) -> list[str]:
    """Target-relative files a run freezes: the manifest, the data files, the evidence corpus, a custom metric
    file and a file of must-pass ids (``gates.must_pass``)."""

    files = [MANIFEST_NAME]
    ds = manifest.dataset
    if ds.path:
        files.append(ds.path)
    if ds.files:
        files += [ds.files.train, ds.files.val, ds.files.test]
    if ds.corpus:
        files.append(ds.corpus)
    files += manifest.metric_files()
    must_pass = manifest.gates.must_pass
    if isinstance(must_pass, str) and must_pass != "learned":
        files.append(must_pass)
    return list(dict.fromkeys(files))


@dataclass
class FrozenTarget:
    """The manifest, data and metric as at the run's start; the only source of labels and scoring."""

    dir: Path
    manifest: Any
    source: str = ""
    _splits: dict[str, list[Example]] | None = field(default=None, repr=False)
    _metrics: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, run_dir: str | Path) -> "FrozenTarget":

        fdir = Path(run_dir) / FROZEN_DIR
        meta_path = fdir / "frozen.json"
        if not meta_path.is_file():
            raise UsageError(f"{run_dir}: not a pipemend run directory (no {FROZEN_DIR}/frozen.json)")
        meta = read_json(meta_path)
        for rel, digest in meta.get("files", {}).items():
            if not (fdir / rel).is_file() or _sha256(fdir / rel) != digest:
                raise ConfigError(fdir / rel, None, "frozen file is missing or was changed after the run started", f"sha256 {digest}")
        return cls(dir=fdir, manifest=load_manifest(fdir, check_files=False), source=meta.get("source", ""))

    def splits(self) -> dict[str, list[Example]]:
        if self._splits is None:
            self._splits = load_splits(self.manifest, self.dir)
        return {k: list(v) for k, v in self._splits.items()}

    def examples_by_id(self) -> dict[str, Example]:
        return {ex.id: ex for rows in self.splits().values() for ex in rows}

    def metric(self, judge: JudgeClient | None = None) -> Any:
        """The run's ``Metric`` (``metric_specs.load_metric_spec``): custom files and judge prompts from this
        frozen copy; ``judge`` answers its judge metrics (one load per judge, kept)."""
        key = id(judge)
        if key not in self._metrics:
            self._metrics[key] = load_metric_spec(self.manifest.metric, self.dir, judge=judge,
                                                  templates_dir=self.dir / JUDGES_SUBDIR)
        return self._metrics[key]


def freeze_target(target_dir: str | Path, manifest: Any, run_dir: str | Path) -> FrozenTarget:
    """Copy the manifest, data and custom metric into ``RUN_DIR/frozen/`` and return the frozen view."""
    target_dir, run_dir = Path(target_dir), Path(run_dir)
    fdir = run_dir / FROZEN_DIR
    hashes: dict[str, str] = {}
    for rel in frozen_files(manifest):
        src = target_dir / rel
        if not src.is_file():
            raise ConfigError(target_dir / "pipemend.yaml", None, f"cannot freeze {rel}: file not found", "the files the manifest names")
        dst = fdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        dst.chmod(0o444)
        hashes[rel] = _sha256(dst)
    for spec, rel in zip(manifest.judge_specs(), frozen_template_paths(manifest.judge_specs())):
        if rel in hashes:
            raise ConfigError(target_dir / "pipemend.yaml", "metric", f"{rel} is both a file of the target the run "
                              f"freezes and the frozen prompt of {spec}", f"no frozen file under {JUDGES_SUBDIR}/")
        dst = fdir / rel  # the judge's prompt as this pipemend has it: the run keeps it, whatever upgrades come
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packaged_template(spec), dst)
        dst.chmod(0o444)
        hashes[rel] = _sha256(dst)
    frozen = FrozenTarget(dir=fdir, manifest=manifest, source=str(target_dir.resolve()))
    splits = frozen.splits()  # validates the data now, before any sandbox runs
    atomic_write_json(fdir / "frozen.json", {
        "format": FROZEN_FORMAT,
        "source": str(target_dir.resolve()),
        "frozen_at": time.time(),
        "files": hashes,
        "splits": {k: [ex.id for ex in v] for k, v in splits.items()},
    })
    return frozen

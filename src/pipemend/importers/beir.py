"""BEIR: a folder of ``corpus.jsonl`` (``{_id, title, text}``), ``queries.jsonl`` (``{_id, text}``) and
``qrels/{train,dev,test}.tsv`` (a header row, then ``query-id<TAB>corpus-id<TAB>score``).

Each query named by a qrels file becomes one record: the query's fields plus ``relevant`` (the corpus
ids it scores above 0, in qrels order: the evidence ids), ``relevant_texts`` (their texts) and
``split`` (the qrels file it came from; ``dev`` is val). The corpus becomes ``{id, text}`` rows.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .common import SPLIT_NAMES, Corpus, Format, Record, read_jsonl_objects, read_text, require

QRELS = ("train", "dev", "test")
DERIVED = {
    "relevant": "corpus ids the qrels score above 0",
    "relevant_texts": "the corpus text of each of those",
    "split": "the qrels file the query is in (dev is val)",
}
_HEADER = "query-id<TAB>corpus-id<TAB>score"


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError(path, None, "not a folder", "a BEIR folder with corpus.jsonl, queries.jsonl and qrels/*.tsv")
    return path


def qrels_files(path: Path) -> dict[str, Path]:
    files = {name: _folder(path) / "qrels" / f"{name}.tsv" for name in QRELS}
    found = {name: f for name, f in files.items() if f.is_file()}
    if not found:
        raise ConfigError(path / "qrels", None, "no qrels file", "qrels/train.tsv, qrels/dev.tsv or qrels/test.tsv")
    return found


def _qrels(path: Path) -> list[tuple[str, str, str, bool]]:
    """``(where, query id, corpus id, relevant)`` of one qrels file, header skipped."""
    out = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip() or n == 1:
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            raise ConfigError(path, f"line {n}", f"{len(cols)} tab-separated column(s)", _HEADER)
        try:
            score = float(cols[2])
        except ValueError:
            raise ConfigError(path, f"line {n}", f"score {cols[2]!r} is not a number", _HEADER) from None
        out.append((f"line {n}", cols[0].strip(), cols[1].strip(), score > 0))
    return out


def _texts(path: Path) -> dict[str, str]:
    """Corpus id -> text (the title when the text is empty)."""
    out: dict[str, str] = {}
    corpus = _folder(path) / "corpus.jsonl"
    for rec in read_jsonl_objects(corpus):
        doc_id = str(require(corpus, rec, "_id", (str, int), "a corpus id `_id`"))
        text = rec.fields.get("text") or rec.fields.get("title") or ""
        if not isinstance(text, str):
            raise ConfigError(corpus, rec.where, "`text` is not a string", "{_id, title, text}")
        if doc_id in out:
            raise ConfigError(corpus, rec.where, f"duplicate `_id` {doc_id!r}", "unique corpus ids")
        out[doc_id] = text
    return out


def read(path: Path) -> list[Record]:
    queries_file = _folder(path) / "queries.jsonl"
    queries: dict[str, Record] = {}
    for rec in read_jsonl_objects(queries_file):
        queries[str(require(queries_file, rec, "_id", (str, int), "a query id `_id`"))] = rec
    texts = _texts(path)
    relevant: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    for name, qfile in qrels_files(path).items():
        for where, qid, doc_id, rel in _qrels(qfile):
            if qid not in queries:
                raise ConfigError(qfile, where, f"query {qid!r} is not in queries.jsonl", "query ids from queries.jsonl")
            if doc_id not in texts:
                raise ConfigError(qfile, where, f"document {doc_id!r} is not in corpus.jsonl", "corpus ids from corpus.jsonl")
            if split_of.setdefault(qid, name) != name:
                raise ConfigError(qfile, where, f"query {qid!r} is also in qrels/{split_of[qid]}.tsv", "each query in one split")
            ids = relevant.setdefault(qid, [])
            if rel and doc_id not in ids:
                ids.append(doc_id)
    return [Record(f"queries.jsonl {queries[qid].where}",
                   {**queries[qid].fields, "relevant": ids, "relevant_texts": [texts[d] for d in ids],
                    "split": SPLIT_NAMES[split_of[qid]]})
            for qid, ids in relevant.items()]


def default_fields(path: Path, records: list[Record], given: dict[str, str]) -> dict[str, str]:
    fields = {"id": "_id", "inputs.question": "text", "expected": "relevant", "evidence": "relevant"}
    if len(qrels_files(path)) == len(QRELS):  # train, dev and test: the source's own splits
        fields["split"] = "split"
    return fields


def corpus(path: Path) -> Corpus:
    return Corpus([{"id": doc_id, "text": text} for doc_id, text in _texts(path).items()])


FORMAT = Format(name="beir", read=read, default_fields=default_fields, derived=DERIVED, corpus=corpus)

"""BM25 search over ``data/corpus.jsonl`` (bm25s with English stemming).

The index is built once, on first use, and kept for the life of the process.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import bm25s
import Stemmer

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.jsonl"

_lock = threading.Lock()
_index: tuple[bm25s.BM25, list[dict], Stemmer.Stemmer] | None = None


def load_corpus(path: Path = CORPUS) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _build() -> tuple[bm25s.BM25, list[dict], Stemmer.Stemmer]:
    global _index
    with _lock:
        if _index is None:
            docs = load_corpus()
            stemmer = Stemmer.Stemmer("english")
            tokens = bm25s.tokenize([f"{d['title']}. {d['text']}" for d in docs], stopwords="en",
                                    stemmer=stemmer, show_progress=False)
            bm25 = bm25s.BM25()
            bm25.index(tokens, show_progress=False)
            _index = (bm25, docs, stemmer)
    return _index


def search(query: str, k: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """The ``k`` best documents for ``query``, best first, as ``{id, title, text, score}``.

    Documents whose id is in ``exclude`` are skipped (and do not count towards ``k``).
    """
    bm25, docs, stemmer = _build()
    if k <= 0:
        return []
    q = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
    if not q or not q[0]:
        return []
    n = min(len(docs), k + len(exclude))
    idx, scores = bm25.retrieve(q, k=n, show_progress=False, n_threads=1)
    hits = []
    for i, s in zip(idx[0].tolist(), scores[0].tolist()):
        d = docs[i]
        if d["id"] in exclude or s <= 0:
            continue
        hits.append({"id": d["id"], "title": d["title"], "text": d["text"], "score": round(float(s), 4)})
        if len(hits) == k:
            break
    return hits


_build()  # build at import: the runner imports the entrypoint once per process

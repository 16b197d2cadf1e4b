"""The llama.cpp side of the local model's tool use: tokens in, tokens out, free or under a grammar.

``LlamaSession`` is the one object ``local_tools.ToolDecoder`` talks to (tests put a fake of
the model here). Constrained greedy decoding checks the grammar lazily, as llama.cpp's own
``common_sampler`` does: the best token first, then the best 64, and only when all of those
are refused the whole vocabulary; checking all 151k tokens of Qwen's vocabulary at every step
(what ``Llama.generate(grammar=...)`` does) cost seconds a token on a small CPU. Sampled
decoding (temperature > 0) keeps llama-cpp-python's own grammar sampler.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .base import BackendError

TOP_FIRST = (1, 64)  # candidates checked against the grammar before the whole vocabulary
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


@dataclass(frozen=True)
class _Snapshot:
    tokens: tuple[int, ...]
    state: bytes


class PrefixSnapshots:
    """KV-cache snapshots of prompt prefixes, each read from an empty cache, taken at ``n_batch`` boundaries.

    An agent's next request repeats its last one and adds to it, so reading each prompt afresh reads the same
    thousands of tokens again every turn (minutes a turn on a small CPU). Keeping the KV cache of the last
    prompt was not bit for bit a fresh read once other completions had run (``LlamaSession.prefill``). A
    snapshot is: the memory is cleared, the prefix's state (sequence 0, ``llama_state_seq_set_data``) is
    written back into it, and the rest of the prompt is evaluated from that boundary. A fresh read evaluates
    the prompt in ``n_batch`` blocks from position 0 into an empty cache; the snapshot holds exactly the
    cells of the first blocks of such a read, in the same places, and the rest is evaluated in the same
    blocks, so every computation is the fresh read's (the slow test checks the logits bit for bit, after
    other work). Keyed by a hash chained over the blocks; the tokens are compared too. Least recently used
    snapshots go first when ``max_bytes`` is passed.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.saved = 0

    @staticmethod
    def keys(tokens: Sequence[int], n_batch: int, upto: int) -> list[tuple[int, str]]:
        """``(boundary, key)`` for every ``n_batch`` boundary of ``tokens`` up to ``upto``, shortest first."""
        out, h = [], hashlib.sha256()
        for b in range(n_batch, upto + 1, n_batch):
            h.update(np.asarray(tokens[b - n_batch:b], dtype=np.int64).tobytes())
            out.append((b, h.copy().hexdigest()))
        return out

    def longest(self, tokens: Sequence[int], keys: list[tuple[int, str]]) -> tuple[int, bytes | None]:
        with self._lock:
            for b, key in reversed(keys):
                snap = self._items.get(key)
                if snap is not None and list(snap.tokens) == list(tokens[:b]):
                    self._items.move_to_end(key)
                    self.hits += 1
                    return b, snap.state
        return 0, None

    def put(self, key: str, tokens: Sequence[int], state: bytes) -> None:
        if len(state) > self.max_bytes:
            return
        with self._lock:
            self._items[key] = _Snapshot(tuple(tokens), state)
            self._items.move_to_end(key)
            self.saved += 1
            while sum(len(s.state) for s in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class LlamaSession:
    """One reply's access to a loaded ``llama_cpp.Llama`` (and the process's prefix snapshots of it, if any)."""

    def __init__(self, llama: Any, snapshots: PrefixSnapshots | None = None):
        self.llama = llama
        self.snapshots = snapshots

    def tokenize(self, text: str) -> list[int]:
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def n_ctx(self) -> int:
        return int(self.llama.n_ctx())

    def token_eos(self) -> int:
        return int(self.llama.token_eos())

    def prefill(self, prompt: Sequence[int]) -> None:
        """Evaluate a reply's prompt from an empty KV cache, so that the reply depends on this request alone.

        Keeping the whole ``n_batch`` blocks shared with the previous prompt looked exact on paper (a block's
        keys and values depend only on the tokens up to its end) and matched a fresh evaluation bit for bit
        in one process, but not in CI's, after other completions had run: the logits of the last token
        differed. A greedy reply that depends on which request came before breaks the cache's premise, so
        every prompt is read afresh (``PIPEMEND_LOCAL_PREFIX_REUSE=1`` trades this back for speed), or from
        a ``PrefixSnapshots`` snapshot of its first blocks, which is the same computation.
        """
        prompt = list(prompt)
        llama = self.llama
        llama.reset()
        if self.snapshots is None or not prompt:
            llama.eval(prompt)
            return
        import llama_cpp

        n_batch = int(llama.n_batch)
        last = ((len(prompt) - 1) // n_batch) * n_batch  # the last boundary before the final token
        keys = PrefixSnapshots.keys(prompt, n_batch, last)
        start, state = self.snapshots.longest(prompt, keys)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama._ctx.ctx), True)
        if state is not None:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buf, len(state), 0) != len(state):
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama._ctx.ctx), True)
                start = 0
            else:
                llama.input_ids[:start] = prompt[:start]
                llama.n_tokens = start
        if last > start:
            llama.eval(prompt[start:last])
            size = llama_cpp.llama_state_seq_get_size(llama._ctx.ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(llama._ctx.ctx, buf, size, 0)
            if 0 < written <= size:
                self.snapshots.put(keys[-1][1], prompt[:last], ctypes.string_at(buf, written))
        llama.eval(prompt[last:])

    def generate(self, sequence: Sequence[int], *, temperature: float, top_k: int, top_p: float,
                 seed: int) -> Iterator[int]:
        """Tokens after ``sequence``, free (llama-cpp-python reuses the evaluated common prefix)."""
        if temperature > 0:
            self.llama.set_seed(seed)
        return self.llama.generate(list(sequence), top_k=top_k, top_p=top_p, temp=temperature,
                                   repeat_penalty=1.0, reset=True)

    def generate_constrained(self, sequence: Sequence[int], gbnf: str, *, temperature: float, top_k: int,
                             top_p: float, seed: int) -> Iterator[int]:
        """Tokens after ``sequence`` that the GBNF grammar ``gbnf`` (root rule ``root``) admits."""
        if temperature > 0:
            from llama_cpp.llama_grammar import LlamaGrammar

            self.llama.set_seed(seed)
            return self.llama.generate(list(sequence), top_k=top_k, top_p=top_p, temp=temperature,
                                       repeat_penalty=1.0, reset=True,
                                       grammar=LlamaGrammar.from_string(gbnf, verbose=False))
        return self._greedy_constrained(list(sequence), gbnf)

    # ----------------------------------------------------------------- lazy grammar, greedy

    def _greedy_constrained(self, sequence: list[int], gbnf: str) -> Iterator[int]:
        import llama_cpp

        llama = self.llama
        sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            raise BackendError(400, "the tool-call grammar does not parse (llama.cpp refused it)")
        try:
            self._evaluate(sequence)
            while True:
                logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),))
                token = _best_allowed(llama_cpp, sampler, logits)
                if token is None:  # the grammar admits nothing (cannot happen for a JSON schema's grammar)
                    return
                yield token
                llama_cpp.llama_sampler_accept(sampler, token)
                llama.eval([token])
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _evaluate(self, sequence: list[int]) -> None:
        """Evaluate ``sequence`` into the KV cache, keeping the prefix already there (at least one token is
        evaluated, so the last token's logits are fresh)."""
        llama = self.llama
        llama.n_tokens = min(_common_prefix(llama.input_ids[: llama.n_tokens], sequence), len(sequence) - 1)
        llama.eval(sequence[llama.n_tokens:])


def _common_prefix(done: Any, sequence: Sequence[int]) -> int:
    n = 0
    for a, b in zip(done, sequence):
        if a != b:
            break
        n += 1
    return n


def _best_allowed(llama_cpp: Any, sampler: Any, logits: np.ndarray) -> int | None:
    """The highest-logit token the grammar admits now: the top candidates first, then the whole vocabulary."""
    for k in (*TOP_FIRST, len(logits)):
        if k >= len(logits):
            ids = np.arange(len(logits), dtype=np.int32)
        else:
            top = np.argpartition(-logits, k - 1)[:k] if k > 1 else np.array([int(np.argmax(logits))])
            ids = top.astype(np.int32)
        data = np.zeros(len(ids), dtype=TOKEN_DATA)
        data["id"], data["logit"] = ids, logits[ids]
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(ids), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        allowed = np.isfinite(data["logit"])
        if allowed.any():
            scores = np.where(allowed, data["logit"], -np.inf)
            best = np.flatnonzero(scores == scores.max())
            return int(data["id"][best].min())  # ties: the lowest id, as a fixed rule
        if k >= len(logits):
            return None
    return None

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
from typing import Any, Iterator, Sequence

import numpy as np

from .base import BackendError

TOP_FIRST = (1, 64)  # candidates checked against the grammar before the whole vocabulary
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class LlamaSession:
    """One reply's access to a loaded ``llama_cpp.Llama``."""

    def __init__(self, llama: Any):
        self.llama = llama

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
        every prompt is read afresh (``PIPEMEND_LOCAL_PREFIX_REUSE=1`` trades this back for speed).
        """
        self.llama.reset()
        self.llama.eval(list(prompt))

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

"""``local/qwen2.5-coder-1.5b-instruct``: llama-cpp-python serving the Q4_K_M GGUF on the CPU.

One model instance per process, loaded on first use; calls are serialized by
a lock. Greedy decoding by default (temperature 0, top_k 1, fixed seed), and
the KV cache is reset before every call, so the answer is a function of the
request alone: llama.cpp otherwise reuses the previous prompt's common prefix,
and the different evaluation order flipped about 1 greedy answer in 20 on the
bundled target (measured by replaying logged calls), which made results depend
on which example ran before which. The reset costs about a fifth more time;
``PIPEMEND_LOCAL_PREFIX_REUSE=1`` trades the determinism back for the speed.
Needs the ``local`` extra.

A request with ``tools`` gets real ``tool_use`` blocks (``local_tools``: Qwen2.5's
``<tool_call>`` format, each call decoded under a grammar of the tools' input schemas;
``local_llama``: the llama.cpp side). Its prompt, too, is read from an empty KV cache
(``LlamaSession.prefill``): keeping the blocks shared with the previous prompt was not bit
for bit a fresh evaluation once other completions had run. What it shares with an earlier
tool prompt is restored from a snapshot of that prompt's first blocks, taken as they were
read into an empty cache (``PrefixSnapshots``), which is the same computation.

Portable across x86-64 CPUs: the model loads with llama.cpp's extra buffer
types off (``use_extra_bufts``, the runtime weight repacking): on a CPU that
advertises AMX, the AMX repacking ran ``tilezero`` in an OpenMP worker and died
with SIGILL in ``ggml_backend_amx_mul_mat``; without it the same model answers
correctly. llama-cpp-python has no ``Llama(...)`` keyword for that field of
``llama_model_params``, so ``load_llama`` turns it off in the default params for the
duration of the load and checks that it took. ``scripts/install`` also builds
llama-cpp-python without ``-march=native`` (``local_guard.PORTABLE_CMAKE_ARGS``),
so a wheel built or cached on one CPU runs on another. Before the first load
in a process, one real completion runs in a child (``local_guard``, once per
machine, build and model): a crash there (SIGILL, SIGSEGV) becomes an error
with its fix instead of killing the gateway; ``pipemend doctor`` runs it too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

from ..local_guard import REBUILD_HINT, ensure_runs_here
from ..model_files import INSTALL_HINT, ModelFileError, ensure_model_file
from .base import LOCAL_MODEL, BackendError, message_response, text_of
from .local_llama import LlamaSession, PrefixSnapshots
from .local_tools import Sampling, ToolDecoder, request_tools, tool_choice

MODEL_NAME = LOCAL_MODEL
SEED = 0
# Context of the one model (``PIPEMEND_LOCAL_N_CTX``): an agent session's system prompt and 16 tools
# take ~3.5k tokens before its first tool result (the model's own limit is 32k; the KV cache costs
# ~28 KiB a token, ~450 MiB here). A prompt over it is a 400.
DEFAULT_N_CTX = 16384

_lock = threading.Lock()
_llama: Any = None  # the one llama_cpp.Llama of this process
_llama_path: Path | None = None
_prefixes = PrefixSnapshots(max_bytes=int(os.environ.get("PIPEMEND_LOCAL_PREFIX_CACHE_MB", "1024")) << 20)
"""Snapshots of tool prompts' first blocks (``local_llama.PrefixSnapshots``): an agent turn reads only what it
added to the last turn's prompt. ``PIPEMEND_LOCAL_PREFIX_CACHE_MB=0`` turns them off."""


def load_llama(model_path: Path | None, n_ctx: int, n_threads: int) -> Any:
    """The process's one ``llama_cpp.Llama`` over ``model_path`` (default: the assembled model), loaded once.

    A caller that needs a larger context than the loaded model's gets the model loaded again with it (a
    smaller one is served by the larger context): the first caller in a process must not cap every later one.
    """
    global _llama, _llama_path
    if _llama is not None:
        if int(_llama.n_ctx()) >= n_ctx:
            return _llama
        _close()
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendError(
            500, f"the local model needs llama-cpp-python, which is not installed: {INSTALL_HINT}"
        ) from e
    try:
        path = ensure_model_file(model_path)
    except ModelFileError as e:
        raise BackendError(500, str(e)) from e
    outcome = ensure_runs_here(llama_cpp, path)  # a crash in llama.cpp kills a child, not this process
    if not outcome.ok:
        raise BackendError(500, f"the local model does not run on this machine: {outcome.detail}; fix: {outcome.fix}")
    with _without_extra_buffer_types(llama_cpp):
        llama = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, seed=SEED, verbose=False)
    if getattr(llama.model_params, "use_extra_bufts", False):
        llama.close()
        raise BackendError(500, "the local model loaded with llama.cpp's extra buffer types on (AMX weight "
                                "repacking crashes some CPUs); this llama-cpp-python lays out its parameters "
                                f"differently than pipemend expects: {REBUILD_HINT}")
    _llama, _llama_path = llama, path
    atexit.register(_close)
    return _llama


@contextlib.contextmanager
def _without_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """While a model loads, llama.cpp's default model params have ``use_extra_bufts`` off.

    ``Llama.__init__`` builds its params from ``llama_cpp.llama_cpp.llama_model_default_params()``
    and loads at once, with no keyword for this field; so the default is wrapped for the load only.
    Older builds without the field are left as they are.
    """
    lib = llama_cpp.llama_cpp
    original = lib.llama_model_default_params

    def portable_defaults() -> Any:
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = portable_defaults
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def _close() -> None:
    """Free the model before interpreter teardown (llama-cpp's own destructor fails that late)."""
    global _llama
    _prefixes.clear()
    if _llama is not None:
        _llama.close()
        _llama = None


def to_chat_messages(request: dict[str, Any]) -> list[dict[str, str]]:
    """Anthropic system + messages → chat-completion messages (text only; tool blocks as text).

    For a request without ``tools``; one with tools is rendered by ``local_tools.render_prompt``.
    """
    out: list[dict[str, str]] = []
    system = text_of(request.get("system") or "")
    if system:
        out.append({"role": "system", "content": system})
    for message in request.get("messages") or []:
        content = message.get("content")
        parts: list[str] = []
        if isinstance(content, str):
            parts.append(content)
        else:
            for block in content or []:
                kind = block.get("type")
                if kind == "text":
                    parts.append(str(block.get("text", "")))
                elif kind == "tool_use":
                    parts.append(f"[tool call {block.get('name')}: {json.dumps(block.get('input', {}))}]")
                elif kind == "tool_result":
                    parts.append(f"[tool result: {text_of(block.get('content', ''))}]")
                elif kind in ("image", "document"):
                    raise BackendError(400, f"{MODEL_NAME} takes text only, got a {kind} block")
        out.append({"role": message.get("role", "user"), "content": "\n".join(parts)})
    return out


class LocalBackend:
    # -2: answers from a fresh KV cache; -3: requests with tools get tool_use blocks (local_tools)
    cache_namespace = "local-qwen2.5-coder-1.5b-q4km-3"
    deterministic = False
    default_temperature = 0.0

    def __init__(self, model_path: Path | None = None, n_ctx: int | None = None, n_threads: int | None = None,
                 prefix_reuse: bool | None = None):
        self.name = MODEL_NAME
        if prefix_reuse is None:
            prefix_reuse = os.environ.get("PIPEMEND_LOCAL_PREFIX_REUSE", "") not in ("", "0")
        self.prefix_reuse = prefix_reuse
        self.model_path = model_path
        self.n_ctx = n_ctx or int(os.environ.get("PIPEMEND_LOCAL_N_CTX", str(DEFAULT_N_CTX)))
        self.n_threads = n_threads or os.cpu_count() or 1
        self.calls = 0

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        temperature = float(request.get("temperature", self.default_temperature))
        if request.get("tools"):
            return self._complete_with_tools(request, temperature)
        messages = to_chat_messages(request)
        kwargs: dict[str, Any] = {
            "messages": messages,
            "max_tokens": int(request.get("max_tokens", 256)),
            "temperature": temperature,
            "top_k": 1 if temperature == 0 else int(request.get("top_k", 40)),
            "seed": SEED,
            "stop": list(request.get("stop_sequences") or []) or None,
        }
        if "top_p" in request:
            kwargs["top_p"] = float(request["top_p"])
        with _lock:
            llama = load_llama(self.model_path, self.n_ctx, self.n_threads)
            self.calls += 1
            if not self.prefix_reuse:
                llama.reset()  # evaluate the whole prompt afresh: the answer depends on this request only
            try:
                result = llama.create_chat_completion(**kwargs)
            except ValueError as e:  # e.g. prompt longer than n_ctx
                raise BackendError(400, f"{MODEL_NAME}: {e}") from e
        choice = result["choices"][0]
        text = choice["message"].get("content") or ""
        usage = result.get("usage") or {}
        return message_response(
            MODEL_NAME,
            [{"type": "text", "text": text}],
            stop_reason="max_tokens" if choice.get("finish_reason") == "length" else "end_turn",
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            id_prefix="msg_local_",
        )

    def _complete_with_tools(self, request: dict[str, Any], temperature: float) -> dict[str, Any]:
        """A reply that may call the request's tools (``local_tools``): text, then ``tool_use`` blocks."""
        tools = request_tools(request)
        choice = tool_choice(request, tools)
        sampling = Sampling(temperature=temperature, top_k=1 if temperature == 0 else int(request.get("top_k", 40)),
                            top_p=float(request.get("top_p", 0.95)), seed=SEED)
        stops = [str(s) for s in request.get("stop_sequences") or []]
        with _lock:
            llama = load_llama(self.model_path, self.n_ctx, self.n_threads)
            self.calls += 1
            session = LlamaSession(llama, _prefixes if _prefixes.max_bytes > 0 else None)
            reply = ToolDecoder(session, sampling, prefill=not self.prefix_reuse).decode(
                request, tools, choice, int(request.get("max_tokens", 256)), stops)
        return message_response(MODEL_NAME, reply.content, stop_reason=reply.stop_reason,
                                stop_sequence=reply.stop_sequence, input_tokens=reply.input_tokens,
                                output_tokens=reply.output_tokens, id_prefix="msg_local_")

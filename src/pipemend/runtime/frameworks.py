"""Framework hooks: DSPy module calls and LangChain/LangGraph runs become trace steps, through the libraries'
own callback interfaces, in pipelines that mark no steps.

``install()`` looks only at ``sys.modules``: a framework is hooked when the pipeline has imported it, and
nothing is imported otherwise (the runtime itself never needs either library; ``pipemend[dspy]`` and
``pipemend[langchain]`` are the extras a user installs in the pipeline's environment). The runner calls it
after the entrypoint is imported and again before each example (a pipeline that imports its framework
lazily is hooked from its next example on); each framework is hooked once per process.

- **DSPy** (``dspy`` loaded): a ``dspy.utils.callback.BaseCallback`` joins DSPy's global callbacks (set in
  its global config directly, so the runner never becomes the thread that owns ``dspy.configure``). Each
  call of a module is a step: a ``dspy.Retrieve`` (or subclass) is a ``retrieval`` step whose ``doc_ids`` are
  the prediction's ``doc_ids``, ``passage_ids``, ``pids`` or ``ids`` field, else the ``id``/``pid`` of its
  ``passages`` (its output keeps the passages' texts); ``Predict`` and ``ChainOfThought`` (and subclasses)
  are ``generation`` steps; other modules ``other``. Each LM call is a ``generation`` step whose inputs are
  the prompt (``model``, ``system``, ``messages``) and whose output is the completion's text; an adapter's
  ``parse`` is a ``parse`` step (an answer DSPy could not parse is its error); a ``dspy.Tool`` call is a
  ``tool`` step. A pipeline that replaces DSPy's callbacks (``dspy.configure(callbacks=[...])``) or
  overrides them in a ``dspy.context`` turns the hook off there.
- **LangChain / LangGraph** (``langchain_core`` loaded): a callback handler is registered with
  ``langchain_core.tracers.context.register_configure_hook``, so every run gets it, as LangSmith's tracer
  does. Chains and runnables (LangGraph graphs and nodes among them) are ``other`` steps, output parsers
  ``parse``, tools ``tool``, LLMs and chat models ``generation`` (inputs: the prompt as ``model``,
  ``system``, ``messages``; output: the answer's text, or ``{"text", "tool_calls"}``), retrievers
  ``retrieval`` with each ``Document``'s ``id`` (else its ``metadata["id"]`` or ``metadata["doc_id"]``) as
  ``doc_ids`` and ``[{"id", "text", "metadata"}]`` as output. Runs LangChain tags ``langsmith:hidden``
  (LangGraph's internal writes) are left out and their children nest under the nearest recorded run.

Steps nest as the framework's calls do (LangChain's ``parent_run_id``; DSPy's call stack) and live in the
example's trace like marked steps, with ``"source": "dspy"`` or ``"source": "langchain"``. A hooked step
is the current step while it runs, so the LLM calls made inside it and their ``x-pipemend-step`` headers
are its.

**With pipemend markers** nothing is merged or dropped: the framework's steps nest under the marked step
that is open when they start, and a marked step opened inside a framework call (a ``RunnableLambda``, a
module's ``forward``) nests under that call's step. A marked retrieval step that wraps a framework
retriever therefore has a hooked retrieval child with the same documents; the diagnosis takes the union
of the ``doc_ids``, so nothing is counted twice. A hooked trace is not joined with the call log on the host
(``trace_join``): its generation steps already hold the prompts (``trace_join.prompt_texts`` reads them).

A hook never breaks an example: whatever fails inside one is written into the trace as a log line
(``"source": "pipemend.hooks"``) and the pipeline's call goes on; a hook that cannot be installed is
logged to the ``pipemend.trace`` logger.
"""

from __future__ import annotations

import contextvars
import importlib
import sys
import threading
from typing import Any, Callable

from . import trace

DSPY_SOURCE = "dspy"
LANGCHAIN_SOURCE = "langchain"
SOURCES = (DSPY_SOURCE, LANGCHAIN_SOURCE)
"""The ``"source"`` of the steps the hooks record."""
NOTE_SOURCE = "pipemend.hooks"
"""The ``"source"`` of a log line saying that a hook failed."""
MAX_OPEN = 10_000
"""Open runs remembered per framework; beyond it the oldest are forgotten (runs an abandoned example left open)."""
HIDDEN_TAG = "langsmith:hidden"
DSPY_ID_FIELDS = ("doc_ids", "passage_ids", "pids", "ids")
"""Fields of a DSPy retriever's prediction that hold its passages' ids, in order of preference."""

_lock = threading.Lock()
_done: dict[str, bool] = {}
"""Framework name -> hooked (True) or failed to hook (False): either way it is not tried again."""


def install() -> list[str]:
    """Hook every supported framework the pipeline has imported (``sys.modules``), once each; returns the names
    of the frameworks hooked (now or before): ``"dspy"``, ``"langchain"``. Never raises."""
    with _lock:
        for name, module, hook in (("dspy", "dspy", _hook_dspy), ("langchain", "langchain_core", _hook_langchain)):
            if name in _done or sys.modules.get(module) is None:
                continue
            try:
                hook(sys.modules[module])
                _done[name] = True
            except Exception:
                _done[name] = False
                trace.log.warning("pipemend: could not hook %s; its calls are not traced as steps", name, exc_info=True)
        return [name for name, ok in _done.items() if ok]


# --------------------------------------------------------------------------- open runs -> steps


class Runs:
    """The steps of a framework's runs still open, by the framework's run or call id (shared by all examples)."""

    def __init__(self, source: str):
        self.source = source
        self.open: dict[Any, tuple[trace.Step, Any, str]] = {}
        self.lock = threading.Lock()

    def step_of(self, key: Any) -> trace.Step | None:
        with self.lock:
            entry = self.open.get(key)
        return entry[0] if entry is not None else None

    def kind_of(self, key: Any) -> str | None:
        with self.lock:
            entry = self.open.get(key)
        return entry[2] if entry is not None else None

    def start(self, key: Any, describe: Callable[[], tuple[str, str, dict[str, Any]]],
              under: trace.Step | None = None) -> None:
        """Open the step ``describe()`` names (``name, kind, inputs``) for run ``key``, under ``under`` (else the
        current step); nothing outside an example."""
        if under is None and trace.current_example_id() is None:
            return
        try:
            name, kind, inputs = describe()
        except Exception as e:
            self.fault("reading a call's start", e, under)
            name, kind, inputs = "?", "other", {}
        try:
            handle, token = trace.open_step(name, kind, inputs, under=under, source=self.source)
        except Exception as e:
            self.fault(f"opening step {name!r}", e, under)
            return
        if handle.id is None:
            return
        with self.lock:
            self.open[key] = (handle, token, kind)
            while len(self.open) > MAX_OPEN:
                self.open.pop(next(iter(self.open)))

    def end(self, key: Any, outputs: Callable[[], tuple[Any, list[str] | None]] | None = None,
            error: BaseException | None = None) -> None:
        """Close run ``key``'s step: its output and doc ids from ``outputs()``, its error ``error``."""
        with self.lock:
            entry = self.open.pop(key, None)
        if entry is None:
            return
        handle, token, _ = entry
        if outputs is not None:
            try:
                value, doc_ids = outputs()
                handle.output(value, doc_ids=doc_ids)
            except Exception as e:
                self.fault("recording a call's output", e, handle)
        try:
            trace.close_step(handle, token, error=error if isinstance(error, BaseException) else None)
        except Exception as e:
            self.fault("closing a step", e, handle)

    def fault(self, what: str, exc: BaseException, under: trace.Step | None) -> None:
        trace.note(f"pipemend {self.source} hook: {what} failed ({type(exc).__name__}: {exc}); the call went on",
                   under=under, source=NOTE_SOURCE)


def guarded(runs: Runs, what: str, fn: Callable[[], None]) -> None:
    """Run one callback's work; a fault becomes a note in the trace, never an exception in the pipeline."""
    try:
        fn()
    except Exception as e:
        runs.fault(what, e, None)


# --------------------------------------------------------------------------- shared shapes


def _text(content: Any) -> str:
    """A message content's text: a string, or the ``text`` of its parts (others shown by repr)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p if isinstance(p, str) else p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str)
                         else repr(p) for p in content)
    return repr(content)


def prompt_inputs(model: Any, turns: list[tuple[str, Any]]) -> dict[str, Any]:
    """A generation step's inputs in the call log's shape: ``{"model", "system", "messages": [{"role",
    "content"}]}`` (system turns joined into ``system``)."""
    system = [_text(c) for role, c in turns if role == "system"]
    return {"model": model if isinstance(model, str) else None, "system": "\n".join(system) if system else None,
            "messages": [{"role": role, "content": _text(c)} for role, c in turns if role != "system"]}


def _id_of(item: Any) -> str | None:
    """A document's id: ``item["id"]``/``["pid"]`` of a mapping, else its ``id``/``pid`` attribute."""
    for key in ("id", "pid"):
        value = item.get(key) if isinstance(item, dict) else getattr(item, key, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


# --------------------------------------------------------------------------- DSPy


def _hook_dspy(dspy: Any) -> None:
    callback_module = importlib.import_module("dspy.utils.callback")  # part of dspy, loaded with it
    callback = _dspy_callback_class(callback_module.BaseCallback)(dspy)
    settings = sys.modules.get("dspy.dsp.utils.settings")
    config = getattr(settings, "main_thread_config", None)
    if isinstance(config, dict):  # DSPy >= 2.6: the global default, set without claiming configure's owner thread
        config["callbacks"] = [*(config.get("callbacks") or []), callback]
    else:
        dspy.settings.configure(callbacks=[*(dspy.settings.get("callbacks") or []), callback])


def _dspy_kind(dspy: Any, instance: Any) -> str:
    def is_a(*names: str) -> bool:
        classes = tuple(c for c in (getattr(dspy, n, None) for n in names) if isinstance(c, type))
        return bool(classes) and isinstance(instance, classes)

    if is_a("Retrieve"):
        return "retrieval"
    if is_a("Predict", "ChainOfThought"):
        return "generation"
    return "other"


def _dspy_name(instance: Any) -> str:
    name = type(instance).__name__
    signature = getattr(instance, "signature", None)
    sig_name = getattr(signature, "__name__", None)
    return f"{name}({sig_name})" if isinstance(sig_name, str) and sig_name != "StringSignature" else name


def _call_inputs(inputs: Any) -> dict[str, Any]:
    """``{"args": (...), "kwargs": {...}}`` of a ``__call__(self, *args, **kwargs)`` as the keyword inputs."""
    if not isinstance(inputs, dict):
        return {"inputs": inputs}
    if not set(inputs) <= {"args", "kwargs"}:
        return dict(inputs)
    out = dict(inputs.get("kwargs") or {})
    if inputs.get("args"):
        out["args"] = list(inputs["args"])
    return out


def _as_dict(value: Any) -> Any:
    """A DSPy ``Prediction``/``Example`` as a plain dict (anything else unchanged)."""
    to_dict = getattr(value, "toDict", None)
    if callable(to_dict) and not isinstance(value, dict):
        try:
            return to_dict()
        except Exception:
            pass
    return value


def dspy_passage_ids(outputs: Any) -> list[str] | None:
    """The ids of a DSPy retriever's passages (module docstring); None when it gives none."""
    items = outputs if isinstance(outputs, list) else [outputs]
    found: list[str] = []
    for item in items:
        pred = _as_dict(item)
        if not isinstance(pred, dict):
            continue
        field = next((f for f in DSPY_ID_FIELDS if isinstance(pred.get(f), (list, tuple))), None)
        if field is not None:
            found += [str(i) for i in pred[field]]
        elif isinstance(pred.get("passages"), (list, tuple)):
            found += [i for i in (_id_of(p) for p in pred["passages"]) if i is not None]
    return list(dict.fromkeys(found)) or None


def _lm_turns(inputs: dict[str, Any]) -> list[tuple[str, Any]]:
    messages = inputs.get("messages")
    if isinstance(messages, list):
        return [(str(m.get("role")), m.get("content")) for m in messages if isinstance(m, dict)]
    prompt = inputs.get("prompt")
    return [("user", prompt)] if prompt is not None else []


def _lm_output(outputs: Any) -> Any:
    texts = [o.get("text") if isinstance(o, dict) else o for o in outputs] if isinstance(outputs, list) else [outputs]
    return texts[0] if len(texts) == 1 else texts


def _dspy_callback_class(base: type) -> type:
    class PipemendDSPyCallback(base):  # type: ignore[misc, valid-type]
        """DSPy callbacks -> pipemend trace steps (``frameworks`` module docstring)."""

        def __init__(self, dspy: Any):
            super().__init__()
            self.dspy = dspy
            self.runs = Runs(DSPY_SOURCE)

        def _start(self, call_id: str, what: str, describe: Callable[[], tuple[str, str, dict[str, Any]]]) -> None:
            guarded(self.runs, what, lambda: self.runs.start(call_id, describe))

        def _end(self, call_id: str, what: str, outputs: Callable[[], tuple[Any, list[str] | None]],
                 exception: BaseException | None) -> None:
            guarded(self.runs, what, lambda: self.runs.end(call_id, None if exception is not None else outputs,
                                                           exception))

        def on_module_start(self, call_id, instance, inputs):
            self._start(call_id, "a module's start",
                        lambda: (_dspy_name(instance), _dspy_kind(self.dspy, instance), _call_inputs(inputs)))

        def on_module_end(self, call_id, outputs, exception=None):
            retrieval = self.runs.kind_of(call_id) == "retrieval"

            def out():
                return _as_dict(outputs), dspy_passage_ids(outputs) if retrieval else None
            self._end(call_id, "a module's end", out, exception)

        def on_lm_start(self, call_id, instance, inputs):
            model = getattr(instance, "model", None)
            self._start(call_id, "an LM call's start", lambda: (
                f"LM({model})" if isinstance(model, str) else "LM", "generation",
                prompt_inputs(model, _lm_turns(inputs if isinstance(inputs, dict) else {}))))

        def on_lm_end(self, call_id, outputs, exception=None):
            self._end(call_id, "an LM call's end", lambda: (_lm_output(outputs), None), exception)

        def on_adapter_parse_start(self, call_id, instance, inputs):
            self._start(call_id, "a parse's start", lambda: (
                f"{type(instance).__name__}.parse", "parse",
                {"completion": inputs.get("completion")} if isinstance(inputs, dict) else {}))

        def on_adapter_parse_end(self, call_id, outputs, exception=None):
            self._end(call_id, "a parse's end", lambda: (outputs, None), exception)

        def on_tool_start(self, call_id, instance, inputs):
            self._start(call_id, "a tool's start", lambda: (
                f"tool:{getattr(instance, 'name', None) or type(instance).__name__}", "tool", _call_inputs(inputs)))

        def on_tool_end(self, call_id, outputs, exception=None):
            self._end(call_id, "a tool's end", lambda: (outputs, None), exception)

    return PipemendDSPyCallback


# --------------------------------------------------------------------------- LangChain / LangGraph

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}
_CHAIN_KINDS = {"parser": "parse", "retriever": "retrieval", "tool": "tool", "llm": "generation"}


def _hook_langchain(langchain_core: Any) -> None:
    callbacks = importlib.import_module("langchain_core.callbacks")  # parts of langchain_core, already imported
    context = importlib.import_module("langchain_core.tracers.context")
    handler = _langchain_handler_class(callbacks.BaseCallbackHandler)()
    # A context variable whose default is the handler: every context, every thread, sees it.
    var = contextvars.ContextVar("pipemend_langchain_handler", default=handler)
    context.register_configure_hook(var, True)


def _lc_name(serialized: Any, kwargs: dict[str, Any], default: str) -> str:
    name = kwargs.get("name")
    if isinstance(name, str) and name:
        return name
    if isinstance(serialized, dict):
        if isinstance(serialized.get("name"), str):
            return serialized["name"]
        ids = serialized.get("id")
        if isinstance(ids, list) and ids and isinstance(ids[-1], str):
            return ids[-1]
    return default


def _lc_model(serialized: Any, kwargs: dict[str, Any]) -> str | None:
    for params in (kwargs.get("invocation_params"), kwargs.get("metadata")):
        if isinstance(params, dict):
            for key in ("model", "model_name", "ls_model_name"):
                if isinstance(params.get(key), str):
                    return params[key]
    return None


def langchain_documents(documents: Any) -> tuple[list[dict[str, Any]], list[str] | None]:
    """A retriever's ``Document``s as ``[{"id", "text", "metadata"}]`` (no ``id`` key for a document without
    one), and their ids (None when none has one)."""
    docs, ids = [], []
    for doc in documents or []:
        metadata = getattr(doc, "metadata", None)
        metadata = metadata if isinstance(metadata, dict) else {}
        doc_id = _id_of(doc)
        if doc_id is None:
            doc_id = next((str(metadata[k]) for k in ("id", "doc_id") if isinstance(metadata.get(k), (str, int))), None)
        docs.append({"text": getattr(doc, "page_content", None), "metadata": metadata})
        if doc_id is not None:
            docs[-1] = {"id": doc_id, **docs[-1]}
            ids.append(doc_id)
    return docs, ids or None


def _lc_answer(response: Any) -> Any:
    """An ``LLMResult``'s answer: the first generation's text, or ``{"text", "tool_calls"}``."""
    generations = getattr(response, "generations", None) or []
    first = generations[0][0] if generations and generations[0] else None
    if first is None:
        return None
    text = getattr(first, "text", None)
    tool_calls = getattr(getattr(first, "message", None), "tool_calls", None)
    return {"text": text, "tool_calls": tool_calls} if tool_calls else text


def _langchain_handler_class(base: type) -> type:
    class PipemendLangChainHandler(base):  # type: ignore[misc, valid-type]
        """LangChain callbacks -> pipemend trace steps (``frameworks`` module docstring)."""

        run_inline = True  # called in the run's own context, never on an executor thread
        raise_error = False

        def __init__(self):
            super().__init__()
            self.runs = Runs(LANGCHAIN_SOURCE)
            self.hidden: dict[Any, Any] = {}
            """Hidden run id -> its parent run id, while it runs (its children nest under the nearest recorded run)."""

        def _under(self, parent_run_id: Any) -> trace.Step | None:
            seen = 0
            while parent_run_id is not None and seen < 1000:
                step = self.runs.step_of(parent_run_id)
                if step is not None:
                    return step
                parent_run_id = self.hidden.get(parent_run_id)
                seen += 1
            return None

        def _start(self, run_id: Any, parent_run_id: Any, tags: Any, what: str,
                   describe: Callable[[], tuple[str, str, dict[str, Any]]]) -> None:
            def go() -> None:
                if isinstance(tags, list) and HIDDEN_TAG in tags:
                    with self.runs.lock:
                        self.hidden[run_id] = parent_run_id
                        while len(self.hidden) > MAX_OPEN:
                            self.hidden.pop(next(iter(self.hidden)))
                    return
                self.runs.start(run_id, describe, under=self._under(parent_run_id))
            guarded(self.runs, what, go)

        def _end(self, run_id: Any, what: str, outputs: Callable[[], tuple[Any, list[str] | None]] | None,
                 error: BaseException | None = None) -> None:
            def go() -> None:
                with self.runs.lock:
                    self.hidden.pop(run_id, None)
                self.runs.end(run_id, outputs, error)
            guarded(self.runs, what, go)

        # chains, runnables, LangGraph graphs and nodes
        def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, tags=None, metadata=None, **kw):
            self._start(run_id, parent_run_id, tags, "a chain's start", lambda: (
                _lc_name(serialized, kw, "chain"), _CHAIN_KINDS.get(kw.get("run_type"), "other"),
                dict(inputs) if isinstance(inputs, dict) else {"input": inputs}))

        def on_chain_end(self, outputs, *, run_id, **kw):
            self._end(run_id, "a chain's end", lambda: (outputs, None))

        def on_chain_error(self, error, *, run_id, **kw):
            self._end(run_id, "a chain's error", None, error)

        # models
        def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, tags=None, metadata=None,
                                **kw):
            def describe():
                turns = [(_ROLES.get(getattr(m, "type", ""), str(getattr(m, "type", "?"))), getattr(m, "content", m))
                         for batch in messages or [] for m in batch]
                return (_lc_name(serialized, kw, "chat model"), "generation",
                        prompt_inputs(_lc_model(serialized, {**kw, "metadata": metadata}), turns))
            self._start(run_id, parent_run_id, tags, "a chat model's start", describe)

        def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, tags=None, metadata=None, **kw):
            self._start(run_id, parent_run_id, tags, "an LLM's start", lambda: (
                _lc_name(serialized, kw, "llm"), "generation",
                prompt_inputs(_lc_model(serialized, {**kw, "metadata": metadata}), [("user", p) for p in prompts or []])))

        def on_llm_end(self, response, *, run_id, **kw):
            self._end(run_id, "an LLM's end", lambda: (_lc_answer(response), None))

        def on_llm_error(self, error, *, run_id, **kw):
            self._end(run_id, "an LLM's error", None, error)

        # retrievers
        def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, tags=None, metadata=None, **kw):
            self._start(run_id, parent_run_id, tags, "a retriever's start",
                        lambda: (_lc_name(serialized, kw, "retriever"), "retrieval", {"query": query}))

        def on_retriever_end(self, documents, *, run_id, **kw):
            self._end(run_id, "a retriever's end", lambda: langchain_documents(documents))

        def on_retriever_error(self, error, *, run_id, **kw):
            self._end(run_id, "a retriever's error", None, error)

        # tools
        def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, tags=None, metadata=None,
                          inputs=None, **kw):
            self._start(run_id, parent_run_id, tags, "a tool's start", lambda: (
                _lc_name(serialized, kw, "tool"), "tool",
                dict(inputs) if isinstance(inputs, dict) else {"input": input_str}))

        def on_tool_end(self, output, *, run_id, **kw):
            self._end(run_id, "a tool's end", lambda: (output, None))

        def on_tool_error(self, error, *, run_id, **kw):
            self._end(run_id, "a tool's error", None, error)

    return PipemendLangChainHandler

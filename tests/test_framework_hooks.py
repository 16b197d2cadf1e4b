"""Framework hooks (``pipemend.runtime.frameworks``): LangChain and LangGraph runs become trace steps through
langchain_core's callbacks, and nothing is imported for a pipeline that uses no framework.

The in-process tests run real langchain_core and LangGraph objects (a ``BaseRetriever`` subclass, runnables,
a compiled ``StateGraph``) under the runtime's tracer; the one fake is at the LLM boundary, langchain_core's
own ``FakeListChatModel``. The runner tests run ``python -m pipemend.runtime.runner`` on
``fixtures/targets/hooks``. DSPy needs LiteLLM (some 400 MB): its hook is tested end to end in the slow
group (``tests/test_eval_openai.py``, the ``dspy_qa`` target, installed into the sandbox from its
requirements).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import threading
from typing import Any, TypedDict

import pytest
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langgraph.graph import END, START, StateGraph

from pipemend import trace
from pipemend.runtime import frameworks
from pipemend.trace_join import prompt_texts
from test_runner import results, run_runner, trace_of

DOCS = [Document(id="d-oslo", page_content="Oslo is the capital of Norway."),
        Document(id="d-lima", page_content="Lima is the capital of Peru."),
        Document(page_content="Bern is the capital of Switzerland.", metadata={"doc_id": "d-bern"})]


class KeywordRetriever(BaseRetriever):
    k: int = 2

    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        asked = set(re.findall(r"[a-z]+", query.lower()))
        return sorted(DOCS, key=lambda d: -len(asked & set(re.findall(r"[a-z]+", d.page_content.lower()))))[: self.k]

    async def _aget_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return self._get_relevant_documents(query, run_manager=run_manager)


def rag_chain(answer: str = "Oslo"):
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context only."),
                                               ("user", "Context:\n{context}\n\nQuestion: {question}")])
    join = RunnableLambda(lambda docs: "\n".join(d.page_content for d in docs)).with_config(run_name="join")
    return ({"context": KeywordRetriever() | join, "question": RunnablePassthrough()}
            | prompt | FakeListChatModel(responses=[answer]) | StrOutputParser())


@pytest.fixture(autouse=True)
def hooked() -> None:
    """langchain_core is imported (by this module), so ``install`` hooks it; once per process."""
    assert "langchain" in frameworks.install()


def traced(example_id: str, fn) -> tuple[Any, dict[str, Any]]:
    """Run ``fn()`` as one example in its own context: its value and its finished trace."""
    def one() -> tuple[Any, dict[str, Any]]:
        ex = trace.start_example(example_id)
        value = fn()
        return value, ex.finish(output=value)
    return contextvars.copy_context().run(one)


def shape(t: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """Each step as (name, kind, parent's name or ""), in start order."""
    names = {s["id"]: s["name"] for s in t["steps"]}
    return [(s["name"], s["kind"], names.get(s["parent"], "")) for s in t["steps"]]


def test_a_chains_retriever_model_and_parser_become_steps_with_the_retrieved_ids() -> None:
    out, t = traced("q1", lambda: rag_chain().invoke("What is the capital of Norway?"))
    assert out == "Oslo"
    steps = {s["name"]: s for s in t["steps"]}
    assert sorted(shape(t)) == sorted([
        ("RunnableSequence", "other", ""), ("RunnableParallel<context,question>", "other", "RunnableSequence"),
        ("RunnableSequence", "other", "RunnableParallel<context,question>"),
        ("KeywordRetriever", "retrieval", "RunnableSequence"), ("join", "other", "RunnableSequence"),
        ("RunnablePassthrough", "other", "RunnableParallel<context,question>"),
        ("ChatPromptTemplate", "other", "RunnableSequence"), ("FakeListChatModel", "generation", "RunnableSequence"),
        ("StrOutputParser", "parse", "RunnableSequence")])
    # the outer sequence's steps run in order: parallel branches, then prompt, model, parser
    order = [s["name"] for s in t["steps"] if s["parent"] == t["steps"][0]["id"]]
    assert order == ["RunnableParallel<context,question>", "ChatPromptTemplate", "FakeListChatModel", "StrOutputParser"]
    retrieval = steps["KeywordRetriever"]
    assert retrieval["doc_ids"] == ["d-oslo", "d-lima"] and retrieval["inputs"] == {"query": "What is the capital of Norway?"}
    assert retrieval["output"][0] == {"id": "d-oslo", "text": "Oslo is the capital of Norway.", "metadata": {}}
    generation = steps["FakeListChatModel"]
    assert generation["output"] == "Oslo" and generation["doc_ids"] is None
    assert generation["inputs"]["system"] == "Answer from the context only."
    assert [m["role"] for m in generation["inputs"]["messages"]] == ["user"]
    assert "Oslo is the capital of Norway." in generation["inputs"]["messages"][0]["content"]
    assert all(s["source"] == "langchain" and s["end"] is not None and s["error"] is None for s in t["steps"])
    assert trace.current_step_name() is None  # every hooked step was closed and the context restored
    # the host's diagnosis reads the hooked prompt, as it reads a joined one
    assert prompt_texts(t) == ["Answer from the context only.\n" + generation["inputs"]["messages"][0]["content"]]


def test_metadata_ids_stand_in_for_a_missing_document_id_and_a_retriever_error_is_the_steps_error() -> None:
    _, t = traced("q2", lambda: KeywordRetriever(k=3).invoke("Switzerland Bern"))
    assert t["steps"][0]["doc_ids"] == ["d-bern", "d-oslo", "d-lima"]

    class Anonymous(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
            return [Document(page_content="no id anywhere", metadata={"source": "notes.txt"})]

    _, t = traced("q2b", lambda: Anonymous().invoke("x"))
    assert t["steps"][0]["doc_ids"] is None  # the diagnosis then says the retrieval step declares no doc ids
    assert t["steps"][0]["output"] == [{"text": "no id anywhere", "metadata": {"source": "notes.txt"}}]

    class Broken(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
            raise LookupError("index offline")

    def fail() -> str:
        with pytest.raises(LookupError):
            Broken().invoke("x")
        return "handled"

    out, t = traced("q3", fail)
    assert out == "handled"
    assert [(s["name"], s["kind"], s["error"]["type"], s["doc_ids"]) for s in t["steps"]] == [
        ("Broken", "retrieval", "LookupError", None)]


class State(TypedDict, total=False):
    question: str
    docs: list
    answer: str


def graph(model: FakeListChatModel, *, run_async: bool):
    retriever = KeywordRetriever(k=1)

    def retrieve(state: State) -> State:
        return {"docs": retriever.invoke(state["question"])}

    def answer(state: State) -> State:
        return {"answer": model.invoke(f"{state['docs'][0].page_content}\n{state['question']}").content}

    async def aretrieve(state: State) -> State:
        return {"docs": await retriever.ainvoke(state["question"])}

    async def aanswer(state: State) -> State:
        return {"answer": (await model.ainvoke(f"{state['docs'][0].page_content}\n{state['question']}")).content}

    g = StateGraph(State)
    g.add_node("retrieve", aretrieve if run_async else retrieve)
    g.add_node("answer", aanswer if run_async else answer)
    g.add_edge(START, "retrieve")
    g.add_edge("retrieve", "answer")
    g.add_edge("answer", END)
    return g.compile()


@pytest.mark.parametrize("run_async", [False, True], ids=["invoke", "ainvoke"])
def test_a_langgraph_graphs_nodes_nest_and_its_hidden_runs_are_left_out(run_async: bool) -> None:
    app = graph(FakeListChatModel(responses=["Lima"]), run_async=run_async)
    run = (lambda: asyncio.run(app.ainvoke({"question": "capital of Peru"}))) if run_async else (
        lambda: app.invoke({"question": "capital of Peru"}))
    out, t = traced("g1", run)
    assert out["answer"] == "Lima"
    assert shape(t) == [("LangGraph", "other", ""), ("retrieve", "other", "LangGraph"),
                        ("KeywordRetriever", "retrieval", "retrieve"), ("answer", "other", "LangGraph"),
                        ("FakeListChatModel", "generation", "answer")]
    assert t["steps"][2]["doc_ids"] == ["d-lima"] and t["steps"][4]["output"] == "Lima"


def test_marked_steps_and_hooked_steps_nest_under_each_other() -> None:
    """A chain run inside a marked step nests under it; a marked step opened inside a runnable nests under the
    runnable's step; both are kept (nothing merged), the hooked ones with their source."""
    def parse(text: str) -> str:
        with trace.step("clean", kind="parse") as s:
            return s.output(text.strip().rstrip("."))

    chain = rag_chain("Oslo.") | RunnableLambda(parse).with_config(run_name="post")

    def run() -> str:
        with trace.step("answer", kind="other"):
            return chain.invoke("capital of Norway")

    out, t = traced("m1", run)
    assert out == "Oslo"
    by_name = {s["name"]: s for s in t["steps"]}
    ids = {s["id"]: s["name"] for s in t["steps"]}
    assert by_name["answer"]["parent"] is None and "source" not in by_name["answer"]
    assert ids[t["steps"][1]["parent"]] == "answer" and t["steps"][1]["source"] == "langchain"
    assert ids[by_name["clean"]["parent"]] == "post" and "source" not in by_name["clean"]
    assert by_name["clean"]["output"] == "Oslo"


@pytest.mark.parametrize("run_async", [False, True], ids=["stream", "astream"])
def test_a_streamed_chain_closes_its_steps_and_leaves_no_current_step_behind(run_async: bool) -> None:
    """An async stream's last chunk closes the outer run in another context than it opened in: the ended step
    must not stay current (the next marked step and LLM call would land on it)."""
    def after(out: str) -> tuple[str, str | None]:
        current = trace.current_step_name()
        with trace.step("after", kind="other"):
            return out, current

    async def astream() -> tuple[str, str | None]:
        return after("".join([part async for part in rag_chain().astream("capital of Norway")]))

    def run() -> tuple[str, str | None]:
        return asyncio.run(astream()) if run_async else after("".join(rag_chain().stream("capital of Norway")))

    (out, current), t = traced("st", run)
    assert out == "Oslo" and current is None
    assert t["steps"][-1]["name"] == "after" and t["steps"][-1]["parent"] is None
    assert len(t["steps"]) == 10 and all(s["end"] is not None for s in t["steps"])
    assert [s["doc_ids"] for s in t["steps"] if s["kind"] == "retrieval"] == [["d-oslo", "d-lima"]]


def test_concurrent_examples_keep_their_own_steps() -> None:
    chain = rag_chain()
    barrier = threading.Barrier(2)
    traces: dict[str, dict[str, Any]] = {}

    def example(ex_id: str, question: str) -> None:
        def both() -> str:
            barrier.wait(timeout=30)
            return chain.invoke(question)
        traces[ex_id] = traced(ex_id, both)[1]

    threads = [threading.Thread(target=example, args=a) for a in (("n", "capital of Norway"), ("p", "capital of Peru"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for ex_id, first in (("n", "d-oslo"), ("p", "d-lima")):
        steps = traces[ex_id]["steps"]
        assert len(steps) == 9
        assert [s["doc_ids"][0] for s in steps if s["kind"] == "retrieval"] == [first]


def test_outside_an_example_the_chain_runs_and_nothing_is_recorded() -> None:
    assert rag_chain().invoke("capital of Norway") == "Oslo"
    assert trace.current_step_name() is None


def test_a_fault_in_the_hook_is_a_note_in_the_trace_and_the_example_goes_on(monkeypatch) -> None:
    def broken(documents: Any) -> Any:
        raise RuntimeError("hook bug")

    monkeypatch.setattr(frameworks, "langchain_documents", broken)
    out, t = traced("f1", lambda: rag_chain().invoke("capital of Norway"))
    assert out == "Oslo"
    retrieval = next(s for s in t["steps"] if s["kind"] == "retrieval")
    assert retrieval["end"] is not None and retrieval["output"] is None and retrieval["error"] is None
    notes = [log for log in retrieval["logs"] if log["source"] == frameworks.NOTE_SOURCE]
    assert len(notes) == 1 and "hook bug" in notes[0]["message"] and "RuntimeError" in notes[0]["message"]
    assert all(s["end"] is not None for s in t["steps"])


def test_a_cut_hooked_prompt_is_not_checked_for_evidence_text() -> None:
    long_context = "filler " * (trace.MAX_STR // 7 + 10)
    _, t = traced("c1", lambda: FakeListChatModel(responses=["x"]).invoke(long_context))
    assert trace.CUT_MARK in t["steps"][0]["inputs"]["messages"][0]["content"]
    assert prompt_texts(t) == []  # a passage past the cut would look missing: the prompt is not evidence


def test_dspy_retriever_ids_come_from_the_prediction_or_its_passages() -> None:
    """The DSPy rules on plain values (DSPy itself runs in the slow group): an id field wins, else passage ids."""
    assert frameworks.dspy_passage_ids({"passages": ["a", "b"], "pids": [3, "d-2"]}) == ["3", "d-2"]
    assert frameworks.dspy_passage_ids({"passages": [{"id": "d-1", "text": "t"}, {"pid": 7}]}) == ["d-1", "7"]
    assert frameworks.dspy_passage_ids([{"passages": ["t"], "doc_ids": ["x"]}, {"passages": ["u"], "ids": ["y", "x"]}]) \
        == ["x", "y"]
    assert frameworks.dspy_passage_ids({"passages": ["no ids here"]}) is None


# --------------------------------------------------------------------------- through the runner


def test_the_runner_hooks_a_langchain_pipeline_that_imports_no_pipemend(tmp_path) -> None:
    rows = [{"id": "a", "inputs": {"question": "capital of Peru"}},
            {"id": "b", "inputs": {"question": "capital of Switzerland", "marked": True}}]
    proc = run_runner(tmp_path, "hooks", rows, entrypoint="lc_pipeline:run")
    assert proc.returncode == 0, proc.stderr
    assert "[runner] framework hooks: langchain" in proc.stderr
    assert {i: r["output"] for i, r in results(tmp_path).items()} == {"a": "ok", "b": "ok"}
    a, b = trace_of(tmp_path, "a"), trace_of(tmp_path, "b")
    assert [(s["name"], s["doc_ids"]) for s in a["steps"] if s["kind"] == "retrieval"] == [("KeywordRetriever", ["d-lima"])]
    assert [s["kind"] for s in a["steps"] if s["kind"] in ("generation", "parse")] == ["generation", "parse"]
    assert b["steps"][0]["name"] == "answer" and "source" not in b["steps"][0]
    assert [s["doc_ids"] for s in b["steps"] if s["kind"] == "retrieval"] == [["d-bern"]]
    assert b["steps"][1]["parent"] == b["steps"][0]["id"]


def test_a_pipeline_without_frameworks_gets_none_imported(tmp_path) -> None:
    proc = run_runner(tmp_path, "hooks", [{"id": "a", "inputs": {}}], entrypoint="plain_pipeline:run")
    assert proc.returncode == 0, proc.stderr
    assert results(tmp_path)["a"]["output"] == []  # langchain_core, langgraph are installed here, yet not loaded
    assert "framework hooks" not in proc.stderr
    assert trace_of(tmp_path, "a")["steps"] == []


def test_a_framework_imported_during_an_example_is_hooked_from_the_next_example_on(tmp_path) -> None:
    rows = [{"id": "a", "inputs": {"question": "capital of Peru"}}, {"id": "b", "inputs": {"question": "capital of Peru"}}]
    proc = run_runner(tmp_path, "hooks", rows, "--concurrency", "1", entrypoint="lazy_pipeline:run")
    assert proc.returncode == 0, proc.stderr
    assert "framework hooks" not in proc.stderr  # nothing to hook after the import
    assert trace_of(tmp_path, "a")["steps"] == []
    assert [s["doc_ids"] for s in trace_of(tmp_path, "b")["steps"] if s["kind"] == "retrieval"] == [["d-lima"]]

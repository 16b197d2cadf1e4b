"""The trace SDK in-process: steps, nesting, decorator, logs, errors, faults, threads."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading

import pytest

from pipemend import trace


@pytest.fixture(autouse=True)
def _clean_capture():
    yield
    trace.uninstall_capture()


def _dumps(t: dict) -> str:
    return json.dumps(t, allow_nan=False)  # a trace is strict JSON


def run_example(example_id: str, fn, *args):
    """Run ``fn`` as one example in a fresh context, like the runner does; returns (result, trace)."""

    def inner():
        ex = trace.start_example(example_id)
        try:
            out = fn(*args)
        except Exception as e:
            return None, ex.finish(error=e)
        return out, ex.finish(output=out)

    return contextvars.copy_context().run(inner)


def test_context_manager_records_inputs_output_and_retrieval_doc_ids():
    def pipeline():
        with trace.step("retrieve", kind="retrieval", query="q?", k=2) as s:
            docs = [{"id": "d1", "text": "a"}, {"id": 7, "text": "b"}]
            s.output(docs)
        return "ok"

    out, t = run_example("e1", pipeline)
    assert out == "ok"
    assert t["trace_format"] == "pipemend-2" and t["example_id"] == "e1" and t["output"] == "ok"
    [st] = t["steps"]
    assert st["id"] == "s1" and st["parent"] is None and st["name"] == "retrieve" and st["kind"] == "retrieval"
    assert st["inputs"] == {"query": "q?", "k": 2}
    assert st["output"][0] == {"id": "d1", "text": "a"}
    assert st["doc_ids"] == ["d1", "7"]
    assert st["start"] <= st["end"] and st["error"] is None and st["llm_calls"] == []
    _dumps(t)


def test_doc_ids_explicit_wins_and_generation_takes_them_from_inputs():
    docs = [{"id": "a"}, {"id": "b"}]

    def pipeline():
        with trace.step("gen", kind="generation", question="q", context=docs):
            pass
        with trace.step("gen2", kind="generation", context=docs, doc_ids=["z"]):
            pass
        with trace.step("r", kind="retrieval") as s:
            s.output(docs, doc_ids=["x", "y"])
        with trace.step("other", kind="other", context=docs) as s:
            s.output(docs)

    _, t = run_example("e", pipeline)
    assert [s["doc_ids"] for s in t["steps"]] == [["a", "b"], ["z"], ["x", "y"], None]


def test_nested_steps_have_parents_and_current_names():
    seen = []

    def pipeline():
        seen.append((trace.current_example_id(), trace.current_step_name()))
        with trace.step("hop1"):
            with trace.step("retrieve", kind="retrieval"):
                seen.append(trace.current_step_name())
            seen.append(trace.current_step_name())
        with trace.step("hop2"):
            with trace.step("retrieve", kind="retrieval"):
                with trace.step("rerank"):
                    pass

    _, t = run_example("nest", pipeline)
    assert seen == [("nest", None), "retrieve", "hop1"]
    assert [(s["id"], s["parent"], s["name"]) for s in t["steps"]] == [
        ("s1", None, "hop1"), ("s2", "s1", "retrieve"), ("s3", None, "hop2"), ("s4", "s3", "retrieve"),
        ("s5", "s4", "rerank"),
    ]


def test_decorator_forms_record_bound_args_and_return_value():
    @trace.step(kind="generation")
    def answer(question, docs, temperature=0.0):
        return f"A:{question}"

    @trace.step("named", kind="parse")
    def parse(raw):
        return {"parsed": raw.strip()}

    @trace.step
    def bare(x):
        return x * 2

    class Agent:
        @trace.step(kind="tool")
        def act(self, cmd):
            return cmd.upper()

    def pipeline():
        return [answer("q", [{"id": "d9"}]), parse(" r "), bare(21), Agent().act("go")]

    out, t = run_example("dec", pipeline)
    assert out == ["A:q", {"parsed": "r"}, 42, "GO"]
    a, p, b, act = t["steps"]
    assert (a["name"], a["kind"], a["inputs"], a["output"], a["doc_ids"]) == (
        "answer", "generation", {"question": "q", "docs": [{"id": "d9"}], "temperature": 0.0}, "A:q", ["d9"])
    assert (p["name"], p["kind"], p["output"]) == ("named", "parse", {"parsed": "r"})
    assert (b["name"], b["kind"], b["inputs"], b["output"]) == ("bare", "other", {"x": 21}, 42)
    assert (act["name"], act["inputs"]) == ("act", {"cmd": "go"})


def test_async_decorator_and_steps_inside_tasks():
    @trace.step(kind="generation")
    async def agen(q):
        await asyncio.sleep(0)
        return q + "!"

    async def main():
        with trace.step("outer"):
            return await asyncio.gather(agen("a"), agen("b"))

    out, t = run_example("async", lambda: asyncio.run(main()))
    assert out == ["a!", "b!"]
    outer, g1, g2 = t["steps"]
    assert g1["parent"] == g2["parent"] == outer["id"]
    assert {g1["output"], g2["output"]} == {"a!", "b!"}


def test_errors_are_recorded_and_propagate_unchanged():
    boom = ValueError("bad thing")

    @trace.step(kind="tool")
    def tool():
        raise boom

    def pipeline():
        with trace.step("outer"):
            try:
                tool()
            except ValueError as e:
                assert e is boom
            with trace.step("again"):
                raise KeyError("k")

    out, t = run_example("err", pipeline)
    outer, tool_step, again = t["steps"]
    assert tool_step["error"]["type"] == "ValueError" and tool_step["error"]["message"] == "bad thing"
    assert "raise boom" in tool_step["error"]["traceback"]
    assert again["error"]["type"] == "KeyError" and outer["error"]["type"] == "KeyError"
    assert t["error"]["type"] == "KeyError" and "Traceback" in t["error"]["traceback"]


def test_logging_print_and_step_log_land_in_the_right_step(capsys):
    logger = logging.getLogger("fixture.trace")
    logger.setLevel(logging.INFO)

    def pipeline():
        print("before any step")
        with trace.step("outer") as s:
            s.log("explicit")
            print("partial ", end="")
            print("line")
            logger.info("info in outer")
            with trace.step("inner"):
                logger.warning("warn in inner %d", 3)
                print("to stderr", file=__import__("sys").stderr)
            print("unterminated", end="")
        return "done"

    _, t = run_example("logs", pipeline)
    print("after the example")  # passes through to the real stdout
    outer, inner = t["steps"]
    assert [(l["source"], l["message"]) for l in outer["logs"]] == [
        ("step", "explicit"), ("stdout", "partial line"), ("logging", "info in outer"), ("stdout", "unterminated"),
    ]
    assert outer["logs"][2]["level"] == "INFO" and outer["logs"][2]["logger"] == "fixture.trace"
    assert [(l["source"], l["message"]) for l in inner["logs"]] == [("logging", "warn in inner 3"), ("stderr", "to stderr")]
    assert [l["message"] for l in t["logs"]] == ["before any step"]
    assert capsys.readouterr().out == "after the example\n"


def test_unknown_kind_is_other_with_a_warning():
    def pipeline():
        with trace.step("outer"):
            with trace.step("x", kind="retreival"):
                pass

    _, t = run_example("k", pipeline)
    assert t["steps"][1]["kind"] == "other"
    [warn] = t["steps"][0]["logs"]
    assert warn["logger"] == "pipemend.trace" and "retreival" in warn["message"]


def test_outside_an_example_steps_are_noops_and_code_runs(capsys):
    @trace.step(kind="generation")
    def gen(x):
        print("gen ran")
        return x + 1

    with trace.step("loose", kind="retrieval", q=1) as s:
        assert s.output([1, 2]) == [1, 2]
        s.log("ignored")
        assert trace.current_example_id() is None and trace.current_step_name() is None
    assert gen(1) == 2
    trace.record_llm_call({"call_id": "c"})  # no example: ignored
    assert capsys.readouterr().out == "gen ran\n"


class Evil(dict):
    def items(self):
        raise RuntimeError("evil items")


class NoRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


def test_tracing_faults_never_break_the_pipeline(caplog):
    caplog.set_level(logging.WARNING, logger="pipemend.trace")

    @trace.step(kind="tool")
    def tool(arg):
        return "tool ok"

    def pipeline():
        with trace.step("a", x=NoRepr()) as s:
            s.output(NoRepr())
        with trace.step("b", arg=Evil(), fine=1) as s:  # cannot copy one input: a marker for it
            s.output(Evil())  # cannot copy the output: a marker, the step goes on
            s.log("fine")
        return tool(Evil())

    out, t = run_example("fault", pipeline)
    assert out == "tool ok"
    a, b, tool_step = t["steps"]
    marker = "<pipemend: could not record Evil: RuntimeError>"
    assert a["inputs"] == {"x": "<unrepresentable NoRepr: RuntimeError>"}
    assert b["inputs"] == {"arg": marker, "fine": 1} and b["output"] == marker and b["end"] is not None
    assert tool_step["inputs"] == {"arg": marker} and tool_step["output"] == "tool ok"
    assert b["logs"][-1]["message"] == "fine"
    assert any("could not" in r.getMessage() for r in caplog.records if r.name == "pipemend.trace")
    _dumps(t)


def test_values_are_json_safe_and_long_strings_cut():
    class Thing:
        def __repr__(self):
            return "Thing()"

    v = trace.jsonable({"s": "x" * 30_000, "n": float("nan"), 3: {1, 2}, "t": Thing(), "b": b"\x00", "l": list(range(2_500))})
    assert v["s"].startswith("x" * trace.MAX_STR) and "truncated 10000 chars" in v["s"]
    assert v["n"] == "nan" and sorted(v["3"]) == [1, 2] and v["t"] == "Thing()" and v["b"] == "b'\\x00'"
    assert len(v["l"]) == trace.MAX_ITEMS + 1 and "truncated 500 items" in v["l"][-1]
    deep: list = []
    cur = deep
    for _ in range(100):
        cur.append([])
        cur = cur[0]
    json.dumps(trace.jsonable(deep))


def test_llm_calls_attach_to_innermost_step_with_otel_names():
    def pipeline():
        trace.record_llm_call({"call_id": "c0", "model": "m"})
        with trace.step("outer"):
            with trace.step("inner", kind="generation"):
                trace.record_llm_call({"call_id": "c1", "model": "claude-x", "input_tokens": 10,
                                       "output_tokens": 5, "cache": "hit", "duration_s": 0.4})
            trace.record_llm_call({"call_id": "c2", "cache_hit": False})

    _, t = run_example("llm", pipeline)
    outer, inner = t["steps"]
    [c1] = inner["llm_calls"]
    assert c1 == {"gen_ai.provider.name": "anthropic", "gen_ai.operation.name": "chat", "call_id": "c1",
                  "gen_ai.request.model": "claude-x", "gen_ai.usage.input_tokens": 10,
                  "gen_ai.usage.output_tokens": 5, "pipemend.cache_hit": True, "duration_s": 0.4}
    assert [c["call_id"] for c in outer["llm_calls"]] == ["c2"] and outer["llm_calls"][0]["pipemend.cache_hit"] is False
    assert [c["call_id"] for c in t["llm_calls"]] == ["c0"]


def test_finish_from_another_thread_snapshots_open_steps():
    started, release = threading.Event(), threading.Event()
    holder = {}

    def worker():
        holder["ex"] = trace.start_example("hung")
        with trace.step("stuck"):
            started.set()
            release.wait(5)
            print("after finish")  # goes nowhere near the finished trace

    th = threading.Thread(target=contextvars.copy_context().run, args=(worker,))
    th.start()
    assert started.wait(5)
    t = holder["ex"].finish(error={"type": "Timeout", "message": "timeout after 1s", "traceback": None})
    release.set()
    th.join(5)
    assert t["steps"][0]["end"] is None and t["error"]["type"] == "Timeout"
    assert holder["ex"].finish() is t and t["steps"][0]["logs"] == []


def test_concurrent_examples_in_threads_do_not_mix():
    log = logging.getLogger("fixture.threads")
    log.setLevel(logging.INFO)
    traces: dict[str, dict] = {}
    barrier = threading.Barrier(8)

    @trace.step(kind="generation")
    def gen(tag, docs):
        log.info("gen %s", tag)
        return f"out-{tag}"

    def one(tag: str) -> dict:
        ex = trace.start_example(tag)
        with trace.step("outer", kind="other", tag=tag) as s:
            barrier.wait(10)  # all eight threads are inside a step at once
            for i in range(3):
                print(f"print {tag} {i}")
                log.info("log %s %d", tag, i)
                with trace.step("retrieve", kind="retrieval", tag=tag) as r:
                    r.output([{"id": f"{tag}-d{i}"}])
                    trace.record_llm_call({"call_id": f"{tag}-c{i}"})
                gen(tag, [{"id": f"{tag}-d{i}"}])
            s.output(tag)
        return ex.finish(output=tag)

    def thread_main(n: int):
        for k in range(3):
            tag = f"t{n}e{k}"
            traces[tag] = one(tag) if k else contextvars.copy_context().run(one, tag)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(thread_main, n)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(traces) == 24
    for tag, t in traces.items():
        assert t["example_id"] == tag and t["output"] == tag
        assert len(t["steps"]) == 7 and [s["id"] for s in t["steps"]] == [f"s{i}" for i in range(1, 8)]
        text = _dumps(t)
        others = [o for o in traces if o != tag]
        assert not any(f'"{o}' in text or f" {o} " in text or f"-{o}" in text for o in others)
        outer = t["steps"][0]
        assert [l["message"] for l in outer["logs"] if l["source"] == "stdout"] == [f"print {tag} {i}" for i in range(3)]
        assert sum(tag in l["message"] for l in outer["logs"]) == 6
        for st in t["steps"][1:]:
            assert st["parent"] == "s1"
            assert all(d.startswith(tag + "-") for d in st["doc_ids"])
        assert [c["call_id"] for s in t["steps"] for c in s["llm_calls"]] == [f"{tag}-c{i}" for i in range(3)]

"""Two-hop question answering over a fictional corpus.

decompose (LLM) -> retrieve hop 1 (BM25) -> [find the bridge entity (LLM), when
``retrieval.hop2_query: bridge``] -> retrieve hop 2 (BM25) -> assemble context -> answer (LLM)
-> parse. Entry point: ``run({"question": ...}) -> str``.

Prompts live in ``prompts/``, parameters in ``config.yaml``. LLM calls go through the
``anthropic`` SDK; base URL and key come from the environment (ANTHROPIC_BASE_URL,
ANTHROPIC_API_KEY), the model from PIPEMEND_MODEL.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import anthropic
import jinja2
import yaml

from pipemend import trace

import retrieval

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "local/qwen2.5-coder-1.5b-instruct"
CONFIG: dict[str, Any] = yaml.safe_load((HERE / "config.yaml").read_text(encoding="utf-8"))
PROMPTS = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "prompts"),
                             undefined=jinja2.StrictUndefined, autoescape=False)

_clients: dict[tuple[str | None, str | None], anthropic.Anthropic] = {}
_clients_lock = threading.Lock()


def _client() -> anthropic.Anthropic:
    key = (os.environ.get("ANTHROPIC_BASE_URL"), os.environ.get("ANTHROPIC_API_KEY"))
    with _clients_lock:
        if key not in _clients:
            _clients[key] = anthropic.Anthropic(max_retries=1)
        return _clients[key]


def complete(prompt: str, max_tokens: int) -> str:
    """One user turn to the model; the reply's text."""
    resp = _client().messages.create(
        model=os.environ.get("PIPEMEND_MODEL", DEFAULT_MODEL),
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": prompt}],
        # anthropic>=2 has no `temperature` argument; the Messages API (and the gateway) still read it
        extra_body={"temperature": CONFIG["llm"]["temperature"]},
    )
    return "".join(block.text for block in resp.content if block.type == "text")


def decompose(question: str) -> dict[str, str]:
    """Split a two-hop question into a first search question and a second-hop template."""
    with trace.step("decompose", kind="generation", question=question) as s:
        prompt = PROMPTS.get_template("decompose.j2").render(question=question)
        raw = complete(prompt, CONFIG["llm"]["decompose_max_tokens"])
        hop1 = re.search(r"HOP1:\s*(.+)", raw)
        hop2 = re.search(r"HOP2:\s*(.+)", raw)
        plan = {"hop1": hop1.group(1).strip() if hop1 else question,
                "hop2": hop2.group(1).strip() if hop2 else question}
        s.output(plan)
    return plan


def retrieve(name: str, query: str, top_k: int) -> list[dict]:
    with trace.step(name, kind="retrieval", query=query, top_k=top_k) as s:
        docs = retrieval.search(query, top_k)
        s.output(docs)
    return docs


def find_bridge(question: str, docs: list[dict]) -> str:
    """Answer the first-hop question from the first-hop documents (the entity the second hop needs)."""
    with trace.step("find_bridge", kind="generation", question=question) as s:
        prompt = PROMPTS.get_template("bridge.j2").render(question=question, docs=docs)
        raw = complete(prompt, CONFIG["llm"]["bridge_max_tokens"])
        bridge = raw.strip().splitlines()[0].strip().rstrip(".") if raw.strip() else ""
        s.output(bridge, doc_ids=[d["id"] for d in docs])
    return bridge


def hop2_query(template: str, hop1_question: str, hop1_docs: list[dict]) -> str:
    """The second-hop search question: the template with its ``[ANSWER]`` slot filled.

    ``retrieval.hop2_query`` says with what: ``hop1_doc`` pastes the best first-hop document
    (whose text names the bridge entity); ``bridge`` asks the model for the entity first.
    """
    if "[ANSWER]" not in template:
        return template
    if not hop1_docs:
        return template.replace("[ANSWER]", "")
    mode = CONFIG["retrieval"]["hop2_query"]
    if mode == "bridge":
        return template.replace("[ANSWER]", find_bridge(hop1_question, hop1_docs))
    if mode != "hop1_doc":
        raise ValueError(f"config.yaml retrieval.hop2_query: {mode!r} is not hop1_doc or bridge")
    top = hop1_docs[0]
    return template.replace("[ANSWER]", f"{top['title']}: {top['text']}")


def assemble_context(hop1: list[dict], hop2: list[dict]) -> list[dict]:
    """Merge both hops' documents (no duplicates), order them and keep at most ``max_docs``."""
    cfg = CONFIG["context"]
    with trace.step("assemble_context", kind="other", hop1=[d["id"] for d in hop1],
                    hop2=[d["id"] for d in hop2], order=cfg["order"]) as s:
        if cfg["order"] == "hop2_first":
            merged = hop2 + hop1
        elif cfg["order"] == "retrieval_order":
            merged = hop1 + hop2
        elif cfg["order"] == "score":
            merged = sorted(hop1 + hop2, key=lambda d: -d["score"])
        else:
            raise ValueError(f"config.yaml context.order: {cfg['order']!r} is not score, retrieval_order or hop2_first")
        seen: set[str] = set()
        docs = [d for d in merged if not (d["id"] in seen or seen.add(d["id"]))][: cfg["max_docs"]]
        s.output(docs, doc_ids=[d["id"] for d in docs])
    return docs


def answer(question: str, docs: list[dict]) -> str:
    with trace.step("answer", kind="generation", question=question) as s:
        prompt = PROMPTS.get_template("answer.j2").render(question=question, docs=docs,
                                                          style=CONFIG["answer"]["style"])
        raw = complete(prompt, CONFIG["llm"]["answer_max_tokens"])
        s.output(raw, doc_ids=[d["id"] for d in docs])
    return raw


def parse_answer(raw: str) -> str:
    """The answer is the first line of the reply, up to a ``[n]`` citation, without a trailing full stop."""
    with trace.step("parse_answer", kind="parse", raw=raw) as s:
        text = raw.strip()
        first = text.splitlines()[0].strip() if text else ""
        result = first.split("[", 1)[0].strip().rstrip(".").strip()
        s.output(result)
    return result


def run(inputs: dict[str, Any]) -> str:
    question = inputs["question"]
    plan = decompose(question)
    hop1 = retrieve("retrieve_hop1", plan["hop1"], CONFIG["retrieval"]["hop1_top_k"])
    hop2 = retrieve("retrieve_hop2", hop2_query(plan["hop2"], plan["hop1"], hop1), CONFIG["retrieval"]["hop2_top_k"])
    docs = assemble_context(hop1, hop2)
    return parse_answer(answer(question, docs))

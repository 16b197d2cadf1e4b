"""Sample indices: an evaluation's sampled model calls (temperature > 0) draw from the series its index
names. Same index: the same draws, from the cache (a re-run pays nothing twice; base and candidate share
the draws of unchanged steps). Another index: fresh draws (the gate's confirmation re-runs).

Real parts: the gateway over HTTP with the ``simulated/sampled`` model (every draw a different answer),
the anthropic SDK, the process sandbox and runner, the cache and call log on disk, ``EvalKey`` files.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path

import anthropic
import pytest

from pipemend.dataset import freeze_target
from pipemend.errors import UsageError
from pipemend.evaluate import EvalContext, EvalKey, evaluate, gateway_socket_path, remember, reuse
from pipemend.fsutil import atomic_write_json, read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.service import SampleCounters
from pipemend.manifest import load_manifest
from pipemend.runtime.sampling import MAX_SAMPLE_INDEX, sample_index
from pipemend.sandbox import get_sandbox

pytestmark = pytest.mark.timeout(120)

TARGETS = Path(__file__).parent / "fixtures" / "targets"
SAMPLED = "simulated/sampled"
ROLL = [{"role": "user", "content": "roll"}]


@pytest.fixture
def serve(tmp_path: Path):
    """Start a gateway over the test's one cache folder (stopped at the end of the test)."""
    started: list[Gateway] = []

    def start(run: str = "run") -> Gateway:
        cfg = GatewayConfig(run_dir=tmp_path / run, cache_dir=tmp_path / "cache", models=[SAMPLED, "simulated/echo"])
        started.append(Gateway(cfg).start())
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def ask(gateway: Gateway, token: str | None, index: str | None, *, messages=ROLL, model: str = SAMPLED,
        temperature: float | None = 0.8) -> tuple[str, str]:
    """One request as the runner sends it: (cache hit or miss, the answer's text)."""
    headers = {k: v for k, v in (("x-pipemend-eval", token), ("x-pipemend-sample", index)) if v is not None}
    extra = {} if temperature is None else {"temperature": temperature}
    raw = anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0).messages.with_raw_response.create(
        model=model, max_tokens=20, messages=messages, extra_headers=headers, extra_body=extra)
    return raw.headers["x-pipemend-cache"], raw.parse().content[0].text


def evaluation(gateway: Gateway, index: str | None, n: int = 2, **kw) -> list[tuple[str, str]]:
    """``n`` identical sampled requests of one evaluation (a fresh token) at ``index``."""
    token = uuid.uuid4().hex
    return [ask(gateway, token, index, **kw) for _ in range(n)]


def backend_calls(gateway: Gateway, model: str = SAMPLED) -> int:
    gateway.flush()
    return sum(1 for row in read_jsonl(gateway.calls_path) if row["model"] == model and row["cache"] == "miss")


# --------------------------------------------------------------------------- the gateway


def test_a_rerun_at_the_same_index_replays_its_draws_and_another_index_draws_fresh(serve):
    gw = serve()
    first = evaluation(gw, "0")
    assert [c for c, _ in first] == ["miss", "miss"]
    draws0 = [t for _, t in first]
    assert draws0[0] != draws0[1] and all(t.startswith("roll #") for t in draws0)  # two draws within one evaluation

    ask(gw, None, None)  # what else the gateway serves in between (a proposer's call) does not shift the draws
    ask(gw, uuid.uuid4().hex, "5", messages=[{"role": "user", "content": "other"}])
    again = evaluation(gw, "0")  # the evaluation re-run (a new token, as every evaluate() call has)
    assert again == [("hit", draws0[0]), ("hit", draws0[1])]

    fresh = evaluation(gw, "1")  # a confirmation re-run
    assert [c for c, _ in fresh] == ["miss", "miss"]
    draws1 = [t for _, t in fresh]
    assert len(set(draws0 + draws1)) == 4
    assert backend_calls(gw) == 5  # two draws at index 0, the other request, two at index 1

    gw.stop()
    gw2 = serve("run2")  # a resumed run: a fresh gateway process state, the same cache
    assert evaluation(gw2, "1", n=3)[:2] == [("hit", draws1[0]), ("hit", draws1[1])]
    assert backend_calls(gw2) == 1  # only the third draw, never asked before, reached the backend
    gw2.flush()
    rows = [r for r in read_jsonl(gw2.calls_path) if r["model"] == SAMPLED]
    assert [r["sample"] for r in rows] == [1, 1, 1]


def test_base_and_candidate_at_one_index_share_the_draws_of_unchanged_steps(serve):
    gw = serve()
    step1 = [{"role": "user", "content": "retrieve"}]

    def run(prompt: str, index: str) -> list[tuple[str, str]]:
        token = uuid.uuid4().hex
        return [ask(gw, token, index, messages=step1), ask(gw, token, index, messages=[{"role": "user", "content": prompt}])]

    base = run("answer tersely", "2")
    cand = run("answer in full", "2")
    assert cand[0] == ("hit", base[0][1])  # the unchanged step: the base's draw, paid once
    assert cand[1][0] == "miss" and cand[1][1].startswith("answer in full #")


def test_concurrent_identical_requests_of_one_evaluation_get_distinct_draws(serve):
    gw = serve()
    token, got, lock = uuid.uuid4().hex, [], threading.Lock()

    def one() -> None:
        answer = ask(gw, token, "3")
        with lock:
            got.append(answer)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(c for c, _ in got) == ["miss"] * 6 and len({t for _, t in got}) == 6
    assert sorted(evaluation(gw, "3", n=6)) == sorted(("hit", t) for _, t in got)


@pytest.mark.parametrize("value", ["-1", "abc", "10000", "99999999999999999999999", "1e3", "0x1", "+1", "1 1", "",
                                   "9" * 4000])
def test_a_hostile_sample_header_reads_as_index_0(serve, value):
    gw = serve()
    [(_, draw)] = evaluation(gw, "0", n=1)
    assert evaluation(gw, value, n=1) == [("hit", draw)]
    # an absurd evaluation token costs no more memory than any other: counters are digests
    assert ask(gw, "t" * 20_000, value) == ("hit", draw)
    gw.flush()
    rows = list(read_jsonl(gw.calls_path))
    assert [r["sample"] for r in rows] == [0, 0, 0] and all(r["error"] is None for r in rows)


def test_requests_outside_an_evaluation_ignore_the_index_and_deterministic_models_ignore_both(serve):
    gw = serve()
    # no eval token (a proposer's call): the n-th identical request of this gateway, whatever index it names
    first = ask(gw, None, "7")
    assert first[0] == "miss" and ask(gw, None, "7")[0] == "miss"
    gw.flush()
    assert [r["sample"] for r in read_jsonl(gw.calls_path)] == [0, 0]
    # a deterministic model is cached whatever the temperature and the index
    echo = [ask(gw, uuid.uuid4().hex, i, model="simulated/echo") for i in ("0", "1", "2")]
    assert echo == [("miss", "roll"), ("hit", "roll"), ("hit", "roll")]
    # no temperature named: greedy, one entry for every index
    greedy = [ask(gw, uuid.uuid4().hex, i, temperature=None) for i in ("0", "4")]
    assert greedy[1] == ("hit", greedy[0][1]) and greedy[0][1] == "roll"


def test_sample_index_reads_only_small_plain_integers():
    assert [sample_index(v) for v in ("0", "1", " 42\t", "0007", str(MAX_SAMPLE_INDEX))] == [0, 1, 42, 7, MAX_SAMPLE_INDEX]
    odd = [None, "", " ", "-3", "+3", str(MAX_SAMPLE_INDEX + 1), "3.0", "1e2", "\u0663", "٣٣", "0b1", "3\n", 3, b"3"]
    assert [sample_index(v) for v in odd] == [0] * len(odd)


def test_sample_counters_stay_bounded_and_forget_the_least_recently_used():
    counters = SampleCounters(limit=3)
    assert [counters.take("a"), counters.take("a"), counters.take("b")] == [0, 1, 0]
    for i in range(1000):
        counters.take(f"flood-{i}")
        assert len(counters) <= 3
    assert counters.take("flood-999") == 1  # recent series keep counting
    assert counters.take("a") == 0  # a forgotten series starts again at draw 0
    with pytest.raises(ValueError):
        SampleCounters(limit=0)


# --------------------------------------------------------------------------- evaluate and its key


def test_the_eval_key_carries_the_sample_and_an_old_key_file_reads_as_index_0(tmp_path: Path):
    out = tmp_path / "evals" / "val"

    def finished(key: EvalKey | None, old: dict | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "outcome.json", {"format": "pipemend-outcome-1"})
        (out / "scored.jsonl").write_text(json.dumps({"id": "q1", "score": 1.0}) + "\n")
        if key is not None:
            remember(out, key)
        else:
            atomic_write_json(tmp_path / "evals" / "val.key.json", old)

    key0 = EvalKey(sha="abc", diff="d", split="val", ids=("q1",), model="m")
    key1 = EvalKey(sha="abc", diff="d", split="val", ids=("q1",), model="m", sample=1)
    assert key0.sample == 0 and key0.to_json()["sample"] == 0 and key1.to_json()["sample"] == 1
    assert EvalKey.of(sha="abc", diff="", split="val", examples=[], model="m", sample=2).sample == 2

    finished(key1)
    assert reuse(out, key1) == [{"id": "q1", "score": 1.0}]
    assert reuse(out, key0) is None and not out.exists()  # another index: run afresh

    old = {k: v for k, v in key0.to_json().items() if k != "sample"}  # written before sample indices
    finished(None, old)
    assert reuse(out, key1) is None
    finished(None, old)
    assert reuse(out, key0) == [{"id": "q1", "score": 1.0}]


@pytest.fixture
def sampled_target(tmp_path: Path) -> Path:
    """``echo_qa`` asking ``simulated/sampled`` at temperature 0.9: every draw a different (wrong) answer."""
    target = tmp_path / "target"
    shutil.copytree(TARGETS / "echo_qa", target)
    manifest = target / "pipemend.yaml"
    manifest.write_text(manifest.read_text().replace("model: simulated/echo", f"model: {SAMPLED}"))
    pipeline = target / "pipeline.py"
    pipeline.write_text(pipeline.read_text().replace("max_tokens=64,", "max_tokens=64, extra_body={\"temperature\": 0.9},"))
    return target


def test_evaluate_sends_its_sample_index_and_a_rerun_pays_nothing_twice(tmp_path: Path, sampled_target: Path):
    manifest = load_manifest(sampled_target)
    run_dir = tmp_path / "run"
    frozen = freeze_target(sampled_target, manifest, run_dir)
    examples = frozen.splits()["val"][:2]
    gw = Gateway(GatewayConfig(run_dir=run_dir, socket_path=gateway_socket_path(run_dir), models=[SAMPLED],
                               cache_dir=tmp_path / "cache")).start()  # a fresh cache: misses are this test's
    try:
        ctx = EvalContext(run_dir=run_dir, frozen=frozen, sandbox=get_sandbox("process", announce=lambda m: None),
                          gateway=gw, model=SAMPLED, sealed=manifest.sealed_paths(sampled_target))

        def outputs(name: str, sample: int) -> dict[str, str]:
            res = evaluate(ctx, name=name, worktree=sampled_target, target_subdir="", split="val",
                           examples=examples, out_dir=run_dir / "evals" / name, sample=sample)
            assert not res.failed_systemically, res.outcome.stderr_tail
            return {r["id"]: r["output"] for r in res.rows}

        with pytest.raises(UsageError, match="sample -1: expected an integer from 0"):
            outputs("bad", -1)
        first = outputs("s0", 0)
        assert all(out.startswith(ex.inputs["question"] + " #") for ex, out in zip(examples, first.values()))
        assert outputs("s0-again", 0) == first
        fresh = outputs("s1", 1)
        assert set(fresh) == set(first) and not set(fresh.values()) & set(first.values())
    finally:
        gw.stop()
    rows = list(read_jsonl(run_dir / "gateway" / "calls.jsonl"))
    assert [(r["sample"], r["cache"]) for r in rows] == [(0, "miss")] * 2 + [(0, "hit")] * 2 + [(1, "miss")] * 2

"""The call log after a crash mid-write: a torn last line never breaks a reader or the next append."""

from __future__ import annotations

import json

import anthropic
import pytest

from pipemend.fsutil import read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.calllog import CallLog, repair_torn_tail

pytestmark = pytest.mark.timeout(60)
HELLO = [{"role": "user", "content": "hello gateway"}]


def row(call_id: str, cost: float = 0.0) -> str:
    return json.dumps({"format": "pipemend-call-1", "call_id": call_id, "cache": "miss", "error": None,
                       "cost_usd": cost, "input_tokens": 10, "output_tokens": 5}) + "\n"


def test_gateway_drops_a_torn_tail_before_appending_and_counts_the_whole_rows(tmp_path):
    log = tmp_path / "run" / "gateway" / "calls.jsonl"
    log.parent.mkdir(parents=True)
    torn = row("c-torn", 5.0)[:-20]  # a crash cut the last write short
    log.write_text(row("c-1", 0.6) + row("c-2", 0.6) + torn)
    cfg = GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=["simulated/echo"],
                        budget_usd=1.0)
    with Gateway(cfg) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.RateLimitError, match=r"spent \$1.2000"):  # the two whole rows, not the torn one
            c.messages.create(model="simulated/echo", max_tokens=5, messages=HELLO)
        gw.flush()
    rows = list(read_jsonl(log, tolerate_torn_tail=False))  # strict: every line is whole
    assert [r["call_id"] for r in rows[:2]] == ["c-1", "c-2"] and len(rows) == 3
    assert rows[2]["error"]["status"] == 429
    assert "c-torn" not in log.read_text()


def test_a_whole_last_row_missing_only_its_newline_is_kept(tmp_path):
    log = tmp_path / "calls.jsonl"
    log.write_text(row("c-1") + row("c-2").rstrip("\n"))
    assert repair_torn_tail(log) == 0
    assert log.read_text() == row("c-1") + row("c-2")
    calls = CallLog(log)
    calls.append({"call_id": "c-3"})
    calls.close()
    assert [r["call_id"] for r in read_jsonl(log, tolerate_torn_tail=False)] == ["c-1", "c-2", "c-3"]


@pytest.mark.parametrize("tail", [b'{"format": "pipemend-call-1", "call', b"\x00\x00\x00\x00", b'{"a": "\xc3', b"["])
def test_torn_fragments_of_any_kind_are_dropped(tmp_path, tail):
    log = tmp_path / "calls.jsonl"
    log.write_bytes(row("c-1").encode() + tail)
    assert repair_torn_tail(log) == len(tail)
    assert log.read_bytes() == row("c-1").encode()
    assert repair_torn_tail(log) == 0  # idempotent


def test_a_log_that_is_one_torn_line_is_emptied_and_a_missing_log_is_fine(tmp_path):
    log = tmp_path / "calls.jsonl"
    assert repair_torn_tail(log) == 0 and not log.exists()
    big_fragment = b'{"call_id": "c-big", "request": "' + b"x" * 200_000  # longer than one read block
    log.write_bytes(big_fragment)
    assert repair_torn_tail(log) == len(big_fragment)
    assert log.read_bytes() == b""


def test_a_long_torn_tail_after_long_rows_is_found_reading_backwards(tmp_path):
    log = tmp_path / "calls.jsonl"
    long_row = json.dumps({"call_id": "c-long", "request": "y" * 150_000}) + "\n"
    log.write_text(long_row + '{"call_id": "c-torn", "request": "' + "z" * 150_000)
    repair_torn_tail(log)
    assert log.read_text() == long_row


def test_the_writer_outlives_a_row_it_cannot_serialize(tmp_path):
    log = tmp_path / "calls.jsonl"
    calls = CallLog(log)
    deep: list = []
    for _ in range(100_000):  # nested far past the recursion limit: json.dumps fails on it
        deep = [deep]
    calls.append({"call_id": "c-bad", "request": deep})
    calls.append({"call_id": "c-good"})
    calls.flush()  # returns: the writer thread is alive
    calls.append({"call_id": "c-after"})
    calls.close()
    assert [r["call_id"] for r in read_jsonl(log, tolerate_torn_tail=False)] == ["c-good", "c-after"]

"""Token counts and dollar costs from a backend's ``usage``: garbage counts as nothing, never an exception
(a backend or an agent reply may send anything)."""

from __future__ import annotations

import pytest

from pipemend.gateway.pricing import cost_usd, tokens_of


def test_tokens_count_cache_writes_and_reads_as_input() -> None:
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 3}
    assert tokens_of(usage) == (22, 3)
    assert cost_usd("claude-haiku-4-5", usage) == pytest.approx((10 + 1.25 * 5 + 0.1 * 7) * 1.0 / 1e6 + 3 * 5.0 / 1e6)


@pytest.mark.parametrize("bad", ["lots", None, -4, float("nan"), float("inf"), True, [1], {"n": 1}])
def test_a_count_that_is_no_count_is_zero(bad: object) -> None:
    usage = {"input_tokens": bad, "output_tokens": bad}
    assert tokens_of(usage) == (0, 0)
    assert cost_usd("claude-sonnet-4-5", usage) == 0.0


@pytest.mark.parametrize("usage", [None, "usage", 3, []])
def test_usage_that_is_no_mapping_counts_nothing(usage: object) -> None:
    assert tokens_of(usage) == (0, 0)  # type: ignore[arg-type]
    assert cost_usd("claude-sonnet-4-5", usage) == 0.0

"""Dollar cost of a call from its usage, by model. Local, scripted and simulated calls cost 0."""

from __future__ import annotations

from typing import Any

# USD per million tokens (input, output), matched by the longest model-name prefix.
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-3-opus": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}
# An unknown claude-* model is priced like the dearest, so budgets never under-count.
UNKNOWN_CLAUDE = (15.0, 75.0)
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1


def price_of(model: str) -> tuple[float, float]:
    if not model.startswith("claude-"):
        return (0.0, 0.0)
    for prefix in sorted(PRICES, key=len, reverse=True):
        if model.startswith(prefix):
            return PRICES[prefix]
    return UNKNOWN_CLAUDE


def _usage_get(usage: Any, name: str) -> int:
    """A token count of ``usage`` (a dict or an SDK ``Usage``); a count that is not a non-negative finite
    number (a backend's garbage) is 0, never an exception."""
    value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        return 0
    return int(value)


def cost_usd(model: str, usage: Any, prices: tuple[float, float] | None = None) -> float:
    """Cost of one call from its ``usage`` (a dict or an SDK ``Usage`` object), counting prompt-cache
    writes and reads at their rates; ``prices`` (input, output per million tokens) overrides the table."""
    usage = usage or {}
    price_in, price_out = prices if prices is not None else price_of(model)
    tokens_in = (
        _usage_get(usage, "input_tokens")
        + CACHE_WRITE_FACTOR * _usage_get(usage, "cache_creation_input_tokens")
        + CACHE_READ_FACTOR * _usage_get(usage, "cache_read_input_tokens")
    )
    return (tokens_in * price_in + _usage_get(usage, "output_tokens") * price_out) / 1e6


def tokens_of(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(input, output) tokens, input including prompt-cache writes and reads."""
    tokens_in = sum(_usage_get(usage, k) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    return tokens_in, _usage_get(usage, "output_tokens")

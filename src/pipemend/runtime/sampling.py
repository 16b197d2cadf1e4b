"""The sample index of an evaluation: which draw of its sampled model calls it gets.

The host gives every evaluation an index (``evaluate(..., sample=k)``), passed
to the sandbox as ``$PIPEMEND_SAMPLE``; the runner sends it on every model
request as ``x-pipemend-sample``, and the gateway puts it in the cache key of a
sampled request (temperature > 0). An evaluation re-run with the same index
replays its samples from the cache; another index draws fresh ones; base and
candidate at the same index share the samples of their unchanged steps.

One home for the header, the variable and the rule that reads them, shared by
the runner (inside the sandbox: standard library only) and the gateway (where
the header is hostile input): a value that is not a plain decimal integer in
``0..MAX_SAMPLE_INDEX`` reads as 0.
"""

from __future__ import annotations

SAMPLE_HEADER = "x-pipemend-sample"
SAMPLE_ENV = "PIPEMEND_SAMPLE"
MAX_SAMPLE_INDEX = 9999
"""The largest sample index; a larger (or negative, or malformed) value reads as 0."""
_MAX_DIGITS = len(str(MAX_SAMPLE_INDEX))


def sample_index(value: object) -> int:
    """The sample index that ``value`` (a header or environment value) names: a plain ASCII decimal
    integer in ``0..MAX_SAMPLE_INDEX``, surrounding blanks allowed; anything else (absent, empty, signed,
    huge, ``1e3``, non-ASCII digits, not a string) is 0."""
    if not isinstance(value, str):
        return 0
    text = value.strip(" \t")
    if not (0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()):
        return 0
    n = int(text)
    return n if n <= MAX_SAMPLE_INDEX else 0

"""A run's token and dollar budget, enforced before each backend call.

Only backend calls (cache misses) spend; cache hits are free and always
allowed. Spending already in the run's call log counts, so a resumed run
does not get its budget back. Concurrent calls may overshoot by what is in
flight when the limit is reached; after that every miss is refused.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..fsutil import read_jsonl


class Budget:
    def __init__(self, usd: float | None = None, tokens: int | None = None):
        self.limit_usd = usd
        self.limit_tokens = tokens
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self._lock = threading.Lock()

    def load_spent(self, calls_log: Path) -> None:
        """Count what earlier calls of this run (cache misses in the call log) already spent."""
        for row in read_jsonl(calls_log):
            if row.get("cache") == "miss" and not row.get("error"):
                self.charge(float(row.get("cost_usd") or 0), int(row.get("input_tokens") or 0) + int(row.get("output_tokens") or 0))

    def exhausted(self) -> str | None:
        """Why no more backend calls are allowed, or None."""
        with self._lock:
            if self.limit_usd is not None and self.spent_usd >= self.limit_usd:
                return f"budget exhausted: spent ${self.spent_usd:.4f} of the ${self.limit_usd:.4f} dollar budget"
            if self.limit_tokens is not None and self.spent_tokens >= self.limit_tokens:
                return f"budget exhausted: spent {self.spent_tokens} of the {self.limit_tokens} token budget"
            return None

    def charge(self, usd: float, tokens: int) -> None:
        with self._lock:
            self.spent_usd += usd
            self.spent_tokens += tokens

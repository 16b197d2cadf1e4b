"""``python -m pipemend.gateway.local_probe``: one real completion of the local model, in its own process.

Loads the model exactly as the gateway does (``LocalBackend``) and asks one short question; prints
one JSON line ``{"ok": true, "text": ..., "seconds": ...}`` and exits 0, or prints the error and
exits 1. A crash inside llama.cpp (SIGILL from CPU instructions this machine lacks, a segfault)
kills only this process, and ``pipemend doctor`` reports its signal and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .backends.base import BackendError
from .backends.local import MODEL_NAME, LocalBackend

PROBE_REQUEST = {
    "model": MODEL_NAME,
    "max_tokens": 8,
    "system": "Answer with one word.",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipemend.gateway.local_probe")
    parser.add_argument("--model-path", type=Path, default=None, help="The GGUF file (default: the bundled model).")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        answer = LocalBackend(model_path=args.model_path).complete(PROBE_REQUEST)
    except BackendError as e:
        print(json.dumps({"ok": False, "error": e.message}), flush=True)
        return 1
    text = "".join(b.get("text", "") for b in answer.get("content", []) if isinstance(b, dict))
    print(json.dumps({"ok": True, "text": text, "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

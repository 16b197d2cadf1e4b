"""Content-addressed response cache on disk, shared by every candidate of a run and across runs.

The key hashes the backend's namespace, the request (minus ``stream`` and
``metadata``, which do not change the answer) and, for a sampled request, which
sample it is: the evaluation's sample index and the request's place among the
identical ones before it (``GatewayService``). Index 0 leaves the key as it was
before indices existed, so caches written then still answer. Entries are written atomically; a small in-memory LRU spares the
disk on hot keys. ``get_or_compute`` lets one caller per key reach the
backend while the others wait for its answer. Errors are never stored.

Each entry also keeps ``latency_s``, how long the backend took to compute it,
so a hit can say what it saved (the call log's ``origin_latency_s``) and a
candidate's latency is compared with its base's as if nothing were cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..fsutil import atomic_write_json

FORMAT = "pipemend-llm-cache-1"
IGNORED_KEYS = frozenset({"stream", "metadata"})


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipemend" / "llm-cache"


def cache_key(namespace: str, request: dict[str, Any], sample: int | None = None, index: int = 0) -> str:
    """The entry of ``request``: ``sample`` None for a greedy or deterministic request, else the n-th
    draw, in the evaluation sample index ``index``'s series of draws."""
    material: dict[str, Any] = {
        "format": FORMAT,
        "namespace": namespace,
        "request": {k: v for k, v in request.items() if k not in IGNORED_KEYS},
        "sample": sample,
    }
    if index:
        material["index"] = index
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: dict[str, Any] | None = None
        self.latency_s: float | None = None
        self.error: BaseException | None = None


class Lookup(NamedTuple):
    response: dict[str, Any]
    hit: bool
    origin_latency_s: float | None
    """How long the backend took for this answer when it was computed (None: not recorded)."""


class ResponseCache:
    def __init__(self, directory: Path, memory_items: int = 2048):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, tuple[dict[str, Any], float | None]] = OrderedDict()
        self._memory_items = memory_items
        self._inflight: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[dict[str, Any], float | None] | None:
        """(response, latency_s it took to compute) of a stored entry, or None."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        try:
            entry = json.loads(self._path(key).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        latency = entry.get("latency_s")
        found = (entry["response"], float(latency) if isinstance(latency, (int, float)) else None)
        self._remember(key, *found)
        return found

    def put(self, key: str, response: dict[str, Any], model: str = "", latency_s: float | None = None) -> None:
        entry = {"format": FORMAT, "key": key, "model": model, "created": time.time(), "latency_s": latency_s,
                 "response": response}
        atomic_write_json(self._path(key), entry)
        self._remember(key, response, latency_s)

    def _remember(self, key: str, response: dict[str, Any], latency_s: float | None) -> None:
        with self._lock:
            self._memory[key] = (response, latency_s)
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, Any]], model: str = "") -> Lookup:
        """(response, hit, origin_latency_s). One ``compute`` per key in flight; concurrent callers wait
        and share its answer (a hit for them) or its error. ``compute``'s answer is stored, with how long
        it took; its errors are not."""
        found = self.get(key)
        if found is not None:
            return Lookup(found[0], True, found[1])
        with self._lock:
            flight = self._inflight.get(key)
            leader = flight is None
            if leader:
                flight = self._inflight[key] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.response is not None
            return Lookup(flight.response, True, flight.latency_s)
        try:
            found = self.get(key)  # a leader that finished just before us may have stored it
            if found is not None:
                flight.response, flight.latency_s = found
                return Lookup(found[0], True, found[1])
            t0 = time.perf_counter()
            response = compute()
            latency = round(time.perf_counter() - t0, 6)
            self.put(key, response, model, latency)
            flight.response, flight.latency_s = response, latency
            return Lookup(response, False, None)
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._inflight[key]
            flight.done.set()

"""Gateway speed: cache-hit latency through the SDK, cached requests/s with 16 concurrent clients,
and the latency the gateway adds over calling the scripted backend in-process.

    .venv/bin/python benchmarks/gateway.py [--n 400]

The gateway runs in its own process (``serve_forever_cli``), as in a real run, so
client and server do not share a GIL. Targets (2-core machine): cache hit p50 <= 3 ms,
>= 300 cached requests/s.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anthropic
import httpx

from pipemend.gateway.backends.scripted import ScriptedBackend

SCRIPT = {"entries": [{"match": {"last_user_regex": "^question"}, "text": "The answer is 42."}]}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(tmp: Path, model: str) -> tuple[subprocess.Popen, str]:
    """A gateway process serving ``model`` only (the host lists every model it serves)."""
    port = free_port()
    code = ("import sys; from pathlib import Path; from pipemend.gateway import serve_forever_cli; "
            f"serve_forever_cli({port}, Path(sys.argv[1]), None, None, Path(sys.argv[2]), models=[sys.argv[3]])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp / "run"), str(tmp / "cache"), model],
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/health", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("gateway did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="requests per measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        script = tmp / "bench.json"
        script.write_text(json.dumps(SCRIPT))
        model = f"scripted:{script}"
        ask = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "question 0"}]}
        proc, url = start_gateway(tmp, model)
        try:
            client = anthropic.Anthropic(base_url=url, api_key="x")
            client.messages.create(**ask)  # fill the cache

            hits = []
            for _ in range(args.n):
                t = time.perf_counter()
                client.messages.create(**ask)
                hits.append(time.perf_counter() - t)
            raw_hits = []
            with httpx.Client(base_url=url) as http:
                for _ in range(args.n):
                    t = time.perf_counter()
                    http.post("/v1/messages", json=ask).raise_for_status()
                    raw_hits.append(time.perf_counter() - t)

            per_client = max(1, args.n // 16) * 4
            clients = [anthropic.Anthropic(base_url=url, api_key="x") for _ in range(16)]
            barrier = threading.Barrier(17)

            def worker(c: anthropic.Anthropic) -> None:
                barrier.wait()
                for _ in range(per_client):
                    c.messages.create(**ask)

            threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            rps = 16 * per_client / (time.perf_counter() - t0)

            backend = ScriptedBackend(script)
            inproc, misses = [], []
            for i in range(1, args.n // 4 + 1):
                req = {**ask, "messages": [{"role": "user", "content": f"question {i}"}]}
                t = time.perf_counter()
                backend.complete(req)
                inproc.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.messages.create(**req)
                misses.append(time.perf_counter() - t)
            stats = httpx.get(f"{url}/pipemend/stats").json()
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    print(f"cache hit via SDK        p50 {pct(hits, .5):6.2f} ms   p95 {pct(hits, .95):6.2f} ms   (target p50 <= 3 ms)")
    print(f"cache hit via raw httpx  p50 {pct(raw_hits, .5):6.2f} ms   p95 {pct(raw_hits, .95):6.2f} ms")
    print(f"cached requests/s, 16 concurrent SDK clients: {rps:7.0f}   (target >= 300)")
    print(f"scripted backend in-process  p50 {pct(inproc, .5):6.3f} ms")
    print(f"same through gateway (miss)  p50 {pct(misses, .5):6.2f} ms   added {pct(misses, .5) - pct(inproc, .5):6.2f} ms"
          "   (includes the atomic, fsynced cache write)")
    print(f"gateway added over in-process on a hit: {pct(hits, .5) - pct(inproc, .5):6.2f} ms (SDK), "
          f"{pct(raw_hits, .5) - pct(inproc, .5):6.2f} ms (raw httpx)")
    print(f"gateway stats: {stats}")
    print(f"machine: {__import__('os').cpu_count()} cpus, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()

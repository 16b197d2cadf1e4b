"""Start-up cost per candidate evaluation and overhead per example, for each sandbox, side by side.

    .venv/bin/python benchmarks/sandbox.py [--repeats 5] [--examples 200]

Start-up: one job of one trivial example, from ``Sandbox.run`` being called to
the runner's process having started (``startup_s``), and the whole job
(``wall_s``: container / namespace creation, runner import, teardown).
Per example: (wall of N examples - wall of 1 example) / (N - 1), concurrency 1,
a pipeline that returns at once: what the runner + sandbox add per example.
Targets: <= 1.5 s to start a candidate's container, <= 5 ms added per example.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from pipemend.errors import SandboxUnavailable
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.protocols import SandboxJob
from pipemend.sandbox import get_sandbox

PIPE = "def run(inputs):\n    return inputs['q']\n"


def job(tmp: Path, name: str, n: int, gw: Gateway) -> SandboxJob:
    inputs = tmp / f"{name}-{n}.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"q{i}", "inputs": {"q": str(i)}}) + "\n" for i in range(n)))
    return SandboxJob(worktree=tmp / "wt", target_subdir="", entrypoint="pipe:run", inputs_file=inputs,
                      out_dir=tmp / "out" / f"{name}-{n}-{len(list((tmp / 'out').glob('*')))}",
                      gateway_url=gw.url, gateway_socket=Path(gw.socket_path), model="simulated/echo", concurrency=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--sandboxes", default="docker,bwrap,process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "wt").mkdir()
        (tmp / "out").mkdir()
        (tmp / "wt" / "pipe.py").write_text(PIPE)
        gw = Gateway(GatewayConfig(run_dir=tmp / "run", socket_path=tmp / "gw.sock", cache_dir=tmp / "cache",
                                   models=["simulated/echo"])).start()
        rows = []
        try:
            for name in args.sandboxes.split(","):
                try:
                    sb = get_sandbox(name, announce=lambda m: None)
                except SandboxUnavailable as e:
                    rows.append((name, f"unavailable: {e}"))
                    continue
                sb.run(job(tmp, name, 1, gw))  # warm: image build / venv / page cache
                starts, walls = [], []
                for _ in range(args.repeats):
                    o = sb.run(job(tmp, name, 1, gw))
                    assert o.error is None, o
                    starts.append(o.startup_s)
                    walls.append(o.wall_s)
                many = []
                for _ in range(max(1, args.repeats // 2)):
                    o = sb.run(job(tmp, name, args.examples, gw))
                    assert o.error is None, o
                    many.append(o.wall_s)
                per_ex = (statistics.median(many) - statistics.median(walls)) / (args.examples - 1)
                rows.append((name, statistics.median(starts), statistics.median(walls), per_ex * 1000))
        finally:
            gw.stop()
    print(f"{'sandbox':<9} {'start (s)':>10} {'1-example job (s)':>18} {'per example (ms)':>17}")
    for r in rows:
        if len(r) == 2:
            print(f"{r[0]:<9} {r[1]}")
        else:
            print(f"{r[0]:<9} {r[1]:>10.3f} {r[2]:>18.3f} {r[3]:>17.2f}")
    print("targets: container start <= 1.5 s (the 1-example job column bounds it); <= 5 ms per example")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

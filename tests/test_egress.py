"""Clear failures at the boundary: a model call around the gateway stops the eval (exit 2) on the first example,
naming the host and the client; refused hosts and calls without an example header are warnings.

Real parts: the runner as a subprocess, the gateway (``simulated/echo``), the sandboxes, the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipemend.boundary import inspect, read_egress
from pipemend.cli import app
from pipemend.runtime.egress import EGRESS_FORMAT, EgressWatch, describe, is_provider_host
from sandbox_support import SANDBOXES, sandbox_or_skip

TARGET = Path(__file__).parent / "fixtures" / "targets" / "egress"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def egress_target(tmp_path: Path, modes: list[str]) -> Path:
    dst = tmp_path / "egress"
    shutil.copytree(TARGET, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "data.jsonl").write_text("".join(
        json.dumps({"id": f"{m}-{i}", "inputs": {"mode": m, "q": f"{m} {i}"}, "expected": f"{m} {i}"}) + "\n"
        for i, m in enumerate(modes)))
    return dst


# --------------------------------------------------------------------------- the watch's rules


def test_requests_to_a_provider_or_a_model_api_path_are_unrouted_and_the_gateway_is_not():
    w = EgressWatch("http://127.0.0.1:4000")
    w.note_request("http://127.0.0.1:4000/v1/messages", "e1")
    w.note_request("http://localhost:4000/v1/chat/completions", "e1")  # the gateway by another loopback name
    w.note_request("https://huggingface.co/api/models/x", "e1")  # not a model call: the socket level decides
    assert w.unrouted == []
    w.note_request("https://api.openai.com/v1/chat/completions", "e2", "OpenAI/Python 1.99")
    w.note_request("http://10.0.0.5:8000/v1/chat/completions", "e3")  # a self-hosted vLLM, hard-coded
    w.note_request("http://localhost:11434/api/chat", "e4")  # ollama on another port
    w.note_request("https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse", "e5")
    assert [u["host"] for u in w.unrouted] == ["api.openai.com", "10.0.0.5", "localhost",
                                               "bedrock-runtime.us-east-1.amazonaws.com"]
    assert w.unrouted[0]["example_id"] == "e2" and w.unrouted[0]["user_agent"] == "OpenAI/Python 1.99"
    assert is_provider_host("my-resource.openai.azure.com") and not is_provider_host("openai.com.evil.example")


def test_sockets_to_anything_but_the_gateway_and_loopback_are_refused_before_they_connect():
    w = EgressWatch("http://127.0.0.1:4000")
    w.audit("socket.getaddrinfo", ("127.0.0.1", 4000, 0, 0, 0), "e1")
    w.audit("socket.getaddrinfo", ("localhost", 9999, 0, 0, 0), "e1")  # the sandbox's own loopback
    with pytest.raises(PermissionError, match="api.anthropic.com:443 is blocked"):
        w.audit("socket.getaddrinfo", ("api.anthropic.com", 443, 0, 0, 0), "e2")
    with pytest.raises(PermissionError, match="telemetry.example.com"):
        w.audit("socket.getaddrinfo", (b"telemetry.example.com", "443", 0, 0, 0), "e2")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(PermissionError):
            w.audit("socket.connect", (s, ("93.184.216.34", 80)), "e3")
        w.audit("socket.connect", (s, ("127.0.0.1", 4000)), "e3")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        w.audit("socket.connect", (s, "/run/gateway.sock"), "e3")  # the gateway's socket, pipes: never refused
    w.audit("import", ("cohere.client", None, [], [], []), None)
    found = w.to_json()
    assert found["format"] == EGRESS_FORMAT
    assert [u["host"] for u in found["unrouted"]] == ["api.anthropic.com"]
    assert [b["host"] for b in found["blocked"]] == ["telemetry.example.com", "93.184.216.34"]
    assert found["sdks"] == ["cohere"]
    assert "api.anthropic.com" in describe(found) and "SDK seen: cohere" in describe(found)


def test_a_hostile_egress_file_is_read_as_data(tmp_path: Path):
    (tmp_path / "egress.json").write_text(json.dumps({
        "format": EGRESS_FORMAT, "unrouted": [{"host": "x" * 5000, "url": 7}, "junk", {"host": 3}],
        "blocked": [{"host": "t.example"}, {"nohost": 1}], "sdks": ["groq", 5, "y" * 500]}))
    found = read_egress(tmp_path)
    assert [len(u["host"]) for u in found["unrouted"]] == [300] and found["unrouted"][0]["url"] is None
    assert found["blocked"] == [{"host": "t.example"}] and found["sdks"] == ["groq", "y" * 60]
    os.unlink(tmp_path / "egress.json")
    os.symlink("/etc/passwd", tmp_path / "egress.json")  # never read through a link
    assert read_egress(tmp_path) == {"unrouted": [], "blocked": [], "sdks": []}
    b = inspect(tmp_path, {"unheaded_call_ids": ["c1", "c2"]})
    assert b.unrouted is None and "2 model call(s) carried no example header" in b.warnings[0]


# --------------------------------------------------------------------------- the runner stops on the first example


def _runner(tmp_path: Path, modes: list[str]) -> subprocess.CompletedProcess:
    target = egress_target(tmp_path, modes)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": json.loads(line)["id"], "inputs": json.loads(line)["inputs"]}) + "\n"
                              for line in (target / "data.jsonl").read_text().splitlines()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_"))}
    return subprocess.run([sys.executable, "-m", "pipemend.runtime.runner", "--target", str(target), "--entrypoint",
                           "pipeline:run", "--inputs", str(inputs), "--out", str(tmp_path / "out"), "--concurrency",
                           "1", "--gateway-url", "http://127.0.0.1:9"], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("mode, host, client", [
    ("openai_url", "api.openai.com", "python-httpx"),
    ("provider_socket", "api.mistral.ai", None),
])
def test_the_runner_stops_after_the_first_unrouted_example_and_says_where(tmp_path: Path, mode, host, client):
    proc = _runner(tmp_path, [mode, "ok", "ok"])
    assert proc.returncode == 3, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{mode}-0"]  # the other two never ran
    assert "is blocked" in rows[0]["error"]
    found = json.loads((tmp_path / "out" / "egress.json").read_text())
    assert [u["host"] for u in found["unrouted"]] == [host] and found["unrouted"][0]["example_id"] == f"{mode}-0"
    if client:
        assert client in (found["unrouted"][0]["user_agent"] or "")
    assert f"stopping: the pipeline called {host} directly" in proc.stderr


# --------------------------------------------------------------------------- pipemend eval, end to end


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_eval_of_a_pipeline_with_a_hard_coded_provider_url_exits_2_naming_it(tmp_path: Path, sandbox):
    sandbox_or_skip(sandbox)
    target = egress_target(tmp_path, ["openai_url", "ok", "ok"])
    res = CliRunner().invoke(app, ["eval", str(target), "--sandbox", sandbox, "--reports-dir", str(tmp_path / "r"),
                                   "--run-id", "e"])
    said = " ".join(res.stderr.split())
    assert res.exit_code == 2, said
    assert "the pipeline called api.openai.com directly in example 'openai_url-0'" in said
    assert "$OPENAI_BASE_URL" in said
    run = tmp_path / "r" / "e"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    outcome = json.loads((run / "evals" / "val" / "outcome.json").read_text())
    assert outcome["returncode"] == 3 and "api.openai.com" in outcome["unrouted"]
    assert len((run / "evals" / "val" / "results.jsonl").read_text().splitlines()) == 1


def test_refused_hosts_and_calls_without_an_example_header_are_warnings(tmp_path: Path):
    target = egress_target(tmp_path, ["telemetry", "pool", "ok"])
    res = CliRunner().invoke(app, ["eval", str(target), "--json", "--sandbox", "process", "--reports-dir",
                                   str(tmp_path / "r"), "--run-id", "w"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["splits"]["val"]["score"] == 1.0  # every answer came back through the gateway
    warnings = " ".join(out["warnings"])
    assert "telemetry.example.com" in warnings and "refused" in warnings
    assert "1 model call(s) carried no example header" in warnings  # the pool child's call
    summary = json.loads((tmp_path / "r" / "w" / "evals" / "val" / "summary.json").read_text())
    assert len(summary["unheaded_call_ids"]) == 1 and summary["unattributed_calls"] == 1

"""The gateway's configuration, and where its key comes from."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError

# The dummy key the runner gives pipelines; never a real key.
DUMMY_KEY = "pipemend-gateway"


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: Path = Field(description="The run directory; the call log goes to RUN_DIR/gateway/calls.jsonl.")
    host: str = Field("127.0.0.1", description="Interface the HTTP server listens on.")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one (see Gateway.url).")
    socket_path: Path | None = Field(None, description="Also listen on this unix socket (mounted into sandboxes).")
    cache_dir: Path | None = Field(
        None, description="Response cache folder; default ${XDG_CACHE_HOME:-~/.cache}/pipemend/llm-cache."
    )
    budget_usd: float | None = Field(None, ge=0, description="Dollar limit of backend calls for the run; None: no limit.")
    budget_tokens: int | None = Field(None, ge=0, description="Token limit (input + output) of backend calls; None: no limit.")
    api_key_file: Path | None = Field(
        None, description="File holding the Anthropic API key; default: ANTHROPIC_API_KEY at gateway start."
    )
    token: str | None = Field(
        None, min_length=16, pattern=r"^[A-Za-z0-9_-]+$",
        description="A per-run secret every TCP request must carry, as the path prefix `/t/TOKEN` (`Gateway.url` "
        "includes it) or the header `x-pipemend-token`; without it the gateway answers 401. Set it whenever the "
        "gateway listens beyond loopback (the Ray executor): see docs/distributed.md. None: no token (loopback only). "
        "The unix socket needs none: its file mode guards it.",
    )
    models: list[str] | None = Field(
        None,
        description="The model names this gateway serves, set on the host (a request never chooses code here): "
        "exactly these names, each built when the gateway starts (`claude-*` stands for every Claude model; "
        "`scripted:PATH`, `simulated/*` and `package.module:Class` plugins are served only when listed). "
        "None: the real families only, `claude-*` and the local model. A run's pipeline gateway gets "
        "`Manifest.models(run_model)`: the run's model and every value of the manifest's `model` knobs.",
    )


def load_api_key(config: GatewayConfig) -> str | None:
    """The Anthropic key: from ``api_key_file`` if given, else ``ANTHROPIC_API_KEY``; None if neither."""
    if config.api_key_file is not None:
        try:
            key = config.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(config.api_key_file, None, f"cannot read the API key file: {e.strerror}") from e
        if not key:
            raise ConfigError(config.api_key_file, None, "the API key file is empty", "an Anthropic API key")
        return key
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    return key if key and key != DUMMY_KEY else None

"""Skip a test that needs the local model (llama-cpp-python and the assembled Qwen2.5-Coder GGUF) when it is
absent, saying what is missing; CI installs both (``scripts/install``), so there it always runs."""

from __future__ import annotations

import importlib.util

import pytest

from pipemend.gateway.model_files import default_model_path, part_paths_from_packages


def local_model_missing() -> str | None:
    """Why the local model cannot run here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'pipemend[local]')"
    if default_model_path().is_file():
        return None
    try:
        part_paths_from_packages()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


def local_model_or_skip() -> None:
    missing = local_model_missing()
    if missing:
        pytest.skip(missing)

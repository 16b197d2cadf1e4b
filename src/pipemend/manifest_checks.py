"""Cross-file checks of a validated manifest: do the files, modules and keys it names exist?

The schema (``manifest.py``) checks shapes; this module checks a parsed
manifest against the target folder. It sits below ``manifest.py`` (whose
``load_manifest`` calls ``check_manifest_files``) and never imports it at run
time, so the two do not import each other. Every problem is a ``ConfigError`` naming the
manifest, the key and what was expected. The cheap checks run first; the
entrypoint import (a subprocess, so the host's ``sys.modules`` stays clean)
runs last.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .configfile import ConfigFileError, lookup, read_config_file
from .errors import ConfigError
from .gateway.backends import BackendError, backend_kind
from .globs import is_relative_glob, walk_files
from .judges.names import JUDGE_PREFIX, JUDGES
from .metrics import BUILTINS, load_metric

if TYPE_CHECKING:
    from .manifest import Manifest

IMPORT_TIMEOUT_S = 60.0


def check_manifest_files(
    manifest: Manifest, target_dir: str | Path, manifest_path: str | Path, *, import_entrypoint: bool = True
) -> None:
    """Raise ``ConfigError`` for the first manifest entry that does not match the target folder."""
    target_dir = Path(target_dir)
    mp = Path(manifest_path)
    _check_dataset(manifest, target_dir, mp)
    _check_metric(manifest, target_dir, mp)
    if manifest.requirements is not None:
        _require_file(target_dir, manifest.requirements, mp, "requirements", "a pip requirements file")
    _check_globs(manifest, target_dir, mp)
    _check_knobs(manifest, target_dir, mp)
    _check_entrypoint(manifest, target_dir, mp, run_import=import_entrypoint)


# --------------------------------------------------------------------------- paths and globs


def inside(target_dir: Path, rel: str) -> Path | None:
    """``target_dir / rel`` if ``rel`` is a relative path that stays inside the target, else None."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.strip() == "":
        return None
    return target_dir / rel


def _require_file(target_dir: Path, rel: str, mp: Path, key: str, what: str) -> Path:
    path = inside(target_dir, rel)
    if path is None:
        raise ConfigError(mp, key, f"{rel!r} is outside the target folder", f"a path relative to {target_dir}, without '..'")
    if not path.is_file():
        raise ConfigError(mp, key, f"file not found: {path}", what)
    return path


def glob_files(target_dir: Path, pattern: str) -> set[str]:
    """Files under ``target_dir`` matching ``pattern`` (``pipemend.globs``), as POSIX paths relative to it."""
    return set(walk_files(target_dir, pattern))


def _check_globs(manifest: Manifest, target_dir: Path, mp: Path) -> None:
    for key, globs in (("editable", manifest.editable), ("protected", manifest.protected)):
        for i, g in enumerate(globs):
            if not is_relative_glob(g):
                raise ConfigError(mp, f"{key}[{i}]", f"glob {g!r} is absolute or climbs out with '..'", "a glob relative to the target folder")
    for i, g in enumerate(manifest.protected):
        if not glob_files(target_dir, g):
            raise ConfigError(mp, f"protected[{i}]", f"glob {g!r} matches no file in {target_dir}", "a glob that matches at least one file (or remove it)")
    protected = {g: glob_files(target_dir, g) for g in manifest.all_protected()}
    for i, g in enumerate(manifest.editable):
        for f in sorted(glob_files(target_dir, g)):
            for pg, pfiles in protected.items():
                if f in pfiles:
                    why = "always protected" if pg not in manifest.protected else f"protected by {pg!r}"
                    raise ConfigError(
                        mp, f"editable[{i}]",
                        f"glob {g!r} matches {f}, which is {why}",
                        "editable and protected globs that share no file (narrow the editable glob)",
                    )


# --------------------------------------------------------------------------- dataset, metric, knobs


def _check_dataset(manifest: Manifest, target_dir: Path, mp: Path) -> None:
    ds = manifest.dataset
    if ds.path is not None:
        _require_file(target_dir, ds.path, mp, "dataset.path", "a JSONL file of {id, inputs, expected, evidence?} rows")
    if ds.files is not None:
        for split in ("train", "val", "test"):
            _require_file(target_dir, getattr(ds.files, split), mp, f"dataset.files.{split}", "a JSONL file of {id, inputs, expected, evidence?} rows")
    if ds.corpus is not None:
        _require_file(target_dir, ds.corpus, mp, "dataset.corpus", "a JSONL file of {id, text} rows")


def builtin_metric_names() -> tuple[str, ...]:
    return tuple(BUILTINS)


def is_custom_metric(spec: str) -> bool:
    return ":" in spec and spec.split(":", 1)[0].endswith(".py")


def _check_metric(manifest: Manifest, target_dir: Path, mp: Path) -> None:
    for spec in manifest.metric_specs():
        key = "metric" if isinstance(manifest.metric, str) else f"metric.weights.{spec}"
        _check_one_metric(spec, key, target_dir, mp)


def _check_one_metric(spec: str, key: str, target_dir: Path, mp: Path) -> None:
    if spec.startswith(JUDGE_PREFIX):
        return  # the manifest's schema knows the judges
    if not is_custom_metric(spec):
        names = builtin_metric_names()
        if spec not in names:
            raise ConfigError(mp, key, f"unknown metric {spec!r}",
                              f"one of {', '.join(names)}, {', '.join(JUDGES)}, or `file.py:function`")
        return
    rel, fn = spec.split(":", 1)
    path = _require_file(target_dir, rel, mp, key, f"a Python file defining {fn}(output, expected, ...)")
    if not fn.isidentifier():
        raise ConfigError(mp, key, f"{fn!r} is not a function name", "`file.py:function`")
    defined = _top_level_names(path, mp, key)
    if fn not in defined:
        raise ConfigError(mp, key, f"{path.name} defines no top-level {fn!r}", f"a function {fn} in {rel}")
    load_metric(spec, target_dir)  # imports it (scoring does so on the host too) and checks its signature


def _top_level_names(path: Path, mp: Path, key: str) -> set[str]:
    """Names a module binds at top level (defs, classes, assignments, imports), read without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(mp, key, f"{path} line {e.lineno}: syntax error: {e.msg}", "valid Python") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _check_knobs(manifest: Manifest, target_dir: Path, mp: Path) -> None:
    for name, knob in manifest.knobs.items():
        path = _require_file(target_dir, knob.file, mp, f"knobs.{name}.file", "a YAML, JSON or TOML config file")
        try:
            data = read_config_file(path)
        except ConfigFileError as e:
            raise ConfigError(mp, f"knobs.{name}.file", f"cannot read {path}: {e}", "a valid .yaml, .yml, .json or .toml file") from None
        found, current = lookup(data, knob.key)
        if not found:
            raise ConfigError(mp, f"knobs.{name}.key", f"key {knob.key!r} not found in {knob.file}", f"a dotted key path that exists in {knob.file}")
        if knob.rung == "model":
            _check_model_knob(name, knob.values, current, knob.file, knob.key, mp)


def model_name_problem(value: object) -> str | None:
    """Why ``value`` cannot name a model a gateway serves (see ``gateway.backends``), or None when it can."""
    if not isinstance(value, str) or not value.strip():
        return f"{value!r} is not a model name"
    if value != value.strip() or "*" in value:
        return f"{value!r} is not one model's name"
    try:
        backend_kind(value)
    except BackendError as e:
        return e.message
    return None


def _check_model_knob(name: str, values: list[object], current: object, file: str, key: str, mp: Path) -> None:
    """A ``model`` knob's values are model names, and its file's current value is one of them: the run's
    gateway serves exactly ``Manifest.models()``, so a model the pipeline calls must be listed there."""
    for i, value in enumerate(values):
        problem = model_name_problem(value)
        if problem is not None:
            raise ConfigError(mp, f"knobs.{name}.values[{i}]", problem,
                              "a model name such as claude-haiku-4-5, simulated/echo or scripted:PATH "
                              "(a `model` knob's values are the models its step may call)")
    if current is not None and current not in values:  # None: the step calls the run's model (llm.model)
        raise ConfigError(mp, f"knobs.{name}.values",
                          f"{file}: {key} is {current!r}, which the knob's values do not list",
                          f"the model the step calls now among the values (the run's gateway serves only the "
                          f"knob's models and llm.model), e.g. [{current!r}, ...]")


# --------------------------------------------------------------------------- entrypoint


def module_file(target_dir: Path, module: str) -> Path | None:
    """The file a dotted module name resolves to inside the target folder, or None."""
    base = target_dir.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


_IMPORT_PROBE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
mod, fn = sys.argv[2], sys.argv[3]
try:
    m = importlib.import_module(mod)
except BaseException as e:
    print(json.dumps({"ok": False, "stage": "import", "type": type(e).__name__,
                      "message": str(e), "name": getattr(e, "name", None)}))
    sys.exit(0)
f = getattr(m, fn, None)
print(json.dumps({"ok": callable(f), "stage": "function", "type": type(f).__name__}))
"""


def _check_entrypoint(manifest: Manifest, target_dir: Path, mp: Path, *, run_import: bool) -> None:
    mod, fn = manifest.entrypoint.split(":", 1)
    path = module_file(target_dir, mod)
    if path is None:
        rel = Path(*mod.split(".")).as_posix()
        raise ConfigError(mp, "entrypoint", f"module {mod!r} not found: no {rel}.py or {rel}/__init__.py in {target_dir}", "`module:function` importable from the target folder")
    defined = _top_level_names(path, mp, "entrypoint")
    if not run_import:
        if fn not in defined:
            raise ConfigError(mp, "entrypoint", f"{path} defines no top-level {fn!r}", f"a function {fn}(inputs) in {path.name}")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}  # the key never reaches target code
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, str(target_dir.resolve()), mod, fn],
            cwd=target_dir, env=env, capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(mp, "entrypoint", f"importing {path} took over {IMPORT_TIMEOUT_S:g}s", "a module that imports quickly (do heavy work on first call)") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(mp, "entrypoint", f"importing {path} crashed the interpreter: {tail[0]}", "an importable module")
    res = json.loads(lines[-1])
    if res["ok"]:
        return
    if res["stage"] == "function":
        if res["type"] == "NoneType":
            raise ConfigError(mp, "entrypoint", f"{path} defines no {fn!r}", f"a function {fn}(inputs) in {path.name}")
        raise ConfigError(mp, "entrypoint", f"{mod}.{fn} in {path} is a {res['type']}, not a function", f"a function {fn}(inputs)")
    missing = res.get("name")
    if res["type"] == "ModuleNotFoundError" and manifest.requirements and missing and module_file(target_dir, missing.split(".")[0]) is None:
        return  # a dependency from the target's requirements: the sandbox installs it, the host need not have it
    raise ConfigError(mp, "entrypoint", f"cannot import {path}: {res['type']}: {res['message']}", "a module that imports without errors")

"""The one loader of pluggable parts: a short name from a registry, or a dotted path ``package.module:Class``.

Proposers, sandboxes and LLM backends each keep a registry: a dict of short
name -> factory (a class or function) or ``"module:attr"`` string, imported
only when asked for. ``resolve(name, registry, kind=...)`` returns the factory:

- a short name in the registry -> its factory (a string entry is imported);
- ``package.module:Attr`` (``Attr`` may be dotted, ``Outer.Inner``) -> that
  object, when ``allow_dotted`` (a caller that takes names from an untrusted
  request passes ``allow_dotted=False``);
- anything else -> ``UsageError`` listing the valid names.

Every failure is a ``UsageError`` that says what was asked for (``kind`` and
the name), what went wrong and where (the module, with its file when it was
found), never a traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import UsageError

Factory = Callable[..., Any]
Registry = Mapping[str, "Factory | str"]


def _where(module: Any) -> str:
    path = getattr(module, "__file__", None)
    return f"module {module.__name__!r} ({path})" if path else f"module {module.__name__!r}"


def is_dotted_path(spec: str) -> bool:
    """Whether ``spec`` has the shape ``package.module:Attr`` (identifiers only)."""
    module_name, sep, attr = spec.partition(":")
    return (bool(sep) and all(p.isidentifier() for p in module_name.split("."))
            and all(p.isidentifier() for p in attr.split(".")))


def load_object(spec: str, *, kind: str, label: str | None = None) -> Any:
    """Import ``package.module:Attr`` and return ``Attr``; a ``UsageError`` saying what failed and where.

    ``label`` is how the user named it (a short name), when that differs from ``spec``.
    """
    asked = f"{kind} {spec!r}" if label is None else f"{kind} {label!r} ({spec})"
    if not is_dotted_path(spec):
        raise UsageError(f"{asked}: not `package.module:Attr` (dotted module, a colon, then a name)")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{asked}: cannot import module {module_name!r} ({e})") from None
    except (Exception, SystemExit) as e:  # a plugin that fails while it is imported
        raise UsageError(f"{asked}: importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = _where(module) if i == 0 else f"{'.'.join(attr.split('.')[:i])!r} in {_where(module)}"
            raise UsageError(f"{asked}: {owner} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def resolve(name: str, registry: Registry, *, kind: str, allow_dotted: bool = True,
            extra_names: Iterable[str] = ()) -> Any:
    """The factory that ``name`` stands for: a registry entry, or with ``allow_dotted`` a ``package.module:Attr``.

    ``extra_names`` are other names the caller accepts itself (e.g. ``auto``),
    listed with the registry's when ``name`` is unknown.
    """
    if not isinstance(name, str):
        raise UsageError(f"{kind} name must be a string, not {type(name).__name__}")
    if name in registry:
        entry = registry[name]
        return load_object(entry, kind=kind, label=name) if isinstance(entry, str) else entry
    valid = ", ".join([*extra_names, *registry])
    if allow_dotted and ":" in name:
        if not is_dotted_path(name):
            raise UsageError(f"{kind} {name!r}: not a known name nor a dotted path; use one of {valid} "
                             "or package.module:Class")
        return load_object(name, kind=kind)
    more = " or package.module:Class" if allow_dotted else ""
    raise UsageError(f"unknown {kind} {name!r}; valid: {valid}{more}")


__all__ = ["Factory", "Registry", "is_dotted_path", "load_object", "resolve"]

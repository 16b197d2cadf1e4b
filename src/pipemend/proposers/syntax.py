"""Does an edited file still parse? Checked before a proposer's write lands, so a broken file never reaches an evaluation.

A ``.py`` file is compiled (``compile(text, path, "exec")``: the source is
parsed and turned into bytecode, never imported or run on the host), a Jinja2
template (``.j2``, ``.jinja``, ``.jinja2``) is parsed in a sandboxed
environment (``SandboxedEnvironment.parse``: nothing is rendered). Other files
are not checked. ``syntax_error`` says what is wrong, with the line.
"""

from __future__ import annotations

import warnings
from pathlib import PurePosixPath

import jinja2
from jinja2.sandbox import SandboxedEnvironment

PYTHON_SUFFIXES = (".py",)
JINJA_SUFFIXES = (".j2", ".jinja", ".jinja2")

__all__ = ["JINJA_SUFFIXES", "PYTHON_SUFFIXES", "is_checked", "syntax_error"]


def is_checked(rel: str) -> bool:
    """Whether writes to ``rel`` are checked (Python sources and Jinja2 templates)."""
    return PurePosixPath(rel).suffix.lower() in PYTHON_SUFFIXES + JINJA_SUFFIXES


def syntax_error(rel: str, text: str) -> str | None:
    """``"<rel> line <n>: <message>"`` when ``text`` does not compile (Python) or parse (Jinja2), else None."""
    suffix = PurePosixPath(rel).suffix.lower()
    if suffix in PYTHON_SUFFIXES:
        return _python_error(rel, text)
    if suffix in JINJA_SUFFIXES:
        return _jinja_error(rel, text)
    return None


def _python_error(rel: str, text: str) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes: the agent's code still compiles
            compile(text, rel, "exec", dont_inherit=True)
    except SyntaxError as e:  # IndentationError and TabError included
        where = f" line {e.lineno}" if e.lineno else ""
        col = f", column {e.offset}" if e.lineno and e.offset else ""
        return f"{rel}{where}{col}: {type(e).__name__}: {e.msg}"
    except (ValueError, RecursionError, MemoryError, OverflowError) as e:  # NUL bytes, absurd nesting
        return f"{rel}: {type(e).__name__}: {str(e)[:300] or 'cannot be compiled'}"
    return None


def _jinja_error(rel: str, text: str) -> str | None:
    try:
        SandboxedEnvironment(undefined=jinja2.ChainableUndefined).parse(text)
    except jinja2.TemplateSyntaxError as e:
        return f"{rel} line {e.lineno}: TemplateSyntaxError: {e.message}"
    except jinja2.TemplateError as e:
        return f"{rel}: {type(e).__name__}: {e.message or e}"
    except (RecursionError, MemoryError) as e:
        return f"{rel}: {type(e).__name__}: the template nests too deep to parse"
    return None

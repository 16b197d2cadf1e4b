"""``python -m pipemend.runner``: the same command as ``python -m pipemend.runtime.runner``.

The runner lives in ``pipemend.runtime.runner`` (standard library only, what
the sandbox runs); this name keeps the documented command working.
"""

from __future__ import annotations

from .runtime.runner import cli

if __name__ == "__main__":
    cli()

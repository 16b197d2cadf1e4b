"""The trace SDK a target pipeline imports: ``from pipemend import trace`` (or ``import pipemend.trace``).

It lives in ``pipemend.runtime.trace`` (standard library only, what the
sandbox runs); this name is that very module, not a copy, so the runner and the
pipeline share one trace state.
"""

from __future__ import annotations

import sys

from .runtime import trace as _trace

sys.modules[__name__] = _trace

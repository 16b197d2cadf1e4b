"""What runs inside the sandbox: the runner, the trace SDK and the gateway forwarder.

This package imports only the Python standard library and its own modules
(an import-linter contract in ``pyproject.toml``, checked by
``tests/test_layers.py``): the sandboxes mount pipemend's folder read-only and
run it with the image's or the target venv's Python, which has none of
pipemend's host dependencies. Nothing here may import the host side of
pipemend (gateway, sandbox, scoring, ...), so labels and keys cannot leak in.
"""

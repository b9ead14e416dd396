"""The one error type a user mistake raises.

A ScanExportError's message names the argument or file, what was expected and what arrived, on one
line. The CLI prints it as `scan-export: error: <message>` and exits 2; anything else that escapes
is a bug and keeps its traceback. This module imports nothing, so every layer (reference, onnx,
runtime) can raise it without an import running back up.
"""

from __future__ import annotations


class ScanExportError(ValueError):
    """A user mistake: a bad argument, a missing or malformed file. Subclasses ValueError so that
    callers catching ValueError, as they did before this type existed, still catch it."""


def describe_value(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters, for 'got ...' in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The one error type a user mistake raises.

A ScanExportError's message names the argument or file, what was expected and what arrived, on one
line. The CLI prints it as `scan-export: error: <message>` and exits 2; anything else that escapes
is a bug and keeps its traceback. This module imports only the standard library, so every layer (reference, onnx,
runtime) can raise it without an import running back up.
"""

from __future__ import annotations

import json


class ScanExportError(ValueError):
    """A user mistake: a bad argument, a missing or malformed file. Subclasses ValueError so that
    callers catching ValueError, as they did before this type existed, still catch it."""


def describe_value(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters, for 'got ...' in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_object(path) -> dict:
    """A user's JSON file that must hold an object (config.json, scan_export.json); one line naming
    the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScanExportError(f"{path}: expected JSON, got a parse error ({e})") from None
    if not isinstance(value, dict):
        raise ScanExportError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value

"""The export's tokenizer, through the `tokenizers` package (no transformers, no torch)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ScanExportError


def load_tokenizer(export_dir, required: bool = False):
    """tokenizers.Tokenizer from export_dir/tokenizer.json, or None when absent and not required."""
    path = Path(export_dir) / "tokenizer.json"
    if not path.is_file():
        if required:
            raise ScanExportError(f"--prompt needs {path}, which the export does not have; pass --input-ids instead")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("--prompt needs the tokenizers package: pip install tokenizers") from e
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise ScanExportError(f"{path}: expected a tokenizers JSON file, could not read it ({str(e).splitlines()[0]})") from None

"""The export's tokenizer, through the `tokenizers` package (no transformers, no torch)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ScanExportError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(export_dir, required: bool = False, needed_by: str = "--prompt"):
    """tokenizers.Tokenizer from export_dir/tokenizer.json, or None when absent and not required.

    needed_by names what asked for it (a CLI flag or an argument) in the error when it is required
    and absent. A file that is there but unreadable is always an error naming the file."""
    path = Path(export_dir) / TOKENIZER_FILE
    if not path.is_file():
        if required:
            instead = "--input-ids" if needed_by.startswith("--") else "token ids"
            raise ScanExportError(f"{needed_by} needs {path}, which the export does not have; pass {instead} instead")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(f"{needed_by} needs the tokenizers package: pip install tokenizers") from e
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON and for a bad schema alike
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ScanExportError(f"{path} is not a readable tokenizers file: expected a Hugging Face "
                              f"tokenizer.json, got the error {reason!r}") from None

"""The export's tokenizer, through the `tokenizers` package (no transformers, no torch)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(export_dir, required: bool = False):
    """tokenizers.Tokenizer from export_dir/tokenizer.json, or None when absent and not required."""
    path = Path(export_dir) / "tokenizer.json"
    if not path.is_file():
        if required:
            raise ValueError(f"--prompt needs {path}, which the export does not have; pass --input-ids instead")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("--prompt needs the tokenizers package: pip install tokenizers") from e
    return Tokenizer.from_file(str(path))

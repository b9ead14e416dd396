"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub id resolved through
huggingface_hub (which honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and the stored token)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ScanExportError
from ..contract import TOKENIZER_FILES

# ORG/NAME as the Hub spells repository ids: letters, digits, '-', '_', '.'; no leading '.', no '..'.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
CONFIG_FILES = ["config.json", *TOKENIZER_FILES]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and ".." not in source


def resolve_checkpoint(source, revision: str | None = None) -> Path:
    """A local checkpoint directory for `source`: the directory itself when it exists, else the Hub
    snapshot of `source` = ORG/NAME at `revision`, with only the files an export reads (config,
    weights, tokenizer): safetensors when the repository has them, pytorch_model*.bin otherwise."""
    path = Path(source).expanduser()
    if path.exists() or not looks_like_hub_id(str(source)):
        if revision is not None:
            raise ScanExportError(f"--revision {revision!r} applies to Hub ids (ORG/NAME), but {str(source)!r} "
                                  f"is a local path")
        return path  # missing local paths are reported by the loader, naming the path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ScanExportError(f"{source!r} is not a local directory, and Hub ids need huggingface_hub: "
                              f"pip install huggingface_hub") from None
    try:
        snap = Path(snapshot_download(str(source), revision=revision, allow_patterns=CONFIG_FILES + SAFETENSORS))
        if not any(snap.glob("*.safetensors")):  # an older repository: PyTorch pickles only
            snap = Path(snapshot_download(str(source), revision=revision, allow_patterns=CONFIG_FILES + TORCH_BIN))
    except GatedRepoError:
        raise ScanExportError(f"{source!r} is gated on the Hub: accept its terms there, then log in "
                              f"(`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ScanExportError(f"--revision {revision!r} does not exist in Hub repository {source!r}") from None
    except RepositoryNotFoundError:
        raise ScanExportError(f"{source!r}: no local directory of that name, and no Hub repository either "
                              f"(or it is private: log in with `hf auth login` or set HF_TOKEN)") from None
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        raise ScanExportError(f"{source!r}: no local directory of that name, and the Hub snapshot is not in the "
                              f"local cache while offline (HF_HUB_OFFLINE or no network): {str(e).splitlines()[0]}") from None
    return snap

"""What the machine has room for: available memory, free disk, and sizes as a person reads them.

Standard library only (runtime and onnx layers both use it). Estimates are checked before any work
so that a size that cannot fit is refused at once with the estimate in the message, never found
out by an allocation failing (or the OOM killer) half-way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ScanExportError


def human_bytes(n: float) -> str:
    """4.0e15 -> '4.0 PB' (decimal units, as df -H and disk vendors count)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path) -> int | None:
    """Free bytes on the file system that holds path (or its nearest existing parent), or None."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def require_memory(need: int, what: str, advice: str) -> None:
    """Refuse up front what would need more memory than is available: one line with the estimate."""
    have = available_memory()
    if have is not None and need > have:
        raise ScanExportError(f"{what} would need {human_bytes(need)} of memory, {human_bytes(have)} is available; "
                              f"{advice}")

"""Eager PyTorch: the truth every exported graph is checked against."""

from .selective_scan import (
    DEFAULT_CHUNK_SIZE,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_step,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "selective_scan_chunked", "selective_scan_ref", "selective_state_step"]

"""scan_export: Mamba-family selective scans and models, exported to ONNX with the time loop kept a
loop (an ONNX Scan over time steps by default, or a Loop over chunks with `scan_form="chunked"`).

Data flows one way: reference (eager torch, the truth) -> onnx (export) -> runtime (onnxruntime,
no torch). `import scan_export` is light; the drop-in ops load torch on first use.
"""

__version__ = "0.1.0"
_LAZY = {"selective_scan_fn": ".reference.custom_ops", "mamba_chunk_scan_combined": ".reference.custom_ops",
         "selective_state_update": ".reference.state_update"}
__all__ = ["mamba_chunk_scan_combined", "selective_scan_fn", "selective_state_update"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'scan_export' has no attribute {name!r}")

"""Upstream's import lines, answered on CPU: `import scan_export.compat.mamba_ssm` (or
`scan_export.compat.install()`) before the model's code is imported, and

    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, mamba_inner_fn
    from mamba_ssm.ops.triton.layer_norm import RMSNorm, rms_norm_fn, layer_norm_fn
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    import selective_scan_cuda

get our drop-ins (scan_export/compat/ops.py), with mamba_ssm's signatures and semantics, which run
eagerly on CPU and export with a plain torch.onnx.export(dynamo=True).

install() puts real module objects into sys.modules for this process only: nothing is written to
disk, and a top-level package that is really installed (found by importlib) is left alone unless
install(force=True). mamba_ssm's nn.Module classes (Mamba, Mamba2, MambaLMHeadModel) are not
provided: the blocks are the user's code, written against these functions.
VMamba's own calling conventions (delta_bias 7th, oflex, its chunk scan's argument order, its
cross scan) are in scan_export.compat.vmamba.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from . import ops

# module name -> its public names (from ops), as upstream's modules define them.
_SCAN_INTERFACE = {
    "selective_scan_fn": ops.selective_scan_fn, "selective_scan_ref": ops.selective_scan_ref,
    "mamba_inner_fn": ops.mamba_inner_fn, "mamba_inner_ref": ops.mamba_inner_ref,
    "mamba_inner_fn_no_out_proj": ops.mamba_inner_fn_no_out_proj, "bimamba_inner_fn": ops.bimamba_inner_fn,
    "bimamba_inner_ref": ops.bimamba_inner_ref, "causal_conv1d_fn": ops.causal_conv1d_fn,
}
_LAYER_NORM = {"RMSNorm": ops.RMSNorm, "LayerNorm": ops.LayerNorm, "rms_norm_fn": ops.rms_norm_fn,
               "layer_norm_fn": ops.layer_norm_fn, "rms_norm_ref": ops.rms_norm_ref, "layer_norm_ref": ops.layer_norm_ref}
MODULES = {
    "mamba_ssm": {"selective_scan_fn": ops.selective_scan_fn, "mamba_inner_fn": ops.mamba_inner_fn},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.selective_scan_interface": _SCAN_INTERFACE,
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.ssd_combined": {
        "mamba_chunk_scan_combined": ops.mamba_chunk_scan_combined,
        "mamba_split_conv1d_scan_combined": ops.mamba_split_conv1d_scan_combined,
        "mamba_split_conv1d_scan_ref": ops.mamba_split_conv1d_scan_ref},
    "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": ops.selective_state_update},
    "mamba_ssm.ops.triton.layer_norm": _LAYER_NORM,
    "mamba_ssm.ops.triton.layernorm": _LAYER_NORM,  # mamba_ssm < 2.0's name (Vim imports it)
    "mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": ops.RMSNormGated, "rmsnorm_fn": ops.rmsnorm_fn},
    "causal_conv1d": {"causal_conv1d_fn": ops.causal_conv1d_fn, "causal_conv1d_update": ops.causal_conv1d_update,
                      "causal_conv1d_ref": ops.causal_conv1d_ref,
                      "causal_conv1d_update_ref": ops.causal_conv1d_update_ref},
    "selective_scan_cuda": {"fwd": ops.selective_scan_cuda_fwd, "bwd": ops.selective_scan_cuda_bwd},
}
MARK = "__scan_export_compat__"  # set on every module we create


def _missing_class(module_name):
    """A module __getattr__ that says why an upstream name is absent, instead of a bare AttributeError."""

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"module {module_name!r} (scan_export.compat) has no attribute {name!r}: it provides "
                             f"mamba_ssm's and causal_conv1d's ops, not its nn.Module classes; define the block in "
                             f"your code against these functions (docs/vision.md)")

    return __getattr__


def _really_installed(top: str) -> bool:
    """True when `top` is importable from disk or already imported and not ours."""
    mod = sys.modules.get(top)
    if mod is not None:
        return not getattr(mod, MARK, False)
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


_replaced: dict[str, types.ModuleType | None] = {}


def install(force: bool = False) -> list[str]:
    """Register the modules for this process; returns the top-level names provided.

    A top-level package (mamba_ssm, causal_conv1d, selective_scan_cuda) that is really installed
    keeps its own modules unless force=True, which replaces them in sys.modules (uninstall()
    restores them). Calling it again is harmless."""
    provided = []
    for top in sorted({name.split(".")[0] for name in MODULES}):
        if _really_installed(top) and not force:
            continue
        provided.append(top)
        for name, attrs in MODULES.items():
            if name.split(".")[0] != top or getattr(sys.modules.get(name), MARK, False):
                continue
            mod = types.ModuleType(name, f"scan_export.compat's stand-in for {name}")
            mod.__dict__.update(attrs)
            mod.__all__ = sorted(attrs)
            mod.__getattr__ = _missing_class(name)
            setattr(mod, MARK, True)
            if any(other.startswith(name + ".") for other in MODULES):
                mod.__path__ = []  # a package: its submodules are found in sys.modules
            _replaced.setdefault(name, sys.modules.get(name))
            sys.modules[name] = mod
        for name in MODULES:  # `import mamba_ssm.ops.triton` binds each child as its parent's attribute
            if name.split(".")[0] == top and "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(sys.modules[parent], child, sys.modules[name])
    return provided


def uninstall() -> None:
    """Remove our modules, putting back any real module install(force=True) replaced."""
    for name, original in _replaced.items():
        if getattr(sys.modules.get(name), MARK, False):
            if original is None:
                del sys.modules[name]
            else:
                sys.modules[name] = original
    _replaced.clear()

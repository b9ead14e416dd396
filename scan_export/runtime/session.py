"""One explicit execution provider per session, asserted; never a silent CPU fallback."""

from __future__ import annotations

import os

import numpy as np

from ..errors import ScanExportError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderUnavailableError(ScanExportError, RuntimeError):
    """The requested execution provider is not in this onnxruntime build (a user-fixable setup
    problem, so a ScanExportError; still a RuntimeError for callers that caught that)."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime is required: pip install onnxruntime (or onnxruntime-gpu for CUDA)") from e
    return onnxruntime


def available_providers() -> list[str]:
    return _onnxruntime().get_available_providers()


def has_cuda_provider() -> bool:
    return PROVIDERS["cuda"] in available_providers()


def make_session(model, provider: str = "cpu", *, threads: int | None = None, log_severity: int = 3):
    """An InferenceSession on exactly one provider ("cpu" or "cuda"). model: path or serialized bytes.

    Raises ProviderUnavailableError when the provider is missing, and RuntimeError if onnxruntime
    quietly put the session on another provider.
    """
    ort = _onnxruntime()
    if provider not in PROVIDERS:
        raise ScanExportError(f"provider: expected one of {sorted(PROVIDERS)}, got {provider!r}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        hint = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" if provider == "cuda" else "pip install onnxruntime"
        raise ProviderUnavailableError(
            f"{wanted} is not available in this onnxruntime build "
            f"(available: {ort.get_available_providers()}); install it with: {hint}"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    try:
        session = ort.InferenceSession(model, opts, providers=[wanted])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/NoSuchFile/InvalidGraph types
        if not isinstance(model, str):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScanExportError(f"{model}: onnxruntime could not load it as an ONNX model ({first})") from e
    if session.get_providers()[0] != wanted:
        raise RuntimeError(f"asked for {wanted}, but onnxruntime chose {session.get_providers()}")
    return session


def run_on_device(session, feeds: dict[str, np.ndarray], output_names=None) -> list[np.ndarray]:
    """Run a session. On CUDA, inputs go to the device once through IO binding and outputs are
    bound on the device, so no per-run host staging happens inside onnxruntime."""
    ort = _onnxruntime()
    names = output_names or [o.name for o in session.get_outputs()]
    if session.get_providers()[0] != PROVIDERS["cuda"]:
        return session.run(names, feeds)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0))
    for name in names:
        binding.bind_output(name, "cuda", 0)
    session.run_with_iobinding(binding)
    return [v.numpy() for v in binding.get_outputs()]


def run_checked(session, names, feeds, model_path):
    """session.run, with onnxruntime's own failures (a graph that loads but cannot run, e.g. a
    damaged model.onnx) as one line naming the file; anything else keeps its traceback."""
    try:
        return session.run(names, feeds)
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScanExportError(f"{model_path}: onnxruntime could not run it ({first[:300]})") from e

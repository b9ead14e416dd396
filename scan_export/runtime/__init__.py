"""ONNX Runtime execution: numpy + onnxruntime only. Importing this package never imports torch."""

from .parity import OutputMismatch, ParityError, ParityReport, compare_outputs
from .session import ProviderUnavailableError, make_session, run_on_device

__all__ = [
    "OutputMismatch", "ParityError", "ParityReport", "ProviderUnavailableError", "compare_outputs",
    "make_session", "run_on_device",
]

"""ONNX Runtime execution: numpy + onnxruntime only. Importing this package never imports torch.

    from scan_export.runtime import ExportedMamba, Sampling, generate, generate_text
"""

from .generate import ExportedMamba, Sampling, generate, generate_text
from .parity import OutputMismatch, ParityError, ParityReport, compare_outputs
from .session import ProviderUnavailableError, make_session, run_on_device
from .streaming import TextStream, TextStreams

__all__ = [
    "ExportedMamba", "OutputMismatch", "ParityError", "ParityReport", "ProviderUnavailableError", "Sampling",
    "TextStream", "TextStreams", "compare_outputs", "generate", "generate_text", "make_session", "run_on_device",
]

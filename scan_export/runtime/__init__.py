"""ONNX Runtime execution: numpy + onnxruntime only. Importing this package never imports torch.

    from scan_export.runtime import ExportedModel, Sampling, generate, generate_text
"""

from .generate import ExportedModel, Sampling, generate, generate_text

# The name before hybrids (0.x): it loads any export, Mamba or hybrid; kept so that old code runs.
ExportedMamba = ExportedModel
from .parity import OutputMismatch, ParityError, ParityReport, compare_outputs
from .session import ProviderUnavailableError, make_session, run_on_device
from .streaming import TextStream, TextStreams

__all__ = [
    "ExportedMamba", "ExportedModel", "OutputMismatch", "ParityError", "ParityReport", "ProviderUnavailableError", "Sampling",
    "TextStream", "TextStreams", "compare_outputs", "generate", "generate_text", "make_session", "run_on_device",
]

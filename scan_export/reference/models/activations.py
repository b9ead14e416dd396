"""transformers' activation names (its ACT2FN table) -> the torch function that computes each one,
for the activations ONNX expresses exactly: each exports to ops with the same formula (Gelu / Erf,
Tanh, Sigmoid, Relu, Mul), so the export is as exact as transformers' own eager forward. Names
that need parameters (gelu_10, leaky_relu, prelu, xielu) or a formula of their own (laplace, mish,
sqrtsoftplus, hardswish, relu6, gelu_accurate) are refused with this list."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import ScanExportError


def _relu2(x):
    return torch.square(F.relu(x))


def _gelu_new(x):  # transformers' NewGELUActivation, written as it writes it
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x):  # transformers' FastGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu,
    "gelu": F.gelu, "gelu_python": F.gelu,  # exact (erf) GELU
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_new": _gelu_new, "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": F.relu, "relu2": _relu2, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "linear": lambda x: x,
}


def read_activation(raw: dict, field: str, default: str) -> str:
    """The activation named by config field `field` (default when absent), refused naming the field
    and the supported names when ONNX cannot compute it exactly."""
    name = raw.get(field, default)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ScanExportError(f"field {field!r}: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return name

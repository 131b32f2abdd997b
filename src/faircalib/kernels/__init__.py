"""Quantized linear layers and their matmul backends, chosen by device and token rows M."""

from faircalib.kernels.backends import (
    BACKEND_NAMES,
    BACKENDS,
    W4_AUTO,
    auto_backend,
    dequantize_packed,
    pack_codes,
    unpack_codes,
)
from faircalib.kernels.quant_linear import QuantLinear, check_codes
from faircalib.kernels.shared_activations import share_activations

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "QuantLinear",
    "W4_AUTO",
    "auto_backend",
    "check_codes",
    "dequantize_packed",
    "pack_codes",
    "share_activations",
    "unpack_codes",
]

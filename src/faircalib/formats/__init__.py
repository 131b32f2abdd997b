"""Packed quantized checkpoints (compressed-tensors `pack-quantized`), saved atomically.

This is a joining layer: it imports `models/` (to rebuild the float model) and `kernels/` (to
swap quantized linears for `QuantLinear`).
"""

from faircalib.formats.packed import (
    FORMAT_VERSION,
    INPUT_SCALE,
    PACK_FORMAT,
    load_packed_model,
    pack_layer,
    packed_nbytes,
    packed_weight_bytes,
    quantization_args,
    save_packed_model,
    unpack_layer,
)

__all__ = [
    "FORMAT_VERSION",
    "INPUT_SCALE",
    "PACK_FORMAT",
    "load_packed_model",
    "pack_layer",
    "packed_nbytes",
    "packed_weight_bytes",
    "quantization_args",
    "save_packed_model",
    "unpack_layer",
]

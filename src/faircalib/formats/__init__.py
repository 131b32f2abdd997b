"""Packed quantized checkpoints (compressed-tensors `pack-quantized`), saved atomically.

This is a joining layer: it imports `models/` (to rebuild the float model) and `kernels/` (to
swap quantized linears for `QuantLinear`).
"""

from faircalib.formats.packed import (
    FORMAT_VERSION,
    INPUT_SCALE,
    PACK_FORMAT,
    check_packable_method,
    load_packed_model,
    model_config,
    pack_layer,
    packed_nbytes,
    packed_weight_bytes,
    quantization_args,
    save_packed_model,
    unpack_layer,
    write_packed,
)

__all__ = [
    "FORMAT_VERSION",
    "INPUT_SCALE",
    "PACK_FORMAT",
    "check_packable_method",
    "load_packed_model",
    "model_config",
    "pack_layer",
    "packed_nbytes",
    "packed_weight_bytes",
    "quantization_args",
    "save_packed_model",
    "unpack_layer",
    "write_packed",
]

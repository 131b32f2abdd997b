"""Quantization algorithms as pure tensor code: weight [out, in] + input statistics -> result.

This package never imports `faircalib.models`; `faircalib.calib` feeds it one linear layer at
a time. Every method in `METHODS` is called as `method(weight, inputs, cfg)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.quant.awq import quantize_awq
from faircalib.quant.gptq import quantize_gptq
from faircalib.quant.primitives import (
    QParams,
    QuantResult,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_activations_per_token,
)
from faircalib.quant.rtn import quantize_rtn
from faircalib.quant.smoothquant import quantize_smoothquant
from faircalib.quant.stats import LayerInputs, LayerInputsAccumulator, weighted_output_error


def _rtn(
    weight: torch.Tensor, inputs: LayerInputs | None, cfg: QuantConfig, *, name: str = "weight"
) -> QuantResult:
    return quantize_rtn(weight, cfg, inputs, name=name)


METHODS: dict[str, Callable[..., QuantResult]] = {
    "rtn": _rtn,
    "gptq": quantize_gptq,
    "awq": quantize_awq,
    "smoothquant": quantize_smoothquant,
}

# Methods that read calibration statistics (the engine can skip collecting them for the rest).
NEEDS_INPUTS = frozenset({"gptq", "awq", "smoothquant"})


def quantize_linear(
    weight: torch.Tensor, inputs: LayerInputs | None, cfg: QuantConfig, *, name: str = "weight"
) -> QuantResult:
    """Quantize one linear layer's weight with the method named by `cfg.method`."""
    method = getattr(cfg, "method", "rtn")  # a plain QuantConfig means RTN
    if method not in METHODS:
        raise ConfigError(
            f"unknown quantization method {method!r}; choose one of {sorted(METHODS)}"
        )
    if method in NEEDS_INPUTS and inputs is None:
        raise ConfigError(f"{method} needs calibration statistics for {name}, got none")
    return METHODS[method](weight, inputs, cfg, name=name)


__all__ = [
    "METHODS",
    "NEEDS_INPUTS",
    "LayerInputs",
    "LayerInputsAccumulator",
    "QParams",
    "QuantResult",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
    "quantize_activations_per_token",
    "quantize_awq",
    "quantize_gptq",
    "quantize_linear",
    "quantize_rtn",
    "quantize_smoothquant",
    "weighted_output_error",
]

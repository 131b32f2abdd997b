"""Round-to-nearest with per-group min-max ranges: the data-free PTQ baseline."""

from __future__ import annotations

import torch

from faircalib.config import QuantConfig
from faircalib.quant.primitives import (
    QuantResult,
    check_weight,
    compute_qparams,
    dequantize,
    quantize,
)
from faircalib.quant.stats import LayerInputs


def quantize_rtn(
    weight: torch.Tensor,
    cfg: QuantConfig,
    inputs: LayerInputs | None = None,
    *,
    name: str = "weight",
) -> QuantResult:
    """Quantize each group to its own min-max grid. `inputs` is accepted (and ignored) so RTN
    has the same call shape as the calibrated methods."""
    del inputs  # RTN is data-free by definition
    check_weight(weight, name)
    cfg.check_layer(name, weight.shape[1])
    w = weight.detach().float()  # [out, in]
    qp = compute_qparams(w, cfg)
    codes = quantize(w, qp)  # [out, in] uint8
    w_hat = dequantize(codes, qp)  # [out, in]
    rel = float((w_hat - w).norm() / w.norm().clamp(min=1e-30))
    return QuantResult(w_hat, codes, qp, info={"weight_rel_error": rel})

"""SmoothQuant (Xiao et al., 2023): make activations easy to quantize for W8A8.

A few input channels carry activation outliers 10-100x larger than the rest, which ruins
per-token activation quantization. Dividing channel j of x by s_j and multiplying column j of
W by s_j leaves x W^T unchanged in float and moves the difficulty into the weights:

    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)        (alpha = migration strength)

Following mit-han-lab/smoothquant (smooth.py), the weight maximum and s are floored at 1e-5
(a channel never active in calibration gets a tiny s) and the activation maximum is the
unweighted abs-max over every calibration row (the activation quantizer must cover every
value it will meet, however rare). The smoothed weight is then
quantized with round-to-nearest at cfg.bits / cfg.group_size (W8 per-channel is the paper's
setting) and activations are fake-quantized per token at `act_bits` at run time.
"""

from __future__ import annotations

import torch

from faircalib.config import SmoothQuantConfig
from faircalib.errors import ConfigError
from faircalib.quant.primitives import (
    QuantResult,
    check_weight,
    compute_qparams,
    dequantize,
    quantize,
)
from faircalib.quant.stats import LayerInputs, check_inputs


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors s: [in]."""
    w_max = weight.abs().amax(dim=0).clamp(min=1e-5)  # [in]
    return (act_absmax.float().pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)


def quantize_smoothquant(
    weight: torch.Tensor, inputs: LayerInputs, cfg: SmoothQuantConfig, *, name: str = "weight"
) -> QuantResult:
    check_weight(weight, name)
    cfg.check_layer(name, weight.shape[1])
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {cfg.alpha}")
    if not 2 <= cfg.act_bits <= 16:
        raise ConfigError(f"activation bit width must be in 2..16, got {cfg.act_bits}")
    inputs = check_inputs(inputs, weight.shape[1], weight.device)
    w = weight.float()  # [out, in]
    s = smoothing_scales(inputs.act_absmax, w, cfg.alpha)  # [in]
    ws = w * s  # [out, in]
    qp = compute_qparams(ws, cfg)
    codes = quantize(ws, qp)
    x_max = inputs.act_absmax.float()
    info = {
        "alpha": cfg.alpha,
        "scale_min": float(s.min()),
        "scale_max": float(s.max()),
        # activation outlier ratio (largest channel max / median channel max), before and after
        "act_outlier_before": float(x_max.max() / x_max.median().clamp(min=1e-12)),
        "act_outlier_after": float((x_max / s).max() / (x_max / s).median().clamp(min=1e-12)),
    }
    return QuantResult(
        dequantize(codes, qp), codes, qp, input_scale=s, act_bits=cfg.act_bits, info=info
    )

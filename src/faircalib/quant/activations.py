"""Activation quantizers: what a W8A8 / W4A8 / W4A4 linear does to its input rows.

A linear's input is [..., in]; a *token* is one row (the last dim). All quantizers here are
fake quantizers: they return float tensors on the grid, so the same code serves calibration,
evaluation and the learned-transform optimiser (with a straight-through estimator).

* INT, per-token dynamic, symmetric: scale_r = clip * max_j |x_rj| / qmax with the restricted
  range qmax = 2^(bits-1) - 1 (INT8 GEMMs take -127..127; `quantize_activations_per_token` in
  primitives.py is the clip = 1 case), code = clamp(round(x / scale), -qmax, qmax). A clip
  ratio < 1 trades saturation of the few largest values for a finer step everywhere else:
  at 4 bits (15 levels) that trade is usually worth it.
* FP8 e4m3, per-token dynamic: scale_r = clip * max_j |x_rj| / 448, then a cast to
  torch.float8_e4m3fn (round to nearest even, the format's largest finite value is 448).
  Values are clamped to +-448 first: torch turns |x| >= 480 into NaN (e4m3fn has no inf).
* INT, static per-tensor: one scale for every row, calibrated offline from the layer's
  observed abs-max (times a clip ratio). Cheaper at run time (no per-row reduction) but one
  massive-outlier token sets the step for all tokens.

`search_clip_ratio` picks the clip ratio on a grid by the layer output error on calibration
rows, the same criterion AWQ's weight clipping uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from faircalib.errors import ConfigError
from faircalib.quant.primitives import ACT_ABSMAX_FLOOR

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


@dataclass
class ActQuantConfig:
    """How a linear's input rows are quantized. `fmt` None: left in float."""

    fmt: Literal["int", "fp8"] | None = "int"
    bits: int = 8  # INT only; FP8 is e4m3
    granularity: Literal["token", "tensor"] = "token"  # dynamic per token / static per tensor
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.fmt not in ("int", "fp8", None):
            raise ConfigError(f"activation format must be int, fp8 or None, got {self.fmt!r}")
        if self.fmt == "int" and not 2 <= self.bits <= 16:
            raise ConfigError(f"activation bit width must be in 2..16, got {self.bits}")
        if self.granularity not in ("token", "tensor"):
            raise ConfigError(f"granularity must be token or tensor, got {self.granularity!r}")
        if self.fmt == "fp8" and self.granularity != "token":
            raise ConfigError("FP8 activations are per-token dynamic only")
        if not 0 < self.clip_ratio <= 1:
            raise ConfigError(f"clip ratio must be in (0, 1], got {self.clip_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def int_qmax(bits: int) -> int:
    """Largest code of the restricted symmetric range +-(2^(bits-1) - 1)."""
    return 2 ** (bits - 1) - 1


def quantize_int_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float | torch.Tensor = 1.0, *, ste: bool = False
) -> torch.Tensor:
    """[..., in] -> [..., in]: symmetric dynamic INT fake quantization of every row.
    `clip_ratio` may be a tensor (learned clipping); with `ste` gradients pass the rounding."""
    qmax = int_qmax(bits)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) * clip_ratio  # [..., 1]
    scale = absmax.clamp(min=ACT_ABSMAX_FLOOR) / qmax
    rnd = ste_round if ste else torch.round
    return (rnd(xf / scale).clamp(-qmax, qmax) * scale).to(x.dtype)


def fp8_e4m3_cast(x: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest float8_e4m3fn value (saturating at +-448), as float32."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def quantize_fp8_rows(
    x: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0, *, ste: bool = False
) -> torch.Tensor:
    """[..., in] -> [..., in]: FP8 e4m3 fake quantization with one scale per row (the last
    dim): per-token for activations, per-output-channel for an [out, in] weight."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) * clip_ratio  # [..., 1]
    scale = absmax.clamp(min=ACT_ABSMAX_FLOOR) / FP8_E4M3_MAX
    y = xf / scale
    q = fp8_e4m3_cast(y.detach() if ste else y)
    if ste:
        q = y + (q - y).detach()
    return (q * scale).to(x.dtype)


def static_scale(absmax: torch.Tensor | float, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """The per-tensor scale of static INT quantization from a calibrated abs-max."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32).max()
    return (absmax * clip_ratio).clamp(min=ACT_ABSMAX_FLOOR) / int_qmax(bits)


def quantize_int_static(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """[..., in] -> [..., in]: symmetric INT fake quantization with one fixed scale."""
    qmax = int_qmax(bits)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (torch.round(x.float() / scale).clamp(-qmax, qmax) * scale).to(x.dtype)


def fake_quantize_activations(
    x: torch.Tensor,
    cfg: ActQuantConfig | None,
    scale: torch.Tensor | None = None,
    *,
    ste: bool = False,
) -> torch.Tensor:
    """Apply `cfg` to rows x [..., in]. Static per-tensor needs its calibrated `scale`."""
    if cfg is None or cfg.fmt is None:
        return x
    if cfg.fmt == "fp8":
        return quantize_fp8_rows(x, cfg.clip_ratio, ste=ste)
    if cfg.granularity == "token":
        return quantize_int_per_token(x, cfg.bits, cfg.clip_ratio, ste=ste)
    if scale is None:
        raise ConfigError("static per-tensor activation quantization needs a calibrated scale")
    return quantize_int_static(x, scale, cfg.bits)


def output_error(
    x: torch.Tensor,
    x_q: torch.Tensor,
    weight: torch.Tensor,
    weight_q: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> float:
    """Relative row-weighted output error sum_r w_r ||x_r W^T - xq_r Wq^T||^2 / sum_r w_r
    ||x_r W^T||^2 (x, x_q: [n, in]; weight: [out, in]; Wq defaults to W)."""
    ref = x.float() @ weight.float().T  # [n, out]
    got = x_q.float() @ (weight if weight_q is None else weight_q).float().T
    w = torch.ones(len(x), device=x.device) if row_weights is None else row_weights.float()
    err = (w * ((ref - got) ** 2).sum(dim=1)).sum()
    return float(err / (w * (ref**2).sum(dim=1)).sum().clamp(min=1e-30))


def default_clip_grid(n: int = 20, low: float = 0.5) -> list[float]:
    """n ratios evenly spaced from 1 down to `low` (1 first: no clipping wins ties)."""
    return [1.0 - (1.0 - low) * i / (n - 1) for i in range(n)] if n > 1 else [1.0]


def search_clip_ratio(
    x: torch.Tensor,
    weight: torch.Tensor,
    cfg: ActQuantConfig,
    *,
    weight_q: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    grid: list[float] | None = None,
) -> tuple[float, list[float]]:
    """The clip ratio of `grid` minimising the layer output error on calibration rows x [n, in]
    (ties: the first, i.e. the least clipping); returns (ratio, error per grid entry).
    For static per-tensor INT the ratio scales the abs-max over all rows of x."""
    grid = grid or default_clip_grid()
    errors = []
    for ratio in grid:
        trial = ActQuantConfig(cfg.fmt, cfg.bits, cfg.granularity, ratio)
        scale = (
            static_scale(x.abs().max(), cfg.bits, ratio) if cfg.granularity == "tensor" else None
        )
        x_q = fake_quantize_activations(x, trial, scale)
        errors.append(output_error(x, x_q, weight, weight_q, row_weights))
    best = min(range(len(grid)), key=lambda i: (errors[i], i))
    return grid[best], errors

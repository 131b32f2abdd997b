"""Integer quantization primitives shared by every method.

Layout: a weight is [out, in]; groups are contiguous runs of `group_size` input features
(group g covers columns g*group_size .. (g+1)*group_size - 1), or one group per output row
when `group_size` is None. Every group has a float `scale` and an integer-valued `zero`.

Code convention (both modes store UNSIGNED codes in [0, 2^bits - 1] plus a zero point):

    code = clamp(round(w / scale) + zero, 0, 2^bits - 1)        w_hat = scale * (code - zero)

* asymmetric: the range is [min(w_min, 0), max(w_max, 0)] (zero is always representable,
  as in GPTQ and compressed-tensors), scale = range / (2^bits - 1), zero = round(-min / scale).
* symmetric: scale = max|w| / ((2^bits - 1) / 2) and zero = 2^(bits-1) for every group, so
  `code - zero` is the signed integer in [-2^(bits-1), 2^(bits-1) - 1] that symmetric packed
  formats (compressed-tensors int4/int8 with zero point 0) store. This is GPTQ's convention;
  it uses all 2^bits levels, unlike the +-(2^(bits-1) - 1) "restricted" range.

Scale dtype: checkpoints store scales in their own dtype (bf16 by default) and stock readers
dequantize with those. A config's optional `scale_dtype` ("bfloat16", "float16" or None) makes
`scale_zero_from_range` / `compute_qparams` round every scale to that dtype *before* zero points
and codes are chosen, so fake-quant, packed and stock-reader weights agree exactly. Min-max
scales round up, so the grid still spans the range; scales stay float32 tensors holding
dtype-representable values. None (the default) leaves them unrounded.

"e8m0" makes every scale a power of two (torch.float8_e8m0fnu: round to nearest). It is the one
scale type rounded to nearest instead of up: a power of two above the min-max scale widens the
step by up to 2x, and on mdlm-small's weights that doubled the W4 g128 error (relative squared
error 0.030 up against 0.014 nearest; float scales 0.013). Groups whose scale rounds down clip
their extreme values. Powers of two are exact in bf16 and float16's range, so such scales are
stored as the checkpoint's bf16 unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from faircalib.config import QuantConfig
from faircalib.errors import CheckpointError, ConfigError


@dataclass
class QParams:
    """Per-group quantization parameters of one [out, in] weight."""

    scale: torch.Tensor  # [out, n_groups] float32, > 0
    zero: torch.Tensor  # [out, n_groups] float32 holding integers in [0, 2^bits - 1]
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def expand(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero repeated over each group's columns: two [out, in] tensors."""
        width = in_features if self.group_size is None else self.group_size
        return (
            self.scale.repeat_interleave(width, dim=1),
            self.zero.repeat_interleave(width, dim=1),
        )

    def to(self, device: torch.device | str) -> QParams:
        """The same parameters on `device` (dtypes kept)."""
        return replace(self, scale=self.scale.to(device), zero=self.zero.to(device))


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Reject anything but a finite 2-D float matrix with a clear error."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(
            f"{name} must be a 2-D float matrix, got {tuple(weight.shape)} {weight.dtype}"
        )
    if not torch.isfinite(weight).all():
        raise CheckpointError(f"{name} contains NaN or Inf values; the checkpoint is corrupt")


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_width] view with contiguous groups along `in`."""
    out, n_in = w.shape
    width = n_in if group_size is None else group_size
    if n_in % width:
        raise ConfigError(f"group size {group_size} does not divide {n_in} input features")
    return w.reshape(out, n_in // width, width)


_SCALE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "e8m0": torch.float8_e8m0fnu,
}


def resolve_scale_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype name (bfloat16, float16, float32, e8m0), the torch dtype itself or None ->
    dtype/None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _SCALE_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _SCALE_DTYPES:
        return _SCALE_DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"unsupported scale dtype {dtype!r}; use bfloat16, float16, float32 or e8m0")


def config_scale_dtype(cfg: object) -> torch.dtype | None:
    """The scale dtype a method config asks for (its optional `scale_dtype` field)."""
    return resolve_scale_dtype(getattr(cfg, "scale_dtype", None))


def round_to_dtype(
    scale: torch.Tensor, dtype: torch.dtype | str | None, *, up: bool = False
) -> torch.Tensor:
    """Positive scales rounded to the nearest value of `dtype` (`up`: the nearest one >= the
    scale, except for e8m0, always nearest: see the module docstring), returned as float32
    (dtype None: unchanged)."""
    dtype = resolve_scale_dtype(dtype)
    if dtype is None:
        return scale
    if dtype == torch.float8_e8m0fnu:
        return _round_pow2(scale)
    rounded = scale.to(dtype)
    if up and dtype in (torch.bfloat16, torch.float16):
        # positive 16-bit floats are ordered like their bit patterns: +1 is the next value up
        bumped = (rounded.view(torch.int16) + 1).view(dtype)
        rounded = torch.where(rounded.float() < scale, bumped, rounded)
    rounded = rounded.float()
    # float16 has a narrow range: a scale that underflows or overflows cannot be stored
    if not (torch.isfinite(rounded) & (rounded > 0)).all():
        raise ConfigError(
            f"some scales underflow or overflow {str(dtype).removeprefix('torch.')}; use bfloat16"
        )
    return rounded


def _round_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Positive scales -> the nearest power of two (ties up), float32, within e8m0's range
    2^-127 to 2^127 (a smaller scale belongs to a group of weights below 1e-37: zeros)."""
    return scale.float().clamp(2.0**-127, 2.0**127).to(torch.float8_e8m0fnu).float()


def scales_representable(qp: QParams, dtype: torch.dtype) -> bool:
    """Whether every scale survives a round trip through `dtype` unchanged."""
    return torch.equal(qp.scale.float().to(dtype).float(), qp.scale.float())


def round_scales(qp: QParams, dtype: torch.dtype | str | None) -> QParams:
    """The same qparams with scales rounded to `dtype` (zero points kept). Codes chosen with
    the old scales are stale: quantize (again) with the returned qparams."""
    return replace(qp, scale=round_to_dtype(qp.scale.float(), dtype))


def scale_zero_from_range(
    w_min: torch.Tensor,
    w_max: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point for ranges of any shape (elementwise). With `scale_dtype`
    the scale is rounded up to that dtype (so the grid still spans the range: no clipping),
    except e8m0's, rounded to the nearest power of two (clipping where it rounds down), and
    the zero point is chosen for the rounded scale (see the module docstring)."""
    maxq = 2**bits - 1
    # Widen to include 0 so that exact zeros (pruned or dead weights) stay exact.
    w_min = w_min.clamp(max=0.0)
    w_max = w_max.clamp(min=0.0)
    if symmetric:
        half_range = torch.maximum(-w_min, w_max)
        half_range = torch.where(half_range > 0, half_range, torch.ones_like(half_range))
        scale = round_to_dtype(half_range / (maxq / 2), scale_dtype, up=True)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        span = w_max - w_min
        # An all-zero group would give scale 0: any positive scale encodes it exactly.
        span = torch.where(span > 0, span, torch.ones_like(span))
        scale = round_to_dtype(span / maxq, scale_dtype, up=True)
        zero = torch.round(-w_min / scale).clamp(0, maxq)
    return scale, zero


def compute_qparams(
    w: torch.Tensor, cfg: QuantConfig, clip_ratio: torch.Tensor | float = 1.0
) -> QParams:
    """Min-max qparams per group; `clip_ratio` ([out, n_groups] or scalar, in (0, 1]) shrinks
    each group's range towards zero, trading clipping error on outliers for finer steps.
    Scales are rounded to the config's optional `scale_dtype` as `scale_zero_from_range` says
    (None: not rounded)."""
    g = grouped(w.float(), cfg.group_size)  # [out, G, width]
    w_min = g.amin(dim=2) * clip_ratio  # [out, G]
    w_max = g.amax(dim=2) * clip_ratio
    scale, zero = scale_zero_from_range(
        w_min, w_max, cfg.bits, cfg.symmetric, config_scale_dtype(cfg)
    )
    return QParams(scale, zero, cfg.bits, cfg.group_size, cfg.symmetric)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Elementwise (broadcasting) float -> unsigned code, returned as float for further math."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Elementwise (broadcasting) code -> float32 value on the quantization grid."""
    return scale * (codes.float() - zero)


def quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """[out, in] float -> [out, in] uint8 codes in [0, 2^bits - 1]."""
    scale, zero = qp.expand(w.shape[1])
    return encode(w.float(), scale, zero, qp.bits).to(torch.uint8)


def dequantize(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    """[out, in] codes -> [out, in] float32 weight."""
    scale, zero = qp.expand(codes.shape[1])
    return decode(codes, scale, zero)


def fake_quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Round-trip through the integer grid: dequantize(quantize(w)) as float32."""
    return dequantize(quantize(w, qp), qp)


# The one floor of a row's abs-max wherever a per-row (per-token) scale is taken from it: the
# fake quantizers (here and quant.activations), QuantLinear's act_bits path, the fp8/int8
# kernels' row quantizers (kernels.backends, kernels.triton_w8a8) and the packed reload. An
# all-zero row then gets a positive scale and stays zero; one shared value makes a row with a
# tiny abs-max quantize to the same codes on every path. 1e-8 keeps every scale a normal
# float32 (1e-8 / 448 ~ 2e-11), so no path meets denormals (GPUs may flush them to zero).
ACT_ABSMAX_FLOOR = 1e-8


def quantize_activations_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric per-token (last dim) fake quantization, as in SmoothQuant's W8A8.

    Uses the restricted range +-(2^(bits-1) - 1) (int8 GEMMs take -127..127) with the scale
    from each token's abs-max, floored at `ACT_ABSMAX_FLOOR` so all-zero tokens stay zero.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_ABSMAX_FLOOR) / qmax  # [..., 1]
    return (torch.round(xf / scale).clamp(-qmax, qmax) * scale).to(x.dtype)


@dataclass
class QuantResult:
    """What every method returns for one linear layer.

    The layer computes (x / input_scale) @ weight.T, so `weight` is the fake-quantized weight
    in the smoothed basis (original weight times input_scale, column-wise).
    """

    weight: torch.Tensor  # [out, in] float32 dequantized weight
    codes: torch.Tensor  # [out, in] uint8 codes, contiguous groups along `in`
    qparams: QParams
    input_scale: torch.Tensor | None = None  # [in]; None: no smoothing
    act_bits: int | None = None  # per-token activation fake-quant bits (SmoothQuant)
    info: dict[str, float] | None = None  # scalar diagnostics

    def to(self, device: torch.device | str) -> QuantResult:
        """The same result with every tensor on `device` (dtypes kept: the codes stay uint8)."""
        scale = None if self.input_scale is None else self.input_scale.to(device)
        return replace(
            self,
            weight=self.weight.to(device),
            codes=self.codes.to(device),
            qparams=self.qparams.to(device),
            input_scale=scale,
        )

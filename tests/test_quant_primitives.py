"""The integer quantizer: code ranges, level counts, rounding error bounds, error handling."""

from dataclasses import dataclass

import pytest
import torch

from faircalib.config import QuantConfig
from faircalib.errors import CheckpointError, ConfigError
from faircalib.quant.primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_activations_per_token,
    round_scales,
    scales_representable,
)


@dataclass
class ScaleDtypeConfig(QuantConfig):
    scale_dtype: str | None = "bfloat16"  # the optional field calibration configs carry


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * 0.05  # [out, in]
    w[3, 7] = 0.9  # an outlier weight
    w[10, :32] = torch.rand(32, generator=g)  # an all-positive group
    w[11, 32:64] = 0.0  # an all-zero group
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_codes_in_range_and_error_at_most_half_step(bits, symmetric, group_size):
    w = _weight()
    cfg = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    qp = compute_qparams(w, cfg)
    codes = quantize(w, qp)
    assert codes.dtype == torch.uint8
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    width = 128 if group_size is None else group_size
    per_group = codes.reshape(64, 128 // width, width)
    n_distinct = max(
        len(torch.unique(per_group[o, g])) for o in range(64) for g in range(128 // width)
    )
    assert n_distinct <= 2**bits
    # No clipping (ratio 1): every weight lies inside its group's range.
    scale, _ = qp.expand(128)
    err = (dequantize(codes, qp) - w).abs()
    assert bool((err <= scale / 2 + 1e-6).all())
    assert torch.equal(fake_quantize(w, qp), dequantize(codes, qp))
    assert bool((qp.zero == torch.round(qp.zero)).all())
    if symmetric:
        assert bool((qp.zero == 2 ** (bits - 1)).all())
    # Exact zeros stay exact (zero is always on the grid).
    assert float(dequantize(codes, qp)[11, 32:64].abs().max()) == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_clipping_bounds_error_inside_the_shrunk_range(symmetric):
    w = _weight(1)
    cfg = QuantConfig(bits=4, group_size=32, symmetric=symmetric)
    ratio = 0.7
    qp = compute_qparams(w, cfg, clip_ratio=ratio)
    full = compute_qparams(w, cfg)
    assert bool((qp.scale <= full.scale + 1e-9).all())
    scale, zero = qp.expand(128)
    lo, hi = -zero * scale, (15 - zero) * scale  # the representable range
    inside = (w >= lo) & (w <= hi)
    err = (fake_quantize(w, qp) - w).abs()
    assert 0.6 < float(inside.float().mean()) < 1.0  # some weights are clipped
    assert bool((err[inside] <= scale[inside] / 2 + 1e-6).all())
    # Outside the range the value saturates at the nearer end of the range.
    wq = fake_quantize(w, qp)
    end = torch.where(w > hi, hi, lo)
    assert torch.allclose(wq[~inside], end[~inside], atol=1e-6)


def test_more_bits_give_smaller_error():
    w = _weight(2)
    errs = [
        float((fake_quantize(w, compute_qparams(w, QuantConfig(bits=b))) - w).norm() / w.norm())
        for b in (2, 3, 4, 8)
    ]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_activation_quantization(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 128, generator=g)
    x[0, 0] = 0.0
    xq = quantize_activations_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    step = x.abs().amax(dim=-1, keepdim=True) / qmax  # [4, 16, 1]
    assert bool(((xq - x).abs() <= step / 2 + 1e-6).all())
    assert float(xq[0, 0].abs().max()) == 0.0
    assert torch.allclose(quantize_activations_per_token(xq, bits), xq, atol=1e-6)
    n_levels = max(len(torch.unique(xq[i, j])) for i in range(4) for j in range(16))
    assert n_levels <= 2 * qmax + 1


def test_bad_inputs_raise_clear_errors():
    from faircalib.quant import quantize_rtn

    w = _weight()
    w[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        quantize_rtn(w, QuantConfig(), name="blocks.0.attn.qkv")
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_rtn(torch.randn(8, 96), QuantConfig(group_size=64), name="proj")
    with pytest.raises(ConfigError, match="2-D"):
        quantize_rtn(torch.randn(8), QuantConfig())


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 32])
def test_scale_dtype_rounds_scales_up_before_zero_points_and_codes(bits, symmetric, group_size):
    w = _weight(2)
    plain = compute_qparams(w, QuantConfig(bits, group_size, symmetric))
    qp = compute_qparams(w, ScaleDtypeConfig(bits, group_size, symmetric))
    # reference: the float32 scale, rounded to bf16, moved one bf16 step up if it fell below
    near = plain.scale.to(torch.bfloat16).float()
    ulp = 2.0 ** (torch.floor(torch.log2(near)) - 7)  # bf16 keeps 8 significant bits
    assert torch.equal(qp.scale, torch.where(near < plain.scale, near + ulp, near))
    assert scales_representable(qp, torch.bfloat16)
    if not symmetric:  # the zero point is chosen for the rounded scale
        w_min = w.reshape(64, -1, group_size or 128).amin(2).clamp(max=0)
        assert torch.equal(qp.zero, torch.round(-w_min / qp.scale).clamp(0, 2**bits - 1))
    # rounding up keeps the grid over the whole range: still no clipping
    scale, _ = qp.expand(128)
    assert bool(((fake_quantize(w, qp) - w).abs() <= scale / 2 + 1e-6).all())
    unset = compute_qparams(w, ScaleDtypeConfig(bits, group_size, symmetric, scale_dtype=None))
    assert torch.equal(unset.scale, plain.scale)  # None: the unrounded behaviour


def test_round_scales_is_round_to_nearest_and_refuses_what_the_dtype_cannot_hold():
    qp = compute_qparams(_weight(3), QuantConfig(bits=4, group_size=32))
    assert not scales_representable(qp, torch.bfloat16)
    rounded = round_scales(qp, "bfloat16")
    assert torch.equal(rounded.scale, qp.scale.to(torch.bfloat16).float())
    assert torch.equal(rounded.zero, qp.zero) and rounded.scale.dtype == torch.float32
    huge = round_scales(qp, torch.float16)
    huge.scale = huge.scale * 1e8  # beyond float16's 65504
    with pytest.raises(ConfigError, match="overflow float16"):
        round_scales(huge, torch.float16)
    with pytest.raises(ConfigError, match="unsupported scale dtype"):
        round_scales(qp, "int8")

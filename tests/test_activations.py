"""Activation quantizers against straightforward loop / enumeration references."""

import itertools

import pytest
import torch

from faircalib.errors import ConfigError
from faircalib.quant.activations import (
    FP8_E4M3_MAX,
    ActQuantConfig,
    fake_quantize_activations,
    fp8_e4m3_cast,
    quantize_fp8_rows,
    quantize_int_per_token,
    quantize_int_static,
    search_clip_ratio,
    static_scale,
)
from faircalib.quant.primitives import quantize_activations_per_token


def _ref_int_row(row: torch.Tensor, bits: int, clip: float) -> list[float]:
    qmax = 2 ** (bits - 1) - 1
    amax = max(abs(float(v)) for v in row) * clip
    scale = torch.tensor(max(amax, 1e-8), dtype=torch.float32) / qmax
    out = []
    for v in row:
        q = round(float(v / scale))  # Python rounds half to even, like torch.round
        out.append(min(max(q, -qmax), qmax) * float(scale))
    return out


@pytest.mark.parametrize("bits,clip", [(8, 1.0), (4, 1.0), (4, 0.8), (3, 0.6)])
def test_int_per_token_matches_loop_reference(bits, clip):
    x = torch.randn(6, 11, generator=torch.Generator().manual_seed(bits)) * 3
    x[2, 4] = 40.0  # an outlier token
    x[5] = 0.0  # an all-zero token stays zero
    got = quantize_int_per_token(x, bits, clip)
    ref = torch.tensor([_ref_int_row(r, bits, clip) for r in x])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert torch.equal(got[5], torch.zeros(11))


def test_int_per_token_equals_primitive_and_round_trips_representable_values():
    x = torch.randn(5, 16)
    assert torch.equal(quantize_int_per_token(x, 8), quantize_activations_per_token(x, 8))
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        codes = torch.randint(-qmax, qmax + 1, (7, 9)).float()
        codes[:, 0] = qmax  # each row's abs-max on the top code: the scale is exactly `scale`
        scale = torch.tensor([0.5, 0.25, 2.0, 1.0, 0.125, 4.0, 0.0625])[:, None]
        x = codes * scale
        assert torch.equal(quantize_int_per_token(x, bits), x)


def _e4m3_values() -> tuple[list[float], list[int]]:
    """Every finite float8_e4m3fn value and its bit pattern, enumerated from the format."""
    values, codes = [], []
    for code in range(256):
        sign, exp, man = code >> 7, (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:  # e4m3fn: only S.1111.111 is NaN (no infinities)
            continue
        mag = (man / 8) * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        values.append(-mag if sign else mag)
        codes.append(code)
    return values, codes


def _ref_e4m3(v: float) -> float:
    values, codes = _e4m3_values()
    v = min(max(v, -FP8_E4M3_MAX), FP8_E4M3_MAX)
    best = min(abs(v - c) for c in values)
    near = [(c, k) for c, k in zip(values, codes, strict=True) if abs(v - c) == best]
    # a tie between two neighbours goes to the even mantissa (round to nearest even)
    return next(c for c, k in near if k % 2 == 0) if len(near) > 1 else near[0][0]


def test_fp8_cast_matches_enumerated_e4m3():
    values, _ = _e4m3_values()
    assert max(values) == FP8_E4M3_MAX and len(set(values)) == 253  # +0 and -0 coincide
    mids = [(a + b) / 2 for a, b in itertools.pairwise(sorted(set(values)))]  # exact ties
    probe = torch.tensor(
        values + mids + [1000.0, -600.0, 1e-5, 0.3, 3.14159, -17.3], dtype=torch.float32
    )
    got = fp8_e4m3_cast(probe)
    ref = torch.tensor([_ref_e4m3(float(v)) for v in probe])
    assert torch.equal(got, ref)


def test_fp8_per_token_matches_reference_and_saturates():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)) * 5
    got = quantize_fp8_rows(x)
    for r in range(4):
        scale = x[r].abs().max() / FP8_E4M3_MAX
        ref = torch.tensor([_ref_e4m3(float(v / scale)) for v in x[r]]) * scale
        torch.testing.assert_close(got[r], ref, rtol=0, atol=0)
        assert got[r].abs().max() == x[r].abs().max()  # the row max is exactly representable
    assert torch.isfinite(quantize_fp8_rows(x, 0.5)).all()  # clipped rows saturate at 448


def test_static_per_tensor_matches_loop_reference():
    x = torch.randn(4, 6) * 2
    scale = static_scale(torch.tensor([1.0, 5.0, 2.0]), bits=4, clip_ratio=0.9)
    assert float(scale) == pytest.approx(5.0 * 0.9 / 7)
    got = quantize_int_static(x, scale, 4)
    ref = [[min(max(round(float(v / scale)), -7), 7) * float(scale) for v in r] for r in x]
    torch.testing.assert_close(got, torch.tensor(ref), rtol=0, atol=1e-6)
    cfg = ActQuantConfig("int", 4, "tensor")
    assert torch.equal(fake_quantize_activations(x, cfg, scale), got)
    with pytest.raises(ConfigError):
        fake_quantize_activations(x, cfg)


def test_clip_search_is_the_argmin_of_enumerated_errors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen) ** 3  # heavy tails: static clipping pays at 4 bits
    w = torch.randn(16, 32, generator=gen)
    grid = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    for cfg in (ActQuantConfig("int", 4), ActQuantConfig("int", 4, "tensor")):
        ratio, errors = search_clip_ratio(x, w, cfg, grid=grid)
        ref = []
        for c in grid:
            if cfg.granularity == "token":
                xq = torch.tensor([_ref_int_row(r, 4, c) for r in x])
            else:
                s = float(x.abs().max()) * c / 7
                xq = torch.tensor(
                    [[min(max(round(float(v) / s), -7), 7) * s for v in r] for r in x]
                )
            out, out_q = x.double() @ w.double().T, xq.double() @ w.double().T
            ref.append(float(((out - out_q) ** 2).sum() / (out**2).sum()))
        torch.testing.assert_close(torch.tensor(errors), torch.tensor(ref), rtol=1e-3, atol=1e-7)
        assert ratio == grid[min(range(len(grid)), key=ref.__getitem__)]
        if cfg.granularity == "tensor":
            assert ratio < 1 and errors[grid.index(ratio)] < 0.9 * errors[0]


def test_config_validation():
    for bad in (
        {"fmt": "int4"},
        {"bits": 1},
        {"clip_ratio": 0.0},
        {"fmt": "fp8", "granularity": "tensor"},
    ):
        with pytest.raises(ConfigError):
            ActQuantConfig(**bad)
    x = torch.randn(3, 4)
    assert fake_quantize_activations(x, None) is x

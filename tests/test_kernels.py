"""QuantLinear and its backends against the fake-quantized (dequantized float) reference."""

import pytest
import torch
import torch.nn.functional as F

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.kernels import W4_AUTO, QuantLinear, auto_backend, backends, pack_codes, unpack_codes
from faircalib.kernels.backends import (
    fp8_quantize,
    int4_cuda_uint8,
    int4_scales_and_zeros,
    quantize_rows_int8,
)
from faircalib.quant.primitives import (
    compute_qparams,
    dequantize,
    quantize,
    quantize_activations_per_token,
)

SCHEMES = [(b, g, s) for b in (4, 8) for g in (32, 64, 128, None) for s in (True, False)]


def quantized(out_f: int, in_f: int, bits: int, group: int | None, sym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=sym))
    codes = quantize(w, qp)
    return codes, qp, dequantize(codes, qp)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm())


def reference(x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None = None):
    """float64 x @ W_hat.T (+ bias) for the (already rounded) x."""
    y = x.double() @ w_hat.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_code_packing_round_trips_including_odd_widths(bits):
    gen = torch.Generator().manual_seed(bits)
    for in_f in (7, 64):
        codes = torch.randint(0, 2**bits, (5, in_f), generator=gen, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.shape == (5, (in_f + 1) // 2 if bits <= 4 else in_f)
        assert torch.equal(unpack_codes(packed, bits, in_f), codes)


@pytest.mark.parametrize(("bits", "group", "sym"), SCHEMES)
def test_dequant_backend_equals_fake_quant_output(bits, group, sym):
    codes, qp, w_hat = quantized(48, 256, bits, group, sym)
    bias = torch.randn(48)
    layer = QuantLinear.from_codes(codes, qp, bias=bias, backend="dequant")
    x = torch.randn(2, 7, 256)
    y = layer(x)
    assert y.shape == (2, 7, 48)
    assert rel_err(y, F.linear(x, w_hat, bias)) <= 1e-5
    # the layer stores the codes losslessly
    assert torch.equal(layer.codes(), codes)
    assert torch.equal(layer.dequantized_weight(), w_hat)


def test_auto_on_fp32_cpu_is_bit_identical_to_fake_quant():
    codes, qp, w_hat = quantized(64, 128, 4, 32, False)
    bias = torch.randn(64)
    layer = QuantLinear.from_codes(codes, qp, bias=bias)
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), F.linear(x, w_hat, bias))
    assert layer.last_backend == "dequant"


@pytest.mark.parametrize(
    ("group", "sym"), [(g, s) for g in (32, 64, 128, None) for s in (True, False)]
)
def test_int4_cpu_kernel_matches_reference(group, sym):
    codes, qp, w_hat = quantized(64, 256, 4, group, sym, seed=1)
    layer = QuantLinear.from_codes(codes, qp, backend="int4_cpu")
    for m in (1, 5, 64):
        x = torch.randn(m, 256).bfloat16()  # the kernel's input dtype; compare on rounded x
        y = layer(x)
        assert y.dtype == torch.bfloat16 and layer.last_backend == "int4_cpu"
        assert rel_err(y, reference(x, w_hat)) <= 1e-2


@pytest.mark.parametrize("bits", [2, 3])
def test_int4_cpu_kernel_runs_lower_bit_codes_centered(bits):
    codes, qp, w_hat = quantized(32, 128, bits, 32, False, seed=bits)
    layer = QuantLinear.from_codes(codes, qp, backend="int4_cpu")
    x = torch.randn(9, 128).bfloat16()
    # centering keeps the float-domain zero small: error stays at the bf16 level (< 1e-2)
    assert rel_err(layer(x), reference(x, w_hat)) <= 1e-2


def test_int4_float_zero_convention():
    """torch's int4 kernels compute (q - 8) * s + z; ours is s * (q - zero)."""
    scale = torch.tensor([[0.5, 2.0]])
    zero = torch.tensor([[3.0, 12.0]])
    sz = int4_scales_and_zeros(scale, zero, 32, 64, torch.float32)  # [G=2, out=1, 2]
    assert sz.shape == (2, 1, 2)
    for g in range(2):
        s, z = sz[g, 0]
        for q in (0, 7, 15):
            assert float((q - 8) * s + z) == pytest.approx(float(scale[0, g] * (q - zero[0, g])))


def test_int4_cuda_layout_puts_even_columns_in_high_nibble():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 9, 6]], dtype=torch.uint8)
    packed = int4_cuda_uint8(codes)
    assert torch.equal(packed >> 4, codes[:, 0::2])
    assert torch.equal(packed & 0xF, codes[:, 1::2])


def test_auto_rule_by_device_dtype_and_m(monkeypatch):
    codes, qp, _ = quantized(64, 256, 4, 128, False)
    layer = QuantLinear.from_codes(codes, qp)
    bf16, fp32 = torch.bfloat16, torch.float32
    rows = W4_AUTO["cuda"]
    gemv, small, middle = rows[0][0], rows[1][0], 1024
    monkeypatch.setattr(backends, "_HAS_TRITON", True)  # the rule only; no kernel runs
    # every M lands in the row whose bound first exceeds it, and runs that row's first backend
    # that can run the layer (the CUDA GEMV is not built here: torch's int4 kernel)
    assert auto_backend(layer, "cuda", bf16, 1) == rows[0][1][1] == "int4_cuda"
    assert auto_backend(layer, "cuda", bf16, gemv) == rows[1][1][0]
    assert auto_backend(layer, "cuda", bf16, small - 1) == rows[1][1][0]
    assert auto_backend(layer, "cuda", bf16, small) == rows[2][1][0]
    # M = 33..4096: CUTLASS's W4A16 GEMM where its library loads, else what ran before it
    monkeypatch.setattr(backends, "_cutlass_common", lambda *a: "not built here")
    assert auto_backend(layer, "cuda", bf16, 40) == "triton_w4"
    assert auto_backend(layer, "cuda", bf16, middle) == "triton_dq"
    monkeypatch.setattr(backends, "_cutlass_common", lambda *a: None)
    monkeypatch.setattr(backends, "_cutlass_library", lambda load: None)  # built and loadable
    wide = QuantLinear.from_codes(*quantized(1024, 256, 4, 128, False)[:2])
    for m in (33, 64, 65, middle, 4096):
        assert auto_backend(wide, "cuda", bf16, m) == "cutlass_w4", m
    assert auto_backend(wide, "cuda", bf16, 32) == rows[2][1][0]  # not at M <= 32
    # M = 1..8 on the GEMV once built, for layers of 1024 outputs and more
    for m in (1, gemv - 1):
        assert auto_backend(wide, "cuda", bf16, m) == "cuda_gemv", m
        assert auto_backend(layer, "cuda", bf16, m) == "int4_cuda", m
    assert auto_backend(wide, "cuda", bf16, gemv) == "int4_cuda"
    assert auto_backend(wide, "cuda", bf16, 8192) == "triton_dq"  # past the measured grid
    # 64 outputs: narrower than any layer CUTLASS was measured faster on (Dream's 512-wide K / V)
    assert auto_backend(layer, "cuda", bf16, middle) == "triton_dq"
    odd_group = QuantLinear.from_codes(*quantized(1024, 256, 4, 32, False)[:2])  # group 32 < 64
    assert auto_backend(odd_group, "cuda", bf16, middle) == "triton_dq"
    w8 = QuantLinear.from_codes(*quantized(1024, 256, 8, None, True)[:2], act_bits=8)
    assert auto_backend(w8, "cuda", bf16, 256) == "cutlass_int8"
    assert auto_backend(w8, "cuda", bf16, 255) == "int8_w8a8"
    w8_narrow = QuantLinear.from_codes(*quantized(512, 256, 8, None, True)[:2], act_bits=8)
    assert auto_backend(w8_narrow, "cuda", bf16, 512) == "int8_w8a8"
    monkeypatch.setattr(backends, "_cutlass_common", lambda *a: "not built here")
    # without triton: torch's int4 kernel at small M, dequantize + cuBLAS above
    monkeypatch.setattr(backends, "_HAS_TRITON", False)  # CI: triton is an optional extra
    assert auto_backend(layer, "cuda", bf16, 1) == "int4_cuda"
    assert auto_backend(layer, "cuda", bf16, 4096) == "dequant"
    monkeypatch.undo()
    assert auto_backend(layer, "cpu", bf16, 4096) == "int4_cpu"  # CPU crossover: none
    assert auto_backend(layer, "cpu", fp32, 1) == "dequant"  # fp32 stays exact
    odd = QuantLinear.from_codes(*quantized(24, 256, 4, 128, False)[:2])  # 24 % 16 != 0
    assert auto_backend(odd, "cpu", bf16, 1) == "dequant"
    w8 = QuantLinear.from_codes(*quantized(64, 256, 8, None, True)[:2], act_bits=8)
    monkeypatch.setattr(backends, "_HAS_TRITON", False)  # W8A8_AUTO's fallback: torch._int_mm
    assert auto_backend(w8, "cuda", bf16, 512) == "int8"
    assert auto_backend(w8, "cuda", bf16, 8) == "dequant"  # _int_mm needs M > 16 on CUDA
    monkeypatch.undo()
    assert auto_backend(w8, "cpu", fp32, 1) == "dequant"  # CPU fp32: the bit-exact path


def test_explicit_backend_that_cannot_run_raises():
    codes, qp, _ = quantized(64, 256, 8, 128, False)
    layer = QuantLinear.from_codes(codes, qp, backend="int4_cpu")
    with pytest.raises(ConfigError, match="at most 4 bits"):
        layer(torch.randn(2, 256).bfloat16())
    with pytest.raises(ConfigError, match="unknown QuantLinear backend"):
        QuantLinear.from_codes(codes, qp, backend="marlin")


def test_smoothing_and_activation_quant_match_fake_quant():
    codes, qp, w_hat = quantized(64, 128, 8, None, True)
    s = torch.rand(128) + 0.5
    bias = torch.randn(64)
    x = torch.randn(4, 6, 128)
    x_q = quantize_activations_per_token(x / s, 8)
    ref = F.linear(x_q, w_hat, bias)
    exact = QuantLinear.from_codes(
        codes, qp, bias=bias, input_scale=s, act_bits=8, backend="dequant"
    )
    assert rel_err(exact(x), ref) <= 1e-5
    # W8A8 through torch._int_mm: integer accumulation, same grid -> same result
    int8 = QuantLinear.from_codes(codes, qp, bias=bias, input_scale=s, act_bits=8, backend="int8")
    assert rel_err(int8(x), ref) <= 1e-5 and int8.last_backend == "int8"


def test_int8_activation_grid_is_the_fake_quant_grid():
    x = torch.randn(5, 32) * torch.logspace(-3, 2, 5)[:, None]
    q, scale = quantize_rows_int8(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.equal((q.float() * scale), quantize_activations_per_token(x, 8))


def test_fp8_backend_matches_its_e4m3_reference_and_the_float_layer():
    codes, qp, w_hat = quantized(64, 128, 8, None, True, seed=3)
    layer = QuantLinear.from_codes(codes, qp, backend="fp8")
    x = torch.randn(16, 128)
    y = layer(x)
    w8, ws = fp8_quantize(w_hat)
    x8, xs = fp8_quantize(x)
    exact_fp8 = (x8.double() * xs.double()) @ (w8.double() * ws.double()).T
    assert rel_err(y, exact_fp8) <= 1e-2  # the kernel computes what it should (bf16 output)
    assert rel_err(y, reference(x, w_hat)) <= 8e-2  # e4m3 rounding of weights and activations


def test_prepared_layouts_follow_dtype_and_are_cleared_on_move():
    codes, qp, w_hat = quantized(32, 64, 4, 32, True)
    layer = QuantLinear.from_codes(codes, qp, cache_dequant=True)
    layer(torch.randn(2, 64))
    layer(torch.randn(2, 64).bfloat16())
    assert {k[0] for k in layer._prepared} == {"dequant", "int4_cpu"}
    layer.to("cpu")
    assert layer._prepared == {}


def test_state_dict_round_trip_and_invalid_codes():
    codes, qp, w_hat = quantized(32, 64, 4, 32, False)
    a = QuantLinear.from_codes(codes, qp, bias=torch.randn(32), input_scale=torch.rand(64) + 1)
    b = QuantLinear(64, 32, bits=4, group_size=32, symmetric=False, bias=True, input_scale=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ConfigError, match="outside"):
        QuantLinear.from_codes(codes.int() + 16, qp)
    bad = compute_qparams(torch.randn(32, 64), QuantConfig(bits=4, group_size=32, symmetric=False))
    bad.scale[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="finite and positive"):
        QuantLinear.from_codes(codes, bad)
    with pytest.raises(ConfigError, match="does not divide"):
        QuantLinear(100, 8, bits=4, group_size=32, symmetric=True)


def test_autocast_dtype_drives_the_choice_like_nn_linear():
    codes, qp, w_hat = quantized(64, 128, 4, 64, False)
    layer = QuantLinear.from_codes(codes, qp)
    x = torch.randn(4, 128)  # float32 in, as the model's norms produce it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert layer.last_backend == "int4_cpu" and y.dtype == torch.bfloat16
    assert rel_err(y, reference(x.bfloat16(), w_hat)) <= 1e-2


def test_from_result_takes_a_quantizer_output():
    from faircalib.quant import quantize_rtn

    w = torch.randn(32, 64)
    result = quantize_rtn(w, QuantConfig(bits=4, group_size=32, symmetric=False))
    layer = QuantLinear.from_result(result)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), F.linear(x, result.weight))

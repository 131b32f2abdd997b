"""The Triton W8A8 (FP8, INT8) and W4A8 kernels and their QuantLinear backends, run by Triton's
CPU interpreter against float64 references of the same quantized math."""

import math
import textwrap
from unittest.mock import patch

import pytest
import torch

from faircalib.config import QuantConfig
from faircalib.kernels import QuantLinear, auto_backend, backends
from faircalib.quant.primitives import compute_qparams, quantize
from interpreted import named_floats, run_interpreted

pytest.importorskip("triton")

# The interpreter must be on before triton decorates the kernels: the checks run in a fresh
# interpreter and print one "name value" line per measured worst case.
CHECK = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from faircalib.config import QuantConfig
    from faircalib.kernels import QuantLinear
    from faircalib.kernels.backends import fp8_quantize, quantize_rows_int8
    from faircalib.kernels import triton_w8a8
    from faircalib.kernels.triton_w4 import pack_tiles
    from faircalib.kernels.triton_w8a8 import (
        quantize_rows, w4a8_layout, w4a8_matmul, w8a8_matmul, w8a8_matmul_tma)
    from faircalib.quant.primitives import (
        compute_qparams, dequantize, quantize, quantize_activations_per_token)

    def rel(y, ref):
        return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-300))

    worst = {}
    def note(name, value):
        worst[name] = max(worst.get(name, 0.0), value)

    gen = torch.Generator().manual_seed(0)
    # per-token quantization: bit-identical to the torch grids, zero rows, ragged K, M = 1, and
    # a row whose abs-max (3e-9) lies below the shared floor (ACT_ABSMAX_FLOOR = 1e-8)
    # rows held in registers (the launch rule's limit), then rows over 128 wide in passes
    whole_rule = triton_w8a8.WHOLE_ROW_MAX_K
    for whole_max in (whole_rule, 128):
        triton_w8a8.WHOLE_ROW_MAX_K = whole_max
        for m, k in ((1, 64), (6, 200), (3, 1000)):
            x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]
            x[m // 2] = 0.0
            x[m // 2, ::2] = -0.0  # e4m3 keeps a zero's sign
            if m > 2:
                x[-1] *= 3e-9 / x[-1].abs().max()
            for kind, ref_fn in (("int8", quantize_rows_int8), ("fp8", fp8_quantize)):
                q, s = quantize_rows(x.half() if kind == "int8" else x, kind)
                rq, rs = ref_fn(x.half() if kind == "int8" else x)
                assert torch.equal(s, rs), (kind, k, whole_max)
                assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), (kind, k, whole_max)
            q, s = quantize_rows(x, "int8")
            assert torch.equal(q.float() * s, quantize_activations_per_token(x, 8))
    triton_w8a8.WHOLE_ROW_MAX_K = whole_rule
    # a row whose abs-max overflowed (scale inf): its finite values give 0, as x / inf does
    x = torch.randn(3, 200, generator=gen)
    x[1, 7] = float("inf")
    for kind, ref_fn in (("int8", quantize_rows_int8), ("fp8", fp8_quantize)):
        q, s = quantize_rows(x, kind)
        rq, rs = ref_fn(x)
        finite = x.isfinite()
        assert torch.equal(s, rs) and torch.isinf(s[1]).all(), kind
        assert torch.equal(q.view(torch.uint8)[finite], rq.view(torch.uint8)[finite]), kind
    q, s = quantize_rows(torch.zeros(0, 64), "fp8")
    assert q.shape == (0, 64) and s.shape == (0, 1)

    # W8A8 GEMMs: M = 1, ragged M/N, K not a multiple of BLOCK_K (32), zero rows, M = 0
    for m, n, k in ((1, 32, 64), (19, 40, 200), (5, 48, 96), (0, 32, 64)):
        x = torch.randn(m, k, generator=gen)
        if m > 2:
            x[2] = 0.0
        w = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        for kind in ("int8", "fp8"):
            a8, a_s = quantize_rows(x, kind)
            if kind == "int8":
                w8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
                w_s = torch.rand(n, generator=gen) + 0.01
            else:
                w8, w_s = fp8_quantize(w)
            acc = a8.double() @ w8.double().T  # exact for both (int: < 2^53; e4m3 products)
            ref = acc * a_s.double() * w_s.double().reshape(1, -1)
            for out in (torch.float32, torch.float16):
                y = w8a8_matmul(a8, a_s, w8, w_s, out)
                assert y.shape == (m, n) and y.dtype == out
                if m:
                    note(f"w8a8_{kind}_{out}", rel(y, ref))
            if m:
                y = w8a8_matmul(a8, a_s, w8, w_s, torch.float32, bias)
                note(f"w8a8_{kind}_bias", rel(y, ref + bias.double()))
                if kind == "int8":  # unit scales: the int32 accumulator itself, exactly
                    ones_m, ones_n = torch.ones(m, 1), torch.ones(n)
                    y = w8a8_matmul(a8, ones_m, w8, ones_n, torch.float32)
                    assert torch.equal(y.double(), acc), "int8 accumulation is not exact"
                meta = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64}  # another tile, ragged K
                note(f"w8a8_{kind}_tile", rel(w8a8_matmul(a8, a_s, w8, w_s, torch.float32,
                                                         meta=meta), ref))
                # split K, reduced in the kernel by each tile's last program: INT8 gives the
                # unsplit bits (int32 partials), FP8 the reference within float32 rounding,
                # splits with empty K ranges included; the counters end at zero each call
                from faircalib.kernels import triton_w8a8 as kw
                tiny = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
                whole = w8a8_matmul(a8, a_s, w8, w_s, torch.float32, bias, meta=tiny)
                for split in (2, 3, 8):
                    y = w8a8_matmul(a8, a_s, w8, w_s, torch.float32, bias,
                                    meta={**tiny, "SPLIT_K": split})
                    note(f"w8a8_split_{kind}", rel(y, ref + bias.double()))
                    assert kind == "fp8" or torch.equal(y, whole), (kind, split)
                    assert not any(c.any() for c in kw._counters.values()), "counters left set"
                # a weight whose K is not its unit-stride dimension gives the same product
                w8_strided = w8.T.contiguous().T
                assert w8_strided.stride(-1) != 1 and torch.equal(
                    w8a8_matmul(a8, a_s, w8_strided, w_s, torch.float32),
                    w8a8_matmul(a8, a_s, w8, w_s, torch.float32))
                # the persistent TMA GEMM: 3 programs walk the tiles (ragged M/N/K zero-filled);
                # a descriptor's rows must be 16-byte aligned, so K = 200 is refused
                if k % 16:
                    try:
                        w8a8_matmul_tma(a8, a_s, w8, w_s, torch.float32)
                        raise AssertionError("K = 200 was not refused")
                    except ValueError as exc:
                        assert "divisible by 16" in str(exc)
                    continue
                for meta in ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32},
                             {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}):
                    y = w8a8_matmul_tma(a8, a_s, w8, w_s, torch.float32, bias, meta=meta)
                    note(f"w8a8_tma_{kind}_bias", rel(y, ref + bias.double()))
                if kind == "int8":
                    y = w8a8_matmul_tma(a8, ones_m, w8, ones_n, torch.float32, meta=meta)
                    assert torch.equal(y.double(), acc), "TMA int8 accumulation is not exact"
            else:
                assert w8a8_matmul_tma(a8, a_s, w8, w_s, torch.float32).shape == (0, n)

    # W4A8: groups 32/64/128/256 and per-channel, asym/sym, 3-bit codes, M = 1 and ragged
    cases = [(1, 40, 128, 32, False, 4), (13, 48, 256, 64, True, 4), (7, 32, 256, 128, False, 4),
             (5, 40, 512, 128, True, 4), (9, 32, 256, None, False, 4), (4, 32, 128, 32, False, 3)]
    for m, n, k, group, sym, bits in cases:
        w = torch.randn(n, k, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=sym))
        codes = quantize(w, qp)
        w_hat = dequantize(codes, qp).double()
        packed, (s_t, z_t) = pack_tiles(codes), w4a8_layout(qp.scale, qp.zero)
        x = torch.randn(m, k, generator=gen)
        for kind in ("int8", "fp8"):
            a8, a_s = quantize_rows(x, kind)
            ref = (a8.double() * a_s.double()) @ w_hat.T
            y = w4a8_matmul(a8, a_s, packed, s_t, z_t, torch.float32)
            note(f"w4a8_{kind}", rel(y, ref))
        assert w4a8_matmul(a8[:0], a_s[:0], packed, s_t, z_t, torch.float32).shape == (0, n)

    # QuantLinear backends against their reference paths
    x3 = torch.randn(2, 5, 256, generator=gen)
    x3[0, 1] = 0.0
    in_scale = torch.rand(256, generator=gen) + 0.5
    for dtype in (torch.float32, torch.float16):
        x = x3.to(dtype)
        # int8_w8a8 == the fake-quant W8A8 layer (dequant backend), with smoothing and bias
        w = torch.randn(40, 256, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
        codes, bias = quantize(w, qp), torch.randn(40, generator=gen)
        kw = dict(bias=bias, input_scale=in_scale, act_bits=8)
        ref = QuantLinear.from_codes(codes, qp, backend="dequant", **kw)(x3).double()
        layer = QuantLinear.from_codes(codes, qp, backend="int8_w8a8", **kw)
        y = layer(x)
        assert layer.last_backend == "int8_w8a8" and y.dtype == dtype and y.shape == (2, 5, 40)
        note(f"ql_int8_w8a8_{dtype}", rel(y, ref))
        # its int8 layout holds the codes: the plain copy is freed, state_dict unchanged
        assert layer.qweight.numel() == 0 and torch.equal(layer.codes(), codes)
        assert torch.equal(layer.state_dict()["qweight"], codes)
        # fp8_w8a8 == the float64 e4m3 math of the `fp8` backend
        layer = QuantLinear.from_codes(codes, qp, backend="fp8_w8a8", bias=bias)
        y = layer(x)
        x8, xs = fp8_quantize(x.reshape(-1, 256))
        w8, ws = fp8_quantize(dequantize(codes, qp))
        ref = (x8.double() * xs.double()) @ (w8.double() * ws.double()).T + bias.double()
        note(f"ql_fp8_w8a8_{dtype}", rel(y.reshape(-1, 40), ref))
        # w4a8 == the fake-quant W4A8 layer; w4a8_fp8 == its float64 e4m3-activation math
        w = torch.randn(48, 256, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=4, group_size=64, symmetric=False))
        codes = quantize(w, qp)
        ref = QuantLinear.from_codes(codes, qp, backend="dequant", **kw | {"bias": None})
        ref = ref(x3).double()
        layer = QuantLinear.from_codes(codes, qp, backend="w4a8", input_scale=in_scale,
                                       act_bits=8)
        note(f"ql_w4a8_{dtype}", rel(layer(x), ref))
        assert layer.qweight.numel() == 0 and torch.equal(layer.codes(), codes)
        bias4 = torch.randn(48, generator=gen)
        layer = QuantLinear.from_codes(codes, qp, backend="w4a8_fp8", bias=bias4)
        y = layer(x).reshape(-1, 48)
        x8, xs = fp8_quantize(x.reshape(-1, 256))
        ref = (x8.double() * xs.double()) @ dequantize(codes, qp).double().T
        note(f"ql_w4a8_fp8_{dtype}", rel(y, ref + layer.bias.double()))
    for name, value in sorted(worst.items()):
        print(name, value)
    """
)

# worst relative error allowed per check: fp32 outputs carry only the epilogue's float32
# rounding; fp16 outputs (and fp16 inputs, for QuantLinear) their half rounding
TOLERANCES = {"float32": 1e-6, "float16": 1e-3}


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, float]:
    return named_floats(run_interpreted(CHECK))


def test_every_kernel_and_backend_was_checked(interpreted_results):
    names = set(interpreted_results)
    for kind in ("int8", "fp8"):
        assert {f"w8a8_{kind}_bias", f"w8a8_{kind}_tile", f"w4a8_{kind}"} <= names
        assert f"w8a8_split_{kind}" in names
        assert f"w8a8_tma_{kind}_bias" in names
    for backend in ("int8_w8a8", "fp8_w8a8", "w4a8", "w4a8_fp8"):
        assert any(n.startswith(f"ql_{backend}_torch") for n in names), backend


def test_kernels_match_float64_reference_of_the_same_quantized_math(interpreted_results):
    for name, err in interpreted_results.items():
        tol = TOLERANCES["float16"] if "float16" in name else TOLERANCES["float32"]
        if name.startswith("ql_"):
            # fp32: float32 smoothing / reference-layer rounding; fp16: the input, smoothed and
            # quantized in half precision against an fp32 reference, moves a few grid points
            tol = 1e-2 if "float16" in name else 1e-5
        assert err <= tol, (name, err)


def test_auto_rule_for_8bit_activations(monkeypatch):
    bf16 = torch.bfloat16
    monkeypatch.setattr(backends, "_HAS_TRITON", True)  # the rule only; no kernel runs
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    qp8 = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
    qp4 = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    w8 = QuantLinear.from_codes(quantize(w, qp8), qp8, act_bits=8)
    w4 = QuantLinear.from_codes(quantize(w, qp4), qp4, act_bits=8)
    w4_weight_only = QuantLinear.from_codes(quantize(w, qp4), qp4)
    # without the CUTLASS library: the Triton INT8 GEMM for W8A8 at every M (M <= 16 too,
    # where torch._int_mm cannot run); with it, CUTLASS's from M = 256
    monkeypatch.setattr(backends, "_cutlass_common", lambda *a: "not built here")
    assert auto_backend(w8, "cuda", bf16, 512) == "int8_w8a8"
    assert auto_backend(w8, "cuda", bf16, 1) == "int8_w8a8"
    # W4 weights with 8-bit activations: the W4A16 rows, whose CUTLASS kernel does not
    # quantize activations: dequantize + cuBLAS with the activations fake-quantized
    monkeypatch.setattr(backends, "_cutlass_common", lambda *a: None)
    monkeypatch.setattr(backends, "_cutlass_library", lambda load: None)  # built here
    assert auto_backend(w8, "cuda", bf16, 512) == "int8_w8a8"  # 64 outputs: too narrow
    w_wide = torch.randn(1024, 256, generator=gen)
    qp_wide = compute_qparams(w_wide, QuantConfig(bits=8, group_size=None, symmetric=True))
    wide8 = QuantLinear.from_codes(quantize(w_wide, qp_wide), qp_wide, act_bits=8)
    assert auto_backend(wide8, "cuda", bf16, 512) == "cutlass_int8"
    assert auto_backend(w8, "cuda", bf16, 1) == "int8_w8a8"
    assert auto_backend(w4, "cuda", bf16, 4096) == "triton_dq"
    # a W4A8 row from M = 256 on: the fused kernel takes over there
    monkeypatch.setitem(backends.W4A8_AUTO_MIN_M, "cuda", 256)
    assert auto_backend(w4, "cuda", bf16, 255) == "triton_dq"
    assert auto_backend(w4, "cuda", bf16, 256) == "w4a8"
    # a weight-only layer never gets 8-bit activations from `auto`, nor does the CPU
    assert auto_backend(w4_weight_only, "cuda", bf16, 4096) != "w4a8"
    assert auto_backend(w8, "cpu", torch.float32, 512) == "dequant"


def test_backends_refuse_layers_they_cannot_compute(monkeypatch):
    monkeypatch.setattr(backends, "_HAS_TRITON", True)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    g16 = QuantLinear(256, 64, bits=4, group_size=16, symmetric=False)
    assert "group size of 32 or 64" in backends.supports(g16, "w4a8", "cuda", torch.bfloat16, 512)
    # a group that straddles the kernel's 128-k tiles would be scaled wrongly: refused too
    g192 = QuantLinear(384, 64, bits=4, group_size=192, symmetric=False)
    assert "got 192" in backends.supports(g192, "w4a8", "cuda", torch.bfloat16, 512)
    qp = compute_qparams(w, QuantConfig(bits=8, group_size=128, symmetric=True))
    grouped8 = QuantLinear.from_codes(quantize(w, qp), qp, act_bits=8)
    assert "per-channel" in backends.supports(grouped8, "int8_w8a8", "cuda", torch.bfloat16, 64)
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=True))
    a4 = QuantLinear.from_codes(quantize(w, qp), qp, act_bits=4)
    assert "act_bits=4" in backends.supports(a4, "w4a8", "cuda", torch.bfloat16, 64)
    # fp8_w8a8 runs on the CPU too (torch's quantizer and _scaled_mm's CPU kernel), but
    # _scaled_mm takes in and out features divisible by 16 only
    assert backends.supports(a4, "fp8_w8a8", "cpu", torch.bfloat16, 64) is None
    ragged = QuantLinear(256, 40, bits=8, group_size=None, symmetric=True)
    assert "divisible by 16" in backends.supports(ragged, "fp8_w8a8", "cpu", torch.bfloat16, 64)
    assert "cpu or cuda" in backends.supports(a4, "fp8_w8a8", "mps", torch.bfloat16, 64)


def test_kernels_compile_for_hopper():
    """The interpreter runs the kernels as Python; the GPU compiler is stricter (no imports
    inside @triton.jit, constexpr-only branches): compile each kernel for sm_90 (no GPU needed,
    ptxas ships with triton)."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_w8a8 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    target = GPUTarget("cuda", 90, 32)

    def compile_(fn, sig: dict, consts: dict, **options) -> None:
        sig = {**sig, **dict.fromkeys(consts, "constexpr")}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        triton.compile(src, target=target, options=options)

    for kind, dt in (("int8", "*i8"), ("fp8", "*fp8e4nv")):
        is_int8 = kind == "int8"
        rows = {"x_ptr": "*bf16", "q_ptr": dt, "s_ptr": "*fp32", "K": "i32"}
        rows |= {"stride_xm": "i32", "stride_qm": "i32"}
        norm = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "q_ptr": dt}
        norm |= {"s_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
        norm |= {"stride_qm": "i32", "eps": "fp32"}
        swiglu = {"g_ptr": "*bf16", "u_ptr": "*bf16", "y_ptr": "*bf16", "q_ptr": dt}
        swiglu |= {"s_ptr": "*fp32", "K": "i32", "stride_gm": "i32", "stride_um": "i32"}
        swiglu |= {"stride_ym": "i32", "stride_qm": "i32"}
        # the row quantizers with rows in registers (the widest the launch rule holds) and in
        # passes, each with the launch rule's warps
        for width in (k.WHOLE_ROW_MAX_K, 4 * k.WHOLE_ROW_MAX_K):
            with patch.object(k, "INTERPRETED", False):
                args = k._launch_args(width)
            warps = args.pop("num_warps")
            for fn, sig in ((k._quant_rows_kernel, rows), (k._norm_quant_kernel, norm),
                            (k._swiglu_quant_kernel, swiglu)):  # fmt: skip
                compile_(fn, sig, {"IS_INT8": is_int8, **args}, num_warps=warps)
        gemm = {"a_ptr": dt, "w_ptr": dt, "as_ptr": "*fp32", "ws_ptr": "*fp32", "b_ptr": "*bf16"}
        gemm |= {"y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32"}
        gemm |= {"stride_wn": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}
        gemm |= {"part_ptr": "*i32" if is_int8 else "*fp32", "cnt_ptr": "*i32"}
        tile = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}
        flags = {"IS_INT8": is_int8, "HAS_BIAS": True, "EVEN_K": False}
        for split in (1, 4):  # with split K: the partials, the counter atomics, the reduction
            compile_(k._w8a8_kernel, gemm, flags | tile | {"SPLIT_K": split})
        w4 = {"a_ptr": dt, "q_ptr": "*i32", "as_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*i32"}
        w4 |= {"y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32"}
        w4 |= {"stride_ym": "i32", "M_BUCKET": "i32"}
        for group in (32, 256):
            consts = {"b_ptr": None, "GROUP_SIZE": group, "IS_INT8": is_int8, "HAS_BIAS": False}
            compile_(k._w4a8_kernel, w4, consts | {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8})

    # GPTQ's fused column sweep (quant/gptq_triton.py), launched without FMA contraction so it
    # matches torch's rounded product then difference: the PTX must hold no float32 FMA and
    # IEEE divisions only.
    from faircalib.quant import gptq_triton

    sweep = dict.fromkeys(("w_ptr", "u_ptr", "s_ptr", "z_ptr", "q_ptr", "c_ptr", "e_ptr"), "*fp32")
    sweep |= dict.fromkeys(("n_rows", "n_cols", "c0", "c1", "stride_w", "stride_ur"), "i32")
    sweep |= dict.fromkeys(("stride_uc", "stride_sr", "stride_sc", "stride_zr", "stride_zc"), "i32")
    sweep |= dict.fromkeys(("stride_q", "stride_c", "stride_e"), "i32")
    for block_c in (32, 128, 256):
        consts = {"MAXQ": 15.0, "BLOCK_R": gptq_triton.tile_rows(block_c), "BLOCK_C": block_c}
        consts["USE_RINT"] = True
        src = ASTSource(
            fn=gptq_triton._gptq_sweep_kernel,
            signature={**sweep, **dict.fromkeys(consts, "constexpr")},
            constexprs=consts,
        )
        ptx = triton.compile(src, target=target, options={"enable_fp_fusion": False}).asm["ptx"]
        assert "fma.rn.f32" not in ptx and "div.full.f32" not in ptx and "div.rn.f32" in ptx


def test_large_m_w8a8_tiles_fit_hopper_shared_memory():
    """The autotuned tiles added for large M compile for sm_90 with pipelined (16-byte
    aligned) loads inside Hopper's 227 KB of shared memory: a tile over it would only ever be
    skipped by the autotuner, never timed."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_w8a8 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    sig = {"a_ptr": "*i8", "w_ptr": "*i8", "as_ptr": "*fp32", "ws_ptr": "*fp32", "b_ptr": "*bf16"}
    sig |= {"y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32"}
    sig |= {"stride_wn": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}
    sig |= {"part_ptr": "*i32", "cnt_ptr": "*i32"}
    names = list(k._w8a8_kernel.arg_names)
    aligned = [names.index(n) for n in ("a_ptr", "w_ptr", "y_ptr", "N", "K", "stride_am")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    large = [c for c in k._w8a8_configs() if c.num_stages == 4 or c.kwargs["BLOCK_K"] > 128]
    assert len(large) >= 3
    split = [({**c.kwargs, "SPLIT_K": 4}, c) for c in k._autotuned_w8a8_split.configs]
    for kwargs, cfg in [({**c.kwargs, "SPLIT_K": 1}, c) for c in large] + split:
        consts = {"IS_INT8": True, "HAS_BIAS": False, "EVEN_K": True, "GROUP_M": 8, **kwargs}
        src = ASTSource(
            fn=k._w8a8_kernel,
            signature={**sig, **dict.fromkeys(consts, "constexpr")},
            constexprs=consts,
            attrs=attrs,
        )
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert compiled.metadata.shared <= 232448, (cfg.kwargs, compiled.metadata.shared)


def test_tma_gemm_compiles_to_tensor_memory_copies_and_wgmma_for_hopper():
    """Every autotuned tile of the persistent TMA GEMM compiles for sm_90 to bulk tensor
    copies (TMA) feeding wgmma, inside Hopper's 227 KB of shared memory."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_w8a8 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    for el, is_int8 in (("i8", True), ("fp8e4nv", False)):
        for cfg in k._tma_configs():
            bm, bn, bk = (cfg.kwargs[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            sig = {"a_desc": f"tensordesc<{el}[{bm}, {bk}]>"}
            sig |= {"w_desc": f"tensordesc<{el}[{bn}, {bk}]>", "as_ptr": "*fp32"}
            sig |= {"ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32"}
            sig |= {"N": "i32", "K": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}
            consts = {"NUM_SMS": 132, "IS_INT8": is_int8, "HAS_BIAS": True, "GROUP_M": 8}
            consts |= cfg.kwargs
            src = ASTSource(
                fn=k._w8a8_tma_kernel,
                signature={**sig, **dict.fromkeys(consts, "constexpr")},
                constexprs=consts,
            )
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            ptx = compiled.asm["ptx"]
            assert "cp.async.bulk.tensor" in ptx and "wgmma" in ptx, cfg.kwargs
            assert compiled.metadata.shared <= 232448, (cfg.kwargs, compiled.metadata.shared)


def test_int8_gemm_takes_the_tma_kernel_at_large_m_and_falls_back_once(monkeypatch):
    """The routing of `int8_matmul` with both kernels stood in for: the TMA GEMM from
    INT8_TMA_MIN_M rows where it is supported and K % 16 == 0, else the pointer-load GEMM; a
    TMA failure warns once and the pointer-load GEMM serves every later call."""
    from faircalib.kernels import triton_w8a8 as k

    calls = []

    def tma(*args, **kwargs):
        calls.append("tma")
        return "tma"

    monkeypatch.setattr(k, "w8a8_matmul", lambda *a, **kw: calls.append("plain") or "plain")
    monkeypatch.setattr(k, "w8a8_matmul_tma", tma)
    monkeypatch.setattr(k, "tma_supported", lambda device: None)
    monkeypatch.setattr(k, "_tma_failed", [])
    big = torch.zeros(k.INT8_TMA_MIN_M, 64, dtype=torch.int8)
    w, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)

    def gemm(a: torch.Tensor, weight: torch.Tensor = w) -> str:
        return k.int8_matmul(a, torch.ones(a.shape[0]), weight, s, torch.float32)

    assert gemm(big) == "tma"
    assert gemm(big[:-1]) == "plain"  # below the measured M
    # 8 output columns: one 128-wide tile column of 8 row blocks, few tiles for a 132-SM GPU,
    # which keep `w8a8_matmul`'s small tiles (the persistent TMA grid would leave most SMs idle;
    # K = 1024 is too shallow to split)
    monkeypatch.setattr(k, "_device_sms", lambda device: 132)
    deep = torch.zeros(k.INT8_TMA_MIN_M, 1024, dtype=torch.int8)
    assert gemm(deep, torch.zeros(8, 1024, dtype=torch.int8)) == "plain"
    monkeypatch.setattr(k, "_device_sms", lambda device: 0)
    assert gemm(deep, torch.zeros(8, 1024, dtype=torch.int8)) == "tma"
    odd = torch.zeros(k.INT8_TMA_MIN_M, 24, dtype=torch.int8)
    assert gemm(odd, torch.zeros(8, 24, dtype=torch.int8)) == "plain"  # K % 16 != 0
    monkeypatch.setattr(k, "tma_supported", lambda device: "not Hopper")
    assert gemm(big) == "plain"
    monkeypatch.setattr(k, "tma_supported", lambda device: None)

    def broken(*args, **kwargs):
        calls.append("tma")
        raise RuntimeError("compile failed")

    monkeypatch.setattr(k, "w8a8_matmul_tma", broken)
    calls.clear()
    with pytest.warns(RuntimeWarning, match="INT8 TMA GEMM failed"):
        assert gemm(big) == "plain"
    assert gemm(big) == "plain"
    assert calls == ["tma", "plain", "plain"]  # tried once, then never again


def test_int8_gemm_refuses_mismatched_operands_without_switching_tma_off(monkeypatch):
    """A caller's shape error raises before the TMA try, so it neither reads out of bounds nor
    counts as a TMA failure; a misaligned contiguous view is copied for the descriptor."""
    from faircalib.kernels import triton_w8a8 as k

    monkeypatch.setattr(k, "tma_supported", lambda device: None)
    monkeypatch.setattr(k, "_tma_failed", [])
    a = torch.zeros(k.INT8_TMA_MIN_M, 64, dtype=torch.int8)
    w, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    bad = [(a, torch.ones(1), w, s), (a, torch.ones(len(a)), w[:, :48], s)]
    bad.append((a, torch.ones(len(a)), w, torch.ones(1)))  # a per-tensor scale
    for args in bad:
        with pytest.raises(ValueError, match="do not match"):
            k.int8_matmul(*args, torch.float32)
    assert k._tma_failed == []
    flat = torch.arange(17 * 16, dtype=torch.int8)
    odd = flat[1:].narrow(0, 0, 16 * 16).view(16, 16)  # contiguous, base 1 byte past aligned
    fixed = k._tma_operand(odd)
    assert fixed.data_ptr() % 16 == 0 and fixed.is_contiguous() and torch.equal(fixed, odd)
    aligned = flat[16:].view(16, 16)
    assert k._tma_operand(aligned) is aligned


def test_int8_w8a8_gemm_falls_back_to_triton_off_cuda_whatever_the_rule_says():
    """INT8_W8A8_GEMM names gemlite below M = 1024, but gemlite is a CUDA-only optional
    package: CPU tensors (and the interpreter runs of the tests) keep our Triton GEMM, and
    the rule's bounds rise to infinity so every M has a kernel."""
    from faircalib.kernels.backends import INT8_W8A8_GEMM, int8_w8a8_gemm

    bounds = [bound for bound, _ in INT8_W8A8_GEMM]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf
    assert {k for _, k in INT8_W8A8_GEMM} <= {"gemlite", "triton"}
    x = torch.zeros(4, 256)
    for m in (1, 16, 1023, 1024, 4096):
        assert int8_w8a8_gemm(m, 256, 256, x) == "triton"


@pytest.mark.parametrize(
    ("m", "n", "k", "split"),
    [
        (128, 4096, 14336, 4),  # an 8B MLP down projection at small M: 32 tiles of 128 x 128
        (256, 4096, 14336, 2),
        (1024, 4096, 14336, 1),  # 256 tiles: enough
        (16, 3584, 18944, 4),  # 28 tiles
        (16, 512, 8192, 8),  # 4 tiles; 8 ranges of 1024
        (16, 512, 4096, 1),  # shallow: smaller tiles instead (few_tiles)
        (1024, 512, 3584, 1),
        (1, 126464, 14336, 1),  # an LM head: tiles enough
    ],
)
def test_split_k_rule_fills_the_sms_without_short_ranges(m, n, k, split):
    from faircalib.kernels.triton_w8a8 import (
        MAX_SPLIT_K,
        MIN_K_PER_SPLIT,
        SPLIT_MIN_K,
        few_tiles,
        split_k_for,
    )

    got = split_k_for(m, n, k, 132)
    assert got == split
    tiles = -(-m // 128) * -(-n // 128)
    assert got == 1 or (tiles * got <= 132 and k // got >= MIN_K_PER_SPLIT and got <= MAX_SPLIT_K)
    assert got == 1 or (k >= SPLIT_MIN_K and few_tiles(m, n, 132))
    assert split_k_for(m, n, k, 0) == 1  # off CUDA


def test_small_tiles_are_autotuned_only_for_layers_of_few_tiles(monkeypatch):
    """The 64-column tiles enter the W8A8 autotuning only where the output's 128 x 128 tiles
    fill at most half the SMs (more candidates elsewhere only lengthen the tuning)."""
    from faircalib.kernels import triton_w8a8 as k

    monkeypatch.setattr(k, "_current_sms", lambda: 132)
    configs = k._autotuned_w8a8.configs

    def widths(m: int, n: int) -> set[int]:
        return {c.kwargs["BLOCK_N"] for c in k._prune_w8a8(configs, {"M": m, "N": n, "K": 3584})}

    assert 64 in widths(1024, 512)  # Dream-7B's K / V: 32 tiles
    assert 64 in widths(2048, 512)
    assert 64 not in widths(4096, 512)  # 128 tiles
    assert 64 not in widths(1024, 4096)
    monkeypatch.setattr(k, "_current_sms", lambda: 0)  # off CUDA: never few
    assert 64 not in widths(1024, 512)


def test_fp8_gemm_rule_takes_triton_where_it_splits_k(monkeypatch):
    """FP8 W8A8 runs torch._scaled_mm except for bf16 / fp16 layers of few output tiles on CUDA:
    deep ones, where our GEMM splits K, and narrow ones, where it takes smaller tiles (the H200
    sweep in benchmarks/results/kernels-split-k)."""
    from faircalib.kernels import triton_w8a8

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_w8a8, "_sm_count", lambda index: 132)
    gemm = backends.fp8_w8a8_gemm
    assert gemm(1024, 512, 3584) == "triton"  # narrow, 32 tiles
    assert gemm(4096, 512, 3584) == "scaled_mm"  # 128 tiles
    assert gemm(64, 4096, 14336) == "triton"  # deep: split K
    assert gemm(64, 4096, 4096) == "scaled_mm"  # neither deep nor narrow
    assert gemm(1024, 4096, 4096) == "scaled_mm"
    assert gemm(1024, 512, 3584, "cuda", torch.float32) == "scaled_mm"  # Triton: bf16 / fp16
    assert gemm(1024, 512, 3584, "cpu") == "scaled_mm"
    assert gemm(1024) == "scaled_mm"  # no shape: the M table
    # a shape _scaled_mm cannot take is refused at every M, also where our GEMM would run
    assert gemm(1024, 512, 3576) == "triton"
    for m in (1024, 4096):
        reason = backends.fp8_w8a8_support(3576, 512, "cuda", torch.bfloat16, m)
        assert "divisible by 16" in reason
    monkeypatch.setattr(backends, "FP8_SPLIT_K_TRITON", False)
    assert gemm(1024, 512, 3584) == "scaled_mm"


EVEN_K_CHECK = textwrap.dedent(
    """
    import torch
    from faircalib.kernels import triton_w8a8 as k

    gen = torch.Generator().manual_seed(3)
    deep = 0
    for sms in (0, 132):  # off CUDA, and an H200 (where few-tile layers keep 64-wide tiles)
        k._current_sms = lambda sms=sms: sms
        for m, n, depth in ((130, 256, 384), (40, 192, 896), (130, 256, 512), (7, 64, 640)):
            a8 = torch.randint(-127, 128, (m, depth), generator=gen, dtype=torch.int8)
            w8 = torch.randint(-127, 128, (n, depth), generator=gen, dtype=torch.int8)
            a_s, w_s = torch.rand(m, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
            exact = (a8.long() @ w8.long().T).double() * a_s.double()[:, None] * w_s.double()
            named = {"M": m, "N": n, "K": depth}
            for config in k._prune_w8a8(k._w8a8_configs(), named):
                tile = config.kwargs
                deep += tile["BLOCK_K"] == 256
                y = torch.empty(m, n)
                grid = k._grid(m, n)(tile)
                k._w8a8_kernel[grid](
                    a8, w8, a_s, w_s, None, y, m, n, depth, a8.stride(0), w8.stride(0),
                    y.stride(0), m, y, y, IS_INT8=True, HAS_BIAS=False,
                    EVEN_K=k._even_k(depth), **tile,
                )
                err = float((y.double() - exact).abs().max() / exact.abs().max())
                assert err < 1e-6, (m, n, depth, tile, err)
    print("deep_tiles", deep)
    """
)


def test_autotuned_w8a8_tiles_never_step_past_k():
    """Every tile the W8A8 autotuner may try for a shape, launched with the EVEN_K that
    `w8a8_matmul` passes it, computes the INT8 product exactly (against int64 matmul): a
    256-deep tile on K = 384 or 896 (K % 256 = 128) must not load unmasked past K. The 256-deep
    tiles do run where they divide K (512)."""
    out = named_floats(run_interpreted(EVEN_K_CHECK))
    assert out["deep_tiles"] >= 2


DIVIDE = textwrap.dedent(
    """
    import torch
    import triton
    import triton.language as tl
    from faircalib.kernels import triton_w8a8 as T

    @triton.jit
    def divide_rows(x_ptr, s_ptr, o_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = row * BLOCK + tl.arange(0, BLOCK)
        tl.store(o_ptr + cols, T._divide(tl.load(x_ptr + cols), tl.load(s_ptr + row)))

    gen = torch.Generator().manual_seed(3)
    rows, width = 768, 512
    # scales as the row quantizers make them (abs-max / 448 or / 127, the abs-max floored at
    # 1e-8) over 60 decades of abs-max, and random significands
    amax = torch.logspace(-30, 30, rows, dtype=torch.float64).float()
    amax = torch.maximum(amax * (1 + torch.rand(rows, generator=gen)), torch.tensor(1e-8))
    scale = amax / torch.where(torch.arange(rows) % 2 == 0, 448.0, 127.0)
    x = (torch.rand(rows, width, generator=gen) * 2 - 1) * amax[:, None]
    # quotients at and next to the grids' ties (n + 1/2 steps, e4m3's odd significands):
    # x = t * scale, then one float32 step either way
    t = torch.randint(-255, 256, (rows, 96), generator=gen).float() / 2
    near = t * scale[:, None]
    x[:, :96] = near
    x[:, 96:192] = torch.nextafter(near, torch.full_like(near, float("inf")))
    x[:, 192:288] = torch.nextafter(near, torch.full_like(near, -float("inf")))
    x[:, 288] = amax  # the abs-max itself: 448 or 127
    x[:, 289] = 0.0
    x[:, 290:300] = torch.randn(rows, 10, generator=gen) * 1e-40  # subnormal inputs
    x[:, 300] = -0.0  # the quotient keeps the sign: e4m3 has a -0 (0x80)
    # tiny normal inputs, 1e-38 to 1e-28: where the remainder x - q * scale can underflow
    x[:, 301:341] = torch.logspace(-38, -28, 40) * torch.randn(rows, 40, generator=gen).sign()
    scale[-1] = float("inf")  # a row whose abs-max overflowed: x / inf
    x[-1, 341] = float("inf")
    out = torch.empty_like(x)
    divide_rows[(rows,)](x, scale.contiguous(), out, BLOCK=width)
    want = x / scale[:, None]
    same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
    tiny = x.abs() < 2.0**-100
    print("mismatches_above_2^-100", int((~same & ~tiny).sum()))
    print("below_2^-100", int(tiny.sum()))
    # there the remainder underflows: the quotient may be an ulp off, but lies far below the
    # 8-bit grids' smallest step, so both round to the same (signed) zero
    print("largest_off_quotient", float(want[~same].abs().max()) if (~same).any() else 0.0)
    print("sign_flips", int((torch.signbit(out) != torch.signbit(want))[~want.isnan()].sum()))
    print("negative_zeros", int(torch.signbit(out[:, 300]).sum()))
    print("inf_row_nan", int(out[-1].isnan().sum()))
    print("elements", x.numel())
    """
)


def test_row_division_is_torchs_ieee_quotient_bit_for_bit():
    """`_divide` (one reciprocal a row, two FMA corrections) against torch's float32 division,
    bit for bit for every |x| >= 2^-100: 393 216 quotients over 60 decades of row scales, at and
    beside the 8-bit grids' ties, signed zeros, and a row scaled by inf (Triton's interpreter
    rounds each FMA once). Below 2^-100 (tiny normals, subnormals) a quotient may be an ulp
    off, far below any 8-bit step."""
    got = named_floats(run_interpreted(DIVIDE))
    assert got["elements"] == 768 * 512 and got["below_2^-100"] >= 768 * 10
    assert got["mismatches_above_2^-100"] == 0
    assert got["largest_off_quotient"] < 2.0**-60 and got["sign_flips"] == 0
    assert got["negative_zeros"] == 768
    assert got["inf_row_nan"] == 1  # inf / inf; the row's finite x / inf are its zeros

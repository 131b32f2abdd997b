"""The large-M W4A8 path (`triton_w8a8.w4a8_unpack` + `w8_group_matmul`, backends `w4a8_dq` and
`w4a8_fp8_dq`), run by Triton's CPU interpreter: the unpack against the codes themselves, the
GEMM against a float64 product of its own operands, the backends against `w4a8` / `w4a8_fp8`."""

import textwrap

import pytest

from interpreted import named_floats, run_interpreted

pytest.importorskip("triton")

# The interpreter must be on before triton decorates the kernels: the checks run in a fresh
# interpreter and print one "name value" line per measured worst case.
CHECK = textwrap.dedent(
    """
    import torch
    from faircalib.config import QuantConfig
    from faircalib.kernels import QuantLinear
    from faircalib.kernels.backends import fp8_quantize
    from faircalib.kernels.triton_w4 import pack_tiles
    from faircalib.kernels.triton_w8a8 import (
        quantize_rows, w4a8_layout, w4a8_unpack, w8_group_matmul)
    from faircalib.quant.primitives import compute_qparams, quantize

    def rel(y, ref):
        return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-300))

    worst = {}
    def note(name, value):
        worst[name] = max(worst.get(name, 0.0), value)

    gen = torch.Generator().manual_seed(0)
    # unpack: (code - zero) exactly, from torch's own codes and zeros; ragged N, 3-bit codes
    for n, k, group, sym, bits in ((40, 256, 32, False, 4), (48, 256, 64, True, 4),
                                   (33, 256, 128, False, 4), (32, 384, None, False, 4),
                                   (40, 128, 32, False, 3)):
        w = torch.randn(n, k, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=sym))
        codes = quantize(w, qp)
        zero = qp.zero.to(torch.int16).repeat_interleave(k // qp.zero.shape[1], dim=1)
        expect = codes.to(torch.int16) - zero  # [N, K]
        packed, (_, z_t) = pack_tiles(codes), w4a8_layout(qp.scale, qp.zero)
        for kind in ("int8", "fp8"):
            w8 = w4a8_unpack(packed, z_t, kind)
            assert w8.shape == (n, k), (kind, w8.shape)
            assert torch.equal(w8.float(), expect.float()), (kind, group)
            print(f"unpacked_{kind}_{group} 1")

    # GEMM: float64 product of its own operands (any 8-bit weights, any group scales);
    # groups 32 / 64 / 128 / 256 and per-channel, ragged M and N, M = 1, bias or none
    for m, n, k, group in ((1, 40, 128, 32), (19, 33, 256, 64), (7, 48, 256, 128),
                           (5, 40, 512, 256), (9, 24, 256, None)):
        g = group or k
        x = torch.randn(m, k, generator=gen)
        s_t = torch.rand(k // g, n, generator=gen) + 0.01  # [G, N]
        bias = torch.randn(n, generator=gen)
        for kind in ("int8", "fp8"):
            a8, a_s = quantize_rows(x, kind)
            if kind == "int8":
                w8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            else:
                w8 = fp8_quantize(torch.randn(n, k, generator=gen))[0]
            w_ref = w8.double() * s_t.double().repeat_interleave(g, dim=0).T  # [N, K]
            ref = (a8.double() * a_s.double()) @ w_ref.T
            for out in (torch.float32, torch.float16):
                y = w8_group_matmul(a8, a_s, w8, s_t, out)
                assert y.shape == (m, n) and y.dtype == out
                note(f"gemm_{kind}_{group}_{out}", rel(y, ref))
            y = w8_group_matmul(a8, a_s, w8, s_t, torch.float32, bias)
            note(f"gemm_{kind}_{group}_bias", rel(y, ref + bias.double()))
            meta = {"BLOCK_M": 32, "BLOCK_N": 16}  # another tile
            y = w8_group_matmul(a8, a_s, w8, s_t, torch.float32, meta=meta)
            note(f"gemm_{kind}_{group}_tile", rel(y, ref))
            assert w8_group_matmul(a8[:0], a_s[:0], w8, s_t, torch.float32).shape == (0, n)

    # backends: w4a8_dq == w4a8 (INT8 act., smoothing, bias), w4a8_fp8_dq == w4a8_fp8
    x3 = torch.randn(2, 5, 256, generator=gen)
    x3[0, 1] = 0.0
    in_scale = torch.rand(256, generator=gen) + 0.5
    for group in (32, 128, None):
        w = torch.randn(40, 256, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=False))
        codes, bias = quantize(w, qp), torch.randn(40, generator=gen)
        for dtype in (torch.float32, torch.float16):
            x = x3.to(dtype)
            pairs = (("w4a8", "w4a8_dq", dict(act_bits=8, input_scale=in_scale)),
                     ("w4a8_fp8", "w4a8_fp8_dq", {}))
            for old, new, kw in pairs:
                ref = QuantLinear.from_codes(codes, qp, backend=old, bias=bias, **kw)(x)
                layer = QuantLinear.from_codes(codes, qp, backend=new, bias=bias, **kw)
                y = layer(x)
                assert layer.last_backend == new and y.dtype == dtype and y.shape == (2, 5, 40)
                note(f"ql_{new}_{dtype}", rel(y, ref.double()))
                # the tile layout holds the codes: the plain copy is freed
                assert layer.qweight.numel() == 0 and torch.equal(layer.codes(), codes)
    for name, value in sorted(worst.items()):
        print(name, value)
    """
)


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    return named_floats(run_interpreted(CHECK))


def test_every_case_was_checked(results):
    names = set(results)
    for kind in ("int8", "fp8"):
        for group in (32, 64, 128, None):
            assert f"unpacked_{kind}_{group}" in names
            assert {f"gemm_{kind}_{group}_bias", f"gemm_{kind}_{group}_tile"} <= names
    for backend in ("w4a8_dq", "w4a8_fp8_dq"):
        assert {f"ql_{backend}_torch.float32", f"ql_{backend}_torch.float16"} <= names


def test_gemm_matches_float64_product_of_its_operands(results):
    # fp32 outputs: float32 accumulation and scaling only; fp16 outputs: half rounding
    for name, err in results.items():
        if name.startswith("gemm_"):
            assert err <= (1e-3 if "float16" in name else 1e-6), (name, err)


def test_dq_backends_agree_with_the_fused_w4a8_backends(results):
    # the same quantized operands, summed in another float32 order (int32 per chunk for INT8):
    # fp32 rounding; in fp16 both outputs are rounded to half (and the input smoothed in half)
    for name, err in results.items():
        if name.startswith("ql_"):
            assert err <= (2e-3 if "float16" in name else 1e-6), (name, err)


def test_new_kernels_compile_for_hopper():
    """The GPU compiler is stricter than the interpreter: compile the unpack and GEMM kernels
    for sm_90 (ptxas ships with triton), with the 16-divisibility a real launch specialises on,
    and check the GEMM's loads are software-pipelined (cp.async) as `_w8a8_kernel`'s are."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_w8a8 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    target = GPUTarget("cuda", 90, 32)

    def compile_(fn, sig: dict, consts: dict, **options):  # noqa: ANN202
        div = [n for n in sig if n not in ("M", "M_BUCKET")]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
        sig = {**sig, **dict.fromkeys(consts, "constexpr")}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=target, options=options)

    for is_int8, dt in ((True, "*i8"), (False, "*fp8e4nv")):
        unpack = {"q_ptr": "*i32", "z_ptr": "*i32", "w_ptr": dt, "N": "i32", "K": "i32"}
        consts = {"GROUP_SIZE": 32, "IS_INT8": is_int8, "BLOCK_N": 128}
        compile_(k._w4a8_unpack_kernel, unpack, consts, num_warps=4)
        gemm = {"a_ptr": dt, "w_ptr": dt, "as_ptr": "*fp32", "s_ptr": "*fp32", "y_ptr": "*bf16"}
        gemm |= dict.fromkeys(("M", "N", "K", "stride_am", "stride_wn", "stride_ym"), "i32")
        gemm |= {"M_BUCKET": "i32"}
        for group in (32, 128):
            consts = {"b_ptr": None, "GROUP_SIZE": group, "IS_INT8": is_int8, "HAS_BIAS": False}
            consts |= {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}
            ttgir = compile_(k._w8_group_kernel, gemm, consts, num_warps=8, num_stages=4)
            ttgir = ttgir.asm["ttgir"]
            assert "async_copy_global_to_local" in ttgir, (is_int8, group)
            assert ttgir.count("ttng.warp_group_dot ") == 128 // group, (is_int8, group)

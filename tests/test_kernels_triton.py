"""The Triton W4A16 kernels (optional dependency), run by Triton's CPU interpreter."""

import re
import textwrap

import pytest
import torch

from interpreted import run_interpreted

pytest.importorskip("triton")

# The interpreter must be switched on before triton decorates the kernels, so the checks run
# in a fresh interpreter. It has no bfloat16: fp16 and fp32 inputs stand in for it.
CHECK = textwrap.dedent(
    """
    import math
    import torch
    from faircalib.config import QuantConfig
    from faircalib.kernels import QuantLinear
    from faircalib.kernels.triton_w4 import w4_matmul
    from faircalib.quant.primitives import compute_qparams, dequantize, quantize

    worst = 0.0
    # (M, N, K, group, symmetric, bits): groups below, equal to and above the 128-wide tile,
    # per-channel, 3-bit codes, ragged M and N
    cases = [(5, 64, 128, 32, False, 4), (33, 96, 256, 128, True, 4), (3, 64, 256, None, False, 4),
             (17, 48, 384, 64, True, 4), (1, 40, 512, None, True, 4), (9, 64, 256, 64, False, 3)]
    # "swap" (weight as the left operand): one and several K tiles per program, ragged M and N;
    # "planes" splits that are uneven or leave programs empty (3 and 8 of 2-4 tiles); fp16
    # with groups spanning K tiles takes the integer path
    variants = [("planes", 1, 16), ("tile", 1, 16), ("planes", 4, 16), ("tile", 2, 32),
                ("swap", 1, 16), ("swap", 4, 16), ("swap", 2, 64), ("planes", 3, 32),
                ("planes", 8, 16), ("planes", 2, 64)]
    for i, (m, n, k, group, sym, bits) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        w = torch.randn(n, k, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=sym))
        codes = quantize(w, qp)
        ref_w = dequantize(codes, qp).double()
        for backend in ("triton_w4", "triton_dq"):
            layer = QuantLinear.from_codes(codes, qp, backend=backend)
            for dtype in (torch.float16, torch.float32):
                x = torch.randn(m, k, generator=gen).to(dtype)
                y = layer(x)
                assert layer.last_backend == backend and y.dtype == dtype
                ref = x.double() @ ref_w.T
                err = float((y.double() - ref).norm() / ref.norm())
                assert math.isfinite(err), (backend, dtype)  # max() would skip a NaN
                worst = max(worst, err)
                if backend == "triton_w4":  # every unpacking variant and split of K
                    prepared = layer._prepared[("triton_w4", x.device, dtype)]
                    for unpack, split, bm in variants:
                        meta = {"BLOCK_M": bm, "BLOCK_N": 32, "UNPACK": unpack, "SPLIT_K": split}
                        y = w4_matmul(x, *prepared, interpreted_meta=meta)
                        assert y.dtype == dtype, meta  # written in x's dtype, no cast pass
                        err = float((y.double() - ref).norm() / ref.norm())
                        assert math.isfinite(err), meta
                        worst = max(worst, err)
                        # the last program to arrive reset its tile's split-K counter
                        assert int(prepared[3].abs().sum()) == 0, meta
    # the Triton layout replaces the plain codes on their device, losslessly
    codes_before = layer.codes().clone()
    qweight_before = layer.stored_qweight().clone()
    layer(x)
    assert layer.qweight.numel() == 0 and torch.equal(layer.codes(), codes_before)
    assert torch.equal(layer.state_dict()["qweight"], qweight_before)
    fresh = QuantLinear.from_codes(codes, qp, backend=backend)
    fresh(x)
    fresh.load_state_dict(layer.state_dict())  # loading into a freed layer restores its shape
    assert torch.equal(fresh.qweight, qweight_before)
    layer.to(torch.float64)  # moving restores the plain codes and drops the layout
    assert torch.equal(layer.qweight, qweight_before) and layer._prepared == {}
    print(worst)
    """
)


def test_fused_w4_kernels_match_reference_under_interpreter():
    worst = float(run_interpreted(CHECK).strip().splitlines()[-1])
    assert worst <= 1e-3  # fp16 inputs and outputs, fp32 accumulation


def test_tile_layout_round_trips_and_puts_planes_of_16_consecutive_k_in_nibbles():
    from faircalib.kernels.triton_w4 import pack_tiles, transposed_scales, unpack_tiles

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 256), generator=gen, dtype=torch.uint8)
    packed = pack_tiles(codes)
    assert packed.shape == (32, 24) and packed.dtype == torch.int32
    assert torch.equal(unpack_tiles(packed), codes)
    # tile 1, int32 row 5, nibble 3 holds k = 128 + 16 * 3 + 5 of every column
    nibble = (packed[16 + 5].to(torch.int64) >> 12) & 0xF
    assert torch.equal(nibble.to(torch.uint8), codes[:, 128 + 48 + 5])
    with pytest.raises(ValueError, match="divisible by 128"):
        pack_tiles(codes[:, :192])
    scale, zero = torch.rand(24, 2) + 0.1, torch.randint(0, 16, (24, 2)).float()
    s_t, zs_t = transposed_scales(scale, zero)
    q = 11.0
    assert torch.allclose(q * s_t + zs_t, (scale * (q - zero)).T)


def test_swap_kernel_compiles_for_hopper_with_the_weight_in_registers():
    """The interpreter runs the kernel as Python; compile the "swap" path for sm_90 (no GPU
    needed): wgmma with its left operand (the dequantized weight) in registers, and the largest
    autotuned tiles within Hopper's 227 KB of shared memory (a config over it would be skipped
    by the autotuner, never timed)."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_w4 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    sig = dict.fromkeys(("s_ptr", "zs_ptr", "part_ptr"), "*fp32") | {"cnt_ptr": "*i32"}
    sig |= {"x_ptr": "*bf16", "q_ptr": "*i32", "y_ptr": "*bf16"}
    sig |= dict.fromkeys(("M", "N", "K", "stride_xm", "stride_ym", "M_BUCKET"), "i32")
    names = list(k._w4_matmul_kernel.arg_names)
    # the runtime specializes pointers and sizes divisible by 16 (then loads are pipelined)
    aligned = [names.index(n) for n in ("x_ptr", "q_ptr", "s_ptr", "zs_ptr", "y_ptr", "N", "K")]
    for bm, bn, split, warps, stages, group in ((16, 128, 4, 4, 4, 128), (128, 256, 1, 8, 3, 32)):
        consts = {"GROUP_SIZE": group, "BLOCK_M": bm, "BLOCK_N": bn, "UNPACK": "swap"}
        consts |= {"SPLIT_K": split, "GROUP_M": 8}
        full = sig | dict.fromkeys(consts, "constexpr")
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        src = ASTSource(fn=k._w4_matmul_kernel, signature=full, constexprs=consts, attrs=attrs)
        opts = {"num_warps": warps, "num_stages": stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert compiled.metadata.shared <= 232448, (bm, bn, compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        assert re.search(r"wgmma\.mma_async[^;]*\},\s*\{", ptx), "left operand not in registers"


def test_planes_kernel_feeds_integer_weights_without_int_to_float_conversions_on_hopper():
    """At M <= 64 the bf16 "planes" loop with groups spanning K tiles must build its weights
    as exact 16-bit integers (code bits OR'd into a float's mantissa, minus the zero) with no
    int->float conversion; the float32 dequantization (groups of 64, or row blocks of 128)
    converts every code. All compile for sm_90."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_w4 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    sig = dict.fromkeys(("s_ptr", "zs_ptr", "part_ptr"), "*fp32") | {"cnt_ptr": "*i32"}
    sig |= {"x_ptr": "*bf16", "q_ptr": "*i32", "y_ptr": "*bf16"}
    sig |= dict.fromkeys(("M", "N", "K", "stride_xm", "stride_ym", "M_BUCKET"), "i32")
    conversions = {}
    for group, bm in ((128, 32), (128, 64), (64, 32), (128, 128)):
        consts = {"GROUP_SIZE": group, "BLOCK_M": bm, "BLOCK_N": 128, "UNPACK": "planes"}
        consts |= {"SPLIT_K": 4 if bm <= 64 else 1, "GROUP_M": 8}
        src = ASTSource(
            fn=k._w4_matmul_kernel,
            signature=sig | dict.fromkeys(consts, "constexpr"),
            constexprs=consts,
        )
        opts = {"num_warps": 4, "num_stages": 4}
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
        conversions[group, bm] = len(re.findall(r"cvt\.rn\.f32\.[su]32", ptx))
    assert conversions[128, 32] == conversions[128, 64] == 0
    # the float32 path: one per nibble plane at least
    assert conversions[64, 32] >= 8 and conversions[128, 128] >= 8


FALLBACK = textwrap.dedent(
    """
    import warnings
    import torch
    import faircalib.kernels.triton_w4 as tw
    from faircalib.config import QuantConfig
    from faircalib.kernels import QuantLinear
    from faircalib.quant.primitives import compute_qparams, dequantize, quantize

    planes = {"BLOCK_M": 16, "BLOCK_N": 32, "UNPACK": "planes", "SPLIT_K": 1}
    calls = {"swap": 0, "no_swap": 0}

    class Failing:  # an autotuner whose "swap" config does not compile
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls["swap"] += 1
                raise RuntimeError("PassManager::run failed")
            return launch

    class Plain:  # the configs without "swap": here one fixed config, interpreted
        def __getitem__(self, grid):
            def launch(*args, GROUP_SIZE):
                calls["no_swap"] += 1
                tw._w4_matmul_kernel[grid](*args, GROUP_SIZE=GROUP_SIZE, **planes)
            return launch

    tw.INTERPRETED = False  # take the autotuned path
    tw._autotuned_matmul, tw._autotuned_matmul_no_swap = Failing(), Plain()
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128))
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp, backend="triton_w4")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).half()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = layer(x), layer(x)
    ref = x.double() @ dequantize(codes, qp).double().T
    err = max(float((y.double() - ref).norm() / ref.norm()) for y in (y1, y2))
    said = [str(c.message) for c in caught if "swap" in str(c.message)]
    print(calls["swap"], calls["no_swap"], len(said), err)
    """
)


def test_a_swap_config_that_fails_to_compile_falls_back_once_and_stays_correct():
    swap_calls, plain_calls, warned, err = run_interpreted(FALLBACK, timeout=300).split()
    assert (swap_calls, plain_calls, warned) == ("1", "2", "1")  # tried once, warned once
    assert float(err) <= 1e-3  # against a float64 matmul of the dequantized weights


def test_autotuning_splits_k_up_to_64_rows_and_never_beyond():
    """At M = 16-64 a layer has one row block, as at M = 1: the autotuner must be offered
    split-K there (the H200 sweep without it: 0.4-0.8x of bf16 at M = 32), with row blocks no
    taller than M needs, and no split beyond SPLIT_K_MAX_M."""
    import triton

    from faircalib.kernels import triton_w4 as k

    configs = k._configs()
    for m in (1, 16, 32, 33, 64, 65, 256):
        kept = k._prune(configs, {"M": m, "N": 4096})
        splits = {c.kwargs["SPLIT_K"] for c in kept}
        tallest = max(16, triton.next_power_of_2(m))
        assert all(c.kwargs["BLOCK_M"] <= tallest for c in kept)
        if m <= k.SPLIT_K_MAX_M:
            assert splits == {1, 2, 4, 8}, (m, splits)
            assert {c.kwargs["BLOCK_M"] for c in kept if c.kwargs["SPLIT_K"] > 1} == {
                b for b in (16, 32, 64) if b <= tallest
            }
        else:
            assert splits == {1}, (m, splits)
    # a layer as wide as a vocabulary has column tiles enough, and its partials would take
    # hundreds of MB: never split
    for m in (1, 64):
        kept = k._prune(configs, {"M": m, "N": 126464})
        assert {c.kwargs["SPLIT_K"] for c in kept} == {1}


def test_split_k_kernels_compile_with_m_specialized_to_one():
    """Triton passes an integer argument equal to 1 as a compile-time constant: the serial
    split-K reduction (shared by the fused W4 GEMM and the GEMV) must compile for sm_90 then,
    as at M = 1 on a GPU (a `.to()` on M did not)."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_gemv as g
    from faircalib.kernels import triton_w4 as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    target = GPUTarget("cuda", 90, 32)
    ptrs = {"s_ptr": "*fp32", "zs_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    ptrs |= {"x_ptr": "*bf16", "q_ptr": "*i32", "y_ptr": "*bf16"}
    for unpack in ("planes", "swap"):
        consts = {"M": 1, "M_BUCKET": 1, "GROUP_SIZE": 128, "BLOCK_M": 16, "BLOCK_N": 64}
        consts |= {"UNPACK": unpack, "SPLIT_K": 4, "GROUP_M": 8}
        sig = ptrs | dict.fromkeys(("N", "K", "stride_xm", "stride_ym"), "i32")
        src = ASTSource(
            fn=k._w4_matmul_kernel,
            signature=sig | dict.fromkeys(consts, "constexpr"),
            constexprs=consts,
        )
        triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3})
    sig = dict.fromkeys(("a_ptr", "b_ptr", "part_ptr"), "*fp32") | {"q_ptr": "*i32"}
    sig |= {"x_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16", "cnt_ptr": "*i32"}
    sig |= dict.fromkeys(("N", "K", "N_TILES", "stride_xm", "stride_ym"), "i32")
    consts = {"M": 1, "GROUP_SIZE": 128, "W": 32, "NEW_GROUPS": 1, "M_PAD": 1, "HAS_BIAS": True}
    consts |= {"BLOCK_N": 32, "SPLIT_K": 4, "PREFETCH": False}
    src = ASTSource(
        fn=g._gemv_kernel, signature=sig | dict.fromkeys(consts, "constexpr"), constexprs=consts
    )
    triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 1})

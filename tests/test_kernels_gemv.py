"""The Triton W4A16 GEMV (kernels/triton_gemv, backend `triton_gemv`, M <= 16): run by Triton's
CPU interpreter against a float64 matmul of the dequantized weight, refusals, its layout, and
an sm_90 compile of every autotuned config (no GPU needed)."""

import re
import textwrap
from pathlib import Path

import pytest
import torch

from interpreted import run_interpreted

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# The interpreter must be on before triton decorates the kernels: a fresh interpreter. It has
# no bfloat16, so fp16 and fp32 stand in for it.
CHECK = textwrap.dedent(
    """
    import importlib.util, sys
    import torch
    from faircalib.kernels import QuantLinear
    from faircalib.kernels.triton_gemv import gemv
    from faircalib.quant.primitives import QParams, dequantize

    def random_layer(n, k, group, sym, bits, gen):
        # any group size (QuantConfig offers 32 / 64 / 128 / per-channel only)
        g = k // (group or k)
        scale = torch.rand(n, g, generator=gen) / 8 + 0.01
        zero = torch.randint(0, 2**bits, (n, g), generator=gen).float()
        if sym:
            zero = torch.full((n, g), float(2 ** (bits - 1)))
        codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
        return QParams(scale, zero, bits, group, sym), codes

    worst = {torch.float16: 0.0, torch.float32: 0.0}
    # (M, N, K, group, symmetric, bits, bias): groups below / equal to / above the 32-word
    # tile's plane, per-channel, K not a multiple of the 256-k tile (320, 200), 3-bit codes,
    # ragged N (not a multiple of BLOCK_N)
    cases = [(1, 40, 256, 32, False, 4, True), (3, 48, 512, 64, True, 4, False),
             (16, 32, 512, 128, False, 4, True), (1, 24, 768, None, True, 4, True),
             (2, 20, 320, 64, False, 4, False), (1, 36, 200, None, False, 4, True),
             (5, 16, 256, 8, False, 3, True)]
    # split-K 1 (direct store), 3 (uneven ranges), 16 (more splits than tiles: empty ranges)
    # each also with the next tile prefetched into registers (PREFETCH)
    metas = [{"BLOCK_N": 16, "SPLIT_K": 1}, {"BLOCK_N": 32, "SPLIT_K": 3},
             {"BLOCK_N": 16, "SPLIT_K": 16}]
    metas += [{**meta, "PREFETCH": True} for meta in metas]
    for i, (m, n, k, group, sym, bits, has_bias) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        qp, codes = random_layer(n, k, group, sym, bits, gen)
        bias = torch.randn(n, generator=gen) if has_bias else None
        ref_w = dequantize(codes, qp).double()
        layer = QuantLinear.from_codes(codes, qp, bias=bias, backend="triton_gemv")
        for dtype in (torch.float16, torch.float32):
            x = torch.randn(m, k, generator=gen).to(dtype)
            ref = x.double() @ ref_w.T + (0 if bias is None else bias.double())
            y = layer(x)
            assert layer.last_backend == "triton_gemv" and y.dtype == dtype and y.shape == (m, n)
            err = float((y.double() - ref).norm() / ref.norm())
            worst[dtype] = max(worst[dtype], err)
            assert torch.equal(layer(x), y)  # deterministic split-K: the same bits every call
            prepared = layer._prepared[("triton_gemv", x.device, dtype)]
            for meta in metas:
                b = None if bias is None else bias.to(dtype)
                y = gemv(x, *prepared, b, interpreted_meta=meta)
                err = float((y.double() - ref).norm() / ref.norm())
                worst[dtype] = max(worst[dtype], err)
                assert int(prepared[3].abs().sum()) == 0  # the last program reset its counter
        # the layout holds the codes losslessly and replaced the plain copy
        assert layer.qweight.numel() == 0 and torch.equal(layer.codes(), codes)
    # M = 17 is refused (QuantLinear raises ConfigError): benchmarks/kernels.py records a
    # skipped cell
    spec = importlib.util.spec_from_file_location("bench_kernels", "benchmarks/kernels.py")
    kb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kb
    spec.loader.exec_module(kb)
    cand = kb.Candidate(
        "triton_gemv", lambda l: kb._quant_linear(l.codes4, l.qp4, "triton_gemv"), kb._ref_w4, 0.5
    )
    rows = kb.bench_shape(256, 32, [1, 17], [cand], torch.device("cpu"), 2**16, 0.0)
    # (the sweep feeds bf16, which the interpreter lacks: there M = 1 is refused for its dtype)
    assert "M <= 16" in rows[1]["skipped"] and "M <= 16" not in rows[0].get("skipped", ""), rows
    print("fp16", worst[torch.float16])
    print("fp32", worst[torch.float32])
    """
)


def test_gemv_matches_float64_reference_under_interpreter():
    out = run_interpreted(CHECK, cwd=ROOT)
    worst = {line.split()[0]: float(line.split()[1]) for line in out.strip().splitlines()}
    assert worst["fp32"] <= 1e-5  # float32 math end to end (the weight to ~1e-6)
    assert worst["fp16"] <= 1e-3  # fp16 inputs and outputs, fp32 accumulation


def test_layout_puts_planes_of_consecutive_k_in_nibbles_and_round_trips():
    from faircalib.kernels.triton_gemv import gemv_scales, pack_gemv, tile_words, unpack_gemv

    assert [tile_words(g) for g in (8, 16, 24, 32, 128, 4096, 200)] == [8, 16, 8, 32, 32, 32, 8]
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 600), generator=gen, dtype=torch.uint8)
    packed = pack_gemv(codes, 32)
    assert packed.shape == (6, 768 // 8) and packed.dtype == torch.int32  # K padded to 3 x 256
    unpacked = unpack_gemv(packed, 32)
    assert torch.equal(unpacked[:, :600], codes) and not unpacked[:, 600:].any()
    # tile 1, word 5, nibble 3 holds k = 256 + 32 * 3 + 5
    nibble = (packed[:, 32 + 5].to(torch.int64) >> 12) & 0xF
    assert torch.equal(nibble.to(torch.uint8), codes[:, 256 + 96 + 5])
    # A f + B with the kernel's f = 1 + code / 16 is scale * (code - zero)
    scale, zero = torch.rand(6, 3) + 0.1, torch.randint(0, 16, (6, 3)).float()
    a_t, b_t = gemv_scales(scale, zero)
    for q in range(16):
        assert torch.allclose(a_t * (1 + q / 16) + b_t, (scale * (q - zero)).T, atol=1e-6)


@pytest.mark.parametrize("group_size", [8, 16, 24, 32, 64, 128, 200, 1000, 4096])
def test_scales_are_loaded_exactly_where_a_plane_can_start_a_group(group_size):
    """`group_planes` against enumeration: plane j of some K tile starts a scale group (its
    first k is a multiple of the group) iff bit j is set - no group start missed (wrong
    scales) and, where the tile and the group divide one another, no needless reload."""
    from faircalib.kernels.triton_gemv import group_planes, tile_words

    words = tile_words(group_size)
    tile = 8 * words
    starts = {
        j for t in range(group_size) for j in range(8) if (t * tile + j * words) % group_size == 0
    }
    mask = group_planes(words, group_size)
    assert starts <= {j for j in range(8) if mask >> j & 1}
    if tile % group_size == 0 or group_size % tile == 0:
        assert mask == sum(1 << j for j in starts)


def _layer(bits: int = 4, group: int | None = 128, k: int = 256):
    from faircalib.kernels import QuantLinear
    from faircalib.quant.primitives import QParams

    g = k // (group or k)
    qp = QParams(torch.ones(32, g), torch.zeros(32, g), bits, group, False)
    codes = torch.randint(0, 2**bits, (32, k), dtype=torch.uint8)
    return QuantLinear.from_codes(codes, qp, backend="triton_gemv")


@pytest.mark.parametrize(
    ("kwargs", "device", "dtype", "m", "reason"),
    [
        ({}, "cuda", torch.bfloat16, 17, "M <= 16"),
        ({"bits": 8}, "cuda", torch.bfloat16, 1, "at most 4 bits"),
        ({"group": None, "k": 252}, "cuda", torch.bfloat16, 1, "divisible by 8"),
        ({"group": 12, "k": 264}, "cuda", torch.bfloat16, 1, "multiple of 8"),
        ({}, "cuda", torch.float32, 1, "activations"),
        ({}, "cpu", torch.bfloat16, 1, "runs on CUDA"),
    ],
)
def test_refusals_say_why(kwargs, device, dtype, m, reason):
    from faircalib.kernels import backends as B

    layer = _layer(**kwargs)
    assert reason in B.supports(layer, "triton_gemv", device, dtype, m)
    assert B.supports(_layer(), "triton_gemv", "cuda", torch.bfloat16, 16) is None
    assert B.supports(_layer(group=None), "triton_gemv", "cuda", torch.float16, 1) is None


def test_every_autotuned_config_compiles_for_hopper_without_int_to_float():
    """The interpreter runs the kernel as Python; compile each autotuned config for sm_90 (no
    GPU needed) at M = 1 and, for the configs the pruning keeps there, M = 16: within Hopper's
    227 KB of shared memory, no I2F conversion (quarter rate: the codes become floats by bit
    tricks) and, at M = 1, no layout conversion of the weight tile inside the K loop."""
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from faircalib.kernels import triton_gemv as k

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no CUDA backend here")
    sig = {"x_ptr": "*bf16", "q_ptr": "*i32", "a_ptr": "*fp32", "b_ptr": "*fp32"}
    sig |= {"bias_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig |= dict.fromkeys(("M", "N", "K", "N_TILES", "stride_xm", "stride_ym"), "i32")
    names = list(k._gemv_kernel.arg_names)
    # the runtime specializes pointers and sizes divisible by 16 (as the 8B shapes are)
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n in ("N", "K")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    compiled_any = {1: 0, 16: 0}
    for m_pad in (1, 16):
        consts0 = {"GROUP_SIZE": 128, "W": 32, "NEW_GROUPS": k.group_planes(32, 128)}
        consts0 |= {"M_PAD": m_pad, "HAS_BIAS": True}
        kept = k._prune(k._configs(), {"N_TILES": 16}, **consts0)
        for cfg in kept:
            consts = consts0 | cfg.kwargs
            src = ASTSource(
                fn=k._gemv_kernel,
                signature=sig | dict.fromkeys(consts, "constexpr"),
                constexprs=consts,
                attrs=attrs,
            )
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            assert compiled.metadata.shared <= 232448, (cfg, compiled.metadata.shared)
            assert "cvt.rn.f32.s32" not in compiled.asm["ptx"]
            if m_pad == 1:
                ttgir = compiled.asm["ttgir"]
                loop = ttgir[ttgir.index("scf.for") : ttgir.index("scf.yield")]
                converted = re.findall(r"ttg.convert_layout %\S+ : tensor<(\S+)", loop)
                assert all(t.count("x") == 1 for t in converted), (cfg, converted)  # 1-D only
            compiled_any[m_pad] += 1
    assert compiled_any[1] == len(k._configs()) and compiled_any[16] >= 2

"""W4A16 kernels in Triton (optional: needs `triton`): a fused dequantize-GEMM and a dequantizer.

Layout (`pack_tiles`, built once per layer by QuantLinear and cached): K is cut into tiles of
128; inside a tile, int32 row r (0..15) holds the codes of k = 16 * j + r in nibble j (0..7),
for every output column n, as `packed [K / 8, N]` with N contiguous. So nibble plane j of a tile
is a [16, N] slab of *consecutive* k: a kernel unpacks it with one shift and one mask and feeds
it straight to a K=16 `tl.dot`, with no redundant loads and no register shuffles. Scales are
stored transposed, `scale_t [G, N]`, with the zero folded in, `zs_t = -zero * scale`, so that
w = code * scale + zs is one FMA (exactly scale * (code - zero) up to float32 rounding).

Kernels:
- `w4_matmul`: y [M, N] = x [M, K] @ W_hat.T, the weight dequantized in registers inside the K
  loop (it never reaches memory). Three variants - eight K=16 dots per tile ("planes"), one
  K=128 dot over the whole tile, its rows gathered from the 16 int32 rows ("tile"), and the
  transposed product y.T = W_hat @ x.T with the dequantized [BN, 128] tile as the dot's left
  operand ("swap", `_swap_matmul`) - and tile shapes are autotuned per (M bucket, N, K); small
  M may split K across programs so a GEMV-like call still fills the GPU; the splits are reduced
  by the last program to arrive (`_store_split`), so a call is one kernel: no zero-fill of a
  float32 output for atomics, no cast pass after it (each an extra kernel in a CUDA graph).
  Why "swap": Hopper's wgmma reads its left operand from registers and its right one from
  shared memory. As the right operand the dequantized weight must be written to shared memory
  every step, and Triton then waits for each dot before the next dequantization (sm_90 compile,
  Triton 3.9: `warp_group_dot_wait` with 0 pending in "planes"; "tile" needs 458-524 KB of
  shared memory for its 128x128 tiles, over the 227 KB limit, so the autotuner never runs it).
  As the left operand, x is the MMA's only shared-memory operand (num_stages deep, cp.async;
  the dequantized tile takes one register layout conversion), one wgmma stays in flight while
  the next tile is dequantized (1 pending), and tokens sit on the MMA's N side (8..256), so
  M = 16 still fills 64-row wgmma tiles. The autotuner picks it only where it is faster
  (`SWAP_SHAPES`); on the H200 with the device's Triton 3.6 it compiled but never won at
  4096x4096, M = 16 / 256 / 1024 (benchmarks/results/kernels/probe-swap-h200/).
- `w4_dequantize`: W_hat.T [K, N] in the activation dtype, for large M where a cuBLAS GEMM on
  the dequantized weight beats any fused kernel (the weight is written once per call and freed).

Needs K % 128 == 0 and a group size that is a multiple of 16 (32, 64, 128, per-channel).
Tested on the CPU under TRITON_INTERPRET=1 with fp16/fp32 (tests/test_kernels_triton.py; the
interpreter has no bfloat16); timed against bf16 cuBLAS, torch's int4 kernel and gemlite by
benchmarks/kernels.py on the GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from faircalib.kernels.fallback import record_failure

TILE_K = 128  # K per tile of the packed layout; 8 nibble planes of 16 rows
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests: no GPU to autotune on


# --- layout ---------------------------------------------------------------------------------
def pack_tiles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 16) -> [K / 8, N] int32 in the tile layout (module docstring)."""
    n, k = codes.shape
    if k % TILE_K:
        raise ValueError(f"the tile layout needs K divisible by {TILE_K}, got {k}")
    planes = codes.T.to(torch.int64).reshape(k // TILE_K, 8, 16, n)  # [tile, j, r, N]
    shifts = (4 * torch.arange(8, device=codes.device)).view(1, 8, 1, 1)
    words = (planes << shifts).sum(dim=1)  # [tile, 16, N], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.to(torch.int32).reshape(k // 8, n).contiguous()


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_tiles`: [K / 8, N] int32 -> [N, K] uint8 codes."""
    k8, n = packed.shape
    words = packed.to(torch.int64).reshape(k8 // 16, 1, 16, n)
    shifts = (4 * torch.arange(8, device=packed.device)).view(1, 8, 1, 1)
    planes = (words >> shifts) & 0xF  # [tile, j, r, N]
    return planes.reshape(k8 * 8, n).T.to(torch.uint8).contiguous()


def transposed_scales(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero [N, G] -> scale_t, zs_t [G, N] float32 with zs = -zero * scale."""
    s = scale.float()
    return s.T.contiguous(), (-zero.float() * s).T.contiguous()


# --- fused dequantize-GEMM ---------------------------------------------------------------------
# "swap" tiles (BLOCK_M tokens, BLOCK_N weight rows, warps, stages): the weight rows are the
# wgmma's 64-row side, tokens its N side (16..256). Each fits Hopper's 227 KB of shared memory
# (sm_90 compile, Triton 3.9: 38 KB at 16x64 to 229 KB at 128x256 g32); 256x128 with 3 stages
# and 128x256 with 4 do not, so they are left out
SWAP_SHAPES = [
    (16, 64, 4, 4),
    (16, 128, 4, 4),
    (32, 128, 4, 4),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 256, 8, 3),
    (256, 128, 8, 2),
]


# Split K (reduced serially inside the kernel, `_store_split`) up to this many token rows. At M = 16-64 a
# layer has as few output tiles as at M = 1 (one row block): without split-K, 4096 outputs in
# 128-wide blocks run 32 programs on the H200's 132 SMs. The 2026-11-29 sweep, which split only
# up to M = 16, had the kernel at 1.0-1.1x of bf16 at M = 16 and 0.4-0.8x at M = 32 (cached
# block decoding's M); splitting up to 64, the 2026-11-30 sweep had it at 0.82-1.02x at M = 32
# and 0.52-0.82x at M = 64 (0.35-0.60x before).
SPLIT_K_MAX_M = 64
MAX_SPLIT_K = 8  # the most K ranges a config splits into (sizes the partials' workspace)
# ... and only below this many output columns: from 32768 on a layer has 512 column tiles of 64
# (enough programs without splitting), and a quantized LM head (126464 columns) at M = 64 would
# need a 260 MB workspace of partials
SPLIT_K_MAX_N = 32768


def _may_split(m: int, n: int) -> bool:
    return m <= SPLIT_K_MAX_M and n < SPLIT_K_MAX_N


def _configs(swap: bool = True) -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, warps, stages
        (16, 64, 4, 4),
        (16, 128, 4, 4),
        (32, 64, 4, 4),
        (32, 128, 4, 4),
        (64, 64, 4, 4),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (128, 128, 8, 3),
        (128, 256, 8, 3),
    ]
    variants = [(shape, unpack) for shape in shapes for unpack in ("planes", "tile")]
    variants += [(shape, "swap") for shape in SWAP_SHAPES] if swap else []
    out = []
    for (bm, bn, warps, stages), unpack in variants:
        for split in (1, 2, 4, MAX_SPLIT_K) if bm <= SPLIT_K_MAX_M else (1,):
            meta = {"BLOCK_M": bm, "BLOCK_N": bn, "UNPACK": unpack, "SPLIT_K": split}
            out.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
    """Row blocks no taller than M needs (16 at least); split K only for M <= SPLIT_K_MAX_M,
    where one row block leaves too few output tiles to fill the GPU; and never at large M."""
    m = named_args["M"]
    tallest = max(16, triton.next_power_of_2(m))
    keep = []
    for c in configs:
        bm, split = c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]
        no_split = not _may_split(m, named_args["N"])
        if bm > tallest or (split > 1 and no_split) or (m >= 256 and bm < 64):
            continue
        keep.append(c)
    return keep or configs[:1]


@triton.jit
def _dequant_rows(packed, j: tl.constexpr, s, zs):
    """Nibble plane j of a [16, BN] int32 block -> float32 weights (codes * s + zs)."""
    return ((packed >> (4 * j)) & 0xF).to(tl.float32) * s + zs


@triton.jit
def _fast_path(dtype: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Whether the "planes" K loop feeds the tensor cores exact integer weights (code - zero in
    the 16-bit type, `_biased_codes` - `_biased_zeros`) and scales per tile after the dots:
    16-bit activations, a scale group spanning whole K tiles (one scale per column per tile),
    and row blocks up to 64 (at 128 x 256 the extra per-tile accumulator spills: sm_90 SASS,
    2026-11-30). Else each weight is dequantized in float32 before its dot."""
    is_16bit: tl.constexpr = dtype == tl.bfloat16 or dtype == tl.float16
    return is_16bit and GROUP_SIZE % 128 == 0 and BLOCK_M <= 64


@triton.jit
def _code_bias(dtype: tl.constexpr):
    """The float whose mantissa's low bits `_biased_codes` fills: 128 in bfloat16 (7 mantissa
    bits), 1024 in float16 (10): BIAS + code is then exact for every 4-bit code."""
    if dtype == tl.bfloat16:
        return 128.0
    else:
        return 1024.0


@triton.jit
def _biased_zeros(s, zs, dtype: tl.constexpr):
    """BIAS + zero in `dtype` (exact: zero is an integer in [0, 16)), from the float32 scale and
    zs = -zero * scale: the division is within an ulp of the integer, which rounding restores."""
    zero = (-zs / s + 0.5).to(tl.int32)  # zero >= 0: truncation rounds
    return (zero.to(tl.float32) + _code_bias(dtype)).to(dtype)


@triton.jit
def _biased_codes(words, shift, dtype: tl.constexpr):
    """The nibbles at `shift` of an int32 block as `dtype` values BIAS + code, exactly, without
    an int->float conversion: the code OR'd into the mantissa of BIAS (0x4300 is 128.0 in
    bfloat16, 0x6400 1024.0 in float16). The float32 form (`_dequant_rows`) costs a shift, a
    mask, an I2F, an FMA and half an F2F a weight; this one a shift and a LOP3, then a packed
    16-bit subtraction of the zero (sm_90 SASS of a 32x128 "planes" step, 2026-11-30: 861
    instructions a thread before, 750 after)."""
    bias_bits: tl.constexpr = 0x4300 if dtype == tl.bfloat16 else 0x6400
    bits = ((words >> shift) & 0xF) | bias_bits
    return bits.to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def _swap_matmul(
    x_ptr,
    q_ptr,
    s_ptr,
    zs_ptr,
    rm_c,
    rn_c,
    N,
    K,
    stride_xm,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y.T tile [BN, BM] = W_hat tile [BN, K] @ x.T [K, BM] over this program's K tiles.

    The weight is the dot's *left* operand: on Hopper, wgmma reads its left operand from
    registers and only its right one from shared memory, so the tile dequantized in registers
    feeds the tensor cores without a round trip through shared memory, while x (a plain load,
    software-pipelined num_stages deep) is the right operand. Tokens become the MMA's N side
    (8..256 wide), so small M still fills 64-row wgmma tiles with weight rows. The [BN, 16]
    int32 block of a K tile is read once (no gather: a gathered [BN, 128] block was staged in
    shared memory 8 times over) and broadcast over the 8 nibble planes in registers."""
    r16, j8, rk = tl.arange(0, 16), tl.arange(0, 8), tl.arange(0, 128)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for tile in range(tl.program_id(1), K // 128, SPLIT_K):
        k0 = tile * 128
        packed = tl.load(q_ptr + (tile * 16 + r16)[None, :] * N + rn_c[:, None])  # [BN, 16]
        # [BN, j, r]: nibble j of row r is k = 16 j + r
        codes = (packed[:, None, :] >> (4 * j8)[None, :, None]) & 0xF
        if GROUP_SIZE % 128 == 0:  # one scale per column for the whole tile
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * N + rn_c)[:, None, None]
            zs = tl.load(zs_ptr + g * N + rn_c)[:, None, None]
        else:  # one per plane of 16 k (a plane never straddles a group)
            g = ((k0 + 16 * j8) // GROUP_SIZE)[None, :]
            s = tl.load(s_ptr + g * N + rn_c[:, None])[:, :, None]
            zs = tl.load(zs_ptr + g * N + rn_c[:, None])[:, :, None]
        w = tl.reshape(codes.to(tl.float32) * s + zs, (BLOCK_N, 128))
        x_t = tl.load(x_ptr + rm_c[None, :] * stride_xm + (k0 + rk)[:, None])  # [128, BM]
        acc = tl.dot(w.to(x_ptr.dtype.element_ty), x_t, acc)
    return acc


@triton.jit
def _store_split(
    acc,
    y_ptr,
    part_ptr,
    cnt_ptr,
    b_ptr,
    rows,
    cols,
    ok,
    M,
    N,
    stride_ym,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
):
    """Store this program's tile of y (+ bias[cols]) in y's dtype; with split K, reduce
    serially: write the float32 partial to the workspace [SPLIT_K, M, N], count in on the
    tile's counter (acq_rel); the last program to arrive sums the partials in a fixed order
    (the same bits every call), stores y and resets the counter for the next call. No
    zero-fill or cast kernel around it. Shared with `triton_gemv` (counter per program_id(0),
    split index program_id(1))."""
    y_ptrs = y_ptr + rows * stride_ym + cols
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        p_ptrs = part_ptr + rows * N + cols
        # 64-bit: [SPLIT_K, M, N] may pass 2**31 elements (M may arrive as the constant 1)
        split_stride = tl.cast(M, tl.int64) * N
        tl.store(p_ptrs + tl.program_id(1) * split_stride, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                part = tl.load(
                    p_ptrs + split * split_stride, mask=ok, other=0.0, cache_modifier=".cg"
                )
                total += part
            if HAS_BIAS:
                total += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)  # ready for the next call


@triton.jit
def _w4_matmul_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    zs_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    M_BUCKET,  # autotuning key only
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNPACK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    # programs that share a column block run together (L2 reuse of the weight)
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % rows)
    pid_n = (pid % (GROUP_M * n_n)) // rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok, n_ok = rm < M, rn < N
    if UNPACK == "swap":
        # out-of-range rows / columns read row / column 0 (masked at the store), so the loads
        # of the K loop carry no masks
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        rn_c = tl.where(n_ok, rn, 0)
        acc_t = _swap_matmul(
            x_ptr, q_ptr, s_ptr, zs_ptr, rm_c, rn_c, N, K, stride_xm,
            GROUP_SIZE, BLOCK_M, BLOCK_N, SPLIT_K,
        )  # fmt: skip
        rows, cols = rm.to(tl.int64)[None, :], rn[:, None]
        ok = m_ok[None, :] & n_ok[:, None]
        _store_split(
            acc_t, y_ptr, part_ptr, cnt_ptr, None, rows, cols, ok, M, N, stride_ym, SPLIT_K
        )
    else:
        acc = _plain_matmul(
            x_ptr, q_ptr, s_ptr, zs_ptr, rm, rn, m_ok, n_ok, N, K, stride_xm,
            GROUP_SIZE, BLOCK_M, BLOCK_N, UNPACK, SPLIT_K,
        )  # fmt: skip
        rows, cols = rm.to(tl.int64)[:, None], rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        _store_split(acc, y_ptr, part_ptr, cnt_ptr, None, rows, cols, ok, M, N, stride_ym, SPLIT_K)


@triton.jit
def _plain_matmul(
    x_ptr,
    q_ptr,
    s_ptr,
    zs_ptr,
    rm,
    rn,
    m_ok,
    n_ok,
    N,
    K,
    stride_xm,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNPACK: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y tile [BM, BN] = x [BM, K] @ W_hat.T [K, BN] over this program's K tiles, the weight
    as the right operand: eight K=16 dots per tile ("planes") or one K=128 dot ("tile")."""
    r16 = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(tl.program_id(1), K // 128, SPLIT_K):
        k0 = tile * 128
        if UNPACK == "planes":
            packed = tl.load(
                q_ptr + (tile * 16 + r16)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0
            )  # [16, BN]
            if GROUP_SIZE % 128 == 0:  # one scale row for the whole tile
                g = k0 // GROUP_SIZE
                # (past N a scale of 1: finite weights in columns that are never stored)
                s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=1.0)[None, :]
                zs = tl.load(zs_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
            if _fast_path(x_ptr.dtype.element_ty, GROUP_SIZE, BLOCK_M):
                # one scale per column for the tile: dot the exact codes minus zeros in the
                # 16-bit type, scale after
                dtype: tl.constexpr = x_ptr.dtype.element_ty
                zb = _biased_zeros(s, zs, dtype)  # [1, BN]
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(8):
                    x = tl.load(
                        x_ptr + rm[:, None] * stride_xm + (k0 + 16 * j + r16)[None, :],
                        mask=m_ok[:, None],
                        other=0.0,
                    )  # [BM, 16]
                    part = tl.dot(x, _biased_codes(packed, 4 * j, dtype) - zb, part)
                acc += s * part
            else:
                for j in tl.static_range(8):
                    if GROUP_SIZE % 128 != 0:  # planes of 16 k never straddle a group
                        g = (k0 + 16 * j) // GROUP_SIZE
                        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
                        zs = tl.load(zs_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
                    x = tl.load(
                        x_ptr + rm[:, None] * stride_xm + (k0 + 16 * j + r16)[None, :],
                        mask=m_ok[:, None],
                        other=0.0,
                    )  # [BM, 16]
                    w = _dequant_rows(packed, j, s, zs)  # [16, BN]
                    acc = tl.dot(x, w.to(x.dtype), acc)
        else:
            rk = tl.arange(0, 128)  # row rk of the tile is k0 + rk: plane rk // 16, row rk % 16
            packed = tl.load(
                q_ptr + (tile * 16 + rk % 16)[:, None] * N + rn[None, :],
                mask=n_ok[None, :],
                other=0,
            )  # [128, BN], each int32 read by 8 rows (cache hits)
            g = (k0 + rk) // GROUP_SIZE  # [128]
            s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0.0)
            zs = tl.load(zs_ptr + g[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0.0)
            codes = (packed >> ((rk // 16) * 4)[:, None]) & 0xF
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0
            )  # [BM, 128]
            w = codes.to(tl.float32) * s + zs
            acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


def _autotuner(swap: bool):  # noqa: ANN202 - a triton Autotuner
    return triton.autotune(
        configs=_configs(swap),
        key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
        prune_configs_by={"early_config_prune": _prune},
    )(_w4_matmul_kernel)


# The "swap" variant was compiled and checked for sm_90 with one Triton version only: where
# another fails to compile it (an error the autotuner does not skip, unlike running out of
# shared memory), the first call falls back, once and for good, to the configs without it.
# FAIRCALIB_W4_SWAP=0 leaves it out from the start.
SWAP_ON = os.environ.get("FAIRCALIB_W4_SWAP", "1") != "0"
_autotuned_matmul = _autotuner(swap=SWAP_ON)
_autotuned_matmul_no_swap = _autotuner(swap=False)
_swap_failed: list[str] = []


def m_bucket(m: int) -> int:
    """Autotuning key for M: its power-of-two ceiling (one tuning per bucket, not per M)."""
    return triton.next_power_of_2(max(1, m))


def split_counters(n: int, device: torch.device | str) -> torch.Tensor:
    """The zeroed int32 arrival counters of `w4_matmul`'s serial split-K, one per output tile
    of the smallest tiles that split (16 x 16) up to SPLIT_K_MAX_M rows: built once per layer
    (kept with its layout); every call leaves them at zero again."""
    tiles = triton.cdiv(SPLIT_K_MAX_M, 16) * triton.cdiv(n, 16)
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def w4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_t: torch.Tensor,
    zs_t: torch.Tensor,
    counters: torch.Tensor | None = None,
    *,
    interpreted_meta: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) @ W_hat.T -> [M, N] in x's dtype, from the tile layout, in one
    kernel. `counters` (`split_counters`) belong to this weight: one layer must not run on two
    streams at once; without them a zeroed set is made for the call.

    `interpreted_meta` fixes the block sizes (CPU interpreter, where nothing can be timed)."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[1]
    group_size = k // scale_t.shape[0]
    meta = None
    if INTERPRETED or interpreted_meta is not None:
        meta = interpreted_meta or {"BLOCK_M": 16, "BLOCK_N": 32, "UNPACK": "planes", "SPLIT_K": 1}
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    # the split partials (float32); the caching allocator hands these out without a kernel
    split = meta["SPLIT_K"] if meta else (MAX_SPLIT_K if _may_split(m, n) else 1)
    # one counter per output tile of the smallest split tiles (a fixed config: its own)
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]) if meta else 0
    tiles = max(tiles, triton.cdiv(m, 16) * triton.cdiv(n, 16))
    if counters is None:
        counters = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    elif split > 1 and counters.numel() < tiles:
        raise ValueError(f"too few split-K counters ({counters.numel()}): use split_counters")
    part = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if split > 1 else y

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return tiles, meta["SPLIT_K"]

    args = (x, packed, scale_t, zs_t, y, part, counters, m, n, k, x.stride(0), y.stride(0))
    args += (m_bucket(m),)
    if meta:
        _w4_matmul_kernel[grid](*args, GROUP_SIZE=group_size, **meta)
    elif _swap_failed or not SWAP_ON:
        _autotuned_matmul_no_swap[grid](*args, GROUP_SIZE=group_size)
    else:
        try:
            _autotuned_matmul[grid](*args, GROUP_SIZE=group_size)
        except torch.cuda.OutOfMemoryError:
            raise  # not a compile failure: no config would help
        except Exception as err:  # noqa: BLE001 - a compile failure: retry without "swap"
            record_failure(_swap_failed, "W4 Triton GEMM: the 'swap' configs", "the others", err)
            _autotuned_matmul_no_swap[grid](*args, GROUP_SIZE=group_size)
    return y


# --- dequantizer (large M: then cuBLAS) --------------------------------------------------------
@triton.jit
def _w4_dequant_kernel(
    q_ptr, s_ptr, zs_ptr, w_ptr, N, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr
):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    r16 = tl.arange(0, 16)
    packed = tl.load(
        q_ptr + (tile * 16 + r16)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0
    )
    for j in tl.static_range(8):
        k = tile * 128 + 16 * j
        g = k // GROUP_SIZE
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
        zs = tl.load(zs_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
        w = _dequant_rows(packed, j, s, zs)
        ptrs = w_ptr + (k + r16)[:, None] * N + rn[None, :]
        tl.store(ptrs, w.to(w_ptr.dtype.element_ty), mask=n_ok[None, :])


def w4_dequantize(
    packed: torch.Tensor, scale_t: torch.Tensor, zs_t: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Tile layout -> W_hat.T [K, N] in `dtype` (one pass: reads 0.5 B, writes 2 B per weight)."""
    k8, n = packed.shape
    k = k8 * 8
    w_t = torch.empty(k, n, device=packed.device, dtype=dtype)
    block_n = 128 if INTERPRETED else 256
    grid = (k // TILE_K, triton.cdiv(n, block_n))
    _w4_dequant_kernel[grid](
        packed, scale_t, zs_t, w_t, n, GROUP_SIZE=k // scale_t.shape[0], BLOCK_N=block_n
    )
    return w_t

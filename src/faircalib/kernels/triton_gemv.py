"""W4A16 GEMV in Triton for M <= 16 token rows (optional: needs `triton`), built for bandwidth.

At M = 1 a linear layer is a matrix-vector product: every weight byte is read once and used for
one multiply-add, so the kernel's speed is how fast it streams the packed INT4 weight. Tensor
cores cannot help; what limits it is the work per weight on the CUDA cores, so each code costs
two integer ops and two float ops, with no int->float conversion (I2F runs at a quarter rate):

    f = bitcast_float((code << 19) | 0x3F800000) = 1 + code / 16           (exact)
    w = A * f + B,  A = 16 * scale, B = -scale * (16 + zero)  =  scale * (code - zero)

(one FMA; B absorbs the 1 and the zero, so W_hat is exact up to float32 rounding, ~1e-6).

Layout (`pack_gemv`, built once per layer by QuantLinear and cached): codes packed 8 per int32
along K, `packed [N, K_pad / 8]` with K contiguous (each program reads long coalesced row
segments). K is cut into tiles of T = 8 W k (W = 32 words, 128 bytes per row, unless the group
size needs a smaller W); inside a tile, nibble j of word w holds k = 8 W tile + W j + w. So
nibble plane j of a [BLOCK_N, W] word tile is W *consecutive* k: one shift and one mask give
the codes of plane j, multiplied by the contiguous x slice x[k0 + W j : k0 + W j + W], and
every tensor of the K loop keeps one 2D register layout (no shuffles). W divides the group
size, so a plane never straddles a group and its scales are one [BLOCK_N] load (once per
tile when the group spans it). A, B are stored transposed, [G, N], so that load is coalesced.
K is zero-padded to a multiple of T (x is masked there).

Kernel (`gemv`): program (i, s) computes outputs [i BLOCK_N, (i + 1) BLOCK_N) for all M rows
over the s-th of SPLIT_K contiguous ranges of K tiles, accumulating [M_PAD, BLOCK_N, W] in
float32 registers (reduced over W once at the end). Split-K is reduced without extra kernels
(no zero-fill, no cast pass): each program writes its float32 partial to a workspace, then
counts itself in on a per-column-block counter (acq_rel atomic); the last one to arrive sums
the SPLIT_K partials in fixed order (deterministic), adds the bias, writes y in x's dtype and
resets the counter to 0 for the next call. The counters live with the cached layout, one set
per layer (so one layer must not run on two streams at once). Tile configs (BLOCK_N, SPLIT_K,
warps) are autotuned per (M bucket, N, K, group); the loads have no dot to pipeline for, so
memory-level parallelism comes from many resident programs (small register footprint) and,
with PREFETCH (autotuned beside it), from each program loading its next tile into registers
before unpacking the current one. The H200 sweep had the kernel without it at ~30% of the
bandwidth roofline at M = 1. By the ALU count (about 4-5 integer and float operations a weight),
the kernel should be memory-bound at ~8 us on 4096x14336 against the 21 us measured, so it
waits on load latency. PREFETCH hid little of it: the 2026-11-30 H200 sweep had the kernel at
1.35-1.58x of bf16 at M = 1 on the eight 8B shapes (1.31-1.55x before), below torch's int4
kernel (1.62-1.86x), so `auto` does not use it.

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_kernels_gemv.py, one fixed config);
compiled for sm_90 there too. Timed by benchmarks/kernels.py (candidate `triton_gemv`).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from faircalib.kernels.triton_w4 import _store_split

MAX_M = 16  # a GEMV kernel: larger M belongs to the tensor-core kernels
MAX_WORDS = 32  # words per row per K tile (128 bytes: one cache line per row per step)
MIN_BLOCK_N = 16  # smallest BLOCK_N of any config: sizes the split-K counters
MAX_SPLIT_K = 16  # largest SPLIT_K of any config: sizes the partials' workspace
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests: no GPU to autotune on
INTERPRETED_META = {"BLOCK_N": 16, "SPLIT_K": 2, "PREFETCH": False}


# --- layout ---------------------------------------------------------------------------------
def tile_words(group_size: int) -> int:
    """W, the words per row of one K tile: the largest power of two up to 32 that divides the
    group size (K for per-channel; 8 at least for multiples of 8), so no nibble plane of W
    consecutive k straddles a group."""
    return math.gcd(group_size, MAX_WORDS)


def pack_gemv(codes: torch.Tensor, words: int) -> torch.Tensor:
    """[N, K] codes in [0, 16) -> [N, K_pad / 8] int32 (module docstring), K zero-padded to a
    multiple of 8 * words."""
    n, k = codes.shape
    tile = 8 * words
    k_pad = -(-k // tile) * tile
    c = torch.zeros(n, k_pad, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes.to(torch.int64)
    planes = c.reshape(n, k_pad // tile, 8, words)  # [N, tile, j, w]: k = tile T + j W + w
    shifts = (4 * torch.arange(8, device=codes.device)).view(1, 1, 8, 1)
    packed = (planes << shifts).sum(dim=2)  # [N, tile, w], < 2^32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement int32
    return packed.to(torch.int32).reshape(n, k_pad // 8).contiguous()


def unpack_gemv(packed: torch.Tensor, words: int) -> torch.Tensor:
    """Inverse of `pack_gemv`: [N, K_pad / 8] int32 -> [N, K_pad] uint8 codes."""
    n, k8 = packed.shape
    w = packed.to(torch.int64).reshape(n, k8 // words, 1, words)
    shifts = (4 * torch.arange(8, device=packed.device)).view(1, 1, 8, 1)
    return ((w >> shifts) & 0xF).reshape(n, k8 * 8).to(torch.uint8).contiguous()


def gemv_scales(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero [N, G] -> A, B [G, N] float32 with A f + B = scale (code - zero) for the
    kernel's f = 1 + code / 16."""
    s, z = scale.float(), zero.float()
    return (16 * s).T.contiguous(), (-s * (16 + z)).T.contiguous()


# --- kernel -----------------------------------------------------------------------------------
def _configs() -> list[triton.Config]:
    # BLOCK_N x SPLIT_K sized so that 8B shapes launch >= 4 programs per H200 SM (132) at
    # N = 4096 (e.g. 32 x 4 -> 512) and fewer, longer programs where N or K is large
    shapes = [  # BLOCK_N, SPLIT_K, warps
        (16, 1, 4),
        (16, 4, 4),
        (16, 16, 4),
        (32, 1, 4),
        (32, 4, 4),
        (32, 8, 4),
        (64, 2, 4),
        (64, 4, 4),
        (64, 8, 4),
        (128, 4, 4),
        (128, 8, 8),
        (128, 16, 8),
    ]
    return [
        triton.Config(
            {"BLOCK_N": bn, "SPLIT_K": split, "PREFETCH": prefetch}, num_warps=warps, num_stages=1
        )
        for bn, split, warps in shapes
        for prefetch in (False, True)
    ]


def _prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
    """At most 64 float32 accumulators per thread (M_PAD x BLOCK_N x W over the threads: more
    spill at M = 16), and no more K splits than K tiles."""
    args = {**named_args, **kwargs}  # constexprs come as keyword arguments
    m_pad, words, n_tiles = args["M_PAD"], args["W"], args["N_TILES"]
    keep = [
        c
        for c in configs
        if m_pad * c.kwargs["BLOCK_N"] * words <= 64 * 32 * c.num_warps
        and c.kwargs["SPLIT_K"] <= max(1, n_tiles)
    ]
    return keep or configs[:1]


def group_planes(words: int, group_size: int) -> int:
    """Bit j set where nibble plane j of a K tile (8 planes of `words` k each) can start a new
    scale group: planes whose first k is a multiple of the group (groups dividing the tile), the
    first plane (groups spanning whole tiles), else every plane. A host-side constant, so the
    kernel's test of it is resolved at compile time on every Triton version."""
    tile = 8 * words
    if tile % group_size == 0:
        return sum(1 << j for j in range(8) if (j * words) % group_size == 0)
    if group_size % tile == 0:
        return 1
    return 0xFF


@triton.jit
def _gemv_kernel(
    x_ptr,
    q_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    M,
    N,
    K,
    N_TILES,
    stride_xm,
    stride_ym,
    GROUP_SIZE: tl.constexpr,
    W: tl.constexpr,
    NEW_GROUPS: tl.constexpr,
    M_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    T: tl.constexpr = 8 * W
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn_c = tl.where(n_ok, rn, 0)  # out-of-range rows read row 0 (never stored): no load masks
    rm = tl.arange(0, M_PAD)
    rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
    rw = tl.arange(0, W)
    # every tensor of the K loop is [M_PAD or 1, BN or 1, W]: one register layout throughout
    q_rows = q_ptr + rn_c.to(tl.int64)[None, :, None] * (N_TILES * W) + rw[None, None, :]
    x_rows = x_ptr + rm_c[:, None] * stride_xm  # [M_PAD, 1]

    per_split = tl.cdiv(N_TILES, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, N_TILES)
    acc = tl.zeros((M_PAD, BLOCK_N, W), dtype=tl.float32)
    if PREFETCH:  # (an empty range reads a valid tile it never uses)
        ahead = tl.load(q_rows + tl.minimum(first, N_TILES - 1) * W)
    for tile in range(first, last):
        if PREFETCH:
            # register double buffering: the next tile's load is in flight while this one is
            # unpacked (a load only stalls at its first use), so a program keeps two tiles
            # of weight bytes outstanding instead of waiting on each
            words = ahead
            # (clamped to this split's last tile: the final iteration re-reads a tile that is
            # in cache rather than fetching the next split's first one from memory)
            ahead = tl.load(q_rows + tl.minimum(tile + 1, last - 1) * W)
        else:
            words = tl.load(q_rows + tile * W)  # [1, BN, W] int32
        for j in tl.static_range(8):
            # scales only where plane j may start a group (`group_planes`); W divides the
            # group, so a plane is in one group
            if (NEW_GROUPS >> j) & 1:
                # (clamped: the zero padding past K, where x is masked, has no group)
                g = tl.minimum((tile * T + j * W) // GROUP_SIZE, (K - 1) // GROUP_SIZE)
                a = tl.load(a_ptr + g * N + rn_c)[None, :, None]
                b = tl.load(b_ptr + g * N + rn_c)[None, :, None]
            # nibble j (bits 4j..4j+3) moved to bits 19..22 of a float in [1, 2): shift + LOP3
            if 4 * j <= 19:
                bits = ((words << (19 - 4 * j)) & (0xF << 19)) | 0x3F800000
            else:
                bits = ((words >> (4 * j - 19)) & (0xF << 19)) | 0x3F800000
            w = bits.to(tl.float32, bitcast=True) * a + b  # [1, BN, W] = scale * (code - zero)
            k = (tile * T + j * W + rw)[None, :]
            xj = tl.load(x_rows + k, mask=k < K, other=0.0).to(tl.float32)[:, None, :]
            acc += w * xj
    part = tl.sum(acc, axis=2)  # [M_PAD, BN]

    ok = (rm < M)[:, None] & n_ok[None, :]
    rows, cols = rm.to(tl.int64)[:, None], rn[None, :]
    _store_split(part, y_ptr, part_ptr, cnt_ptr, bias_ptr, rows, cols, ok, M, N, stride_ym,
                 SPLIT_K, HAS_BIAS)  # fmt: skip


_autotuned = triton.autotune(
    configs=_configs(),
    key=["M_PAD", "N", "K", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune},
)(_gemv_kernel)


def m_pad(m: int) -> int:
    """M rounded up to a power of two: the kernel's row block (and autotuning bucket)."""
    return triton.next_power_of_2(max(1, m))


def gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    counters: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    interpreted_meta: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 16; bf16/fp16, or fp32 under the interpreter) @ W_hat.T (+ bias) -> [M, N]
    in x's dtype, from `pack_gemv`'s layout, `gemv_scales`' A/B and a zeroed int32 counter
    buffer of at least ceil(N / MIN_BLOCK_N) entries. `group_size`: K for per-channel.
    `interpreted_meta` fixes BLOCK_N / SPLIT_K (CPU interpreter, where nothing can be timed)."""
    x = x.contiguous()
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"gemv takes at most {MAX_M} rows, got {m}")
    n, k8 = packed.shape
    words = tile_words(group_size)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = torch.empty(MAX_SPLIT_K, m, n, device=x.device, dtype=torch.float32)
    has_bias = bias is not None
    args = (x, packed, a_t, b_t, bias if has_bias else y, y, part, counters)
    args += (m, n, k, k8 // words, x.stride(0), y.stride(0))
    consts = {"GROUP_SIZE": group_size, "W": words, "NEW_GROUPS": group_planes(words, group_size)}
    consts |= {"M_PAD": m_pad(m), "HAS_BIAS": has_bias}

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]

    meta = interpreted_meta or (INTERPRETED_META if INTERPRETED else None)
    if meta is not None:
        meta = {"PREFETCH": False, **meta}
    # the dequantization is one FMA a weight by design: ask for contraction explicitly (Triton
    # 3.10 turns its default off)
    if meta is not None:
        _gemv_kernel[grid](*args, **consts, **meta, enable_fp_fusion=True)
    else:
        _autotuned[grid](*args, **consts, enable_fp_fusion=True)
    return y

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
  loop (it never reaches memory). Two unpacking variants - eight K=16 dots per tile ("planes") or
  one K=128 dot over the whole tile, its rows gathered from the 16 int32 rows ("tile") - and
  tile shapes are autotuned per (M bucket, N, K); small M may split K across programs
  (float32 atomics) so a GEMV-like call still fills the GPU.
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
def _configs() -> list[triton.Config]:
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
    out = []
    for bm, bn, warps, stages in shapes:
        for unpack in ("planes", "tile"):
            for split in (1, 2, 4, 8) if bm == 16 else (1,):
                meta = {"BLOCK_M": bm, "BLOCK_N": bn, "UNPACK": unpack, "SPLIT_K": split}
                out.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
    """Row blocks no taller than M needs (16 at least); split K only for GEMV-like M <= 16,
    where too few output tiles exist to fill the GPU; and never at large M."""
    m = named_args["M"]
    tallest = max(16, triton.next_power_of_2(m))
    keep = []
    for c in configs:
        bm, split = c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]
        if bm > tallest or (split > 1 and m > 16) or (m >= 256 and bm < 64):
            continue
        keep.append(c)
    return keep or configs[:1]


@triton.jit
def _dequant_rows(packed, j: tl.constexpr, s, zs):
    """Nibble plane j of a [16, BN] int32 block -> float32 weights (codes * s + zs)."""
    return ((packed >> (4 * j)) & 0xF).to(tl.float32) * s + zs


@triton.jit
def _w4_matmul_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    zs_ptr,
    y_ptr,
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
                s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
                zs = tl.load(zs_ptr + g * N + rn, mask=n_ok, other=0.0)[None, :]
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
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y_ptrs, acc, mask=ok)  # y is a zeroed float32 buffer


_autotuned_matmul = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["y_ptr"],
)(_w4_matmul_kernel)


def m_bucket(m: int) -> int:
    """Autotuning key for M: its power-of-two ceiling (one tuning per bucket, not per M)."""
    return triton.next_power_of_2(max(1, m))


def w4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_t: torch.Tensor,
    zs_t: torch.Tensor,
    *,
    interpreted_meta: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) @ W_hat.T -> [M, N] in x's dtype, from the tile layout.

    `interpreted_meta` fixes the block sizes (CPU interpreter, where nothing can be timed)."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[1]
    group_size = k // scale_t.shape[0]
    meta = None
    if INTERPRETED or interpreted_meta is not None:
        meta = interpreted_meta or {"BLOCK_M": 16, "BLOCK_N": 32, "UNPACK": "planes", "SPLIT_K": 1}
    # a zeroed float32 output wherever split-K may accumulate into it with atomics
    split = meta["SPLIT_K"] > 1 if meta else m <= 16
    if split:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return tiles, meta["SPLIT_K"]

    args = (x, packed, scale_t, zs_t, y, m, n, k, x.stride(0), y.stride(0), m_bucket(m))
    if meta:
        _w4_matmul_kernel[grid](*args, GROUP_SIZE=group_size, **meta)
    else:
        _autotuned_matmul[grid](*args, GROUP_SIZE=group_size)
    return y.to(x.dtype)


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

"""INT4 group-wise weights x bf16 activations on Hopper through CUTLASS's mixed-input GEMM.

Why CUTLASS: the W4A16 target at M >= 256 needs the dequantization overlapped with the MMA.
Triton 3.6 on sm_90 feeds a dequantized tile back through shared memory (our fused GEMM runs
0.23-0.49x of bf16 there), while CUTLASS's mixed-input collective converts the INT4 operand in
registers and issues register-sourced wgmma (`csrc/w4a16_sm90.cu`).

The library is built and loaded by `cutlass_lib` (nvcc, the `nvidia-cutlass` wheel's headers,
a cache; ctypes over raw device pointers).

The math: QuantLinear's W = scale * (code - zero) with unsigned codes is written as
scale * (code - 8) + scale * (8 - zero): the codes XOR 8 are CUTLASS's signed int4 with the same
nibble order, and the kernel's per-group zero term is scale * (8 - zero), rounded to bf16 once.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from faircalib.kernels import cutlass_lib

NAME = "w4a16_sm90"  # csrc/w4a16_sm90.cu
GROUP_MULTIPLE = 64  # CUTLASS's K tile for bf16: a group must hold whole tiles
SHUFFLE_ROWS = 16  # the shuffle atom is 16 rows x 16 columns (compute_memory_reordering_atom)
# the library's configurations (csrc/w4a16_sm90.cu): index by token tile, all shuffled, one
# output tile per CTA; then the same with stream-K (the K loop split over the SMs)
TOKEN_TILE_CONFIG = {32: 2, 64: 1, 128: 0, 256: 3}
STREAM_K_CONFIG = {64: 7, 128: 5, 256: 6}
UNSHUFFLED_CONFIG = 4
CONFIGS = 11  # the library's configurations (fc_w4a16_sm90_config_name)
# 64 weight rows a tile, two consumer warp groups on alternate tiles (ping-pong), by token
# tile. config_for does not choose them: at M >= 256 on the large 8B shapes they ran 0.38-0.54x
# (64-token tile) to 0.56-1.05x (256) of bf16 where its picks ran 0.72-1.11x; only 4096x4096 at
# M <= 128 was faster on them (0.70-0.80x against 0.62-0.67x; benchmarks/results/cutlass-w4-pp)
PINGPONG_CONFIG = {64: 8, 128: 9, 256: 10}
WEIGHT_TILE = 128  # the tile along the weight rows (N) of every configuration config_for picks
# Work per token row of each token tile relative to the 256 tile, at M = 4096 on the H200
# (benchmarks/results/cutlass-w4: 0.81-0.94x, 0.54-0.62x and 0.32-0.36x of the 256 tile's speed
# on the seven large 8B shapes): a smaller tile fills more SMs but converts the same weight tile
# for fewer rows.
TILE_EFFICIENCY = {256: 1.0, 128: 0.85, 64: 0.57, 32: 0.34}
# Stream-K (M > 64) is modelled as the work spread evenly over the SMs, times 1 + FIXUP +
# PER_SPLIT x (splits of a tile's K loop beyond one): its partial sums meet in global memory.
# Fitted to the two H200 sweeps (cutlass-w4, cutlass-w4-sk: 70 cells of the seven large 8B
# shapes): the modelled best plan ran within 10% of the fastest configuration in 66.
STREAM_K_FIXUP, STREAM_K_PER_SPLIT = 0.2, 0.2
# At M <= 64 (rows too few to fill a tile, where the model's cost per row does not hold):
# stream-K where the best single-tile plan keeps less than this share of the SMs busy.
STREAM_K_BELOW = 0.5


def load_library() -> ctypes.CDLL:
    """The W4A16 library (cutlass_lib.load), its C signatures declared (once)."""
    return cutlass_lib.load(NAME, _declare)


def _declare(lib: ctypes.CDLL) -> None:
    cutlass_lib.check_version(NAME, lib.fc_w4a16_sm90_configs(), CONFIGS)
    lib.fc_w4a16_sm90_gemm.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int] * 4]
    lib.fc_w4a16_sm90_gemm.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fc_w4a16_sm90_workspace.argtypes = [ctypes.c_int] * 5
    lib.fc_w4a16_sm90_workspace.restype = ctypes.c_size_t
    lib.fc_w4a16_sm90_shuffled_offset.argtypes = [ctypes.c_int] * 4
    lib.fc_w4a16_sm90_shuffled_offset.restype = ctypes.c_int64
    lib.fc_w4a16_sm90_error.restype = ctypes.c_char_p
    lib.fc_w4a16_sm90_config_name.restype = ctypes.c_char_p


def config_for(m: int, n: int, sm_count: int = 132) -> int:
    """The configuration for M token rows and N weight rows: the plan of least modelled time
    over the token tiles up to the one that holds M, each one output tile per CTA (waves of
    tiles x the tile's cost per row) or, above M = 64, stream-K (see STREAM_K_FIXUP)."""
    holds_m = next((t for t in TOKEN_TILE_CONFIG if m <= t), 256)
    weight_tiles = -(-n // WEIGHT_TILE)
    plans = []  # (modelled time, config)
    for tile in (t for t in TOKEN_TILE_CONFIG if t <= holds_m):
        tiles = weight_tiles * -(-m // tile)
        per_wave = tile / TILE_EFFICIENCY[tile]
        plans.append((-(-tiles // sm_count) * per_wave, TOKEN_TILE_CONFIG[tile]))
        if m > 64 and tile in STREAM_K_CONFIG:
            splits = max(0.0, sm_count / tiles - 1)
            overhead = 1 + STREAM_K_FIXUP + STREAM_K_PER_SPLIT * splits
            plans.append((tiles / sm_count * per_wave * overhead, STREAM_K_CONFIG[tile]))
    config = min(plans)[1]
    tile = next((t for t, c in TOKEN_TILE_CONFIG.items() if c == config), None)
    if m <= 64 and tile is not None and weight_tiles * -(-m // tile) < STREAM_K_BELOW * sm_count:
        return STREAM_K_CONFIG[min(max(tile, 64), 256)]
    return config


# --- the weight in the kernel's layout -------------------------------------------------------------
def signed_int4(qweight: torch.Tensor) -> torch.Tensor:
    """QuantLinear's packed unsigned codes ([out, in/2] uint8, even column in the low nibble)
    -> CUTLASS int4b_t bytes of code - 8 (the same nibble order: XOR 8 in each nibble)."""
    return qweight ^ 0x88


def group_terms(
    scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, groups] scale and integer zero -> the kernel's N-major [groups, out] scale and
    zero term scale * (8 - zero), each rounded to `dtype` once."""
    s = scale.float()
    term = s * (8.0 - zero.float())
    return s.to(dtype).t().contiguous(), term.to(dtype).t().contiguous()


def reference_weight(
    int4: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor, group: int
) -> torch.Tensor:
    """[out, in] float64 weight the kernel's operands stand for: scale * q + zero term, q the
    signed nibbles (what the GEMM multiplies, before its own bf16 rounding)."""
    low = (int4 & 0xF).to(torch.int16)
    high = (int4 >> 4).to(torch.int16)
    q = torch.stack((low, high), dim=-1).reshape(int4.shape[0], -1)
    q = torch.where(q >= 8, q - 16, q).double()
    s = scale_t.t().double().repeat_interleave(group, dim=1)
    z = zero_t.t().double().repeat_interleave(group, dim=1)
    return s * q + z


def shuffle_offsets(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """[n, k] int64: where element (row i, column j) of the weight goes in the shuffled layout,
    CUTLASS's `tile_to_shape(compute_memory_reordering_atom<bf16, 1x1, [0,2,4,6,1,3,5,7]>,
    (n, k))` written out. The atom is 16 x 16 elements: row r = r0 + 8 r1 goes to 32 r0 + r1,
    column c = c0 + 2 c1 + 8 c2 to 4 c0 + 8 c1 + 2 c2 (the 16 values one thread feeds a wgmma
    made contiguous, in the order the int4 -> bf16 conversion unpacks); atoms are laid out
    rows first (row tile t_r, column tile t_c at 256 (t_r + t_c n / 16))."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    r, c = i % 16, j % 16
    in_atom = 32 * (r % 8) + r // 8 + 4 * (c % 2) + 8 * ((c // 2) % 4) + 2 * (c // 8)
    return in_atom + 256 * (i // 16 + (j // 16) * (n // 16))


def shuffle(plain: torch.Tensor) -> torch.Tensor:
    """[n, k/2] int4 bytes (K-major) -> the same bytes in the shuffled layout, computed with
    torch ops on the tensors' device and stream (no kernel of the library's own: its reorder
    helper launches on the legacy default stream and exits the process on an error)."""
    n, k = plain.shape[0], plain.shape[1] * 2
    nibbles = torch.stack((plain & 0xF, plain >> 4), dim=-1).reshape(n, k)
    out = torch.empty(n * k, dtype=torch.uint8, device=plain.device)
    out[shuffle_offsets(n, k, plain.device).reshape(-1)] = nibbles.reshape(-1)
    return (out[0::2] | (out[1::2] << 4)).reshape(n, k // 2)


@dataclass
class CutlassW4Weight:
    """One layer's weight in the kernel's layouts (prepared once, on the GPU)."""

    int4: torch.Tensor  # [out, in/2] int4b_t bytes, shuffled for the shuffled configs
    plain: torch.Tensor | None  # the unshuffled bytes, kept only when asked for
    scale: torch.Tensor  # [groups, out] bf16
    zero: torch.Tensor  # [groups, out] bf16
    out_features: int
    in_features: int
    group: int

    @classmethod
    def prepare(
        cls,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group: int,
        keep_plain: bool = False,
    ) -> CutlassW4Weight:
        out_f, in_f = qweight.shape[0], qweight.shape[1] * 2
        check_shape(out_f, in_f, group)
        plain = signed_int4(qweight).contiguous()
        s, z = group_terms(scale, zero)
        return cls(shuffle(plain), plain if keep_plain else None, s, z, out_f, in_f, group)


def check_shape(out_features: int, in_features: int, group: int) -> None:
    """ValueError naming what the kernel cannot take (TMA's 16-byte rows, whole K tiles)."""
    if group % GROUP_MULTIPLE or in_features % group:
        raise ValueError(
            f"the CUTLASS W4A16 kernel needs groups of a multiple of {GROUP_MULTIPLE} that "
            f"divide in_features (group {group}, in_features {in_features})"
        )
    if out_features % SHUFFLE_ROWS:
        raise ValueError(
            f"the CUTLASS W4A16 kernel needs out_features % {SHUFFLE_ROWS} == 0 ({out_features}): "
            "the weight shuffle moves blocks of 16 rows x 16 columns"
        )


def w4a16_gemm(x: torch.Tensor, weight: CutlassW4Weight, config: int | None = None) -> torch.Tensor:
    """x [..., in] bf16 @ W^T -> [..., out] bf16 on the current stream (graph-capturable: the
    workspace is allocated before capture on first use of a size)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cuda" or x.shape[-1] != weight.in_features:
        raise ValueError(
            f"the CUTLASS W4A16 GEMM takes bf16 CUDA activations of width {weight.in_features} "
            f"(got {x.dtype} on {x.device}, width {x.shape[-1]})"
        )
    lib = load_library()
    x2 = x.reshape(-1, weight.in_features).contiguous()
    m = x2.shape[0]
    if config is None:
        config = config_for(m, weight.out_features, cutlass_lib.sm_count(x.device))
    if not 0 <= config < lib.fc_w4a16_sm90_configs():
        raise ValueError(f"no CUTLASS W4A16 configuration {config}")
    w = weight.plain if config == UNSHUFFLED_CONFIG else weight.int4
    if w is None:
        raise ValueError("the unshuffled configuration needs CutlassW4Weight(keep_plain=True)")
    out = torch.empty(m, weight.out_features, device=x.device, dtype=torch.bfloat16)
    n, k, g = weight.out_features, weight.in_features, weight.group
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):  # the library sizes and launches on the current device
        space = cutlass_lib.workspace(x.device, lib.fc_w4a16_sm90_workspace(config, m, n, k, g))
        status = lib.fc_w4a16_sm90_gemm(
            config, x2.data_ptr(), w.data_ptr(), weight.scale.data_ptr(), weight.zero.data_ptr(),
            out.data_ptr(), m, n, k, g, space.data_ptr(), space.numel(), stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUTLASS W4A16 GEMM: {lib.fc_w4a16_sm90_error().decode()}")
    return out.reshape(*x.shape[:-1], n)

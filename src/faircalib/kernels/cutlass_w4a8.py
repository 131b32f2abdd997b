"""W4A8 (FP8 activations) for large M on Hopper through CUTLASS (csrc/w4a8_sm90.cu): the INT4
codes minus their zero points unpacked to an e4m3 [out, in] temporary per call
(`triton_w8a8.w4a8_unpack`: |code - zero| <= 15 is exact in e4m3), then CUTLASS's block-scaled
FP8 GEMM, which applies each (output, 128-k group) weight scale to the float accumulator of that
group's MMAs and the per-token activation scale once, in its epilogue.

Why: group-wise W4A8 must scale between one group's MMAs and the next. Our Triton kernels wait
for every group's MMA before scaling it and reach 17-27% of the 8-bit peak (0.54-0.75x of bf16,
benchmarks/results/kernels-w4a8-rescale). CUTLASS's mainloop waits too, but its producer warp
streams the operands in through TMA meanwhile: 43-51% of the 8-bit peak for the GEMM, 1.5-1.8x
the Triton W4A8's speed at M >= 1024 with the unpack included (H200,
benchmarks/results/cutlass-w4a8).

The numbers are `w4a8_fp8_dq`'s (the same operands and scales, float32 sums in another order).
"""

from __future__ import annotations

import ctypes

import torch

from faircalib.kernels import cutlass_lib

NAME = "w4a8_sm90"  # csrc/w4a8_sm90.cu
CONFIGS = 4  # the library's tile configurations, by index (fc_w4a8_sm90_config_name)
# by index: 128x128 cooperative, 64x128 pingpong, 128x128 cooperative in clusters of 2 along M
# (the weight tile multicast), 128x128 cooperative stream-K
COOP_128x128, PINGPONG_64x128, COOP_CLUSTER_128x128, STREAMK_128x128 = 0, 1, 2, 3
GROUP = 128  # k per scale: the kernel's K tile
MAX_K = 131072  # the library's table of A scale factors (ones) covers 1024 groups
FILL = 0.75  # the share of the SMs a 128 x 128 tile's output tiles must keep busy


def load_library() -> ctypes.CDLL:
    """The W4A8 library (cutlass_lib.load), its C signatures declared (once)."""
    return cutlass_lib.load(NAME, lambda lib: cutlass_lib.declare_scaled_gemm(lib, NAME, CONFIGS))


def config_for(m: int, n: int, k: int, sm_count: int = 132) -> int:
    """The tile for M token rows, N outputs and K inputs, fitted to the H200 sweep of every
    configuration (benchmarks/results/cutlass-w4a8: the seven large 8B shapes and 3584 x 512,
    M = 256-4096): 64 x 128 ping-pong on narrow layers (N <= 1024) and where 128 x 128 tiles
    leave SMs idle; stream-K on deep layers (K > N), whose few output columns it spreads over
    K; else 128 x 128 cooperative. A larger tile must keep FILL of the SMs busy."""
    if n <= 1024:
        return PINGPONG_64x128
    if k > n:
        return STREAMK_128x128
    tiles = -(-m // 128) * -(-n // 128)
    return COOP_128x128 if tiles >= FILL * sm_count else PINGPONG_64x128


def group_scales(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """A layer's scale [out, G] (group size in_features / G, a multiple of 128) -> the
    kernel's [out, in / 128] float32: each scale repeated over its group's 128-k tiles."""
    n_groups = scale.shape[1]
    group = in_features // n_groups
    if in_features % n_groups or group % GROUP:
        raise ValueError(
            f"the CUTLASS W4A8 GEMM needs groups of a multiple of {GROUP} inputs, "
            f"got {in_features} inputs in {n_groups} groups"
        )
    return scale.float().repeat_interleave(group // GROUP, dim=1).contiguous()


def check_operands(
    a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor
) -> None:
    """ValueError naming what the kernel would misread (types, devices, shapes, alignment)."""
    m, k = a8.shape
    n = w8.shape[0]
    problems = []
    if a8.dtype != torch.float8_e4m3fn or w8.dtype != torch.float8_e4m3fn:
        problems.append(f"e4m3 operands (got {a8.dtype}, {w8.dtype})")
    if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        problems.append("float32 scales")
    if k % GROUP or n % 8 or k > MAX_K:
        problems.append(f"K % {GROUP} == 0, K <= {MAX_K} and N % 8 == 0 (K {k}, N {n})")
    elif a_scale.numel() != m or w8.shape[1] != k or tuple(w_scale.shape) != (n, k // GROUP):
        problems.append(f"a_scale of {m} rows, w8 [{n}, {k}] and w_scale [{n}, {k // GROUP}]")
    devices = {t.device for t in (a8, a_scale, w8, w_scale)}
    if {d.type for d in devices} != {"cuda"} or len(devices) > 1:
        problems.append(f"CUDA tensors on one device (got {sorted(map(str, devices))})")
    if problems:
        raise ValueError("the CUTLASS W4A8 GEMM needs " + "; ".join(problems))


def fp8_group_scaled_mm(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    config: int | None = None,
) -> torch.Tensor:
    """sum over 128-k groups g of a_scale[m] * w_scale[n, g] * (a8 @ w8.T over g) for e4m3
    a8 [M, K], w8 [N, K], float32 a_scale [M] and w_scale [N, K / 128] -> [M, N] bf16, on the
    current stream (graph-capturable once a call of the size ran eagerly)."""
    a8, w8 = a8.contiguous(), w8.contiguous()
    a_scale, w_scale = a_scale.reshape(-1).contiguous(), w_scale.contiguous()
    check_operands(a8, a_scale, w8, w_scale)
    lib = load_library()
    (m, k), n = a8.shape, w8.shape[0]
    if config is None:
        config = config_for(m, n, k, cutlass_lib.sm_count(a8.device))
    if not 0 <= config < lib.fc_w4a8_sm90_configs():
        raise ValueError(f"no CUTLASS W4A8 configuration {config}")
    out = torch.empty(m, n, device=a8.device, dtype=torch.bfloat16)
    if m == 0:
        return out
    stream = torch.cuda.current_stream(a8.device).cuda_stream
    with torch.cuda.device(a8.device):  # the library sizes and launches on the current device
        space = cutlass_lib.workspace(a8.device, lib.fc_w4a8_sm90_workspace(config, m, n, k))
        status = lib.fc_w4a8_sm90_gemm(
            config, a8.data_ptr(), a_scale.data_ptr(), w8.data_ptr(), w_scale.data_ptr(),
            out.data_ptr(), m, n, k, space.data_ptr(), space.numel(), stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUTLASS W4A8 GEMM: {lib.fc_w4a8_sm90_error().decode()}")
    return out


def w4a8_fp8_gemm(
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    zero_t: torch.Tensor,
    w_scale: torch.Tensor,
    config: int | None = None,
) -> torch.Tensor:
    """e4m3 rows x8 [M, K] with scales [M, 1] x the tile-layout codes packed [K / 8, N] and
    zero points zero_t [G, N] (`triton_w8a8.w4a8_layout`) with `group_scales` w_scale
    [N, K / 128] -> [M, N] bf16: the codes unpacked to e4m3 (a per-call temporary, never kept),
    then `fp8_group_scaled_mm`."""
    from faircalib.kernels.triton_w8a8 import w4a8_unpack  # imports triton: only when used

    if x8.shape[0] == 0:
        return torch.empty(0, packed.shape[1], device=x8.device, dtype=torch.bfloat16)
    with torch.cuda.device(x8.device):  # the Triton unpack launches on the current device too
        w8 = w4a8_unpack(packed, zero_t, "fp8")
        return fp8_group_scaled_mm(x8, x_scale.float(), w8, w_scale, config)

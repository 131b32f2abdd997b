"""INT8 W8A8 GEMM on Hopper through CUTLASS (csrc/w8a8_sm90.cu): int8 x int8 with int32
accumulation, per-token x per-channel scales applied in the epilogue, bf16 out.

Why: the INT8 W8A8 target (1.6x bf16 at M >= 1024) needs a GEMM near the INT8 tensor-core peak.
Our Triton TMA GEMM reaches 44-59% of it, and cuBLAS has no per-token-scaled INT8 GEMM
(`torch._int_mm` then a scaling pass: 0.47-0.74x of bf16). CUTLASS's warp-specialized kernels
with the scales in an epilogue visitor tree are what vLLM and SGLang run for this.

The operands are those of the `int8_w8a8` backend: activations quantized per token
(`triton_w8a8.quantize_rows` / the fused norms), the weight as int8 [out, in] with float32
per-channel scales.
"""

from __future__ import annotations

import ctypes

import torch

from faircalib.kernels import cutlass_lib

NAME = "w8a8_sm90"  # csrc/w8a8_sm90.cu
CONFIGS = 7  # the library's tile configurations, by index (fc_w8a8_sm90_config_name)
# by index: 128x128 and 128x256 cooperative (the second also in clusters of 2), 64x128 and
# 64x256 pingpong, then 128x128 and 128x256 cooperative with stream-K
COOP_128x256, COOP_128x128, PINGPONG_64x128 = 1, 0, 3
FILL = 0.75  # the share of the SMs a larger tile's output tiles must keep busy


def load_library() -> ctypes.CDLL:
    """The W8A8 library (cutlass_lib.load), its C signatures declared (once)."""
    return cutlass_lib.load(NAME, lambda lib: cutlass_lib.declare_scaled_gemm(lib, NAME, CONFIGS))


def config_for(m: int, n: int, sm_count: int = 132) -> int:
    """The tile for M token rows and N outputs. H200 sweep (benchmarks/results/cutlass-w8a8,
    the GEMM alone, eight 8B shapes, M = 256-4096): 64 x 128 pingpong led every shape at
    M = 256 but one; 128 x 128 cooperative was within 9% of the best at 512 on the large
    shapes; from 1024, 128 x 256 cooperative was within 10% of the best wherever its tiles
    filled the GPU (1.72-2.16x of bf16) and 64 x 128 pingpong led where they did not
    (3584 x 512). A larger tile must keep FILL of the SMs busy."""
    if m < 512:
        return PINGPONG_64x128
    if m < 1024:
        fills = -(-m // 128) * -(-n // 128) >= FILL * sm_count
        return COOP_128x128 if fills else PINGPONG_64x128
    if -(-m // 128) * -(-n // 256) >= FILL * sm_count:
        return COOP_128x256
    return PINGPONG_64x128


def check_operands(
    a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor
) -> None:
    """ValueError naming what the kernel would misread (types, devices, TMA alignment)."""
    m, k = a8.shape
    n = w8.shape[0]
    problems = []
    if a8.dtype != torch.int8 or w8.dtype != torch.int8:
        problems.append(f"int8 operands (got {a8.dtype}, {w8.dtype})")
    if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        problems.append("float32 scales")
    if a_scale.numel() != m or w_scale.numel() != n or w8.shape[1] != k:
        problems.append(f"scales of {m} rows and {n} columns and w8 [{n}, {k}]")
    if k % 16 or n % 8:
        problems.append(f"K % 16 == 0 and N % 8 == 0 (K {k}, N {n})")
    if {t.device.type for t in (a8, a_scale, w8, w_scale)} != {"cuda"}:
        problems.append("CUDA tensors")
    if problems:
        raise ValueError("the CUTLASS INT8 GEMM needs " + "; ".join(problems))


def int8_scaled_mm(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    config: int | None = None,
) -> torch.Tensor:
    """(a8 [M, K] int8 * a_scale [M]) @ (w8 [N, K] int8 * w_scale [N])^T -> [M, N] bf16, on the
    current stream (graph-capturable once a call of the size ran eagerly)."""
    a8, w8 = a8.contiguous(), w8.contiguous()
    a_scale, w_scale = a_scale.reshape(-1).contiguous(), w_scale.reshape(-1).contiguous()
    check_operands(a8, a_scale, w8, w_scale)
    lib = load_library()
    (m, k), n = a8.shape, w8.shape[0]
    if config is None:
        config = config_for(m, n, cutlass_lib.sm_count(a8.device))
    if not 0 <= config < lib.fc_w8a8_sm90_configs():
        raise ValueError(f"no CUTLASS INT8 configuration {config}")
    out = torch.empty(m, n, device=a8.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(a8.device).cuda_stream
    with torch.cuda.device(a8.device):  # the library sizes and launches on the current device
        space = cutlass_lib.workspace(a8.device, lib.fc_w8a8_sm90_workspace(config, m, n, k))
        status = lib.fc_w8a8_sm90_gemm(
            config, a8.data_ptr(), a_scale.data_ptr(), w8.data_ptr(), w_scale.data_ptr(),
            out.data_ptr(), m, n, k, space.data_ptr(), space.numel(), stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUTLASS INT8 GEMM: {lib.fc_w8a8_sm90_error().decode()}")
    return out

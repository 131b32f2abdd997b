"""A fused dequantize-GEMM for <= 4-bit codes in Triton (optional: needs `triton`).

y [M, N] = x [M, K] @ W_hat.T with W_hat = scale * (code - zero), read straight from
QuantLinear's own layout: codes two per byte along K (even k in the low nibble), float32
scales and uint8 zeros [N, K / group]. Each program computes one [BLOCK_M, BLOCK_N] tile; per
K step it loads the packed bytes, unpacks and dequantizes a [BLOCK_K, BLOCK_N] weight tile in
registers and feeds tl.dot with float32 accumulation, so the bf16 weight never reaches memory
(the `dequant` backend writes and re-reads it). BLOCK_K always divides the group size, so a
K step sees one scale and one zero per column.

Tested on the CPU under TRITON_INTERPRET=1 with fp16/fp32 inputs (the interpreter has no
bfloat16; tests/test_kernels_triton.py); timed against the other backends by
benchmarks/kernels.py on the GPU. `auto` does not pick it until that benchmark shows it wins.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 64, 32, 4, 4),
        (16, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 32, 8, 3),
    ]
]


def _prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
    """Keep the configs whose BLOCK_K divides the group; small M never needs tall tiles."""
    group, m = named_args["group_size"], named_args["M"]
    keep = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]
    small = [c for c in keep if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return small or keep


@triton.jit
def _w4_matmul_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BM, BK]
        packed = tl.load(
            q_ptr + rn[None, :] * stride_qn + (k // 2)[:, None],
            mask=k_ok[:, None] & n_ok[None, :],
            other=0,
        )  # [BK, BN] uint8
        codes = (packed >> ((k % 2) * 4)[:, None].to(tl.uint8)) & 0xF
        g = k0 // group_size
        scale = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)  # [BN]
        zero = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0)
        w = (codes.to(tl.float32) - zero.to(tl.float32)[None, :]) * scale[None, :]
        acc = tl.dot(x, w.to(x.dtype), acc)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


_autotuned = triton.autotune(
    configs=_CONFIGS,
    key=["M", "N", "K", "group_size"],
    prune_configs_by={"early_config_prune": _prune},
)(_w4_matmul_kernel)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tests: no GPU to autotune on


def w4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) @ dequantized weight.T -> [M, N] in x's dtype.

    qweight [N, ceil(K/2)] uint8 nibbles, scale [N, G] float32, zero [N, G] uint8."""
    x = x.contiguous()
    m, k = x.shape
    n, n_groups = scale.shape
    group_size = k // n_groups
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    scale, zero = scale.float().contiguous(), zero.contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

    args = (
        x,
        qweight,
        scale,
        zero,
        y,
        m,
        n,
        k,
        group_size,
        x.stride(0),
        qweight.stride(0),
        scale.stride(0),
        y.stride(0),
    )
    if INTERPRETED:
        blocks = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32 if group_size % 64 else 64}
        _w4_matmul_kernel[grid](*args, **blocks)
    else:
        _autotuned[grid](*args)
    return y

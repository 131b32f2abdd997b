"""8-bit-activation GEMMs in Triton (optional: needs `triton`): W8A8 (FP8 e4m3 or INT8) and W4A8.

All three compute y [M, N] = (a_scale[:, None] * w_scale[None, :]) * (a8 @ w8.T) from 8-bit
activations a8 [M, K] with one float32 scale per token (row) and weights with one scale per
output channel (W8A8) or per (K-group, output channel) (W4A8):

- `quantize_rows(x, kind)`: one kernel, one program per token row: the row's abs-max, then
  the 8-bit row and its scale (rows up to `WHOLE_ROW_MAX_K` wide are held in registers and read
  once; wider ones twice, the second time from L1/L2; nothing but the 8-bit row and one float
  per row reaches memory). INT8 uses the project's activation grid
  (`quant.primitives.quantize_activations_per_token(x, 8)`: scale = max(|x|, floor) / 127,
  round half to even, +-127), so an INT8 kernel reproduces the fake-quantized layer exactly;
  FP8 maps each row's abs-max to 448 (`backends.fp8_quantize`). Both floor the abs-max at the
  project's one `quant.primitives.ACT_ABSMAX_FLOOR`. Quotients are IEEE-rounded, as torch's
  are (one division a row, then FMA corrections: `_divide`).
- `w8a8_matmul`: a8 [M, K] x w8 [N, K] (K contiguous: the K-major B operand Hopper's 8-bit
  wgmma wants), fp8 x fp8 -> fp32 or int8 x int8 -> int32 accumulators (exact: |sum| <
  K * 127^2 < 2^31 for K < 133 000), scales and bias applied once in the epilogue.
- `w4a8_matmul`: a8 [M, K] x INT4 codes in `triton_w4`'s tile layout (`packed [K / 8, N]`
  int32). Per tile of 128 k, the nibble planes (16 consecutive k each) are unpacked in
  registers, the zero point subtracted (code - zero lies in [-15, 15], exact in int8 and in
  e4m3) and joined into one [CHUNK, BLOCK_N] 8-bit operand, CHUNK = min(group, 128); the chunk's
  dot starts from zero and is added to the float32 accumulator times its group scale, so
  y = a_scale * sum_g s_g * sum_{k in g} a8_k * (code_k - zero_g) with exact integer (INT8) or
  fp32 (FP8) partial sums. Needs K % 128 == 0 and a group size of 32 or 64 (the 8-bit MMA's
  K divides it, and it divides the 128-k tile) or a multiple of 128, or per-channel.
- `w4a8_dq_matmul` (large M, like `triton_w4.w4_dequantize` + cuBLAS for W4A16): the same
  numbers from two kernels, `w4a8_unpack` (the tile layout -> an 8-bit [N, K] temporary of
  code - zero, one pass, freed after the call) and `w8_group_matmul` (a8 x w8 with the group
  scales applied per chunk in fp32, loads pipelined as in `w8a8_matmul`; per-channel runs
  `w8a8_matmul` itself), so the GEMM's K loop does no unpacking.

Autotuning: a short Hopper list (128x128 and 128x256 tiles, 8 warps, 3-4 stages, plus one
64x128 tile for M <= 64, and 64-wide tiles for layers of `few_tiles`) keyed by (M bucket, N,
K); deep layers of few tiles split K (`split_k_for`). Under TRITON_INTERPRET=1 a fixed tiny
config runs instead (the CPU tests). The interpreter has no bfloat16: tests use fp16/fp32
outputs; the GPU writes bf16.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from faircalib.kernels.fallback import record_failure
from faircalib.kernels.triton_w4 import INTERPRETED, TILE_K, m_bucket
from faircalib.quant.primitives import ACT_ABSMAX_FLOOR
from faircalib.quant.triton_rounding import round_half_even

FP8_MAX = 448.0
INT8_MAX = 127.0
# the abs-max floor of every row quantizer (all-zero rows stay zero): a constexpr, so the
# kernel may read it as a global
ABSMAX_FLOOR = tl.constexpr(ACT_ABSMAX_FLOOR)
KINDS = ("int8", "fp8")

# fixed configs for the CPU interpreter (nothing to time there)
TINY_W8A8 = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
TINY_W4A8 = {"BLOCK_M": 16, "BLOCK_N": 32}


def _torch_dtype(kind: str) -> torch.dtype:
    if kind not in KINDS:
        raise ValueError(f"8-bit kind must be one of {KINDS}, got {kind!r}")
    return torch.int8 if kind == "int8" else torch.float8_e4m3fn


# --- per-token activation quantization ---------------------------------------------------------
@triton.jit
def _round_e4m3(v):
    """v (|v| <= 448) rounded to the nearest e4m3 value, ties to even, in float32: the
    interpreter's own float32 -> fp8 cast drops the carry when rounding up crosses a power of
    two (127.9 -> 64), so it is handed values it need not round. ulp = 2^(max(e, -6) - 3)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _sign_of(v, round_half_even(v / ulp, False) * ulp)  # power-of-two division: exact


@triton.jit
def _row_scale(a, IS_INT8: tl.constexpr):
    """A row's scale from its abs-max a: the abs-max (floored) maps to the grid's top."""
    if IS_INT8:
        scale = tl.math.div_rn(tl.maximum(a, ABSMAX_FLOOR), tl.full((), 127.0, tl.float32))
    else:
        scale = tl.math.div_rn(tl.maximum(a, ABSMAX_FLOOR), tl.full((), 448.0, tl.float32))
    return scale


@triton.jit
def _divide(x, scale):
    """x / scale correctly rounded, as torch's IEEE division gives it, without a division per
    element: q = x * RN(1 / scale), then twice q += RN(1 / scale) * (x - q * scale), the
    remainder exact in an FMA. The first correction brings q within an ulp of x / scale; from
    there Markstein's theorem makes the second one the correctly rounded quotient.
    - No overflow: |x / scale| <= 448.
    - The remainder underflows only for |x| below about 2^-100; such a quotient (below 2^-60, as
      scale >= 1e-8 / 448) may be an ulp off, and rounds to the same zero on both 8-bit grids.
    - A row with an infinite abs-max has scale = inf and inv = 0: its corrections use a zero
      scale, so a finite x gives 0 and an infinite one NaN, as x / inf does.
    Measured (benchmarks/results/row-quant/README.md): with whole rows held in registers the
    quantizer ran 1.13-1.41x faster than with a div.rn per element; in passes about as fast."""
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), scale)
    scale = tl.where(inv == 0.0, 0.0, scale)  # a row scale, not an element: no per-element cost
    q = x * inv
    q = tl.math.fma(tl.math.fma(-q, scale, x), inv, q)
    q = tl.math.fma(tl.math.fma(-q, scale, x), inv, q)
    # x = -0 comes out +0 (-0 + +0 rounds to +0); the quotient's sign is x's (scale > 0), and
    # e4m3 keeps it (0x80), as torch's division does
    return _sign_of(x, q)


@triton.jit
def _sign_of(x, v):
    """v (float32, of x's sign or zero) with x's sign bit: a zero keeps x's sign."""
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    return (v.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _on_grid(x, scale, IS_INT8: tl.constexpr, USE_RINT: tl.constexpr):
    """x / scale (IEEE) rounded onto the 8-bit grid, in float32 (every row quantizer's last step:
    one helper, so the fused ones below give the same bits as `quantize_rows`)."""
    v = _divide(x, scale)
    if IS_INT8:
        v = tl.minimum(tl.maximum(round_half_even(v, USE_RINT), -127.0), 127.0)
    else:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if not USE_RINT:
            v = _round_e4m3(v)
    return v


@triton.jit
def _quant_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    IS_INT8: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_RINT: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    rk = tl.arange(0, BLOCK_K)
    if WHOLE_ROW:  # the row held in registers: read from memory once
        ok = rk < K
        x = tl.load(x_row + rk, mask=ok, other=0.0).to(tl.float32)
        _quantize_held_row(x, q_row, s_ptr, row, rk, ok, IS_INT8, USE_RINT)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _row_scale(tl.max(amax, axis=0), IS_INT8)
        tl.store(s_ptr + row, scale)
        _quantize_row(x_row, q_row, K, scale, IS_INT8, BLOCK_K, USE_RINT)


@triton.jit
def _quantize_held_row(x, q_row, s_ptr, row, cols, ok, IS_INT8: tl.constexpr,
                       USE_RINT: tl.constexpr):  # fmt: skip
    """A whole row x (float32, in registers; masked lanes 0) quantized: its scale and 8-bit row
    stored."""
    scale = _row_scale(tl.max(tl.abs(x), axis=0), IS_INT8)
    tl.store(s_ptr + row, scale)
    tl.store(q_row + cols, _on_grid(x, scale, IS_INT8, USE_RINT).to(q_row.dtype.element_ty), ok)


@triton.jit
def _quantize_row(
    src_row, q_row, K, scale, IS_INT8: tl.constexpr, BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr
):
    """Every row quantizer's last pass: the row read (from L1/L2) and written on the grid."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + rk < K
        x = tl.load(src_row + k0 + rk, mask=ok, other=0.0).to(tl.float32)
        v = _on_grid(x, scale, IS_INT8, USE_RINT)
        tl.store(q_row + k0 + rk, v.to(q_row.dtype.element_ty), mask=ok)


def quantize_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (8-bit rows [M, K] int8 / float8_e4m3fn, float32 scales [M, 1])."""
    dtype = _torch_dtype(kind)
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=dtype)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m == 0:
        return q, s
    _quant_rows_kernel[(m,)](
        x, q, s, k, x.stride(0), q.stride(0), IS_INT8=kind == "int8", **_launch_args(k)
    )
    return q, s


# --- the ops that write an activation, fused with its row quantization --------------------------
# Each program owns one row. Rows up to WHOLE_ROW_MAX_K wide are held in registers: the op's
# inputs are read once, its output y stored (any other reader still gets it) and quantized from
# the registers. Wider rows take passes: pass 1 reduces what the op needs; pass 2 computes y
# (stored) and its abs-max; pass 3 reads y back (after a barrier; the row was just written, so
# from L1/L2) and quantizes it with `_on_grid`. Either way q, s are exactly
# `quantize_rows(y, kind)` of the y returned: the same y values meet the same `_on_grid`.
# Computing y a third time instead read the op's inputs again: slower at the MLP's width
# (benchmarks/results/e2e/fused-quant-probes.txt; removed after that measurement).
@triton.jit
def _normed(x, w, rstd):
    """weight * (x * rstd).to(x's dtype), in float32: RMSNorm's order (normalise in float32,
    cast back, then scale), as faircalib's LLaMA-like blocks and both upstreams compute it."""
    n = (x.to(tl.float32) * rstd).to(x.dtype)
    return w.to(tl.float32) * n.to(tl.float32)


@triton.jit
def _store_quantized(y, y_row, q_row, s_ptr, row, cols, ok, IS_INT8: tl.constexpr,
                     USE_RINT: tl.constexpr):  # fmt: skip
    """A whole row's output y (float32, in registers): stored in y's dtype, then that stored
    value quantized (the bits `quantize_rows` gives for it)."""
    y = y.to(y_row.dtype.element_ty)
    tl.store(y_row + cols, y, mask=ok)
    _quantize_held_row(y.to(tl.float32), q_row, s_ptr, row, cols, ok, IS_INT8, USE_RINT)


@triton.jit
def _quantize_written_row(y_row, q_row, s_ptr, row, amax, K, IS_INT8: tl.constexpr,
                          BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr):  # fmt: skip
    """The fused ops' last pass over a row they wrote in passes: its scale from the running
    abs-max, then the row read back and quantized."""
    scale = _row_scale(tl.max(amax, axis=0), IS_INT8)
    tl.store(s_ptr + row, scale)
    tl.debug_barrier()  # y's stores visible to every thread of the program
    _quantize_row(y_row, q_row, K, scale, IS_INT8, BLOCK_K, USE_RINT)


@triton.jit
def _norm_quant_kernel(
    x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, K, stride_xm, stride_ym, stride_qm, eps,
    IS_INT8: tl.constexpr, BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row, q_row = x_ptr + row * stride_xm, y_ptr + row * stride_ym, q_ptr + row * stride_qm
    rk = tl.arange(0, BLOCK_K)
    if WHOLE_ROW:
        ok = rk < K
        x = tl.load(x_row + rk, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
        y = _normed(x, tl.load(w_ptr + rk, mask=ok, other=0.0), rstd)
        _store_quantized(y, y_row, q_row, s_ptr, row, rk, ok, IS_INT8, USE_RINT)
    else:
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            squares += x * x
        rstd = tl.math.rsqrt(tl.sum(squares, axis=0) / K + eps)
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + rk < K
            x = tl.load(x_row + k0 + rk, mask=ok, other=0.0)
            w = tl.load(w_ptr + k0 + rk, mask=ok, other=0.0)
            y = _normed(x, w, rstd).to(y_ptr.dtype.element_ty)
            tl.store(y_row + k0 + rk, y, mask=ok)
            amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
        _quantize_written_row(y_row, q_row, s_ptr, row, amax, K, IS_INT8, BLOCK_K, USE_RINT)


@triton.jit
def _silu_times(g, u, USE_LIBDEVICE: tl.constexpr):
    """silu(gate) * up as eager torch computes it: silu in float32 (g / (1 + exp(-g)), IEEE
    division), rounded to gate's dtype, times up, in float32 (the caller casts)."""
    gf = g.to(tl.float32)
    if USE_LIBDEVICE:  # noqa: SIM108 - a constexpr branch; expf as torch's (not ex2.approx)
        e = libdevice.exp(-gf)
    else:
        e = tl.exp(-gf)
    silu = tl.math.div_rn(gf, 1.0 + e).to(g.dtype)
    return silu.to(tl.float32) * u.to(tl.float32)


@triton.jit
def _swiglu_quant_kernel(
    g_ptr, u_ptr, y_ptr, q_ptr, s_ptr, K, stride_gm, stride_um, stride_ym, stride_qm,
    IS_INT8: tl.constexpr, BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    g_row, u_row = g_ptr + row * stride_gm, u_ptr + row * stride_um
    y_row, q_row = y_ptr + row * stride_ym, q_ptr + row * stride_qm
    rk = tl.arange(0, BLOCK_K)
    if WHOLE_ROW:
        ok = rk < K
        g = tl.load(g_row + rk, mask=ok, other=0.0)
        y = _silu_times(g, tl.load(u_row + rk, mask=ok, other=0.0), USE_RINT)
        _store_quantized(y, y_row, q_row, s_ptr, row, rk, ok, IS_INT8, USE_RINT)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + rk < K
            g = tl.load(g_row + k0 + rk, mask=ok, other=0.0)
            u = tl.load(u_row + k0 + rk, mask=ok, other=0.0)
            y = _silu_times(g, u, USE_RINT).to(y_ptr.dtype.element_ty)
            tl.store(y_row + k0 + rk, y, mask=ok)
            amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
        _quantize_written_row(y_row, q_row, s_ptr, row, amax, K, IS_INT8, BLOCK_K, USE_RINT)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [M, K] rows with contiguous columns."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _fused_outputs(shape: torch.Size, dtype: torch.dtype, kind: str, device: torch.device):  # noqa: ANN202
    m, k = math.prod(shape[:-1]), shape[-1]
    y = torch.empty(shape, device=device, dtype=dtype)
    q = torch.empty(m, k, device=device, dtype=_torch_dtype(kind))
    s = torch.empty(m, 1, device=device, dtype=torch.float32)
    return y, q, s, m, k


# The row quantizers' launch rule. Rows up to WHOLE_ROW_MAX_K wide are held in registers (the
# op's inputs read once, 4 warps a row); wider ones are taken in PASS_BLOCK_K-column passes
# (the second read hits L2). `benchmarks/row_quant.py` measured the choices on an H200: whole
# rows ran 1.10-1.31x faster than the passes at 3584-4096 columns, 4 warps the fastest; holding
# 12288-18944 needs so many registers a thread (or 32-warp programs, one an SM) that the loads
# stop overlapping the arithmetic, up to 3.9x slower. No other pass width or warp count won in
# every cell (4096-column passes: 1.09-1.19x on rows of 18944 columns, 0.92-0.96x on SwiGLU's).
WHOLE_ROW_MAX_K = 4096
WHOLE_ROW_WARPS = 4
PASS_BLOCK_K = 2048
PASS_WARPS = 8


def _launch_args(k: int) -> dict:
    if k <= WHOLE_ROW_MAX_K:
        block_k, warps = triton.next_power_of_2(max(k, 16)), WHOLE_ROW_WARPS
    elif INTERPRETED:  # small blocks: the CPU tests take several passes at small widths
        block_k, warps = 128, 4
    else:
        block_k, warps = PASS_BLOCK_K, PASS_WARPS
    return {
        "BLOCK_K": block_k,
        "WHOLE_ROW": k <= WHOLE_ROW_MAX_K,
        "USE_RINT": not INTERPRETED,
        "num_warps": warps,
    }


def rms_norm_quantize_rows(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm and the per-token quantization of its output in one kernel: x [..., K] ->
    (y = weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) [..., K], in the dtype
    torch promotes weight and x to; then `quantize_rows(y, kind)`'s (q [M, K], s [M, 1]))."""
    dtype = torch.promote_types(weight.dtype, x.dtype)
    y, q, s, m, k = _fused_outputs(x.shape, dtype, kind, x.device)
    if m:
        rows = _rows(x)
        _norm_quant_kernel[(m,)](
            rows, weight.contiguous(), y, q, s, k, rows.stride(0), k, q.stride(0), float(eps),
            IS_INT8=kind == "int8", **_launch_args(k),
        )  # fmt: skip
    return y, q, s


def swiglu_quantize_rows(
    gate: torch.Tensor, up: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu(gate) * up and the per-token quantization of it in one kernel: gate, up [..., K]
    (one dtype) -> (y [..., K], then `quantize_rows(y, kind)`'s (q [M, K], s [M, 1]))."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ"
        )
    y, q, s, m, k = _fused_outputs(gate.shape, gate.dtype, kind, gate.device)
    if m:
        g, u = _rows(gate), _rows(up)
        _swiglu_quant_kernel[(m,)](
            g, u, y, q, s, k, g.stride(0), u.stride(0), k, q.stride(0),
            IS_INT8=kind == "int8", **_launch_args(k),
        )  # fmt: skip
    return y, q, s


# --- W8A8 GEMM -----------------------------------------------------------------------------------
def _w8a8_configs() -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 128, 128, 8, 4),
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (64, 128, 128, 4, 4),  # small M (decode-like, cached block steps)
        # deeper pipelines and a longer K step for large M: the H200 sweep had the INT8 GEMM at
        # 41-52% of the 8-bit peak with the tiles above (benchmarks/results/kernels); each fits
        # Hopper's 227 KB of shared memory (8-bit tiles: (BM + BN) x BK bytes a stage)
        (128, 256, 128, 8, 4),
        (256, 128, 128, 8, 4),
        (128, 128, 256, 8, 3),
        # layers of few output tiles only (`few_tiles`; Dream-7B's 3584 x 512 K / V at M <= 2048):
        # more, smaller tiles fill the SMs. benchmarks/results/kernels-split-k (H200, FP8, the
        # GEMM alone): 64 x 64 x 256 at 1.24x of bf16 at M = 1024 where 128 x 128 ran 0.75x and
        # torch._scaled_mm 0.73x; 64 x 128 at 1.56x at M = 2048 (1.13x)
        (64, 64, 128, 4, 4),
        (64, 64, 256, 4, 3),
        (128, 64, 128, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def few_tiles(m: int, n: int, sms: int) -> bool:
    """Whether an [m, n] output's 128 x 128 tiles fill at most half of `sms` multiprocessors
    (never off CUDA, sms = 0): then smaller tiles or a split K keep the GPU busy."""
    return 2 * triton.cdiv(m, 128) * triton.cdiv(n, 128) <= sms


def _current_sms() -> int:
    return _sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else 0


def _even_k(k: int) -> bool:
    """EVEN_K of an autotuned launch: K whole 128-deep steps. `_prune_w8a8` then keeps only the
    256-deep tiles that also divide K (an unmasked 256-deep step past K = 384 would read the
    next row, or past the tensor)."""
    return k % 128 == 0


def _prune_w8a8(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
    """`_prune_m`, except that a layer of few output tiles keeps every tile it fits (the
    64-row and 64-column ones too) and any other layer none narrower than 128 columns; no
    tile deeper than `_even_k` promises."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    if _even_k(k):
        configs = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
    if few_tiles(m, n, _current_sms()):
        tallest = max(64, triton.next_power_of_2(m))
        return [c for c in configs if c.kwargs["BLOCK_M"] <= tallest] or configs[-1:]
    return _prune_m([c for c in configs if c.kwargs["BLOCK_N"] >= 128], named_args, **kwargs)


def _prune_m(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's hook signature
    """No row block taller than M needs (64 at least); at M >= 256 the 64-row tile never wins."""
    m = named_args["M"]
    tallest = max(64, triton.next_power_of_2(m))
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= tallest and not (m >= 256 and c.kwargs["BLOCK_M"] < 128)
    ]
    return keep or configs[-1:]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: programs that share a column block of the weight run together."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % rows)
    pid_n = (pid % (GROUP_M * n_n)) // rows
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, as_ptr, ws_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """y = acc * a_scale[m] * w_scale[n] (+ bias[n]), in y's dtype."""
    m_ok, n_ok = rm < M, rn < N
    a_s = tl.load(as_ptr + rm, mask=m_ok, other=0.0)
    y = acc * a_s[:, None]
    if ws_ptr is not None:
        w_s = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        y = y * w_s[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w8a8_kernel(
    a_ptr,
    w_ptr,
    as_ptr,
    ws_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_ym,
    M_BUCKET,  # autotuning key only
    part_ptr,  # split K: the partials [SPLIT_K, M, N] (accumulator dtype); else unused
    cnt_ptr,  # split K: one zeroed arrival counter per output tile; else unused
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
    GROUP_M: tl.constexpr = 8,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)  # this program's share of K: tiles pid_k, pid_k + SPLIT_K, ...
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # clamp out-of-range rows/columns to valid ones (their results are masked at the store):
    # the loads of the K loop then need no row/column masks
    rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_c = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = a_ptr + rm_c[:, None] * stride_am + (pid_k * BLOCK_K + rk)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + rn_c[None, :] * stride_wn + (pid_k * BLOCK_K + rk)[:, None]  # [BK, BN]
    if IS_INT8:  # noqa: SIM108 - constexpr branches, one compiled
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        elif IS_INT8:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
            w = tl.load(w_ptrs, mask=(k0 + rk)[:, None] < K, other=0)
        else:  # an fp8 tensor's `other` must be a float
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            w = tl.load(w_ptrs, mask=(k0 + rk)[:, None] < K, other=0.0)
        if IS_INT8:  # noqa: SIM108
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += SPLIT_K * BLOCK_K
        w_ptrs += SPLIT_K * BLOCK_K
    if SPLIT_K == 1:
        _epilogue(
            acc.to(tl.float32), as_ptr, ws_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS
        )
    else:
        # serial reduction, as `triton_w4._store_split`: park the partial, count in; the last
        # program of the tile sums the partials in split order (int32 for INT8: the same exact
        # sum as one program's), runs the epilogue and re-zeroes the counter for the next call
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        p_ptrs = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        split_stride = tl.cast(M, tl.int64) * N
        tl.store(p_ptrs + pid_k * split_stride, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(p_ptrs + split * split_stride, mask=ok, cache_modifier=".cg")
            _epilogue(
                total.to(tl.float32), as_ptr, ws_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym,
                HAS_BIAS,
            )  # fmt: skip
            tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)


_autotuned_w8a8 = triton.autotune(
    configs=_w8a8_configs(),
    key=["M_BUCKET", "N", "K", "IS_INT8", "EVEN_K"],
    prune_configs_by={"early_config_prune": _prune_w8a8},
)(_w8a8_kernel)

# --- split K: deep layers with few output tiles ---------------------------------------------------
# At small M a layer has few output tiles: 14336 -> 4096 at M <= 128 has 32 of 128 x 128, a
# quarter of the H200's 132 SMs, each walking all of K = 14336. Splitting K fills the GPU; the
# partials are reduced inside the kernel (`_w8a8_kernel`'s tail), so a call stays one kernel in
# a CUDA graph. Measured (benchmarks/results/kernels-split-k, H200, FP8, the GEMM alone): it
# pays for deep K (1.07-1.32x of bf16 at M = 1-64 on 14336 -> 4096 and 18944 -> 3584, where
# torch._scaled_mm ran 0.83-0.95x); at K = 3584 each split added ~5 us and smaller tiles won
# instead (`few_tiles`), hence SPLIT_MIN_K.
MAX_SPLIT_K = 8
MIN_K_PER_SPLIT = 512  # shorter K ranges spend more on the partials than they gain
SPLIT_MIN_K = 8192
_SPLIT_TILES = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (128, 128, 128, 8, 4),
    (128, 128, 128, 8, 3),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
]
_SPLIT_COUNTERS = 4096  # arrival counters per (device, stream): >= the tiles any split call has


def split_k_for(m: int, n: int, k: int, sms: int) -> int:
    """How many K ranges `w8a8_matmul` splits an [m, k] x [n, k] product into on `sms`
    multiprocessors: 1 unless K >= SPLIT_MIN_K and the output has `few_tiles`; then the most
    (2, 4, 8) that keep the programs within one wave and each range >= MIN_K_PER_SPLIT deep."""
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    split = 1
    if k < SPLIT_MIN_K or not few_tiles(m, n, sms):
        return split
    while (
        2 * split <= MAX_SPLIT_K
        and tiles * 2 * split <= sms
        and k // (2 * split) >= MIN_K_PER_SPLIT
    ):
        split *= 2
    return split


def _device_sms(device: torch.device) -> int:
    """The device's multiprocessor count; 0 off CUDA (nothing splits there)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 0


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_counters: dict[tuple[int, int], torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """Zeroed arrival counters for the split calls of this device's current stream: calls on
    one stream run one after another and each leaves its counters at zero, so they share one
    set, made by the first call outside a CUDA graph capture. A capture that finds no set for
    its stream gets a set of its own: zeroed inside the graph at each replay and not kept (a
    set first made inside a capture would be zeroed only when that one graph replays, and
    held in its memory pool). `models.cuda_graph.capture` warms up on the stream it captures
    on, so its graphs find the set made then. Graphs captured on one stream share its set:
    replay them one after another, not concurrently on several streams."""
    if device.type != "cuda":
        return torch.zeros(_SPLIT_COUNTERS, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream
    key = (device.index or 0, stream)
    counters = _counters.get(key)
    if counters is None:
        counters = torch.zeros(_SPLIT_COUNTERS, dtype=torch.int32, device=device)
        if not torch.cuda.is_current_stream_capturing():
            _counters[key] = counters
    return counters


_autotuned_w8a8_split = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _SPLIT_TILES
    ],
    key=["M_BUCKET", "N", "K", "IS_INT8", "EVEN_K", "SPLIT_K"],
    # every config's partials land in the same workspace; the counters are zero after each run
)(_w8a8_kernel)


def _grid(m: int, n: int, split: int = 1):  # noqa: ANN202
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)


def _check_w8a8(
    name: str, a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor
) -> None:
    """The kernels index w8, a_scale and w_scale by a8's K and M and w8's N: a mismatch would
    read out of bounds instead of failing."""
    if a8.dtype != w8.dtype or a8.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"{name} takes int8 or e4m3 operands, got {a8.dtype}, {w8.dtype}")
    (m, k), (n, kw) = a8.shape, w8.shape
    if kw != k or a_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(
            f"{name}: a8 {tuple(a8.shape)}, w8 {tuple(w8.shape)}, a_scale "
            f"{tuple(a_scale.shape)}, w_scale {tuple(w_scale.shape)} do not match"
        )


def w8a8_matmul(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    meta: dict | None = None,
) -> torch.Tensor:
    """a8 [M, K] (int8 / e4m3) with a_scale [M, 1] or [M], w8 [N, K] (same dtype) with w_scale
    [N] (or [1, N]) -> y [M, N] in out_dtype. `meta` fixes the tile (else autotuned; the
    interpreter always runs `TINY_W8A8`) and may set SPLIT_K; else K splits where
    `split_k_for` says (CUDA). The split sums are the same for INT8 (int32) and reordered
    float32 sums for FP8, in a fixed order: the same bits every call."""
    _check_w8a8("w8a8_matmul", a8, a_scale, w8, w_scale)
    m, k = a8.shape
    n = w8.shape[0]
    y = torch.empty(m, n, device=a8.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return y
    # the kernels step along K with unit stride in both operands
    a8 = a8 if a8.stride(-1) == 1 else a8.contiguous()
    w8 = w8 if w8.stride(-1) == 1 else w8.contiguous()
    args = (
        a8,
        w8,
        a_scale.reshape(-1),
        w_scale.reshape(-1),
        bias,
        y,
        m,
        n,
        k,
        a8.stride(0),
        w8.stride(0),
        y.stride(0),
        m_bucket(m),
    )
    meta = TINY_W8A8 if INTERPRETED and meta is None else meta
    sms = _device_sms(a8.device)
    split = meta.get("SPLIT_K", 1) if meta is not None else split_k_for(m, n, k, sms)
    part, counters = y, y  # placeholders: read only when K splits
    if split > 1:
        acc_dtype = torch.int32 if a8.dtype == torch.int8 else torch.float32
        part = torch.empty(split, m, n, device=a8.device, dtype=acc_dtype)
        counters = _split_counters(a8.device)
        tiles = [(meta["BLOCK_M"], meta["BLOCK_N"])] if meta else _SPLIT_TILES
        most = max(triton.cdiv(m, t[0]) * triton.cdiv(n, t[1]) for t in tiles)
        if most > counters.numel():  # split_k_for splits only layers of few tiles
            raise ValueError(f"w8a8_matmul: {most} output tiles are too many to split K")
    args += (part, counters)
    flags = {"IS_INT8": a8.dtype == torch.int8, "HAS_BIAS": bias is not None}
    if meta is not None:
        even = k % meta["BLOCK_K"] == 0
        _w8a8_kernel[_grid(m, n, split)](*args, **flags, EVEN_K=even, **meta)
    elif split > 1:
        _autotuned_w8a8_split[_grid(m, n, split)](*args, **flags, EVEN_K=_even_k(k), SPLIT_K=split)
    else:
        _autotuned_w8a8[_grid(m, n)](*args, **flags, EVEN_K=_even_k(k))
    return y


# --- W8A8 GEMM, persistent with TMA (Hopper) ------------------------------------------------------
# The kernel above loads its tiles with plain pointer loads (cp.async on sm_90) and reaches
# 41-52% of the 8-bit peak at M >= 1024 (benchmarks/results/kernels). Hopper's fast path is the
# tensor memory accelerator: whole [BLOCK, BLOCK_K] tiles copied into shared memory by one
# instruction, no address arithmetic in the warps, and a persistent grid (one program per SM
# walking the output tiles) so the next tile's loads overlap the last one's epilogue. Same
# numbers as `w8a8_matmul` (exact int32 / fp32 accumulation, the same epilogue).
def _tma_configs() -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 256, 128, 8, 3),
        (128, 256, 128, 8, 4),
        (128, 128, 128, 8, 4),
        (256, 128, 128, 8, 3),
        (128, 128, 256, 8, 3),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            num_warps=w,
            num_stages=s,
            pre_hook=_set_tma_blocks,
        )
        for bm, bn, bk, w, s in shapes
    ]


def _set_tma_blocks(nargs: dict) -> None:
    """A descriptor's block shape is part of the kernel's signature: set it from the config
    before each launch (the autotuner calls this before timing or running a config)."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.jit
def _w8a8_tma_kernel(
    a_desc,
    w_desc,
    as_ptr,
    ws_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_ym,
    M_BUCKET,  # autotuning key only
    NUM_SMS: tl.constexpr,
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)  # the descriptors zero-fill past K
    for tile in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=True):
        group = tile // (GROUP_M * n_n)
        first_m = group * GROUP_M
        rows = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (tile % rows)
        pid_n = (tile % (GROUP_M * n_n)) // rows
        if IS_INT8:  # noqa: SIM108 - constexpr branches, one compiled
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])  # [BM, BK]
            w = w_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])  # [BN, BK], K contiguous
            if IS_INT8:  # noqa: SIM108
                acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, w.T, acc)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(
            acc.to(tl.float32), as_ptr, ws_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS
        )


# Warp-specialized configs (TMA producer warps, wgmma consumer warpgroups) were tried here and
# removed: on the H200 with Triton 3.6 one ran out of shared memory and the other hung
# (benchmarks/results/kernels-ws-probe/).
_autotuned_w8a8_tma = triton.autotune(
    configs=_tma_configs(), key=["M_BUCKET", "N", "K", "IS_INT8"]
)(_w8a8_tma_kernel)


def tma_supported(device: torch.device) -> str | None:
    """None if the TMA GEMM can run here (CUDA, sm_90 or newer, Triton's host descriptors),
    else why not."""
    if device.type != "cuda":
        return "the TMA GEMM needs a CUDA device"
    if _capability(device.index) < (9, 0):
        return "the TMA GEMM needs compute capability 9.0 (Hopper) or newer"
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return f"Triton {triton.__version__} has no host-side tensor descriptors"
    return None


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# INT8 W8A8 at M >= INT8_TMA_MIN_M runs on the TMA GEMM where it can: on the H200 it beat
# `w8a8_matmul` in all 14 cells measured (7 shapes x M = 1024, 4096; 1.13-1.45x of bf16
# against 1.06-1.29x, benchmarks/results/kernels-tma/). Smaller M were not measured and stay
# on `w8a8_matmul`; so does FP8, where `_scaled_mm` is faster than both Triton GEMMs.
INT8_TMA_MIN_M = 1024
_tma_failed: list[str] = []


def int8_matmul(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The INT8 W8A8 GEMM by M: `w8a8_matmul_tma` from INT8_TMA_MIN_M rows on Hopper (K a
    multiple of 16), else `w8a8_matmul`. A TMA compile failure (another Triton version) falls
    back, with one warning, to `w8a8_matmul` for good."""
    _check_w8a8("int8_matmul", a8, a_scale, w8, w_scale)  # a caller's error is not a TMA failure
    (m, k), n = a8.shape, w8.shape[0]
    tma_ok = m >= INT8_TMA_MIN_M and n > 0 and k > 0 and k % 16 == 0
    # a layer of few output tiles takes `w8a8_matmul`'s small tiles or split K; the persistent
    # grid of 128-wide tiles would leave most SMs idle
    tma_ok = tma_ok and not few_tiles(m, n, _device_sms(a8.device))
    if tma_ok and not _tma_failed and tma_supported(a8.device) is None:
        try:
            return w8a8_matmul_tma(a8, a_scale, w8, w_scale, out_dtype, bias)
        except torch.cuda.OutOfMemoryError:
            raise  # not a compile failure
        except Exception as err:  # noqa: BLE001 - a compile failure: the pointer-load GEMM
            record_failure(_tma_failed, "INT8 TMA GEMM", "w8a8_matmul", err)
    return w8a8_matmul(a8, a_scale, w8, w_scale, out_dtype, bias)


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t contiguous with a 16-byte-aligned base, as a descriptor needs (a contiguous view at an
    odd offset would fail its assertion and switch the TMA GEMM off for good)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def w8a8_matmul_tma(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    meta: dict | None = None,
) -> torch.Tensor:
    """`w8a8_matmul`'s contract on the persistent TMA kernel (check `tma_supported` first).
    K must be a multiple of 16 (a descriptor's row stride: 16-byte aligned)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    _check_w8a8("w8a8_matmul_tma", a8, a_scale, w8, w_scale)
    m, k = a8.shape
    n = w8.shape[0]
    if k % 16 or k == 0:
        raise ValueError(f"the TMA GEMM needs K > 0 divisible by 16, got {k}")
    y = torch.empty(m, n, device=a8.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return y
    a8, w8 = _tma_operand(a8), _tma_operand(w8)
    # persistent: one program per SM (the CPU interpreter: a few, to walk several tiles each)
    sms = torch.cuda.get_device_properties(a8.device).multi_processor_count if a8.is_cuda else 3
    # descriptors start with a placeholder block; `_set_tma_blocks` sets the config's
    a_desc = TensorDescriptor.from_tensor(a8, [1, 16])
    w_desc = TensorDescriptor.from_tensor(w8, [1, 16])

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(sms, tiles),)

    args = (a_desc, w_desc, a_scale.reshape(-1), w_scale.reshape(-1), bias, y, m, n, k,
            y.stride(0), m_bucket(m))  # fmt: skip
    flags = {"NUM_SMS": sms, "IS_INT8": a8.dtype == torch.int8, "HAS_BIAS": bias is not None}
    if meta is not None:
        _set_tma_blocks({"a_desc": a_desc, "w_desc": w_desc, **meta})
        _w8a8_tma_kernel[grid](*args, **flags, **meta)
    else:
        _autotuned_w8a8_tma[grid](*args, **flags)
    return y


# --- W4A8 GEMM -----------------------------------------------------------------------------------
def _mn_configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages) tiles of the K-by-128 loops (W4A8, grouped W8)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


def _w4a8_configs() -> list[triton.Config]:
    return _mn_configs([(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4)])


def _check_groups(name: str, k: int, group_size: int) -> None:
    """The K-loops take 128 k a step, one group per dot: K % 128 == 0 and groups of 32, 64 or
    a multiple of 128."""
    if k % TILE_K or group_size % 32 or (group_size > 64 and group_size % TILE_K):
        raise ValueError(
            f"{name} needs K % 128 == 0 and a group size of 32, 64 or a multiple of 128, "
            f"got K={k}, group size {group_size}"
        )


@triton.jit
def _plane(packed, j: tl.constexpr, zero):
    """Nibble plane j of a [16, BN] int32 block minus the zero points -> int32 in [-15, 15]."""
    return ((packed >> (4 * j)) & 0xF) - zero


@triton.jit
def _join_planes(packed, j0: tl.constexpr, zero, P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Planes j0 .. j0 + P - 1 (P in 2, 4, 8) -> [16 * P, BN] int32 of consecutive k
    (row 16 * p + r is plane j0 + p, row r): tl.join stacks along a new last axis, so P planes
    joined pairwise, then permuted plane-major, reshape without reordering."""
    p0 = _plane(packed, j0, zero)
    p1 = _plane(packed, j0 + 1, zero)
    if P == 2:
        w = tl.permute(tl.join(p0, p1), (2, 0, 1))  # [2, 16, BN]
    else:
        p2 = _plane(packed, j0 + 2, zero)
        p3 = _plane(packed, j0 + 3, zero)
        if P == 4:  # [16, BN, c, b] holds plane 2b + c
            w = tl.permute(tl.join(tl.join(p0, p1), tl.join(p2, p3)), (3, 2, 0, 1))
        else:  # [16, BN, c, b, a] holds plane 4a + 2b + c
            p4 = _plane(packed, j0 + 4, zero)
            p5 = _plane(packed, j0 + 5, zero)
            p6 = _plane(packed, j0 + 6, zero)
            p7 = _plane(packed, j0 + 7, zero)
            lo = tl.join(tl.join(p0, p1), tl.join(p2, p3))
            hi = tl.join(tl.join(p4, p5), tl.join(p6, p7))
            w = tl.permute(tl.join(lo, hi), (4, 3, 2, 0, 1))
    return tl.reshape(w, (16 * P, BLOCK_N))


@triton.jit
def _w4a8_kernel(
    a_ptr,
    q_ptr,
    as_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ym,
    M_BUCKET,  # autotuning key only
    GROUP_SIZE: tl.constexpr,
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    CHUNK: tl.constexpr = GROUP_SIZE if GROUP_SIZE < 128 else 128  # k per dot
    P: tl.constexpr = CHUNK // 16  # nibble planes per dot
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_c = tl.where(rn < N, rn, 0)
    r16 = tl.arange(0, 16)
    rc = tl.arange(0, CHUNK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(0, K // 128):
        k0 = tile * 128
        packed = tl.load(q_ptr + (tile * 16 + r16)[:, None] * N + rn_c[None, :])  # [16, BN]
        for c in tl.static_range(128 // CHUNK):
            g = (k0 + c * CHUNK) // GROUP_SIZE
            zero = tl.load(z_ptr + g * N + rn_c)[None, :]  # [1, BN] int32
            s = tl.load(s_ptr + g * N + rn_c)  # [BN] float32
            w = _join_planes(packed, c * P, zero, P, BLOCK_N)  # [CHUNK, BN] int32
            a = tl.load(a_ptr + rm_c[:, None] * stride_am + (k0 + c * CHUNK + rc)[None, :])
            if IS_INT8:
                part = tl.dot(a, w.to(tl.int8), out_dtype=tl.int32).to(tl.float32)
            else:
                part = tl.dot(a, w.to(tl.float32).to(a_ptr.dtype.element_ty))
            acc += part * s[None, :]
    _epilogue(acc, as_ptr, None, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


_autotuned_w4a8 = triton.autotune(
    configs=_w4a8_configs(),
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "IS_INT8"],
    prune_configs_by={"early_config_prune": _prune_m},
)(_w4a8_kernel)


def w4a8_layout(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale [N, G] float, zero [N, G] -> scale_t [G, N] float32, zero_t [G, N] int32."""
    return scale.float().T.contiguous(), zero.to(torch.int32).T.contiguous()


def w4a8_matmul(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    packed: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    meta: dict | None = None,
) -> torch.Tensor:
    """a8 [M, K] (int8 / e4m3) with a_scale [M, 1] x the tile-layout codes packed [K / 8, N]
    with scale_t, zero_t [G, N] (`w4a8_layout`) -> y [M, N] in out_dtype."""
    m, k = a8.shape
    n = packed.shape[1]
    group_size = k // scale_t.shape[0]
    _check_groups("w4a8", k, group_size)
    y = torch.empty(m, n, device=a8.device, dtype=out_dtype)
    if m == 0:
        return y
    a8 = a8 if a8.stride(-1) == 1 else a8.contiguous()
    args = (a8, packed, a_scale.reshape(-1), scale_t, zero_t, bias, y, m, n, k)
    args += (a8.stride(0), y.stride(0), m_bucket(m))
    flags = {
        "GROUP_SIZE": group_size,
        "IS_INT8": a8.dtype == torch.int8,
        "HAS_BIAS": bias is not None,
    }
    meta = TINY_W4A8 if INTERPRETED and meta is None else meta
    if meta is not None:
        _w4a8_kernel[_grid(m, n)](*args, **flags, **meta)
    else:
        _autotuned_w4a8[_grid(m, n)](*args, **flags)
    return y


# --- W4A8, large M: unpack the codes to 8 bits once per call, then an 8-bit GEMM ---------------
TINY_UNPACK_N = 32  # the unpack kernel's column block under the interpreter (GPU: 128)


@triton.jit
def _w4a8_unpack_kernel(
    q_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    GROUP_SIZE: tl.constexpr,
    IS_INT8: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One 128-k tile x BLOCK_N columns of the tile layout -> w8 [BN, 128] rows of [N, K]
    (K contiguous, the 8-bit wgmma's B layout): nibble j of int32 row r is k = 16 j + r, so the
    [BN, 8, 16] nibbles reshape to [BN, 128] in k order (as `triton_w4._swap_matmul` reads them)."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn_c = tl.where(n_ok, rn, 0)
    r16, j8, rk = tl.arange(0, 16), tl.arange(0, 8), tl.arange(0, 128)
    packed = tl.load(q_ptr + (tile * 16 + r16)[None, :] * N + rn_c[:, None])  # [BN, 16]
    codes = (packed[:, None, :] >> (4 * j8)[None, :, None]) & 0xF  # [BN, j, r]
    g = ((tile * 128 + 16 * j8) // GROUP_SIZE)[None, :]  # a plane of 16 k is in one group
    zero = tl.load(z_ptr + g * N + rn_c[:, None])[:, :, None]  # [BN, 8, 1]
    w = tl.reshape(codes - zero, (BLOCK_N, 128))  # in [-15, 15]: exact in int8 and e4m3
    ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + (tile * 128 + rk)[None, :]
    if IS_INT8:
        tl.store(ptrs, w.to(tl.int8), mask=n_ok[:, None])
    else:
        tl.store(ptrs, w.to(tl.float32).to(w_ptr.dtype.element_ty), mask=n_ok[:, None])


def w4a8_unpack(packed: torch.Tensor, zero_t: torch.Tensor, kind: str) -> torch.Tensor:
    """The tile-layout codes packed [K / 8, N] and zero_t [G, N] (`w4a8_layout`) -> w8 [N, K]
    = code - zero in int8 or e4m3 (exact: |code - zero| <= 15). One pass, 0.5 B read and 1 B
    written per weight; the caller frees it after its GEMM (never a resident copy)."""
    k8, n = packed.shape
    k = k8 * 8
    w8 = torch.empty(n, k, device=packed.device, dtype=_torch_dtype(kind))
    block_n = TINY_UNPACK_N if INTERPRETED else 128
    grid = (k // TILE_K, triton.cdiv(n, block_n))
    group_size = k // zero_t.shape[0]
    _w4a8_unpack_kernel[grid](
        packed,
        zero_t,
        w8,
        n,
        k,
        GROUP_SIZE=group_size,
        IS_INT8=kind == "int8",
        BLOCK_N=block_n,
        num_warps=4,
    )
    return w8


def _w8_group_configs() -> list[triton.Config]:
    # two [BM, BN] float32 tiles live at once (the sum and the chunk's dot): ptxas (sm_90a,
    # Triton 3.9) puts 128x128 / 8 warps at 255 registers with 4 B (group 128) to 256 B
    # (group 32) of spills, 128x256 / 8 warps at ~500 B, 4 warps and 256x128 at 0.6-2.4 KB:
    # those two are left out
    return _mn_configs([(128, 128, 8, 4), (128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4)])


@triton.jit
def _w8_group_kernel(
    a_ptr,
    w_ptr,
    as_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_ym,
    M_BUCKET,  # autotuning key only
    GROUP_SIZE: tl.constexpr,
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    """y = a_scale * sum_g s[g] * (a8 @ w8.T over group g), w8 [N, K] 8-bit, s [G, N]: per
    128-k step, 128 / CHUNK dots of CHUNK k each (one group each), each from zero, added to the
    float32 accumulator times its group's scale. Loads are plain (clamped rows / columns, K a
    multiple of 128), so Triton pipelines them num_stages deep as in `_w8a8_kernel`."""
    CHUNK: tl.constexpr = GROUP_SIZE if GROUP_SIZE < 128 else 128
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, CHUNK)
    rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_c = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + rm_c[:, None] * stride_am + rc[None, :]  # [BM, CHUNK]
    w_ptrs = w_ptr + rn_c.to(tl.int64)[None, :] * stride_wn + rc[:, None]  # [CHUNK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 128):
        for c in tl.static_range(128 // CHUNK):
            a = tl.load(a_ptrs + k0 + c * CHUNK)
            w = tl.load(w_ptrs + k0 + c * CHUNK)
            s = tl.load(s_ptr + ((k0 + c * CHUNK) // GROUP_SIZE) * N + rn_c)  # [BN] float32
            if IS_INT8:  # noqa: SIM108 - constexpr branches, one compiled
                part = tl.dot(a, w, out_dtype=tl.int32).to(tl.float32)
            else:
                part = tl.dot(a, w)
            acc += part * s[None, :]
    _epilogue(acc, as_ptr, None, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


_autotuned_w8_group = triton.autotune(
    configs=_w8_group_configs(),
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "IS_INT8"],
    prune_configs_by={"early_config_prune": _prune_m},
)(_w8_group_kernel)


def w8_group_matmul(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    w8: torch.Tensor,
    scale_t: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    *,
    meta: dict | None = None,
) -> torch.Tensor:
    """a8 [M, K] (int8 / e4m3) with a_scale [M, 1] x w8 [N, K] (same dtype) with group scales
    scale_t [G, N] float32 -> y [M, N] in out_dtype. One group (per-channel) runs the W8A8
    GEMM (`w8a8_matmul`, the scale in its epilogue: same math, integer / one fp32 sum)."""
    if a8.dtype != w8.dtype or a8.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"w8_group_matmul takes int8 or e4m3 operands, got {a8.dtype}, {w8.dtype}")
    m, k = a8.shape
    n, n_groups = w8.shape[0], scale_t.shape[0]
    if n_groups == 1:
        w8a8_meta = None if meta is None else {"BLOCK_K": 128, **meta}
        return w8a8_matmul(a8, a_scale, w8, scale_t[0], out_dtype, bias, meta=w8a8_meta)
    group_size = k // n_groups
    _check_groups("w8_group_matmul", k, group_size)
    y = torch.empty(m, n, device=a8.device, dtype=out_dtype)
    if m == 0:
        return y
    a8 = a8 if a8.stride(-1) == 1 else a8.contiguous()
    w8 = w8 if w8.stride(-1) == 1 else w8.contiguous()
    args = (a8, w8, a_scale.reshape(-1), scale_t, bias, y, m, n, k)
    args += (a8.stride(0), w8.stride(0), y.stride(0), m_bucket(m))
    flags = {"GROUP_SIZE": group_size, "IS_INT8": a8.dtype == torch.int8}
    flags["HAS_BIAS"] = bias is not None
    meta = TINY_W4A8 if INTERPRETED and meta is None else meta
    if meta is not None:
        _w8_group_kernel[_grid(m, n)](*args, **flags, **meta)
    else:
        _autotuned_w8_group[_grid(m, n)](*args, **flags)
    return y


def w4a8_dq_matmul(
    a8: torch.Tensor,
    a_scale: torch.Tensor,
    packed: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`w4a8_matmul`'s result for large M: the codes unpacked to 8 bits once (`w4a8_unpack`,
    a per-call temporary), then `w8_group_matmul` - the GEMM's K loop does no unpacking."""
    kind = "int8" if a8.dtype == torch.int8 else "fp8"
    w8 = w4a8_unpack(packed, zero_t, kind)
    return w8_group_matmul(a8, a_scale, w8, scale_t, out_dtype, bias)


def autotune_choices() -> dict:
    """The tile each autotuned kernel chose per key (for the benchmark's notes)."""
    return {
        name: {str(key): str(cfg) for key, cfg in getattr(fn, "cache", {}).items()}
        for name, fn in (
            ("w8a8", _autotuned_w8a8),
            ("w8a8_split", _autotuned_w8a8_split),
            ("w8a8_tma", _autotuned_w8a8_tma),
            ("w4a8", _autotuned_w4a8),
            ("w8_group", _autotuned_w8_group),
        )
    }

"""GPTQ's inner column loop as one Triton kernel (optional: needs `triton`; imported lazily by
quant/gptq.py, so quant/ still works without it).

The torch loop (`gptq.sweep_columns_torch`) launches ~10 small kernels per column: on an H200
an 8B layer's 4096-12288 columns leave the GPU idle most of the time. Given U, GPTQ's rows are
independent, so one program owns a slice of BLOCK_R output rows and keeps its [BLOCK_R, B] tile
of the lazy block in registers while it walks the block's columns: encode, decode, scaled
error, rank-1 update of the tile, exactly the torch loop's operations in the same order.

Bit-for-bit with the torch loop, by construction:
* divisions are IEEE (div_rn), rounding is half-to-even (libdevice rint; the interpreter, which
  has no libdevice, uses the 1.5 * 2^23 trick, exact below 2^22 and clamped beyond);
* the kernel is launched with enable_fp_fusion=False: torch computes the rank-1 update as a
  product, rounded, then a difference, and an FMA would round once (one ulp apart, and codes
  can then flip at a rounding boundary). The Triton default contracts a*b - c into an FMA.
* a column is read from the register tile as sum(where(col == i, tile, 0)): x + 0 is exact.

Lives in quant/ rather than kernels/ because it is part of the GPTQ algorithm (it shares
encode/decode's definition) and kernels/ imports quant/, not the other way round.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from faircalib.quant.gptq import FUSED_SWEEP_MAX_COLS
from faircalib.quant.triton_rounding import round_half_even

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gptq_sweep_kernel(
    w_ptr,  # [R, B] float32 block, updated in place
    u_ptr,  # [B, B] float32 block of U (upper triangular, any strides)
    s_ptr,  # scale, column i - c0 for block column i
    z_ptr,  # zero point, same layout
    q_ptr,  # [R, B] dequantized out
    c_ptr,  # [R, B] codes out (float32)
    e_ptr,  # [R, B] scaled errors out
    n_rows,
    n_cols,
    c0,
    c1,
    stride_w,
    stride_ur,
    stride_uc,
    stride_sr,
    stride_sc,
    stride_zr,
    stride_zc,
    stride_q,
    stride_c,
    stride_e,
    MAXQ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_RINT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # row * stride of a stacked 8B+ matrix can pass 2^31
    cols = tl.arange(0, BLOCK_C)
    tile_ok = row_ok[:, None] & (cols < n_cols)[None, :]
    tile_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
    tile = tl.load(tile_ptrs, mask=tile_ok, other=0.0)  # [BLOCK_R, BLOCK_C]
    for i in range(c0, c1):
        wc = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)  # [BLOCK_R], exact
        s = tl.load(s_ptr + rows * stride_sr + (i - c0) * stride_sc, mask=row_ok, other=1.0)
        z = tl.load(z_ptr + rows * stride_zr + (i - c0) * stride_zc, mask=row_ok, other=0.0)
        # encode, decode, scaled error: primitives.encode / decode and the torch loop's order
        code = round_half_even(tl.math.div_rn(wc, s), USE_RINT) + z
        code = tl.minimum(tl.maximum(code, 0.0), MAXQ)
        q = s * (code - z)
        d = tl.load(u_ptr + i * (stride_ur + stride_uc))
        e = tl.math.div_rn(wc - q, tl.zeros_like(wc) + d)
        # rank-1 update of the columns i.. (rounded product, then difference: no FMA)
        later = (cols >= i) & (cols < n_cols)
        u_row = tl.load(u_ptr + i * stride_ur + cols * stride_uc, mask=later, other=0.0)
        tile = tl.where(later[None, :], tile - e[:, None] * u_row[None, :], tile)
        tl.store(q_ptr + rows * stride_q + i, q, mask=row_ok)
        tl.store(c_ptr + rows * stride_c + i, code, mask=row_ok)
        tl.store(e_ptr + rows * stride_e + i, e, mask=row_ok)
    tl.store(tile_ptrs, tile, mask=tile_ok)  # later dynamic groups read the updated block


def tile_rows(block_c: int) -> int:
    """Rows per program for a (power-of-two) block width: tiles of ~2048 elements (16
    registers a thread at 4 warps) and more programs than SMs (a 4096-row layer with
    128-column blocks runs 256 programs of 16 rows)."""
    return max(4, min(32, 2048 // block_c))


def sweep_columns_triton(
    w1: torch.Tensor,
    u1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    c0: int,
    c1: int,
    bits: int,
) -> None:
    """Drop-in for `gptq.sweep_columns_torch` (same arguments, same results)."""
    q_out, codes_out, err_out = out
    n_rows, n_cols = w1.shape
    if n_cols > FUSED_SWEEP_MAX_COLS:
        raise ValueError(f"the fused GPTQ sweep takes blocks of <= {FUSED_SWEEP_MAX_COLS} columns")
    if u1.dtype != torch.float32:
        raise ValueError("the fused GPTQ sweep needs a float32 U")
    for t in (w1, q_out, codes_out, err_out):
        if t.stride(1) != 1 or t.dtype != torch.float32:
            raise ValueError("the fused GPTQ sweep needs float32 blocks with unit column stride")
    block_c = triton.next_power_of_2(n_cols)
    block_r = tile_rows(block_c)
    grid = (triton.cdiv(n_rows, block_r),)
    _gptq_sweep_kernel[grid](
        w1, u1, scale, zero, q_out, codes_out, err_out,
        n_rows, n_cols, c0, c1,
        w1.stride(0), u1.stride(0), u1.stride(1), scale.stride(0), scale.stride(1),
        zero.stride(0), zero.stride(1), q_out.stride(0), codes_out.stride(0), err_out.stride(0),
        MAXQ=float(2**bits - 1), BLOCK_R=block_r, BLOCK_C=block_c, USE_RINT=not INTERPRETED,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip

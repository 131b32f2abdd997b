"""Round half to even inside Triton kernels, compiled or interpreted (shared by the fused GPTQ
sweep, `quant/gptq_triton.py`, and the W8A8 kernels, `kernels/triton_w8a8.py`)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def round_half_even(v, USE_RINT: tl.constexpr):
    # (libdevice is imported at module level: the compiler rejects imports inside @triton.jit)
    if USE_RINT:  # noqa: SIM108 - a constexpr branch, one compiled
        r = libdevice.rint(v)
    else:
        # interpreter (no libdevice): 1.5 * 2^23 pushes the fraction out of float32's mantissa
        # with round to nearest even, exact for |v| < 2^22 (callers clamp larger values to
        # their grid either way)
        r = (v + 12582912.0) - 12582912.0
    return r

"""Matmul backends for `QuantLinear`, and the rule that picks one by device, dtype and M.

Every backend computes y = x @ W_hat.T for the layer's dequantized weight
W_hat = scale * (code - zero) (groups contiguous along `in`), from the same plain codes; each
repacks them once into its kernel's layout and caches the result on the layer.

| name      | device   | what runs                                   | vs W_hat (rel. error)  |
|-----------|----------|---------------------------------------------|------------------------|
| dequant   | any      | unpack + dequantize (fp32), dense matmul    | exact reference        |
| int4_cpu  | cpu      | aten._weight_int4pack_mm_for_cpu, bf16 act. | bf16 rounding (~3e-3)  |
| int4_cuda | cuda     | aten._weight_int4pack_mm (tinygemm), bf16   | bf16 scales (~3e-3)    |
| int8      | cpu/cuda | torch._int_mm W8A8 (w8 sym per-channel, a8) | exact int accumulation |
| fp8       | cpu/cuda | torch._scaled_mm e4m3 W8A8, row-wise scales | re-rounds to e4m3 (~4%)|
| triton_w4 | cuda     | our fused dequant GEMM (kernels/triton_w4)  | bf16 act. (~3e-3)      |
| triton_dq | cuda     | our dequantizer to bf16, then cuBLAS        | bf16 act. (~3e-3)      |
| triton_gemv | cuda   | our CUDA-core W4A16 GEMV for M <= 16 (kernels/triton_gemv) | bf16 act. (~3e-3) |
| int8_w8a8 | cuda     | int8 x int8: gemlite < M=1024 (if installed), else ours (TMA on sm_90) | exact (gemlite 3e-3) |
| fp8_w8a8  | cpu/cuda | fused per-token e4m3 quantization + `_scaled_mm` or Triton fp8 GEMM (by M, shape) | as fp8 |
| w4a8      | cuda     | Triton INT4-group x int8-activation GEMM, dequantized to int8 in registers | exact |
| w4a8_fp8  | cuda     | the same with e4m3 activations (codes - zero are exact in e4m3) | e4m3 act. (~3%) |
| w4a8_dq   | cuda     | w4a8's math for large M: codes unpacked to int8 per call, then an int8 GEMM | exact |
| w4a8_fp8_dq | cuda   | the same with e4m3 activations and an e4m3 GEMM       | e4m3 act. (~3%)        |
| cutlass_w4a8 | cuda  | w4a8_fp8_dq's numbers on CUTLASS's block-scaled FP8 GEMM (Hopper) | e4m3 act. (~3%) |
| cutlass_w4a8_lut | cuda | the same, INT4 -> e4m3 in registers by per-group tables (e8m0 scales) | e4m3 act. (~3%) |

int4 kernels take codes of at most 4 bits; `int8` needs symmetric per-channel 8-bit weights
and act_bits=8; `fp8` takes any layer (it dequantizes, then rounds rows to e4m3);
`triton_w4` and `triton_dq` need the optional `triton` package, K % 128 == 0 and a group
size divisible by 16; they share one cached layout (`triton_w4.pack_tiles`). `triton_gemv`
needs the same package, M <= 16, K % 8 == 0 and a group size that is a multiple of 8 (or
per-channel); its own layout (`triton_gemv.pack_gemv`) holds the codes; `auto` does not pick it:
on the H200 it was slower than torch's int4 kernel at every M <= 16 and every shape measured
(benchmarks/results/kernels-gemv/).

torch's int4 kernels dequantize as w = (q - 8) * s + z with z "in the float domain"; our
codes satisfy w = s * (q - zero), so z = s * (8 - zero) (verified numerically in the tests).
The kernels take scales and zeros as one [n_groups, out, 2] tensor, and only group sizes 32,
64, 128 and 256: a per-channel layer is fed to them as identical groups of the largest of
those that divides `in`.

`int8_w8a8` takes what `int8` takes (act_bits 8, or None: then it quantizes activations to
the same grid by name); it holds the weight as int8 [out, in], which is the codes (so the plain
copy is freed). Below M = 1024 it runs the optional `gemlite` package's dynamic INT8 layer
(`INT8_W8A8_GEMM`), built on first use over a transposed view of that same int8 weight; gemlite
quantizes the activations itself (per token) and applies the scales in its own epilogue, so
its output differs from ours by rounding (rel. ~3e-3 of the float64 reference against 1.7e-3).
`fp8_w8a8` takes what `fp8` takes and computes the same numbers; its code
(`fp8_w8a8_support`, `fp8_w8a8_linear`) also runs the reloaded FP8 W8A8 layers
(`formats.packed.FP8ActLinear`). On the CPU it quantizes with `fp8_quantize` and runs
`_scaled_mm`'s CPU kernel (slower there than the float reference: named only). `w4a8` and
`w4a8_fp8` take <= 4-bit codes with K % 128 == 0 and a group size of 32, 64 or a multiple of 128 (or
per-channel), act_bits 8 or None, and share `triton_w4`'s tile layout (which holds the codes);
`w4a8_dq` / `w4a8_fp8_dq` take the same layers and layout and compute the same numbers (up to
float32 summation order), unpacking the codes to an 8-bit [out, in] temporary per call (like
`triton_dq` for W4A16) so the GEMM's K loop does no unpacking; `auto` does not pick them yet.
The W8A8/W4A8 Triton backends also run on the CPU under TRITON_INTERPRET=1 (the tests).

`cutlass_w4a8` (Hopper, bf16, the libraries built by `faircalib build-kernels`) takes what
`w4a8_fp8` takes with groups of a multiple of 128 inputs (or per-channel), out % 8 == 0 and
in <= 131072, and computes `w4a8_fp8_dq`'s numbers. `cutlass_w4a8_lut` takes the layers of
those that are on its grid (`cutlass_w4a8_lut.grid_why`: symmetric, power-of-two scales, as
`--scheme w4a8fp8-e8m0` makes them) with out % 16 == 0, and computes the same products without
the e4m3 temporary; `auto` prefers it where it can run a W4AFP8 layer. Its mainloop sums the
FP8 MMAs of the whole K in the tensor cores' accumulator (no per-group promotion to float32):
on the H200 sweep its relative error to float64 grew from 2.1e-3 at K = 3584-4096 to 2.8e-3
at K = 18944, where cutlass_w4a8's stayed at 2.0-2.3e-3 and fp8_w8a8's reached 4.1e-3.
`auto` never changes numerics beyond the activation dtype's rounding, so `fp8`, `fp8_w8a8`,
`w4a8_fp8` and `cutlass_w4a8` (which re-round onto e4m3) are only used when asked for by name
on layers of other activation grids; layers that already
quantize activations to the int8 grid (act_bits=8) may get `int8_w8a8` (8-bit weights) or
`w4a8` (<= 4-bit weights), as `W8A8_AUTO` / `W4A8_AUTO_MIN_M` say: the same numbers, integer
accumulation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from faircalib.errors import ConfigError
from faircalib.fusion import fused
from faircalib.kernels.fallback import record_failure
from faircalib.kernels.shared_activations import quantize_once
from faircalib.quant.primitives import ACT_ABSMAX_FLOOR

if TYPE_CHECKING:
    from faircalib.kernels.quant_linear import QuantLinear

# `auto`'s W4A16 choice, per device: (M bound, backends) rows; a call with M token rows takes
# the first row whose bound exceeds M and runs the first of its backends that can run the layer,
# else `dequant` (the exact reference, which runs anything).
# CUDA: from the H200 sweep in benchmarks/results/kernels/ (torch 2.11, Triton 3.6, CUDA-graph
# device time, all eight 8B layer shapes, commit fc3ee7b, 2026-11-30): torch's int4 kernel at
# M = 1 (1.62-1.86x of bf16); the fused Triton kernel, splitting K, at M = 16 (0.93-1.13x),
# 32 (0.82-1.02x) and 64 (0.52-0.82x, where dequantize + cuBLAS ran 0.44-0.61x and led on
# 4096x4096 alone); dequantize + cuBLAS from M = 256 (0.50-0.67x). The sweep's
# `suggested_w4_auto` carries the fused kernel up to M = 255, but between 64 and 256 only
# 4096x4096 was measured, at M = 128 (benchmarks/results/kernels-w4-int/), and there
# dequantize + cuBLAS led (0.56x against 0.47x): so the fused kernel stops at 64. Since the
# fused kernel reduces its split K itself (one kernel a call; benchmarks/results/kernels-w4-split/,
# five shapes): 1.12-1.30x at M = 16, 0.99-1.18x at 32, 0.63-1.00x at 64 (dequantize + cuBLAS
# 0.42-0.62x there), which confirms the rows below.
# Where triton is missing, torch's int4 kernel serves M <= 64 and `dequant` the rest.
# CPU: on the 2-core EPYC dev machine the bf16 int4 kernel beat both dense bf16 and
# dequantize-then-GEMM at every M up to 2048 (2048x2048 layer), so it never hands over.
# CUTLASS's mixed-input GEMM (`faircalib build-kernels`, Hopper) from M = 33 where it loads:
# H200, benchmarks/results/cutlass-w4 and cutlass-w4-sk (its tile rule, cutlass_w4.config_for,
# on the seven large 8B shapes): 0.66-1.45x of bf16 at M = 64 against 0.62-0.75x for the fused
# Triton kernel; 0.63-1.24x at 128, 0.73-1.03x at 256, 0.89-1.14x at 1024 against 0.45-0.58x,
# 0.47-0.66x and 0.75-0.85x for dequantize + cuBLAS. At M = 16 the Triton kernel led (1.11-1.29x
# against 0.68-1.45x); at 32 they were even. Without the library the rows fall through to the
# backends that ran before.
W4_AUTO: dict[str, list[tuple[float, tuple[str, ...]]]] = {
    "cuda": [
        # M = 1..8: our tensor-core GEMV (kernels/cuda_gemv.py, once built). H200, the seven
        # large 8B shapes (benchmarks/results/cuda-gemv): 2.18-2.92x of bf16 at M = 1
        # against 1.65-1.81x for torch's int4 kernel, 2.05-2.50x at M = 8 against 0.75-0.97x
        (9, ("cuda_gemv", "int4_cuda", "triton_w4")),
        (16, ("int4_cuda", "triton_w4")),  # M = 9..15 (measured at M = 1)
        (33, ("triton_w4", "int4_cuda")),  # M = 16..32: the fused kernel (split-K)
        (65, ("cutlass_w4", "triton_w4", "int4_cuda")),
        (4097, ("cutlass_w4", "triton_dq", "dequant")),  # M = 65..4096
        # beyond the sweep's grid: one step at batch 8 (M = 8192, e2e-auto) ran 0.95x of bf16
        # on CUTLASS and 1.01x on dequantize + cuBLAS, which amortizes its dequantization there
        (math.inf, ("triton_dq", "dequant")),
    ],
    "cpu": [(math.inf, ("int4_cpu",))],
}

# Layers of fewer outputs than this do not get the backend from `auto`: Dream-7B's 3584 x 512
# K / V (4 tiles of 128 outputs) ran 0.25-0.65x of bf16 on CUTLASS at M <= 2048, against
# 0.62-0.77x for dequantize + cuBLAS (cutlass-w4, cutlass-w4-sk); stacked with Q
# (--stack-linears) the layer is 4608 wide and takes it.
# INT8: 0.57x against 0.75-0.78x for `int8_w8a8` at M = 256-512 there (cutlass-w8a8-sk).
# The GEMV takes it (1.79x at M = 1 against torch's int4 kernel's 1.55x, cuda-gemv-feed); no
# narrower layer was measured.
AUTO_MIN_OUT_FEATURES = {"cutlass_w4": 1024, "cutlass_int8": 1024, "cuda_gemv": 512}

# `int8` on CUDA: `torch._int_mm` needs M > 16 (cuBLASLt int8 constraint).
# `auto` for layers that quantize activations to the int8 grid (act_bits=8), on CUDA: per M,
# (M bound, backends) rows as in W4_AUTO (same numbers on every backend named here: integer
# accumulation of the same grid). 8-bit weights take the first backend of the row that can run
# the layer (else fall through to W4_AUTO / dequant); <= 4-bit weights take `w4a8` from
# W4A8_AUTO_MIN_M rows on. From the H200 sweep (benchmarks/results/kernels, `suggested_w8a8`):
# the Triton INT8 GEMM with fused per-token quantization beats torch._int_mm by geometric mean
# at every M and in 47 of the 48 cells where both run (not 18944x3584 at M = 64: 0.65x vs
# 0.69x); 1.06-1.45x of bf16 at M >= 1024 on the 8B shapes, against 0.45-0.77x; it also runs
# M <= 16; W4A8 (fused or unpack-then-GEMM) never beats the W4A16 kernels (<= 0.73x of bf16),
# so 4-bit weights keep the W4A16 path.
# From M = 256, CUTLASS's INT8 GEMM (scales in the epilogue; Hopper, once built) where it
# loads. H200, benchmarks/results/cutlass-w8a8-sk, the seven large 8B shapes, its tile rule
# (cutlass_w8a8.config_for) with its own activation quantization: 1.22-1.34x of bf16 at
# M = 256 against 0.84-1.20x for `int8_w8a8`, 1.34-2.00x at M >= 1024 against 1.15-1.63x;
# the GEMM alone (rows from the fused norms) 1.69-2.14x at M >= 1024. At M = 128 the two were
# even (1.05-1.44x against 0.90-1.42x) and at 32 gemlite led (1.28-1.57x against 0.85-1.39x).
W8A8_AUTO: dict[str, list[tuple[float, tuple[str, ...]]]] = {
    "cuda": [(256, ("int8_w8a8", "int8")), (math.inf, ("cutlass_int8", "int8_w8a8", "int8"))],
}
W4A8_AUTO_MIN_M: dict[str, float] = {"cuda": math.inf}
# W4AFP8 layers (act_format "fp8": their activations are e4m3 by definition) take CUTLASS's
# block-scaled FP8 GEMM (`cutlass_w4a8`, Hopper, once built) from this M on, where it can run
# them; below, and elsewhere, the W4A16 rule on the fake-quantized activations (which cannot
# use CUTLASS's W4A16 GEMM: it refuses layers with act_bits set). H200,
# benchmarks/results/cutlass-w4a8 (commit 1704000), beside what auto ran before: 0.54-0.60x of
# bf16 at M = 256 against 0.26-0.36x, 0.82-1.04x at 1024 against 0.29-0.61x, 1.03-1.24x at
# 4096 against 0.33-0.72x on the seven large shapes; on Dream's 3584 x 512 0.36-0.46x against
# 0.07-0.16x. Smaller M were not measured.
W4AFP8_AUTO_MIN_M: dict[str, float] = {"cuda": 256}
# W4AFP8 layers on the lookup-table kernel's grid (power-of-two scales: scheme w4a8fp8-e8m0)
# take `cutlass_w4a8_lut` from this M instead. H200, benchmarks/results/cutlass-w4a8-lut-small
# (2649619, with the 128 x 32 / 128 x 64 token tiles config_for picks there): 0.69-1.65x of
# bf16 at M = 1-128 and 1.00-1.57x at 256 on the seven large shapes; the path auto took before
# (the W4A16 rule on fake-quantized activations) ran 0.24-0.87x below M = 256 (its first run,
# 3239e92, first-run-3239e92.json.gz); 3584 x 512 0.43-0.45x. From M = 256,
# benchmarks/results/cutlass-w4a8-lut (commit e1b80f1; activation quantization included):
# 1.35-1.74x of bf16 at M = 1024 and 1.47-1.87x at 4096 on the seven large shapes, against
# 0.79-1.02x and 0.56-1.19x for cutlass_w4a8 in the same run; 0.41-0.62x against 0.36-0.48x on
# 3584 x 512.
W4AFP8_LUT_AUTO_MIN_M: dict[str, float] = {"cuda": 1}
# `fp8_w8a8`'s GEMM by M: (M bound, kernel) rows, "scaled_mm" (torch._scaled_mm) or "triton"
# (triton_w8a8.w8a8_matmul). H200: _scaled_mm is faster by geometric mean at every M of the
# grid but 64 (where Triton leads by a few percent); one row keeps the rule simple.
FP8_W8A8_GEMM: list[tuple[float, str]] = [(math.inf, "scaled_mm")]
# ...except for layers of few output tiles, where cuBLAS's FP8 kernels leave most SMs idle and
# our GEMM splits K (deep layers at small M: `triton_w8a8.split_k_for`) or, for narrow layers
# (<= FP8_NARROW_N outputs: Dream-7B's 3584 x 512 K / V at M <= 2048), takes smaller tiles
# (benchmarks/results/kernels-split-k).
FP8_SPLIT_K_TRITON = True
FP8_NARROW_N = 1024
# `int8_w8a8`'s GEMM by M: "gemlite" (the optional gemlite package's dynamic INT8 layer, over
# the same int8 weight) or "triton" (ours, triton_w8a8; TMA from M = 1024 on Hopper). H200
# (benchmarks/results/kernels-gemlite, all eight 8B shapes): gemlite was at least as fast in
# all 48 cells below M = 1024, 2-3x ours at M <= 32; from M = 1024 ours led gemlite's own
# INT8 layer (1.16-1.44x of bf16 against 1.13-1.31x on three shapes).
INT8_W8A8_GEMM: list[tuple[float, str]] = [(1024, "gemlite"), (math.inf, "triton")]
INT8_CUDA_MIN_M = 17

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_GEMLITE = _HAS_TRITON and importlib.util.find_spec("gemlite") is not None
_GEMLITE_FAILED: list[str] = []  # why gemlite could not be used (then our GEMM serves)
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what torch's int4 kernels accept, largest first
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# --- plain codes ----------------------------------------------------------------------------
def packed_width(in_features: int, bits: int) -> int:
    """Bytes per row of `QuantLinear.qweight`: two codes per byte for bits <= 4."""
    return (in_features + 1) // 2 if bits <= 4 else in_features


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] codes in [0, 2^bits) -> [out, packed_width] uint8 (even column: low nibble)."""
    codes = codes.to(torch.uint8)
    if bits > 4:
        return codes.contiguous()
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))  # an odd `in` gets a zero nibble that unpacking drops
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [out, packed_width] uint8 -> [out, in] uint8."""
    if bits > 4:
        return qweight
    both = torch.stack((qweight & 0xF, qweight >> 4), dim=-1)  # [out, in/2, 2]
    return both.reshape(qweight.shape[0], -1)[:, :in_features]


def dequantize_packed(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[out, packed_width] codes -> [out, in] weight in `dtype`, computed in float32 with the
    same operations as `faircalib.quant.primitives.decode`, so fp32 results are bit-identical
    to the fake-quantized weight."""
    codes = unpack_codes(qweight, bits, in_features)  # [out, in]
    out, n_groups = scale.shape
    grouped = codes.reshape(out, n_groups, in_features // n_groups).float()  # [out, G, width]
    w = scale.float()[:, :, None] * (grouped - zero.float()[:, :, None])
    return w.reshape(out, in_features).to(dtype)


# --- backend interface ----------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """`supports` returns None or the reason the backend cannot run this layer and input;
    `prepare` repacks the layer's codes for the kernel (cached per device and dtype);
    `run` maps the prepared tensors and x [M, in] to y [M, out] (no bias)."""

    name: str
    supports: Callable[[QuantLinear, str, torch.dtype, int], str | None]
    prepare: Callable[[QuantLinear, torch.device, torch.dtype], tuple]
    run: Callable[[QuantLinear, tuple, torch.Tensor], torch.Tensor]
    quantizes_activations: bool = False  # True: run() applies the layer's act_bits itself
    adds_bias: bool = False  # True: run() adds the layer's bias itself
    # prepared tensors -> [out, in] codes, for layouts that hold the codes losslessly: QuantLinear
    # then frees its plain copy on that device (the layout *is* the weight: no second copy)
    codes_from_layout: Callable[[tuple], torch.Tensor] | None = None


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


# dequant ---------------------------------------------------------------------------------------
def _dequant_supports(layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int) -> None:
    return None


def _dequant_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    if not layer.cache_dequant:
        return ()
    return (_dequantize_layer(layer, device, dtype),)


def _dequantize_layer(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # one kernel per weight shape: a shape-generic dequantizer measured 5-10x slower
    fn = fused(dequantize_packed, device.type, dynamic=False)
    return fn(layer.stored_qweight(), layer.scale, layer.zero, layer.bits, layer.in_features, dtype)


def _dequant_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    w = prepared[0] if prepared else _dequantize_layer(layer, x.device, x.dtype)  # [out, in]
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)  # the fake-quant model's exact call, so fp32 matches bit for bit


# int4 (torch's tinygemm-style kernels) ---------------------------------------------------------
def int4_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size to hand torch's int4 kernels, or None if they cannot take the layer."""
    if group_size is not None:
        return group_size if group_size in INT4_GROUP_SIZES else None
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def int4_scales_and_zeros(
    scale: torch.Tensor, zero: torch.Tensor, kernel_group: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """scale, zero [out, G] -> [in / kernel_group, out, 2] with the float-domain zero
    z = s * (8 - zero), so that (q - 8) * s + z == s * (q - zero)."""
    repeat = (in_features // kernel_group) // scale.shape[1]  # > 1 only for per-channel layers
    s = scale.float().repeat_interleave(repeat, dim=1)  # [out, in / kernel_group]
    z = s * (8.0 - zero.float().repeat_interleave(repeat, dim=1))
    return torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_centered(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and zeros shifted by 8 - 2^(bits-1) so that a < 4-bit grid sits in the middle of
    the int4 range: the float zero s * (8 - zero) then stays small and its bf16 rounding does
    not swamp 2- and 3-bit weights. Returns codes [out, in] uint8 and zeros [out, G]."""
    shift = 8 - 2 ** (layer.bits - 1)
    codes = layer.codes() + shift
    return codes.contiguous(), layer.zero.float() + shift


def _int4_common(layer: QuantLinear) -> str | None:
    if layer.bits > 4:
        return f"int4 kernels take codes of at most 4 bits, layer has {layer.bits}"
    if int4_group_size(layer.in_features, layer.group_size) is None:
        return f"group size {layer.group_size} is not one of {INT4_GROUP_SIZES}"
    return None


def _int4_cpu_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    if device_type != "cpu":
        return "int4_cpu runs on the CPU only"
    if dtype != torch.bfloat16:
        # the kernel has a fast path for bf16 only (fp32 input was 20-60x slower here)
        return f"int4_cpu needs bfloat16 activations, got {dtype}"
    if layer.out_features % 16:
        return f"int4_cpu needs out_features divisible by 16, got {layer.out_features}"
    return _int4_common(layer)


def _int4_cpu_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    codes, zero = int4_centered(layer)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    group = int4_group_size(layer.in_features, layer.group_size)
    sz = int4_scales_and_zeros(layer.scale, zero, group, layer.in_features, torch.bfloat16)
    return packed, sz, group


def _int4_cpu_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    packed, sz, group = prepared
    x = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def int4_cuda_inner_k_tiles(in_features: int) -> int | None:
    """tinygemm tiles `in` by inner_k_tiles * 16; the largest tile that divides it is fastest."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def int4_cuda_uint8(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes -> [out, in / 2] uint8 with the EVEN column in the HIGH nibble: the input
    layout of `aten._convert_weight_to_int4pack` on CUDA (torch >= 2.5)."""
    codes = codes.to(torch.uint8)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()


def _int4_cuda_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    if device_type != "cuda":
        return "int4_cuda runs on CUDA only"
    if dtype != torch.bfloat16:
        return f"int4_cuda needs bfloat16 activations, got {dtype}"
    if layer.out_features % 8:
        return f"int4_cuda needs out_features divisible by 8, got {layer.out_features}"
    if int4_cuda_inner_k_tiles(layer.in_features) is None:
        return f"int4_cuda needs in_features divisible by 32, got {layer.in_features}"
    cap = _cuda_capability()
    if cap is not None and cap < (8, 0):
        return f"int4_cuda needs compute capability >= 8.0, device has {cap}"
    return _int4_common(layer)


def _int4_cuda_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    codes, zero = int4_centered(layer)
    tiles = int4_cuda_inner_k_tiles(layer.in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack(int4_cuda_uint8(codes), tiles)
    group = int4_group_size(layer.in_features, layer.group_size)
    sz = int4_scales_and_zeros(layer.scale, zero, group, layer.in_features, torch.bfloat16)
    return packed, sz, group


def _int4_cuda_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    packed, sz, group = prepared
    return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, group, sz)


# int8 W8A8 (exact) --------------------------------------------------------------------------------
def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 with the restricted range +-127 and the abs-max floor
    `ACT_ABSMAX_FLOOR`: the same grid as
    `faircalib.quant.primitives.quantize_activations_per_token(x, 8)`.
    x [M, K] -> (q int8 [M, K], scale float32 [M, 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_ABSMAX_FLOOR) / 127
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def _int8_supports(layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int) -> str | None:
    if layer.bits != 8 or not layer.symmetric or layer.group_size is not None:
        return "int8 needs 8-bit symmetric per-channel weights"
    if layer.act_bits != 8:
        return "int8 computes W8A8: the layer must quantize activations to 8 bits (act_bits=8)"
    if device_type == "cuda":
        if m < INT8_CUDA_MIN_M:
            return f"torch._int_mm on CUDA needs more than 16 token rows, got {m}"
        if layer.in_features % 8 or layer.out_features % 8:
            return "torch._int_mm on CUDA needs in and out features divisible by 8"
    elif device_type != "cpu":
        return f"int8 runs on cpu or cuda, not {device_type}"
    return None


def _int8_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    codes = layer.stored_qweight().to(torch.int16)  # [out, in]; zero is 128 (symmetric)
    w = (codes - 128).to(torch.int8)
    return w.t(), layer.scale.float().reshape(1, -1)  # [in, out] column-major view, [1, out]


def _int8_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    w_t, w_scale = prepared
    q, x_scale = quantize_once("int8_torch", x, fused(quantize_rows_int8, x.device.type))
    acc = torch._int_mm(q, w_t)  # [M, out] int32, exact
    return (acc.float() * (x_scale * w_scale)).to(x.dtype)


# fp8 W8A8 -----------------------------------------------------------------------------------------
def fp8_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of t [R, K] -> (e4m3 [R, K], float32 scale [R, 1]); each row's abs-max (floored at
    `ACT_ABSMAX_FLOOR`) maps to 448: the grid of `quant.activations.quantize_fp8_rows`."""
    tf = t.float()
    scale = tf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_ABSMAX_FLOOR) / FP8_MAX
    return (tf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def scaled_mm_fp8_support(in_features: int, out_features: int, device_type: str) -> str | None:
    """None if torch._scaled_mm can multiply e4m3 operands of this shape on this device."""
    if in_features % 16 or out_features % 16:
        return "fp8 (_scaled_mm) needs in and out features divisible by 16"
    if device_type == "cuda":
        cap = _cuda_capability()
        if cap is not None and cap < (8, 9):
            return f"fp8 needs compute capability >= 8.9 (Ada/Hopper), device has {cap}"
    elif device_type != "cpu":
        return f"fp8 runs on cpu or cuda, not {device_type}"
    return None


def _fp8_supports(layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int) -> str | None:
    return scaled_mm_fp8_support(layer.in_features, layer.out_features, device_type)


def _fp8_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    w = dequantize_packed(
        layer.stored_qweight(),
        layer.scale,
        layer.zero,
        layer.bits,
        layer.in_features,
        torch.float32,
    )
    w8, w_scale = fp8_quantize(w)  # [out, in], [out, 1]
    return w8, w_scale.reshape(1, -1).contiguous()


def _fp8_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    w8, w_scale = prepared
    # one fused pass over x (not seven eager ops), shared by the block's other readers of x
    x8, x_scale = quantize_once("fp8_torch", x, fused(fp8_quantize, x.device.type))
    # row-wise scaled fp8 GEMM: bf16 output is what the row-wise kernels support. Fast
    # accumulation keeps Hopper's fp8 tensor cores at full rate (about 2x); its error is far
    # below the e4m3 rounding itself (benchmarks/kernels.py checks rel. error <= 1e-2)
    y = torch._scaled_mm(
        x8,
        w8.t(),
        scale_a=x_scale,
        scale_b=w_scale,
        out_dtype=torch.bfloat16,
        use_fast_accum=x.is_cuda,
    )
    return y.to(x.dtype)


# W4A16 in Triton (optional): fused dequant GEMM, and dequantize-then-cuBLAS --------------------
def _triton_w4_common(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, name: str
) -> str | None:
    """What every Triton W4A16 backend needs: triton, CUDA (or the CPU interpreter), 16-bit
    activations (fp32 too under the interpreter) and codes of at most 4 bits."""
    if not _HAS_TRITON:
        return "triton is not installed (pip install 'faircalib[gpu]')"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type != "cuda" and not (device_type == "cpu" and interpreted):
        return f"{name} runs on CUDA (or the CPU under TRITON_INTERPRET=1)"
    allowed = (torch.float16, torch.float32) if interpreted else (torch.bfloat16, torch.float16)
    if dtype not in allowed:
        return f"{name} takes {allowed} activations here, got {dtype}"
    if layer.bits > 4:
        return f"{name} takes codes of at most 4 bits, layer has {layer.bits}"
    return None


def _triton_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    why = _triton_w4_common(layer, device_type, dtype, "triton_w4 / triton_dq")
    if why is not None:
        return why
    if layer.in_features % 128:
        return f"the triton backends need in_features divisible by 128, got {layer.in_features}"
    if (layer.group_size or layer.in_features) % 16:
        return "the triton backends need a group size divisible by 16"
    return None


def _triton_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    from faircalib.kernels.triton_w4 import pack_tiles, split_counters, transposed_scales

    packed = pack_tiles(layer.codes().to(device))  # [K / 8, N] int32
    scale_t, zs_t = transposed_scales(layer.scale.to(device), layer.zero.to(device))
    # the fused GEMM's split-K arrival counters, reset by the kernel itself after each call
    return packed, scale_t, zs_t, split_counters(layer.out_features, device)


def _triton_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.triton_w4 import w4_matmul  # imports triton: only when used

    return w4_matmul(x, *prepared)


def _triton_codes(prepared: tuple) -> torch.Tensor:
    from faircalib.kernels.triton_w4 import unpack_tiles

    return unpack_tiles(prepared[0])


def _triton_dq_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.triton_w4 import w4_dequantize

    w_t = w4_dequantize(*prepared[:3], x.dtype)  # [in, out], freed after the call
    y = x @ w_t
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


# W4A16 GEMV in Triton (optional): kernels/triton_gemv, M <= 16 -----------------------------------
def _triton_gemv_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    if m > 16:  # first: the reason a sweep cell at larger M is skipped
        return f"triton_gemv is a GEMV kernel for M <= 16 token rows, got M = {m}"
    why = _triton_w4_common(layer, device_type, dtype, "triton_gemv")
    if why is not None:
        return why
    if layer.in_features % 8:
        return f"triton_gemv needs in_features divisible by 8, got {layer.in_features}"
    group = layer.group_size or layer.in_features
    if group % 8 or layer.in_features % group:
        return f"triton_gemv needs a group size that is a multiple of 8 and divides K, got {group}"
    return None


def _triton_gemv_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    from faircalib.kernels.triton_gemv import MIN_BLOCK_N, gemv_scales, pack_gemv, tile_words

    group = layer.group_size or layer.in_features
    packed = pack_gemv(layer.codes().to(device), tile_words(group))  # [N, K_pad / 8] int32
    a_t, b_t = gemv_scales(layer.scale.to(device), layer.zero.to(device))  # [G, N] float32
    # split-K arrival counters, reset by the kernel itself after each call
    counters = torch.zeros(-(-layer.out_features // MIN_BLOCK_N), dtype=torch.int32, device=device)
    return packed, a_t, b_t, counters, group


def _triton_gemv_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.triton_gemv import gemv  # imports triton: only when used

    return gemv(x, *prepared, _bias(layer))


def _triton_gemv_codes(prepared: tuple) -> torch.Tensor:
    from faircalib.kernels.triton_gemv import tile_words, unpack_gemv

    return unpack_gemv(prepared[0], tile_words(prepared[4]))


# W8A8 / W4A8 in Triton (optional): kernels/triton_w8a8 -----------------------------------------
def _triton_8bit_common(device_type: str, dtype: torch.dtype, fp8: bool) -> str | None:
    if not _HAS_TRITON:
        return "triton is not installed (pip install 'faircalib[gpu]')"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        cap = _cuda_capability()
        need = (8, 9) if fp8 else (8, 0)
        if cap is not None and cap < need:
            return f"{'fp8' if fp8 else 'int8'} tensor cores need compute capability >= {need}"
    elif not (device_type == "cpu" and interpreted):
        return "the triton backends run on CUDA (or the CPU under TRITON_INTERPRET=1)"
    allowed = (torch.float16, torch.float32) if interpreted else (torch.bfloat16, torch.float16)
    if dtype not in allowed:
        return f"the triton backends take {allowed} activations here, got {dtype}"
    return None


def _act8_ok(layer: QuantLinear) -> str | None:
    if layer.act_bits not in (None, 8):
        return f"8-bit activation kernels cannot compute act_bits={layer.act_bits}"
    return None


def _int8_w8a8_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    if layer.bits != 8 or not layer.symmetric or layer.group_size is not None:
        return "int8_w8a8 needs 8-bit symmetric per-channel weights"
    return _act8_ok(layer) or _triton_8bit_common(device_type, dtype, fp8=False)


def _int8_w8a8_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    codes = layer.codes().to(device=device, dtype=torch.int16)  # [out, in]; zero is 128
    w8 = (codes - 128).to(torch.int8).contiguous()
    # the third slot caches gemlite's layer (built on first small-M use): a view of w8
    return w8, layer.scale.to(device).float().reshape(-1), {}


def int8_w8a8_gemm(m: int, in_features: int, out_features: int, x: torch.Tensor) -> str:
    """`INT8_W8A8_GEMM`'s kernel for M token rows: "gemlite" (its dynamic INT8 layer, where the
    optional package imports, on CUDA >= 8.0, both dims multiples of 128), else "triton"."""
    kernel = next(k for bound, k in INT8_W8A8_GEMM if m < bound)
    usable = (
        _HAS_GEMLITE
        and x.is_cuda
        and os.environ.get("TRITON_INTERPRET") != "1"
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
        and in_features % 128 == 0
        and out_features % 128 == 0
    )
    return kernel if kernel != "gemlite" or usable else "triton"


def _int8_w8a8_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.triton_w8a8 import int8_matmul, quantize_rows

    w8, w_scale, cache = prepared
    gl = _gemlite_for(cache, w8, w_scale, x)
    if gl is not None:
        y = gl(x)
        return y if layer.bias is None else y + _bias(layer).to(y.dtype)
    q, x_scale = quantize_once("int8", x, lambda x: quantize_rows(x, "int8"))
    return int8_matmul(q, x_scale, w8, w_scale, x.dtype, _bias(layer))


def _gemlite_for(cache: dict, w8: torch.Tensor, w_scale: torch.Tensor, x: torch.Tensor):  # noqa: ANN202 - gemlite's module or None
    """The gemlite layer that runs these M rows, or None for our GEMM: decided once per (M,
    dtype, device) and kept in the layer's cache (a steady-state call is one dict lookup). A
    gemlite that fails to build (another Triton, a changed API) is warned about once and our
    GEMM serves from then on."""
    m, dtype = x.shape[0], x.dtype
    kernel = cache.get((m, dtype, x.device))
    if kernel is None:
        out_f, in_f = w8.shape
        use = int8_w8a8_gemm(m, in_f, out_f, x) == "gemlite" and not _GEMLITE_FAILED
        if use and dtype not in cache:
            try:
                cache[dtype] = gemlite_int8_layer(w8, w_scale, dtype)
            except Exception as exc:  # noqa: BLE001 - an optional package: fall back, say why
                record_failure(
                    _GEMLITE_FAILED,
                    "int8_w8a8: gemlite's INT8 layer",
                    "faircalib's Triton GEMM",
                    exc,
                    stacklevel=4,
                )
        kernel = cache[(m, dtype, x.device)] = (
            "gemlite" if use and not _GEMLITE_FAILED else "triton"
        )
    return cache[dtype] if kernel == "gemlite" else None


def gemlite_ready() -> None:
    """Import gemlite and, on a Hopper GPU its package has no tuned configs for (it matches them
    by device name: none for the H200), load its H100 configs (same architecture), so only the
    shapes missing there autotune on first use."""
    import gemlite
    from gemlite.core import GemLiteLinearTriton, get_default_cache_config

    if get_default_cache_config() is None and torch.cuda.get_device_capability() == (9, 0):
        GemLiteLinearTriton.load_config(
            os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
        )


def gemlite_int8_layer(w8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype):  # noqa: ANN201 - gemlite's module
    """gemlite's dynamic INT8 W8A8 layer (per-token int8 activations, int32 accumulation,
    per-channel weight scales after) over our int8 weight [out, in]: its packing keeps a
    transposed *view* of `w8`, so the layer adds no weight copy."""
    gemlite_ready()
    from gemlite.core import DType, GemLiteLinearTriton

    out_f, in_f = w8.shape
    out_dtype = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}[dtype]
    gl = GemLiteLinearTriton(
        8,
        group_size=in_f,
        in_features=in_f,
        out_features=out_f,
        input_dtype=DType.INT8,
        output_dtype=out_dtype,
        scaled_activations=True,
    )
    gl.pack(w8, w_scale.reshape(out_f, 1).float(), zeros=None, bias=None)
    gl.W_group_mode, gl.channel_scale_mode = 0, 3  # scales after the int32 dot (its A8W8 setup)
    if gl.W_q.data_ptr() != w8.data_ptr():  # a second copy would undo the 8-bit saving
        raise RuntimeError("gemlite copied the int8 weight instead of viewing it")
    return gl


def _int8_w8a8_codes(prepared: tuple) -> torch.Tensor:
    return (prepared[0].to(torch.int16) + 128).to(torch.uint8)


def _bias(layer: QuantLinear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def fp8_w8a8_gemm(
    m: int,
    out_features: int = 0,
    in_features: int = 0,
    device_type: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """`FP8_W8A8_GEMM`'s kernel for M token rows of an [out, in] layer with `dtype`
    activations ("triton" under the CPU interpreter, which is there to run the Triton kernels,
    and on CUDA for bf16 / fp16 where the Triton GEMM splits K: `FP8_SPLIT_K_TRITON`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    triton_ok = device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if FP8_SPLIT_K_TRITON and triton_ok and _few_tiles_on_triton(m, out_features, in_features):
        return "triton"
    return next(kernel for bound, kernel in FP8_W8A8_GEMM if m < bound)


def _few_tiles_on_triton(m: int, n: int, k: int) -> bool:
    """Whether triton_w8a8.w8a8_matmul splits K for this product on the current CUDA device, or
    the layer is narrow with few output tiles (its small tiles)."""
    if not (_HAS_TRITON and torch.cuda.is_available() and m > 0 and n > 0 and k > 0):
        return False
    from faircalib.kernels.triton_w8a8 import _current_sms, few_tiles, split_k_for

    sms = _current_sms()
    return split_k_for(m, n, k, sms) > 1 or (n <= FP8_NARROW_N and few_tiles(m, n, sms))


def fp8_w8a8_support(
    in_features: int, out_features: int, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    """None if `fp8_w8a8_linear` can run an [out, in] layer on M rows of `dtype` here: the
    Triton GEMM where `fp8_w8a8_gemm` picks it, else torch._scaled_mm (CUDA >= 8.9 or the
    CPU; in and out divisible by 16). Shared by QuantLinear's `fp8_w8a8` backend and the
    reloaded FP8 layers (`formats.packed.FP8ActLinear`). The Triton GEMM takes any shape, but
    on CUDA it runs only at some M: there _scaled_mm's shape rule holds at every M, so a layer
    that runs at one M runs at all (the interpreter runs Triton at every M)."""
    on_triton = fp8_w8a8_gemm(m, out_features, in_features, device_type, dtype) == "triton"
    ragged = in_features % 16 or out_features % 16
    if on_triton and (os.environ.get("TRITON_INTERPRET") == "1" or not ragged):
        return _triton_8bit_common(device_type, dtype, fp8=True)
    return scaled_mm_fp8_support(in_features, out_features, device_type)


def fp8_quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) on `fp8_quantize`'s grid: Triton's
    one-pass row kernel where it runs (CUDA, or the CPU interpreter), else `fp8_quantize`
    itself (fused by torch.compile on CUDA). Both are bit-identical (tests/test_kernels_w8a8)."""
    if _HAS_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from faircalib.kernels.triton_w8a8 import quantize_rows

        return quantize_once("fp8", x, lambda x: quantize_rows(x, "fp8"))
    return quantize_once("fp8_torch", x, fused(fp8_quantize, x.device.type))


def fp8_w8a8_linear(
    x: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The real FP8 W8A8 GEMM: x [M, in] -> per-token e4m3 (`fp8_quantize_activations`) ->
    (x8 * x_scale) @ (w8 * w_scale).T + bias in `out_dtype`, for e4m3 weights w8 [out, in]
    with per-channel float32 scales w_scale [1, out]. Check `fp8_w8a8_support` first."""
    x8, x_scale = fp8_quantize_activations(x)
    return fp8_rows_matmul(x8, x_scale, w8, w_scale, bias, out_dtype)


def fp8_rows_matmul(
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    gemm: str | None = None,
) -> torch.Tensor:
    """`fp8_w8a8_linear` after its activation quantization: e4m3 rows x8 [M, in] with scales
    [M, 1] -> y [M, out] on the GEMM `fp8_w8a8_gemm` picks for M and the layer's shape, or on
    `gemm` ("scaled_mm" / "triton": the benchmarks' side-by-side columns)."""
    (m, k), n = x8.shape, w8.shape[0]
    if (gemm or fp8_w8a8_gemm(m, n, k, x8.device.type, out_dtype)) == "triton":
        from faircalib.kernels.triton_w8a8 import w8a8_matmul  # imports triton: only when used

        return w8a8_matmul(x8, x_scale, w8, w_scale, out_dtype, bias)
    # CUDA's row-wise scaled kernels write bf16 only; the CPU's write any float dtype, so a
    # float32 CPU call is not rounded through bf16. Fast accumulation keeps Hopper's fp8
    # tensor cores at full rate (about 2x); its error is far below the e4m3 rounding itself
    # (benchmarks/kernels.py checks rel. error <= 1e-2)
    y = torch._scaled_mm(
        x8,
        w8.t(),  # [in, out] column-major: the layout _scaled_mm wants for its second operand
        scale_a=x_scale,
        scale_b=w_scale,
        out_dtype=torch.bfloat16 if x8.is_cuda else out_dtype,
        use_fast_accum=x8.is_cuda,
    ).to(out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


def _fp8_w8a8_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    return fp8_w8a8_support(layer.in_features, layer.out_features, device_type, dtype, m)


def _fp8_w8a8_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    w8, w_scale = prepared  # [out, in] e4m3, [1, out]
    return fp8_w8a8_linear(x, w8, w_scale, _bias(layer), x.dtype)


def _w4a8_supports(layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int) -> str | None:
    if layer.bits > 4:
        return f"w4a8 takes codes of at most 4 bits, layer has {layer.bits}"
    if layer.in_features % 128:
        return f"w4a8 needs in_features divisible by 128, got {layer.in_features}"
    group = layer.group_size or layer.in_features
    if group % 32 or (group > 64 and group % 128):
        return (
            "w4a8 needs a group size of 32 or 64 or a multiple of 128 "
            f"(the 8-bit MMA's K and the 128-k tile), got {group}"
        )
    return _act8_ok(layer)


def _w4a8_int8_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    reason = _w4a8_supports(layer, device_type, dtype, m)
    return reason or _triton_8bit_common(device_type, dtype, fp8=False)


def _w4a8_fp8_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    reason = _w4a8_supports(layer, device_type, dtype, m)
    return reason or _triton_8bit_common(device_type, dtype, fp8=True)


def _w4a8_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    from faircalib.kernels.triton_w4 import pack_tiles
    from faircalib.kernels.triton_w8a8 import w4a8_layout

    packed = pack_tiles(layer.codes().to(device))  # [K / 8, N] int32: the codes, no copy kept
    return (packed, *w4a8_layout(layer.scale.to(device), layer.zero.to(device)))


def _w4a8_runner(kind: str) -> Callable[[QuantLinear, tuple, torch.Tensor], torch.Tensor]:
    def run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
        from faircalib.kernels.triton_w8a8 import quantize_rows, w4a8_matmul

        q, x_scale = quantize_once(kind, x, lambda x: quantize_rows(x, kind))
        return w4a8_matmul(q, x_scale, *prepared, x.dtype, _bias(layer))

    return run


def _w4a8_dq_runner(kind: str) -> Callable[[QuantLinear, tuple, torch.Tensor], torch.Tensor]:
    """Large M: the codes unpacked once per call to an 8-bit [out, in] temporary (freed after),
    then an 8-bit GEMM with the group scales in fp32 (`triton_w8a8.w4a8_dq_matmul`)."""

    def run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
        from faircalib.kernels.triton_w8a8 import quantize_rows, w4a8_dq_matmul

        q, x_scale = quantize_once(kind, x, lambda x: quantize_rows(x, kind))
        return w4a8_dq_matmul(q, x_scale, *prepared, x.dtype, _bias(layer))

    return run


# CUTLASS on Hopper (optional: nvcc + nvidia-cutlass; kernels/cutlass_lib) -----------------------
def _cutlass_common(device_type: str, dtype: torch.dtype, name: str) -> str | None:
    """Why a CUTLASS library cannot run here: not Hopper, not bf16, or not built / loadable."""
    if device_type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return f"{name} runs on a CUDA GPU (Hopper, sm_90)"
    if _cuda_capability() != (9, 0):
        return f"{name} is built for Hopper (sm_90a); this GPU is sm_{''.join(map(str, _cuda_capability() or ()))}"
    if dtype != torch.bfloat16:
        return f"{name} computes in bfloat16, got {dtype}"
    return None


def _cutlass_library(load: Callable[[], object]) -> str | None:
    from faircalib.kernels.cutlass_lib import CutlassUnavailable

    try:
        load()
    except CutlassUnavailable as exc:
        return str(exc)
    return None


def _w4a16_library_why(
    layer: QuantLinear,
    device_type: str,
    dtype: torch.dtype,
    name: str,
    check_shape: Callable[[], None],
    load: Callable[[], object],
) -> str | None:
    """Why a W4A16 kernel of the built libraries (csrc/) cannot run the layer here: not 4-bit
    weights with float activations, not Hopper / bf16, a shape it refuses, or not built."""
    if layer.bits != 4 or layer.act_bits is not None:
        return f"{name} runs 4-bit weights with float activations (W4A16)"
    why = _cutlass_common(device_type, dtype, name)
    if why is not None:
        return why
    try:
        check_shape()
    except ValueError as exc:
        return str(exc)
    return _cutlass_library(load)


def _w4_operands(layer: QuantLinear, device: torch.device) -> tuple:
    """(packed codes, scale, zero, group) on `device`: what the W4A16 library kernels prepare from."""
    group = layer.group_size or layer.in_features
    return layer.stored_qweight().to(device), layer.scale.to(device), layer.zero.to(device), group


def _cutlass_w4_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    from faircalib.kernels import cutlass_w4

    group = layer.group_size or layer.in_features
    shape = lambda: cutlass_w4.check_shape(layer.out_features, layer.in_features, group)  # noqa: E731
    return _w4a16_library_why(
        layer, device_type, dtype, "cutlass_w4", shape, cutlass_w4.load_library
    )


def _cutlass_w4_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    from faircalib.kernels.cutlass_w4 import CutlassW4Weight

    return (CutlassW4Weight.prepare(*_w4_operands(layer, device)),)


def _cutlass_w4_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.cutlass_w4 import w4a16_gemm

    return w4a16_gemm(x, prepared[0])


def _cuda_gemv_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    from faircalib.kernels import cuda_gemv

    if m > cuda_gemv.MAX_M:  # first: the reason a sweep cell at larger M is skipped
        return f"cuda_gemv is a GEMV kernel for M <= {cuda_gemv.MAX_M} token rows, got M = {m}"
    group = layer.group_size or layer.in_features
    shape = lambda: cuda_gemv.check_shape(layer.in_features, group)  # noqa: E731
    # built with the CUTLASS libraries, for the same GPUs
    return _w4a16_library_why(layer, device_type, dtype, "cuda_gemv", shape, cuda_gemv.load_library)


def _cuda_gemv_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    from faircalib.kernels.cuda_gemv import GemvWeight

    return (GemvWeight.prepare(*_w4_operands(layer, device)),)


def _cuda_gemv_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.cuda_gemv import w4a16_gemv

    return w4a16_gemv(x, prepared[0])


def _cutlass_int8_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    from faircalib.kernels import cutlass_w8a8

    if layer.bits != 8 or not layer.symmetric or layer.group_size is not None:
        return "cutlass_int8 needs 8-bit symmetric per-channel weights"
    why = _act8_ok(layer) or _cutlass_common(device_type, dtype, "cutlass_int8")
    if why is not None:
        return why
    if layer.in_features % 16 or layer.out_features % 8:
        return "cutlass_int8 needs in_features % 16 == 0 and out_features % 8 == 0 (TMA rows)"
    return _cutlass_library(cutlass_w8a8.load_library)


def _cutlass_int8_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.cutlass_w8a8 import int8_scaled_mm
    from faircalib.kernels.triton_w8a8 import quantize_rows

    w8, w_scale, _ = prepared
    q, x_scale = quantize_once("int8", x, lambda x: quantize_rows(x, "int8"))
    y = int8_scaled_mm(q, x_scale.float(), w8, w_scale)
    return y if layer.bias is None else y + _bias(layer).to(y.dtype)


def _cutlass_w4a8_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    from faircalib.kernels import cutlass_w4a8

    why = _cutlass_common(device_type, dtype, "cutlass_w4a8")  # first: the GPU it needs
    why = why or _w4a8_supports(layer, device_type, dtype, m)
    why = why or _triton_8bit_common(device_type, dtype, fp8=True)  # the unpack is Triton
    if why is not None:
        return why
    group = layer.group_size or layer.in_features
    k, n = layer.in_features, layer.out_features
    if group % cutlass_w4a8.GROUP or n % 8 or k > cutlass_w4a8.MAX_K:
        return (
            f"cutlass_w4a8 needs groups of a multiple of {cutlass_w4a8.GROUP} inputs, "
            f"in_features <= {cutlass_w4a8.MAX_K} and out_features % 8 == 0, got group {group}, "
            f"{k} inputs, {n} outputs"
        )
    return _cutlass_library(cutlass_w4a8.load_library)


def _cutlass_w4a8_prepare(layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> tuple:
    from faircalib.kernels.cutlass_w4a8 import group_scales

    packed, _, zero_t = _w4a8_prepare(layer, device, dtype)
    return packed, zero_t, group_scales(layer.scale.to(device), layer.in_features)


def _cutlass_w4a8_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels.cutlass_w4a8 import w4a8_fp8_gemm
    from faircalib.kernels.triton_w8a8 import quantize_rows

    q, x_scale = quantize_once("fp8", x, lambda x: quantize_rows(x, "fp8"))
    y = w4a8_fp8_gemm(q, x_scale, *prepared).to(x.dtype)
    return y if layer.bias is None else y + _bias(layer).to(y.dtype)


def _lut_why(layer: QuantLinear) -> str | None:
    """cutlass_w4a8_lut.grid_why for the layer, computed once while its plans live (kept in
    `layer._derived`, which moving or loading the layer clears with its kernel layouts)."""
    from faircalib.kernels import cutlass_w4a8_lut

    derived = layer._derived
    if "lut_grid" not in derived:
        derived["lut_grid"] = cutlass_w4a8_lut.grid_why(
            layer.codes, layer.scale, layer.zero, layer.bits
        )
    return derived["lut_grid"]


def _cutlass_w4a8_lut_supports(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    from faircalib.kernels import cutlass_w4a8_lut

    why = _cutlass_common(device_type, dtype, "cutlass_w4a8_lut")  # first: the GPU it needs
    layer_why = _w4a8_supports(layer, device_type, dtype, m)
    why = why or (layer_why and f"cutlass_w4a8_lut: {layer_why}")
    why = why or _triton_8bit_common(device_type, dtype, fp8=True)  # the row quantizer
    if why is not None:
        return why
    group = layer.group_size or layer.in_features
    n = layer.out_features
    if group % cutlass_w4a8_lut.TILE_K or n % cutlass_w4a8_lut.ATOM_ROWS:
        return (
            f"cutlass_w4a8_lut needs groups of a multiple of {cutlass_w4a8_lut.TILE_K} inputs "
            f"and out_features % {cutlass_w4a8_lut.ATOM_ROWS} == 0, got group {group}, {n} outputs"
        )
    why = _lut_why(layer)
    if why is not None:
        return f"cutlass_w4a8_lut {why}"
    return _cutlass_library(cutlass_w4a8_lut.load_library)


def _cutlass_w4a8_lut_prepare(
    layer: QuantLinear, device: torch.device, dtype: torch.dtype
) -> tuple:
    from faircalib.kernels import cutlass_w4a8_lut

    zero = 2 ** (layer.bits - 1)
    values = (layer.codes().to(device).to(torch.int16) - zero).to(torch.int8)
    out_scale, rel = cutlass_w4a8_lut.split_scales(layer.scale.to(device))
    weight = cutlass_w4a8_lut.LutWeight.prepare(values, out_scale, rel)
    # a flat tuple of the LutWeight's fields: its tensors are what the layer keeps resident
    return (*(getattr(weight, f.name) for f in dataclasses.fields(weight)), zero)


def _cutlass_w4a8_lut_codes(prepared: tuple) -> torch.Tensor:
    from faircalib.kernels.cutlass_w4a8_lut import LutWeight

    values = LutWeight(*prepared[:-1]).values()
    return (values.to(torch.int16) + prepared[-1]).to(torch.uint8)


def _cutlass_w4a8_lut_run(layer: QuantLinear, prepared: tuple, x: torch.Tensor) -> torch.Tensor:
    from faircalib.kernels import cutlass_w4a8_lut
    from faircalib.kernels.triton_w8a8 import quantize_rows

    weight = cutlass_w4a8_lut.LutWeight(*prepared[:-1])
    q, x_scale = quantize_once("fp8", x, lambda x: quantize_rows(x, "fp8"))
    config = cutlass_w4a8_lut.config_for(x.shape[0], weight.out_features, weight.in_features)
    y = cutlass_w4a8_lut.gemm(q, x_scale.reshape(-1), weight, config).to(x.dtype)
    return y if layer.bias is None else y + _bias(layer).to(y.dtype)


# --- registry and the auto rule --------------------------------------------------------------
BACKENDS: dict[str, Backend] = {
    "dequant": Backend(
        "dequant", _dequant_supports, _dequant_prepare, _dequant_run, adds_bias=True
    ),
    "int4_cpu": Backend("int4_cpu", _int4_cpu_supports, _int4_cpu_prepare, _int4_cpu_run),
    "int4_cuda": Backend("int4_cuda", _int4_cuda_supports, _int4_cuda_prepare, _int4_cuda_run),
    "int8": Backend("int8", _int8_supports, _int8_prepare, _int8_run, quantizes_activations=True),
    "fp8": Backend("fp8", _fp8_supports, _fp8_prepare, _fp8_run),
    "triton_w4": Backend(
        "triton_w4",
        _triton_supports,
        _triton_prepare,
        _triton_run,
        codes_from_layout=_triton_codes,
    ),
    "triton_dq": Backend(
        "triton_dq",
        _triton_supports,
        _triton_prepare,
        _triton_dq_run,
        adds_bias=True,
        codes_from_layout=_triton_codes,
    ),
    "triton_gemv": Backend(
        "triton_gemv",
        _triton_gemv_supports,
        _triton_gemv_prepare,
        _triton_gemv_run,
        adds_bias=True,
        codes_from_layout=_triton_gemv_codes,
    ),
    "int8_w8a8": Backend(
        "int8_w8a8",
        _int8_w8a8_supports,
        _int8_w8a8_prepare,
        _int8_w8a8_run,
        quantizes_activations=True,
        adds_bias=True,
        codes_from_layout=_int8_w8a8_codes,
    ),
    "fp8_w8a8": Backend(
        "fp8_w8a8", _fp8_w8a8_supports, _fp8_prepare, _fp8_w8a8_run, adds_bias=True
    ),
    "w4a8": Backend(
        "w4a8",
        _w4a8_int8_supports,
        _w4a8_prepare,
        _w4a8_runner("int8"),
        quantizes_activations=True,
        adds_bias=True,
        codes_from_layout=_triton_codes,
    ),
    "w4a8_fp8": Backend(
        "w4a8_fp8",
        _w4a8_fp8_supports,
        _w4a8_prepare,
        _w4a8_runner("fp8"),
        adds_bias=True,
        codes_from_layout=_triton_codes,
    ),
    "w4a8_dq": Backend(
        "w4a8_dq",
        _w4a8_int8_supports,
        _w4a8_prepare,
        _w4a8_dq_runner("int8"),
        quantizes_activations=True,
        adds_bias=True,
        codes_from_layout=_triton_codes,
    ),
    "w4a8_fp8_dq": Backend(
        "w4a8_fp8_dq",
        _w4a8_fp8_supports,
        _w4a8_prepare,
        _w4a8_dq_runner("fp8"),
        adds_bias=True,
        codes_from_layout=_triton_codes,
    ),
    # CUTLASS (Hopper): chosen by name only until the H200 sweep decides where auto takes them.
    # cutlass_w4 keeps the plain codes beside its shuffled copy (no codes_from_layout yet).
    "cutlass_w4": Backend("cutlass_w4", _cutlass_w4_supports, _cutlass_w4_prepare, _cutlass_w4_run),
    # our CUDA GEMV for M <= 8 (kernels/cuda_gemv.py), built with the CUTLASS libraries
    "cuda_gemv": Backend("cuda_gemv", _cuda_gemv_supports, _cuda_gemv_prepare, _cuda_gemv_run),
    "cutlass_int8": Backend(
        "cutlass_int8",
        _cutlass_int8_supports,
        _int8_w8a8_prepare,
        _cutlass_int8_run,
        quantizes_activations=True,
        adds_bias=True,
        codes_from_layout=_int8_w8a8_codes,
    ),
    # W4A8 with e4m3 activations for large M: `w4a8_fp8_dq`'s numbers on CUTLASS's
    # block-scaled FP8 GEMM (kernels/cutlass_w4a8.py); `auto` runs it for W4AFP8 layers
    # (W4AFP8_AUTO_MIN_M), other layers by name
    "cutlass_w4a8": Backend(
        "cutlass_w4a8",
        _cutlass_w4a8_supports,
        _cutlass_w4a8_prepare,
        _cutlass_w4a8_run,
        adds_bias=True,
        codes_from_layout=_triton_codes,
    ),
    # the same numbers for layers with power-of-two scales (scheme w4a8fp8-e8m0), the INT4
    # codes turned into e4m3 in registers through per-group tables
    # (kernels/cutlass_w4a8_lut.py); `auto` prefers it for such W4AFP8 layers
    "cutlass_w4a8_lut": Backend(
        "cutlass_w4a8_lut",
        _cutlass_w4a8_lut_supports,
        _cutlass_w4a8_lut_prepare,
        _cutlass_w4a8_lut_run,
        adds_bias=True,
        codes_from_layout=_cutlass_w4a8_lut_codes,
    ),
}
BACKEND_NAMES = ("auto", *BACKENDS)


def supports(
    layer: QuantLinear, name: str, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    """None if backend `name` can run `layer` on this device/dtype with M token rows."""
    return BACKENDS[name].supports(layer, device_type, dtype, m)


def auto_backend(layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int) -> str:
    """The backend `auto` runs: on CUDA, for layers that quantize activations to 8 bits, the
    `W8A8_AUTO` row for M (8-bit weights) or, from `W4A8_AUTO_MIN_M` rows, `w4a8` (<= 4-bit
    weights); otherwise the `W4_AUTO` row for M (see there)."""
    # only on CUDA: on the CPU, fp32 `dequant` is the bit-exact reference users compare to
    if layer.act_bits == 8 and device_type in W8A8_AUTO:
        names = next(n for bound, n in W8A8_AUTO[device_type] if m < bound)
        for name in names:
            if _auto_takes(layer, name, device_type, dtype, m):
                return name
        min_m = W4A8_AUTO_MIN_M.get(device_type, math.inf)
        if m >= min_m and supports(layer, "w4a8", device_type, dtype, m) is None:
            return "w4a8"
    for bound, names in W4_AUTO.get(device_type, []):
        if m < bound:
            return next(
                (n for n in names if _auto_takes(layer, n, device_type, dtype, m)), "dequant"
            )
    return "dequant"


def w4afp8_auto_backend(
    layer: QuantLinear, device_type: str, dtype: torch.dtype, m: int
) -> str | None:
    """What `auto` runs for a W4AFP8 layer from its own rules: `cutlass_w4a8_lut` from
    `W4AFP8_LUT_AUTO_MIN_M` where the layer is on its grid, else `cutlass_w4a8` from
    `W4AFP8_AUTO_MIN_M`; None below (the W4A16 rule then)."""
    if m >= W4AFP8_LUT_AUTO_MIN_M.get(device_type, math.inf) and _auto_takes(
        layer, "cutlass_w4a8_lut", device_type, dtype, m
    ):
        return "cutlass_w4a8_lut"
    if m >= W4AFP8_AUTO_MIN_M.get(device_type, math.inf) and _auto_takes(
        layer, "cutlass_w4a8", device_type, dtype, m
    ):
        return "cutlass_w4a8"
    return None


def _auto_takes(
    layer: QuantLinear, name: str, device_type: str, dtype: torch.dtype, m: int
) -> bool:
    """Whether `auto` runs `name` for the layer: it can, and the layer is not one the backend
    was measured slower on (AUTO_MIN_OUT_FEATURES)."""
    if layer.out_features < AUTO_MIN_OUT_FEATURES.get(name, 0):
        return False
    return supports(layer, name, device_type, dtype, m) is None


def check_backend_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown QuantLinear backend {name!r}; choose one of {BACKEND_NAMES}")
    return name

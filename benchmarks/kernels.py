"""Linear-layer kernels vs token rows M: bf16 cuBLAS against our QuantLinear backends.

    python benchmarks/kernels.py --out benchmarks/results/kernels          # GPU, ~2-4 minutes
    python benchmarks/kernels.py --smoke --out /tmp/kernels                # CPU, tiny, seconds

For M in {1, ..., 4096} and the layer shapes (in x out) of a generic 8B model (4096x4096,
4096x14336, 14336x4096), LLaDA-8B's MLP (4096x12288 up/gate, 12288x4096 down) and Dream-7B's
(3584x18944, 18944x3584, and 3584x512: its grouped K/V projections) it times, per call:
  bf16          F.linear with a bf16 weight (cuBLAS)
  int4_torch    QuantLinear int4 g128 asym on torch's int4 kernel (_weight_int4pack_mm on GPU,
                _weight_int4pack_mm_for_cpu on the CPU)
  int4_aten     the same kernel called bare on its prepacked weight (uint8 [N, K/2] ->
                _convert_weight_to_int4pack, scales_and_zeros bf16 [K/128, N, 2]): the kernel's
                own cost, without QuantLinear's Python around it (which dominates at small M)
  dequant_bf16  QuantLinear int4 g128: dequantize to bf16 (one fused torch.compile kernel on
                GPU) + cuBLAS; the large-M path
  int8_intmm    QuantLinear 8-bit per-channel, act_bits=8, torch._int_mm (activation
                quantization included); GPU needs M > 16
  fp8_scaled_mm QuantLinear 8-bit per-channel on torch._scaled_mm, row-wise scales (per-token
                activation quantization by torch.compile included)
  int8_w8a8     (GPU) QuantLinear backend int8_w8a8: per-token int8 activations, int32
                accumulation, on the GEMM backends.INT8_W8A8_GEMM picks by M (gemlite's below
                M = 1024 where it is installed, else our Triton GEMM)
  int8_triton   (GPU) int8_w8a8's work on our Triton GEMM whatever the rule says
  fp8_w8a8      (GPU) QuantLinear backend fp8_w8a8: fused per-token e4m3 quantization + the
                GEMM backends.fp8_w8a8_gemm picks (_scaled_mm; ours for layers of few tiles)
  fp8_triton    (GPU) fp8_w8a8's work on our Triton fp8 GEMM, whatever the table says
  int8_tma      (GPU, Hopper) int8_w8a8's work on the persistent TMA GEMM (w8a8_matmul_tma)
  fp8_tma       (GPU, Hopper) fp8_w8a8's work on the persistent TMA GEMM
  w4a8          (GPU) QuantLinear int4 g128, act_bits=8: int8 activations x INT4 weights
                dequantized to int8 in registers (Triton)
  w4a8_fp8      (GPU) the same with e4m3 activations (a W4AFP8 layer: act_format "fp8")
  fp8_prequant  (GPU) the GEMM alone: x's per-token e4m3 rows made outside the timed call, as
                a block's RMSNorm / SwiGLU writes them (kernels.fused_quant); fp8_w8a8's GEMM
  int8_prequant (GPU) the same for INT8 rows and int8_w8a8's Triton GEMM
  fp8_prequant_sm  (GPU) fp8_prequant on torch._scaled_mm whatever backends.fp8_w8a8_gemm says
                (the rule's other column where our GEMM splits K)
  fp8_aten      fp8_w8a8's work called bare: per-token e4m3 scales of x (inside the timed call)
                + torch._scaled_mm with per-channel weight scales, bf16 out
  cutlass_w4    (GPU) CUTLASS's mixed-input GEMM (kernels.cutlass_w4: INT4 converted in
                registers, register-sourced wgmma), tile by M and N (cutlass_w4.config_for);
                cutlass_w4_{32,64,128,256} one token tile each, cutlass_w4_sk{64,128,256} with
                stream-K, cutlass_w4_pp{64,128,256} 64-row ping-pong tiles,
                cutlass_w4_128_plain without the offline weight shuffle (needs
                `faircalib build-kernels`, or FAIRCALIB_CUTLASS_DIR)
  cuda_gemv     (GPU) our tensor-core GEMV for M <= 8 (kernels.cuda_gemv: QuantLinear's packing
                read once, two codes to a bf16 pair by one LOP3, mma.sync with the tokens as N);
                cuda_gemv_t{1,2}[_s{2,4}] its row tiles a warp and K splits fixed (8 warps
                a block, _t2_w4 4); cuda_gemv_w{4,8,16} two tiles, K not split, 4, 8 or 16
                warps a block; cuda_gemv_t1_w16 one tile, K not split, 16 warps
  cutlass_int8  (GPU) int8_w8a8's work on CUTLASS's INT8 GEMM (kernels.cutlass_w8a8: scales in
                the epilogue); cutlass_int8_prequant the GEMM alone, _c0.._c6 one tile each
  cutlass_w4a8  (GPU) QuantLinear int4 g128 W4AFP8 on backend cutlass_w4a8: per-token e4m3
                activations, the codes unpacked to e4m3 per call, CUTLASS's block-scaled FP8
                GEMM (group scales on the accumulator; kernels.cutlass_w4a8), tile by M and N;
                cutlass_w4a8_c{0..3} one tile each; cutlass_w4a8_alone[_c{0..3}] the GEMM
                alone (rows and the e4m3 weight made outside the timed call); auto_w4afp8 the
                same W4AFP8 layer on backend "auto"
  cutlass_w4a8_lut  (GPU) a w4a8fp8-e8m0 layer (power-of-two group scales) on the lookup-table
                kernel (kernels.cutlass_w4a8_lut), per-token quantization included;
                cutlass_w4a8_lut_alone its GEMM alone at the tile its rule picks, _c0.._c8
                (and _alone_c0..) one tile each; auto_w4afp8_e8m0 the same layer on "auto"
  gemlite_w4    (GPU) gemlite's Triton W4A16 layer over the int4 g128 codes, if `gemlite`
                imports (optional: `pip install gemlite`; H100 configs loaded on an H200)
  gemlite_w4a8_fp8   (GPU) gemlite's W4 g128 x dynamic per-token e4m3 activations
  gemlite_int8_w8a8  (GPU) gemlite's dynamic INT8 W8A8 layer from the per-channel int8 weight
  gemlite_fp8_w8a8   (GPU) gemlite's dynamic FP8 W8A8 layer from the same weight
  triton_w4     QuantLinear int4 g128 on our fused Triton dequant GEMM (needs triton; autotuned
                per M bucket and shape during the warm-up, which is not timed)
  triton_dq     QuantLinear int4 g128: our Triton dequantizer to bf16, then cuBLAS
  triton_gemv   QuantLinear int4 g128 on our CUDA-core Triton GEMV (M <= 16; larger M skipped)
  auto_w4       QuantLinear int4 g128 with backend "auto": what a user gets (W4_AUTO's choice)
Timing: median over timed rounds after warm-up (CUDA events on GPU); every round calls each of
several independent (weight, input) copies in turn, together larger than 4x the L2 cache (the
copies are counted from each backend's weight bytes: 3584x512 in int4 is 0.9 MB, so it rotates
hundreds of copies; a 100 MB bf16 weight two), so no call finds its operands cached by the
previous one; each row records `copies`, `rotation_bytes` and `rotation_vs_l2`. On the GPU each round is captured in a
CUDA graph and replayed, so a cell is the kernels' device time (bf16 included); `auto_w4_eager`
times the same calls from Python, showing what per-call dispatch adds when a step is not
captured (faircalib.models.cuda_graph captures whole denoising steps). Correctness: at every shape and M, a
fresh random input through each backend against a float64 matmul of the operands that backend
is meant to compute with (rel. Frobenius error <= 1e-2). Writes kernels.json, kernels.md and
kernels.png into --out, per timed row a roofline (achieved TFLOP/s and GB/s; on an H200 their
share of the peaks and of the roofline bound), the W8A8/W4A8 rows backends.W8A8_AUTO,
W4A8_AUTO_MIN_M and FP8_W8A8_GEMM should hold (`suggested_w8a8`), the W4A16 rows that
`faircalib.kernels.W4_AUTO` should hold (the fastest correct W4A16 backend per M, by
geometric mean over the shapes) and the M from which bf16 beats the bare int4 kernel at
every larger M (where torch's int4 kernel stops paying). kernels.md ends with issue 16's targets
and every cell below one with what holds it (`shortfall`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from faircalib import atomic
from faircalib.bench import run_record
from faircalib.config import QuantConfig
from faircalib.kernels import W4_AUTO, QuantLinear
from faircalib.kernels.backends import (
    BACKENDS,
    INT8_W8A8_GEMM,
    fp8_quantize,
    gemlite_ready,
    pack_codes,
    quantize_rows_int8,
)
from faircalib.models.cuda_graph import capture
from faircalib.quant.primitives import compute_qparams, dequantize, quantize

SHAPES = [  # (in, out)
    (4096, 4096),  # generic 8B (LLaMA-3-8B-like): attention projections
    (4096, 14336),  # generic 8B: MLP up / gate
    (14336, 4096),  # generic 8B: MLP down
    (4096, 12288),  # LLaDA-8B: ff_proj / up_proj
    (12288, 4096),  # LLaDA-8B: ff_out (down)
    (3584, 18944),  # Dream-7B: gate_proj / up_proj
    (18944, 3584),  # Dream-7B: down_proj
    (3584, 512),  # Dream-7B: k_proj / v_proj (4 key/value heads of 128)
]
SHAPE_SOURCES = {
    "4096x4096": "8B attention",
    "4096x14336": "8B MLP up",
    "14336x4096": "8B MLP down",
    "4096x12288": "LLaDA-8B MLP up",
    "12288x4096": "LLaDA-8B MLP down",
    "3584x18944": "Dream-7B MLP up",
    "18944x3584": "Dream-7B MLP down",
    "3584x512": "Dream-7B k/v",
}
ROTATION_L2_MULTIPLE = 4  # the rotated copies together exceed this many L2 caches
MAX_COPIES = 1024  # only a tiny weight needs more; then the rotation is recorded as short
MS = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
SMOKE_SHAPES = [(256, 512), (512, 256)]
SMOKE_MS = [1, 16, 64]
MAX_REL_ERR = 1e-2
BASELINE = "bf16"
# device peaks for the roofline columns (dense; H200 SXM datasheet, /work/.library/device/
# H200.md): bf16 ~990 TFLOP/s, FP8 and INT8 twice that, HBM3e 4.8 TB/s
PEAKS = {"h200": {"tflops_bf16": 989.0, "tflops_8bit": 1979.0, "gbs": 4800.0}}
DEVICE_PEAKS: str | None = None  # set by main() from the device name

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Layer:
    """One random layer in every form the backends need (on the benchmark device)."""

    w: torch.Tensor  # [out, in] float32
    codes4: torch.Tensor
    qp4: object
    codes8: torch.Tensor
    qp8: object
    codes4e: torch.Tensor  # symmetric INT4 g128 with power-of-two scales (w4a8fp8-e8m0)
    qp4e: object

    @classmethod
    def random(cls, in_f: int, out_f: int, device: torch.device, seed: int) -> Layer:
        gen = torch.Generator(device=device).manual_seed(seed)
        w = torch.randn(out_f, in_f, generator=gen, device=device) / math.sqrt(in_f)
        qp4 = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
        qp8 = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
        e8m0 = QuantConfig(bits=4, group_size=128, symmetric=True, scale_dtype="e8m0")
        qp4e = compute_qparams(w, e8m0)
        return cls(w, quantize(w, qp4), qp4, quantize(w, qp8), qp8, quantize(w, qp4e), qp4e)


@dataclass
class Candidate:
    """A backend: `make(layer)` -> the callable to time, `reference(layer, x)` -> float64 y,
    `weight_bytes` per weight element (sizes the cache-flushing rotation)."""

    name: str
    make: Callable[[Layer], Fn]
    reference: Callable[[Layer, torch.Tensor], torch.Tensor]
    weight_bytes: float
    graph: bool = True  # time device work from a CUDA graph; False: with Python dispatch
    math: str = "bf16"  # the tensor-core type it runs on: "bf16" or "8bit" (roofline peak)


def _quant_linear(codes, qp, backend: str, **kw) -> Fn:
    layer = QuantLinear.from_codes(codes, qp, backend=backend, **kw)
    return torch.no_grad()(layer.forward)


def _bare_kernel(codes, qp, backend: str) -> Fn:
    """Backend `backend`'s kernel call alone, on the layout its `prepare` built (the same code
    QuantLinear runs, minus reshapes, backend choice and bias handling)."""
    layer = QuantLinear.from_codes(codes, qp, backend=backend)
    impl = BACKENDS[backend]
    prepared = impl.prepare(layer, codes.device, torch.bfloat16)
    return torch.no_grad()(lambda x: impl.run(layer, prepared, x))


def _ref_w4(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ dequantize(layer.codes4, layer.qp4).double().T


def _ref_int8(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows_int8(x)
    return (q.double() * s.double()) @ dequantize(layer.codes8, layer.qp8).double().T


def _ref_fp8(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    x8, xs = fp8_quantize(x)
    w8, ws = fp8_quantize(dequantize(layer.codes8, layer.qp8))
    return (x8.double() * xs.double()) @ (w8.double() * ws.double()).T


def _ref_w4a8(kind: str) -> Callable[[Layer, torch.Tensor], torch.Tensor]:
    def ref(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows_int8(x) if kind == "int8" else fp8_quantize(x)
        return (q.double() * s.double()) @ dequantize(layer.codes4, layer.qp4).double().T

    return ref


_ref_w4a8_int8, _ref_w4a8_fp8 = _ref_w4a8("int8"), _ref_w4a8("fp8")


def _make_fp8_triton(layer: Layer) -> Fn:
    """fp8_w8a8's work on the Triton GEMM whatever FP8_W8A8_GEMM says (fused per-token
    quantization + triton_w8a8.w8a8_matmul): measures the table's other column."""
    from faircalib.kernels.triton_w8a8 import quantize_rows, w8a8_matmul

    w8, w_scale = fp8_quantize(dequantize(layer.codes8, layer.qp8))
    w_scale = w_scale.reshape(-1).contiguous()

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = quantize_rows(x, "fp8")
        return w8a8_matmul(x8, x_scale, w8, w_scale, x.dtype)

    return run


def _int8_weight(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8_w8a8 backend's weight: codes - 128 (zero 128) as int8 [out, in], and its
    per-channel float32 scales [out]."""
    w8 = (layer.codes8.to(torch.int16) - 128).to(torch.int8).contiguous()
    return w8, layer.qp8.scale.float().reshape(-1).contiguous()


def _make_int8_triton(layer: Layer) -> Fn:
    """int8_w8a8's work on our Triton GEMM whatever INT8_W8A8_GEMM says (fused per-token
    quantization + triton_w8a8.int8_matmul): the rule's other column below M = 1024."""
    from faircalib.kernels.triton_w8a8 import int8_matmul, quantize_rows

    w8, w_scale = _int8_weight(layer)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        q, x_scale = quantize_rows(x, "int8")
        return int8_matmul(q, x_scale, w8, w_scale, x.dtype)

    return run


def _make_tma(kind: str) -> Callable[[Layer], Fn]:
    """The 8-bit work of int8_w8a8 / fp8_w8a8 (fused per-token quantization, then the GEMM)
    on the persistent TMA GEMM (triton_w8a8.w8a8_matmul_tma; Hopper only)."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels.triton_w8a8 import quantize_rows, tma_supported, w8a8_matmul_tma

        why = tma_supported(layer.w.device)
        if why:
            raise RuntimeError(why)
        if kind == "int8":
            w8, w_scale = _int8_weight(layer)
        else:
            w8, w_scale = fp8_quantize(dequantize(layer.codes8, layer.qp8))
            w_scale = w_scale.reshape(-1).contiguous()

        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            x8, x_scale = quantize_rows(x, kind)
            return w8a8_matmul_tma(x8, x_scale, w8, w_scale, x.dtype)

        return run

    return make


def _make_prequant(kind: str, scaled_mm: bool = False) -> Callable[[Layer], Fn]:
    """The GEMM alone: x's 8-bit rows and scales are made once per input outside the timed
    call, as a LLaDA / Dream block's RMSNorms and SwiGLU now write them (kernels.fused_quant) or
    another reader of the same input shared them (kernels.shared_activations). The call is the
    GEMM int8_w8a8 / fp8_w8a8 run on such rows (triton_w8a8.int8_matmul; for FP8 the GEMM
    backends.fp8_w8a8_gemm picks, or `scaled_mm` forces torch._scaled_mm)."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels import backends
        from faircalib.kernels.triton_w8a8 import int8_matmul, quantize_rows

        if kind == "int8":
            w8, w_scale = _int8_weight(layer)
        else:
            w8, w_scale = fp8_quantize(dequantize(layer.codes8, layer.qp8))
            w_scale = w_scale.reshape(1, -1).contiguous()  # [1, out], as the backend holds it
        made: dict[int, tuple] = {}  # id(x) -> (x, rows, scales): x held, so the id stays its

        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            hit = made.get(id(x))
            if hit is None or hit[0] is not x:
                hit = made[id(x)] = (x, *quantize_rows(x, kind))
            _, x8, x_scale = hit
            if kind == "int8":
                return int8_matmul(x8, x_scale, w8, w_scale, x.dtype)
            gemm = "scaled_mm" if scaled_mm else None
            return backends.fp8_rows_matmul(x8, x_scale, w8, w_scale, None, x.dtype, gemm=gemm)

        return run

    return make


def _make_bf16(layer: Layer) -> Fn:
    w = layer.w.to(torch.bfloat16)
    return lambda x: F.linear(x, w)


def _make_gemlite(kind: str) -> Callable[[Layer], Fn]:
    """gemlite's layers (its Triton kernels; `pip install gemlite`) over our weights: "w4" the
    INT4 g128 codes weight-only (its hqq convention (q - zero) * scale is ours), "w4a8_fp8"
    the same codes with dynamic per-token e4m3 activations, "int8_w8a8" / "fp8_w8a8" its
    dynamic 8-bit layers built from our per-channel 8-bit weight."""

    def make(layer: Layer) -> Fn:
        gemlite_ready()
        from gemlite import helper

        dev, bf16 = layer.w.device, torch.bfloat16
        if kind in ("w4", "w4a8_fp8"):
            make_layer = (
                helper.A16W4_HQQ_INT(device=dev, dtype=bf16)
                if kind == "w4"
                else helper.A8W4_HQQ_INT_dynamic(device=dev, dtype=bf16)
            )
            gl = make_layer.from_weights(
                layer.codes4, layer.qp4.scale.to(bf16), layer.qp4.zero.to(bf16)
            )
        else:
            fp8 = torch.float8_e4m3fn if kind == "fp8_w8a8" else False
            make_layer = helper.A8W8_dynamic(device=dev, dtype=bf16, fp8=fp8)
            gl = make_layer.from_weights(dequantize(layer.codes8, layer.qp8).to(bf16))
        return torch.no_grad()(gl.forward)

    return make


def _make_cutlass_w4(config: int | None) -> Callable[[Layer], Fn]:
    """CUTLASS's mixed-input GEMM (kernels.cutlass_w4) over the int4 g128 codes: `config`
    None picks the token tile by M (shuffled weight), else one configuration of the library."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels import cutlass_w4

        plain = config == cutlass_w4.UNSHUFFLED_CONFIG
        weight = cutlass_w4.CutlassW4Weight.prepare(
            pack_codes(layer.codes4, 4), layer.qp4.scale, layer.qp4.zero, 128, keep_plain=plain
        )
        return lambda x: cutlass_w4.w4a16_gemm(x, weight, config)

    return make


def _make_cuda_gemv(
    tiles: int,
    splits: int,
    warps: int | None = None,
) -> Callable[[Layer], Fn]:
    """Our tensor-core GEMV (kernels.cuda_gemv) with its row tiles a warp and its K splits
    fixed, against the rules' choice (tiles_for, splits_for) that `cuda_gemv` runs."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels import cuda_gemv

        weight = cuda_gemv.GemvWeight.prepare(
            pack_codes(layer.codes4, 4), layer.qp4.scale, layer.qp4.zero, 128
        )
        return lambda x: cuda_gemv.w4a16_gemv(x, weight, tiles, splits, warps)

    return make


def _make_cutlass_int8(prequant: bool, config: int | None = None) -> Callable[[Layer], Fn]:
    """int8_w8a8's work on CUTLASS's INT8 GEMM (kernels.cutlass_w8a8): the fused per-token
    quantization then the GEMM, or with `prequant` the GEMM alone on rows quantized once per
    input (as `_make_prequant`); `config` one tile configuration, None the M rule."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels.cutlass_w8a8 import int8_scaled_mm
        from faircalib.kernels.triton_w8a8 import quantize_rows

        w8, w_scale = _int8_weight(layer)
        made: dict[int, tuple] = {}  # prequant: id(x) -> (x, rows, scales)

        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            hit = made.get(id(x)) if prequant else None
            if hit is None or hit[0] is not x:
                hit = (x, *quantize_rows(x, "int8"))
                if prequant:
                    made[id(x)] = hit
            _, x8, x_scale = hit
            return int8_scaled_mm(x8, x_scale.float(), w8, w_scale, config)

        return run

    return make


def _make_cutlass_w4a8(config: int | None, alone: bool = False) -> Callable[[Layer], Fn]:
    """W4A8 with e4m3 activations on CUTLASS's block-scaled FP8 GEMM (kernels.cutlass_w4a8):
    per call the fused per-token quantization, the codes unpacked to e4m3 and the GEMM; with
    `alone` the GEMM only (the e4m3 weight unpacked once, the rows once per input, outside the
    timed call: what the unpack and quantization cost is the difference). `config` one tile,
    None the M rule."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels import cutlass_w4a8
        from faircalib.kernels.triton_w4 import pack_tiles
        from faircalib.kernels.triton_w8a8 import quantize_rows, w4a8_layout, w4a8_unpack

        packed = pack_tiles(layer.codes4)
        _, zero_t = w4a8_layout(layer.qp4.scale, layer.qp4.zero)
        w_scale = cutlass_w4a8.group_scales(layer.qp4.scale, layer.codes4.shape[1])
        w8 = w4a8_unpack(packed, zero_t, "fp8") if alone else None
        made: dict[int, tuple] = {}  # alone: id(x) -> (x, rows, scales)

        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            if not alone:
                x8, x_scale = quantize_rows(x, "fp8")
                return cutlass_w4a8.w4a8_fp8_gemm(x8, x_scale, packed, zero_t, w_scale, config)
            hit = made.get(id(x))
            if hit is None or hit[0] is not x:
                hit = made[id(x)] = (x, *quantize_rows(x, "fp8"))
            _, x8, x_scale = hit
            return cutlass_w4a8.fp8_group_scaled_mm(x8, x_scale.float(), w8, w_scale, config)

        return run

    return make


def _ref_w4a8_e8m0(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """A w4a8fp8-e8m0 layer (power-of-two group scales) on e4m3 rows."""
    q, s = fp8_quantize(x)
    return (q.double() * s.double()) @ dequantize(layer.codes4e, layer.qp4e).double().T


def _make_cutlass_w4a8_lut(config: int | None, alone: bool = False) -> Callable[[Layer], Fn]:
    """The lookup-table W4A8 kernel (kernels.cutlass_w4a8_lut) at one tile (None: the tile
    config_for picks, as the backend does) on a w4a8fp8-e8m0 layer: per call the fused
    per-token quantization and the GEMM; with `alone` the GEMM only (the rows made once per
    input, outside the timed call)."""

    def make(layer: Layer) -> Fn:
        from faircalib.kernels import cutlass_w4a8_lut
        from faircalib.kernels.triton_w8a8 import quantize_rows

        values = (layer.codes4e.to(torch.int16) - 8).to(torch.int8)
        out_scale, rel = cutlass_w4a8_lut.split_scales(layer.qp4e.scale)
        weight = cutlass_w4a8_lut.LutWeight.prepare(values, out_scale, rel)
        made: dict[int, tuple] = {}

        def tile(m: int) -> int:
            if config is not None:
                return config
            return cutlass_w4a8_lut.config_for(m, weight.out_features, weight.in_features)

        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            if not alone:
                x8, x_scale = quantize_rows(x, "fp8")
                return cutlass_w4a8_lut.gemm(x8, x_scale, weight, tile(x.shape[0]))
            hit = made.get(id(x))
            if hit is None or hit[0] is not x:
                hit = made[id(x)] = (x, *quantize_rows(x, "fp8"))
            return cutlass_w4a8_lut.gemm(hit[1], hit[2], weight, tile(x.shape[0]))

        return run

    return make


GEMLITE = [  # name, kind, reference, weight bytes per element, tensor-core type
    ("gemlite_w4", "w4", _ref_w4, 0.5, "bf16"),
    ("gemlite_w4a8_fp8", "w4a8_fp8", _ref_w4a8_fp8, 0.5, "8bit"),
    ("gemlite_int8_w8a8", "int8_w8a8", _ref_int8, 1.0, "8bit"),
    ("gemlite_fp8_w8a8", "fp8_w8a8", _ref_fp8, 1.0, "8bit"),
]


# The Triton 8-bit-activation backends (activation quantization inside the timed call): name,
# the Layer fields of its weight (codes, qparams), the QuantLinear kwargs of the layer it runs,
# its reference and weight bytes per element. Each layer is built so that the backend computes
# exactly what its reference computes: `w4a8_fp8` runs a W4AFP8 layer (act_format "fp8"), whose
# activations the kernel puts on the e4m3 grid itself. On an INT8-activation layer (act_bits=8,
# act_format "int") QuantLinear first fake-quantizes x onto the int8 grid and the kernel then
# re-rounds that onto e4m3: two roundings, 2-2.5% from `_ref_w4a8_fp8` (the H200 sweep's
# failure; tests/test_kernels_bench_8bit.py runs this table on the CPU interpreter).
TRITON_8BIT = [
    ("int8_w8a8", "codes8", "qp8", {"act_bits": 8}, _ref_int8, 1.0),
    ("fp8_w8a8", "codes8", "qp8", {}, _ref_fp8, 1.0),
    ("w4a8", "codes4", "qp4", {"act_bits": 8}, _ref_w4a8_int8, 0.5),
    ("w4a8_fp8", "codes4", "qp4", {"act_bits": 8, "act_format": "fp8"}, _ref_w4a8_fp8, 0.5),
    # large-M W4A8: the codes unpacked to 8 bits per call, then an 8-bit GEMM (triton_w8a8);
    # like w4a8_fp8, w4a8_fp8_dq quantizes its own FP8 activations (FP8_ACT_BACKENDS)
    ("w4a8_dq", "codes4", "qp4", {"act_bits": 8}, _ref_w4a8_int8, 0.5),
    ("w4a8_fp8_dq", "codes4", "qp4", {"act_bits": 8, "act_format": "fp8"}, _ref_w4a8_fp8, 0.5),
]


def triton_8bit_candidates() -> list[Candidate]:
    """`TRITON_8BIT` as candidates (each one's backend has the candidate's name)."""
    out = []
    for name, codes, qp, kw, ref, wb in TRITON_8BIT:
        make = lambda l, c=codes, q=qp, b=name, k=kw: _quant_linear(  # noqa: E731
            getattr(l, c), getattr(l, q), b, **k
        )
        out.append(Candidate(name, make, ref, wb, math="8bit"))
    return out


def candidates(device: torch.device) -> list[Candidate]:
    int4 = "int4_cuda" if device.type == "cuda" else "int4_cpu"
    out = [
        Candidate(
            BASELINE, _make_bf16, lambda l, x: x.double() @ l.w.to(torch.bfloat16).double().T, 2.0
        ),
        Candidate("int4_torch", lambda l: _quant_linear(l.codes4, l.qp4, int4), _ref_w4, 0.5),
        Candidate("int4_aten", lambda l: _bare_kernel(l.codes4, l.qp4, int4), _ref_w4, 0.5),
        Candidate(
            "dequant_bf16", lambda l: _quant_linear(l.codes4, l.qp4, "dequant"), _ref_w4, 0.5
        ),
        Candidate(
            "int8_intmm",
            lambda l: _quant_linear(l.codes8, l.qp8, "int8", act_bits=8),
            _ref_int8,
            1.0,
            math="8bit",
        ),
        Candidate(
            "fp8_scaled_mm",
            lambda l: _quant_linear(l.codes8, l.qp8, "fp8"),
            _ref_fp8,
            1.0,
            math="8bit",
        ),
        Candidate(
            "fp8_aten",
            lambda l: _bare_kernel(l.codes8, l.qp8, "fp8"),
            _ref_fp8,
            1.0,
            math="8bit",
        ),
    ]
    if device.type == "cuda":
        out += triton_8bit_candidates()
        out.append(Candidate("fp8_triton", _make_fp8_triton, _ref_fp8, 1.0, math="8bit"))
        out.append(Candidate("int8_triton", _make_int8_triton, _ref_int8, 1.0, math="8bit"))
        out.append(Candidate("int8_tma", _make_tma("int8"), _ref_int8, 1.0, math="8bit"))
        out.append(Candidate("fp8_tma", _make_tma("fp8"), _ref_fp8, 1.0, math="8bit"))
        for kind, ref in (("fp8", _ref_fp8), ("int8", _ref_int8)):
            out.append(Candidate(f"{kind}_prequant", _make_prequant(kind), ref, 1.0, math="8bit"))
        out.append(
            Candidate("fp8_prequant_sm", _make_prequant("fp8", True), _ref_fp8, 1.0, math="8bit")
        )
        for name, kind, ref, wb, mma in GEMLITE:
            out.append(Candidate(name, _make_gemlite(kind), ref, wb, math=mma))
        out.append(Candidate("cutlass_w4", _make_cutlass_w4(None), _ref_w4, 0.5))
        for name, prequant in (("cutlass_int8", False), ("cutlass_int8_prequant", True)):
            out.append(Candidate(name, _make_cutlass_int8(prequant), _ref_int8, 1.0, math="8bit"))
        for config in range(7):
            make = _make_cutlass_int8(True, config)
            out.append(
                Candidate(f"cutlass_int8_prequant_c{config}", make, _ref_int8, 1.0, math="8bit")
            )
        make = lambda l: _quant_linear(  # noqa: E731 - a W4AFP8 layer, as w4a8_fp8
            l.codes4, l.qp4, "cutlass_w4a8", act_bits=8, act_format="fp8"
        )
        out.append(Candidate("cutlass_w4a8", make, _ref_w4a8_fp8, 0.5, math="8bit"))
        make = lambda l: _quant_linear(  # noqa: E731 - what `auto` runs for a W4AFP8 layer
            l.codes4, l.qp4, "auto", act_bits=8, act_format="fp8"
        )
        out.append(Candidate("auto_w4afp8", make, _ref_w4a8_fp8, 0.5, math="8bit"))
        # the GEMM alone reads the 1-byte e4m3 weight
        make = _make_cutlass_w4a8(None, True)
        out.append(Candidate("cutlass_w4a8_alone", make, _ref_w4a8_fp8, 1.0, math="8bit"))
        for config in range(4):
            for alone in (False, True):
                name = f"cutlass_w4a8{'_alone' if alone else ''}_c{config}"
                make = _make_cutlass_w4a8(config, alone)
                wb = 1.0 if alone else 0.5
                out.append(Candidate(name, make, _ref_w4a8_fp8, wb, math="8bit"))
        # w4a8fp8-e8m0 layers: the lookup-table backend, what `auto` runs for them, and the
        # kernel's tiles one by one (kernels.cutlass_w4a8_lut)
        for name in ("cutlass_w4a8_lut", "auto"):
            make = lambda l, b=name: _quant_linear(  # noqa: E731
                l.codes4e, l.qp4e, b, act_bits=8, act_format="fp8"
            )
            label = "auto_w4afp8_e8m0" if name == "auto" else name
            out.append(Candidate(label, make, _ref_w4a8_e8m0, 0.5, math="8bit"))
        # the GEMM alone at the tile the backend's rule picks
        make = _make_cutlass_w4a8_lut(None, True)
        out.append(Candidate("cutlass_w4a8_lut_alone", make, _ref_w4a8_e8m0, 0.5, math="8bit"))
        for config in range(9):
            for alone in (False, True):
                name = f"cutlass_w4a8_lut{'_alone' if alone else ''}_c{config}"
                make = _make_cutlass_w4a8_lut(config, alone)
                out.append(Candidate(name, make, _ref_w4a8_e8m0, 0.5, math="8bit"))
        tiles = (("32", 2), ("64", 1), ("128", 0), ("256", 3), ("128_plain", 4))
        tiles += (("sk64", 7), ("sk128", 5), ("sk256", 6))  # stream-K
        tiles += (("pp64", 8), ("pp128", 9), ("pp256", 10))  # 64-row ping-pong tiles
        for tile, config in tiles:
            out.append(Candidate(f"cutlass_w4_{tile}", _make_cutlass_w4(config), _ref_w4, 0.5))
        for tiles, splits, warps in ((1, 1, 8), (2, 1, 8), (1, 2, 8), (1, 4, 8), (2, 1, 4)):
            name = f"cuda_gemv_t{tiles}" + (f"_s{splits}" if splits > 1 else "")
            name += "_w4" if warps == 4 else ""
            out.append(Candidate(name, _make_cuda_gemv(tiles, splits, warps), _ref_w4, 0.5))
        for warps in (4, 8, 16):  # two tiles, K not split
            out.append(Candidate(f"cuda_gemv_w{warps}", _make_cuda_gemv(2, 1, warps), _ref_w4, 0.5))
        make = _make_cuda_gemv(1, 1, 16)  # one tile, K not split, 16 warps
        out.append(Candidate("cuda_gemv_t1_w16", make, _ref_w4, 0.5))
        for name in ("triton_w4", "triton_dq", "triton_gemv", "cuda_gemv"):
            out.append(
                Candidate(name, lambda l, n=name: _quant_linear(l.codes4, l.qp4, n), _ref_w4, 0.5)
            )
    auto = lambda l: _quant_linear(l.codes4, l.qp4, "auto")  # noqa: E731
    out.append(Candidate("auto_w4", auto, _ref_w4, 0.5))
    # the same call timed from Python: what a step pays when it is not captured in a graph
    out.append(Candidate("auto_w4_eager", auto, _ref_w4, 0.5, graph=False))
    return out


# --- timing -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round_ms(
    fns: list[Fn], xs: list[torch.Tensor], device: torch.device, min_seconds: float, graph: bool
) -> tuple[list[float], str]:
    """Per-call milliseconds of each timed round (one call per copy, copies in turn), and how
    they were timed: "graph" replays the round from a captured CUDA graph (the kernels' device
    time, without the Python that launches them), "eager" calls it from Python."""

    def one_round() -> None:
        for fn, x in zip(fns, xs, strict=True):
            fn(x)

    one_round()  # warm-up: compilation, kernel layouts, autotuning
    sync(device)
    run, mode = one_round, "eager"
    if graph and device.type == "cuda":
        run, mode = _captured(one_round, device)
    start = time.perf_counter()
    run()  # second warm-up round, timed to size the measurement
    sync(device)
    rounds = max(3, min(200, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / len(fns))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3 / len(fns))
    return times, mode


def _captured(one_round: Callable[[], None], device: torch.device) -> tuple[Callable, str]:
    """one_round replayed from a CUDA graph; eager where capture fails (a backend that
    synchronizes or copies from the host inside its call)."""
    try:
        graph, _ = capture(one_round, device)
    except Exception as exc:  # noqa: BLE001 - recorded, then timed eagerly
        torch.cuda.synchronize(device)
        return one_round, f"eager (capture failed: {type(exc).__name__})"
    return graph.replay, "graph"


def copy_bytes(in_f: int, out_f: int, m: int, weight_bytes: float) -> float:
    """Bytes one timed call reads: its weight and its bf16 input."""
    return in_f * out_f * weight_bytes + m * in_f * 2


def n_copies(flush_bytes: int, in_f: int, out_f: int, m: int, weight_bytes: float) -> int:
    """Copies to rotate so that together they exceed `flush_bytes` (at least 2)."""
    per_copy = copy_bytes(in_f, out_f, m, weight_bytes)
    return max(2, min(MAX_COPIES, math.ceil(flush_bytes / per_copy)))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def bench_shape(
    in_f: int,
    out_f: int,
    ms: list[int],
    cands: list[Candidate],
    device: torch.device,
    flush_bytes: int,
    min_seconds: float,
) -> list[dict]:
    rows = []
    max_copies = max(n_copies(flush_bytes, in_f, out_f, 1, c.weight_bytes) for c in cands)
    layers = [Layer.random(in_f, out_f, device, seed=i) for i in range(max_copies)]
    for cand in cands:
        try:
            fns = [cand.make(layer) for layer in layers]
        except Exception as exc:  # noqa: BLE001 - an optional or broken backend is recorded
            rows += [
                _row(in_f, out_f, m, cand.name, skipped=f"{type(exc).__name__}: {exc}") for m in ms
            ]
            continue
        for m in ms:
            rows.append(
                _measure(cand, fns, layers, in_f, out_f, m, device, flush_bytes, min_seconds)
            )
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure(
    cand: Candidate,
    fns: list[Fn],
    layers: list[Layer],
    in_f: int,
    out_f: int,
    m: int,
    device: torch.device,
    flush_bytes: int,
    min_seconds: float,
) -> dict:
    k = n_copies(flush_bytes, in_f, out_f, m, cand.weight_bytes)
    gen = torch.Generator(device=device).manual_seed(1000 + m)
    try:
        x = torch.randn(m, in_f, generator=gen, device=device).to(torch.bfloat16)
        err = rel_err(fns[0](x), cand.reference(layers[0], x))
        xs = [torch.randn(m, in_f, device=device).to(torch.bfloat16) for _ in range(k)]
        times, timing = time_round_ms(fns[:k], xs, device, min_seconds, cand.graph)
    except Exception as exc:  # noqa: BLE001 - e.g. a kernel's shape constraint at this M
        return _row(in_f, out_f, m, cand.name, skipped=f"{type(exc).__name__}: {exc}"[:300])
    return _row(
        in_f,
        out_f,
        m,
        cand.name,
        ms=statistics.median(times),
        ms_p20=_quantile(times, 0.2),
        ms_p80=_quantile(times, 0.8),
        copies=k,
        rotation_bytes=int(k * copy_bytes(in_f, out_f, m, cand.weight_bytes)),
        rotation_vs_l2=k
        * copy_bytes(in_f, out_f, m, cand.weight_bytes)
        * ROTATION_L2_MULTIPLE
        / flush_bytes,
        timing=timing,
        rel_err=err,
        correct=err <= MAX_REL_ERR,
        **roofline(in_f, out_f, m, cand, statistics.median(times)),
    )


def roofline(in_f: int, out_f: int, m: int, cand: Candidate, ms: float) -> dict:
    """Achieved TFLOP/s and GB/s of one call (2MNK flops; bytes: the weight, the bf16 input
    and output), and the share of the roofline bound at this arithmetic intensity:
    min(peak math, intensity x peak bandwidth) with the H200's peaks (`PEAKS`; None on other
    devices, whose peaks this script does not know)."""
    flops = 2.0 * m * in_f * out_f
    bytes_ = in_f * out_f * cand.weight_bytes + 2.0 * m * (in_f + out_f)
    seconds = ms * 1e-3
    row = {"tflops": flops / seconds / 1e12, "gbs": bytes_ / seconds / 1e9}
    peak = PEAKS.get(DEVICE_PEAKS)
    if peak is None:
        return {**row, "roofline_pct": None, "bound": None}
    math_peak = peak["tflops_" + cand.math] * 1e12
    bw_peak = peak["gbs"] * 1e9
    attainable = min(math_peak, flops / bytes_ * bw_peak)
    return {
        **row,
        "pct_peak_tflops": 100 * flops / seconds / math_peak,
        "pct_peak_gbs": 100 * bytes_ / seconds / bw_peak,
        "roofline_pct": 100 * (flops / seconds) / attainable,
        "bound": "math" if attainable == math_peak else "memory",
    }


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _row(in_f: int, out_f: int, m: int, backend: str, **fields) -> dict:
    return {
        "shape": f"{in_f}x{out_f}",
        "in": in_f,
        "out": out_f,
        "M": m,
        "backend": backend,
        **fields,
    }


# --- reporting -----------------------------------------------------------------------------------
def add_speedups(rows: list[dict]) -> None:
    base = {(r["shape"], r["M"]): r["ms"] for r in rows if r["backend"] == BASELINE and "ms" in r}
    for r in rows:
        if "ms" in r and (r["shape"], r["M"]) in base:
            r["speedup_vs_bf16"] = base[(r["shape"], r["M"])] / r["ms"]


def crossover(rows: list[dict], small: str = "int4_torch", large: str = "dequant_bf16") -> dict:
    """Per shape: the first M of the grid from which `large` is faster than `small` at every
    larger M; overall: the largest of those (so `small` is only used where it wins everywhere)."""
    per_shape = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        t = {(r["backend"], r["M"]): r.get("ms") for r in rows if r["shape"] == shape}
        ms = sorted({m for (_, m) in t})
        first = None
        for m in reversed(ms):
            a, b = t.get((small, m)), t.get((large, m))
            if a is None or b is None or b >= a:
                break
            first = m
        per_shape[shape] = first
    known = [v for v in per_shape.values() if v is not None]
    overall = max(known) if known and len(known) == len(per_shape) else None
    return {"per_shape": per_shape, "suggested": overall, "small": small, "large": large}


# W4A16 candidates and the QuantLinear backend each one measures
W4_BACKENDS = {
    "int4_torch": "int4_cuda",
    "dequant_bf16": "dequant",
    "triton_w4": "triton_w4",
    "triton_dq": "triton_dq",
    "triton_gemv": "triton_gemv",  # M <= 16 only: larger M are skipped cells
    "cutlass_w4": "cutlass_w4",  # Hopper, once `faircalib build-kernels` has run
    "cuda_gemv": "cuda_gemv",  # M <= 8 only, built with the CUTLASS libraries
}


def suggested_w4_auto(rows: list[dict]) -> list[list]:
    """[M bound, backend] rows for W4_AUTO['cuda']: per M the QuantLinear backend with the best
    geometric-mean speed over the shapes (correct cells only), runs of equal winners merged."""
    ms = sorted({r["M"] for r in rows})
    winners = []
    for m in ms:
        score = {}
        for cand, backend in W4_BACKENDS.items():
            cells = [r for r in rows if r["backend"] == cand and r["M"] == m]
            if cells and all(r.get("correct") and "speedup_vs_bf16" in r for r in cells):
                logs = [math.log(r["speedup_vs_bf16"]) for r in cells]
                score[backend] = sum(logs) / len(logs)
        if score:
            winners.append((m, max(score, key=score.get)))
    out: list[list] = []
    for m, backend in winners:
        if out and out[-1][1] == backend:
            continue
        if out:
            out[-1][0] = m  # the previous run ends where this one starts
        out.append([None, backend])
    if out:
        out[-1][0] = "inf"
    return out


def fastest(rows: list[dict], names: tuple[str, ...]) -> dict:
    """Per shape and M: the fastest correct backend among `names` (the W4A16 candidates)."""
    best: dict[str, dict[int, str]] = {}
    for r in rows:
        if r["backend"] in names and r.get("correct"):
            cell = best.setdefault(r["shape"], {})
            other = next(
                (
                    o
                    for o in rows
                    if o["backend"] == cell.get(r["M"])
                    and o["shape"] == r["shape"]
                    and o["M"] == r["M"]
                ),
                None,
            )
            if other is None or r["ms"] < other["ms"]:
                cell[r["M"]] = r["backend"]
    return best


def suggested_w8a8(rows: list[dict]) -> dict:
    """What backends.W8A8_AUTO / W4A8_AUTO_MIN_M / FP8_W8A8_GEMM should hold, by geometric-mean
    speed over the shapes per M (correct cells only): the faster 8-bit-weight int8 backend per
    M, the first M from which w4a8 beats every W4A16 candidate at every larger M, and the
    faster fp8 GEMM per M."""

    def score(name: str, m: int) -> float | None:
        cells = [r for r in rows if r["backend"] == name and r["M"] == m]
        if not cells or not all(r.get("correct") and "speedup_vs_bf16" in r for r in cells):
            return None
        return sum(math.log(r["speedup_vs_bf16"]) for r in cells) / len(cells)

    ms = sorted({r["M"] for r in rows})

    def best(m: int, names: tuple[str, ...]) -> str:
        return max(names, key=lambda n: -math.inf if score(n, m) is None else score(n, m))

    int8_names = {"int8_w8a8": "int8_w8a8", "int8_triton": "int8_w8a8", "int8_intmm": "int8"}
    int8 = {m: int8_names[best(m, W8_INT8)] for m in ms}
    # int8_w8a8's GEMM per M (backends.INT8_W8A8_GEMM): where the rule gives it gemlite's
    # kernels, the backend's cell is gemlite's and int8_triton's is ours; elsewhere both are
    # ours (then "triton")
    int8_gemm = {}
    for m in ms:
        rule, ours = score("int8_w8a8", m), score("int8_triton", m)
        gemlite_cells = int8_w8a8_kernel(m) == "gemlite"
        int8_gemm[m] = (
            "gemlite"
            if gemlite_cells and rule is not None and (ours is None or rule > ours)
            else "triton"
        )
    fp8 = {m: {"fp8_w8a8": "scaled_mm", "fp8_triton": "triton"}[best(m, W8_FP8)] for m in ms}
    # the fused W4A8 GEMM or the unpack-then-GEMM one, whichever is faster at each M
    w4a8_by_m = {m: best(m, W4A8_INT8) for m in ms}
    w4a8_min = None
    for m in reversed(ms):
        w4a8, w4 = score(w4a8_by_m[m], m), [score(n, m) for n in W4_BACKENDS]
        if w4a8 is None or any(v is not None and v >= w4a8 for v in w4):
            break
        w4a8_min = m
    return {
        "int8_by_m": int8,
        "int8_gemm_by_m": int8_gemm,
        "fp8_gemm_by_m": fp8,
        "w4a8_by_m": w4a8_by_m,
        "w4a8_min_m": w4a8_min,
    }


W8_INT8 = ("int8_w8a8", "int8_triton", "int8_intmm")


def _gemlite() -> str | None:
    """The installed gemlite's version (int8_w8a8's small-M kernels), or None."""
    from importlib import metadata

    try:
        return metadata.version("gemlite")
    except metadata.PackageNotFoundError:
        return None


def int8_w8a8_kernel(m: int) -> str:
    """What backends.INT8_W8A8_GEMM names for M rows (the cell ran it where gemlite was
    installed: the record's `gemlite` says whether it was)."""
    return next(kernel for bound, kernel in INT8_W8A8_GEMM if m < bound)


W4A8_INT8 = ("w4a8", "w4a8_dq")
W4A8_LAYERS = (  # every W4A8 layer backend, and what `auto` runs for W4AFP8 layers
    *("w4a8", "w4a8_fp8", "w4a8_dq", "w4a8_fp8_dq", "cutlass_w4a8", "cutlass_w4a8_lut"),
    *("auto_w4afp8", "auto_w4afp8_e8m0"),
)
W8_FP8 = ("fp8_w8a8", "fp8_triton")  # fp8_w8a8 runs FP8_W8A8_GEMM's choice (_scaled_mm now)


# issue 16's kernel targets: (name, the backends that may meet it - per cell the fastest
# correct one counts -, smallest M, largest M, least speed vs bf16)
TARGETS = [
    ("FP8 W8A8", ("fp8_w8a8", "fp8_triton", "fp8_scaled_mm"), 1024, math.inf, 1.6),
    ("INT8 W8A8", ("int8_w8a8", "int8_triton", "int8_intmm", "cutlass_int8"), 1024, math.inf, 1.6),
    # the lookup-table kernel's layers are W4AFP8 on power-of-two group scales (w4a8fp8-e8m0)
    ("W4A8", W4A8_LAYERS, 1024, math.inf, 1.5),
    ("W4A16 M >= 256", ("auto_w4", *W4_BACKENDS), 256, math.inf, 0.9),
    ("W4A16 M = 1", ("auto_w4", *W4_BACKENDS), 1, 1, 2.5),
    # not the targets themselves: the same GEMMs on rows quantized by the op that writes them
    ("FP8 W8A8, GEMM alone", ("fp8_prequant",), 1024, math.inf, 1.6),
    ("INT8 W8A8, GEMM alone", ("int8_prequant", "cutlass_int8_prequant"), 1024, math.inf, 1.6),
    ("W4A8, GEMM alone", ("cutlass_w4a8_alone", "cutlass_w4a8_lut_alone"), 1024, math.inf, 1.5),
]
# the layers that quantize their own activations, and the target whose cells time their GEMM
# alone in the same run: the difference is the per-token pass (triton_w8a8.quantize_rows)
ALONE_OF = {name: f"{name}, GEMM alone" for name in ("FP8 W8A8", "INT8 W8A8", "W4A8")}
KEEP = ("shape", "M", "backend", "speedup_vs_bf16", "tflops", "gbs", "roofline_pct", "bound")


def _cell(row: dict) -> tuple[str, int]:
    return row["shape"], row["M"]


def fastest_cells(rows: list[dict], backends, m_lo: float, m_hi: float) -> dict[tuple, dict]:
    """(shape, M) -> the fastest correct row of `backends` with m_lo <= M <= m_hi."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r["backend"] in backends and m_lo <= r["M"] <= m_hi and r.get("correct"):
            key = _cell(r)
            if "speedup_vs_bf16" in r and (
                key not in best or r["speedup_vs_bf16"] > best[key]["speedup_vs_bf16"]
            ):
                best[key] = r
    return best


def targets(rows: list[dict]) -> list[dict]:
    """Each target's worst cell over the shapes and Ms it covers (per cell its fastest correct
    backend: an upper bound on what `auto`'s per-M rule gets), with that cell's roofline
    numbers. Met when every (shape, M) of the sweep in the target's range has a correct cell and
    the worst reaches the speed; `missing` counts the cells without one. Each cell below the
    target comes with what holds it (`shortfall`)."""
    grid = {_cell(r) for r in rows}
    bf16 = {_cell(r): r for r in rows if r["backend"] == BASELINE and "ms" in r}
    spec = {name: (backends, lo, hi) for name, backends, lo, hi, _ in TARGETS}
    out = []
    for name, backends, m_lo, m_hi, least in TARGETS:
        best = fastest_cells(rows, backends, m_lo, m_hi)
        alone = fastest_cells(rows, *spec[ALONE_OF[name]]) if name in ALONE_OF else {}
        expected = {(s, m) for s, m in grid if m_lo <= m <= m_hi}
        missing = sorted(expected - set(best))
        cells = sorted(best.values(), key=lambda r: r["speedup_vs_bf16"])
        worst = cells[0] if cells else None
        out.append(
            {
                "target": name,
                "backends": list(backends),
                "m_range": [m_lo, None if m_hi == math.inf else m_hi],
                "least_speedup": least,
                "cells": len(cells),
                "missing": len(missing),
                "met": bool(cells) and not missing and worst["speedup_vs_bf16"] >= least,
                "worst": {k: worst.get(k) for k in KEEP} if worst else None,
                "shortfalls": [
                    shortfall(r, least, bf16.get(_cell(r)), alone.get(_cell(r)))
                    for r in cells
                    if r["speedup_vs_bf16"] < least
                ],
            }
        )
    return out


def shortfall(r: dict, least: float, bf16: dict | None, alone: dict | None) -> dict:
    """One cell below its target and what holds it: the time the target asks for (bf16's time /
    the least speed) and the TFLOP/s and GB/s that time takes, beside what the cell reached (as
    shares of the device's peaks, where known). For a layer that quantizes its own activations,
    `alone` is the fastest GEMM on rows made beforehand at the same cell of the same run: the
    rest of the layer's time is the per-token pass, whose bytes (bf16 rows in, 8-bit rows and
    float32 scales out) at the HBM peak bound the layer from below with that GEMM."""
    out = {k: r.get(k) for k in KEEP}
    if bf16 is None or "ms" not in r:
        return out
    us, bf16_us = r["ms"] * 1e3, bf16["ms"] * 1e3
    need_us = bf16_us / least
    out |= {"us": us, "bf16_us": bf16_us, "need_us": need_us}
    for kind in ("tflops", "gbs"):  # what the target's time asks of the same work
        if r.get(kind) is not None:
            out[f"need_{kind}"] = r[kind] * us / need_us
        if r.get(f"pct_peak_{kind}") is not None:
            out[f"pct_peak_{kind}"] = r[f"pct_peak_{kind}"]
            out[f"need_pct_peak_{kind}"] = r[f"pct_peak_{kind}"] * us / need_us
    if alone is None or "ms" not in alone:
        return out
    alone_us = alone["ms"] * 1e3
    pass_bytes = r["M"] * r["in"] * 3 + 4 * r["M"]
    out |= {
        "alone_backend": alone["backend"],
        "alone_us": alone_us,
        "alone_pct_peak_tflops": alone.get("pct_peak_tflops"),
        "pass_us": us - alone_us,
        "pass_bytes": pass_bytes,
    }
    peak = PEAKS.get(DEVICE_PEAKS)
    if peak is not None:
        at_peak = pass_bytes / (peak["gbs"] * 1e3)  # bytes / (GB/s) in microseconds
        out |= {
            "pass_us_at_peak": at_peak,
            "speed_with_pass_at_peak": bf16_us / (alone_us + at_peak),
        }
    return out


def triton_choices() -> dict:
    """The tile configuration autotuning chose per key of the fused kernels (for the notes)."""
    try:
        from faircalib.kernels.triton_w4 import _autotuned_matmul
        from faircalib.kernels.triton_w8a8 import autotune_choices
    except ImportError:
        return {}
    w4 = {str(key): str(cfg) for key, cfg in getattr(_autotuned_matmul, "cache", {}).items()}
    return {"w4": w4, **autotune_choices()}


def markdown(result: dict) -> str:
    rows, names = result["rows"], result["backends"]
    parts = result["record"].get("parts", [])
    commands = [p["command"] for p in parts] or [result["record"]["command"]]
    lines = [
        f"# Linear-layer kernels vs M ({result['record']['device']})",
        "",
        *(f"Command: `{c}`  " for c in commands),
        *([f"Merged by: `{result['record']['merged_by']}`  "] if parts else []),
        f"Commit: {result['record']['git_commit']}"
        f"  \nDate: {result['record']['date']}  \ntorch {result['record']['torch']}",
        "",
        "Speed relative to bf16 (>1 is faster); bf16 column in microseconds. GPU cells are "
        "device time from CUDA graph replays, except `auto_w4_eager` (Python dispatch included). "
        "`!` marks a failed correctness check (rel. err > 1e-2), `-` a skipped cell.",
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        source = result.get("shape_sources", {}).get(shape, "")
        rotation = [r["rotation_vs_l2"] for r in rows if r["shape"] == shape and "ms" in r]
        lines += [
            f"## in x out = {shape}" + (f" ({source})" if source else ""),
            "",
            f"Rotation per round: {min(rotation, default=0):.1f}-{max(rotation, default=0):.1f}x "
            "the L2 cache.",
            "",
            "| M | bf16 (us) | " + " | ".join(names[1:]) + " |",
            "|---:|---:|" + "---:|" * (len(names) - 1),
        ]
        for m in result["Ms"]:
            cell = {r["backend"]: r for r in rows if r["shape"] == shape and r["M"] == m}
            base = cell.get(BASELINE, {})
            row = [str(m), f"{base['ms'] * 1e3:.1f}" if "ms" in base else "-"]
            for name in names[1:]:
                r = cell.get(name, {})
                mark = "" if r.get("correct", True) else "!"
                row.append(f"{r['speedup_vs_bf16']:.2f}x{mark}" if "speedup_vs_bf16" in r else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    c, b = result["crossover"], result["int4_vs_bf16"]
    lines += [
        "## Crossover",
        "",
        f"First M at which {c['large']} beats {c['small']}, per shape: {c['per_shape']}.",
        "",
        "W4A16 backend by M (best geometric-mean speed over the shapes), as `[M bound, backend]` "
        f"rows: suggested `W4_AUTO['{result['device_type']}']` = {result['suggested_w4_auto']} "
        f"(in code: {result['w4_auto_in_code']}).",
        "",
        f"First M from which bf16 beats the bare int4 kernel ({b['small']}) at every larger M, "
        f"per shape: {b['per_shape']} (1: int4 never wins here).",
        "",
        "Fastest correct W4A16 backend per M: "
        + "; ".join(f"{shape}: {cells}" for shape, cells in result["fastest_w4"].items()),
        "",
    ]
    lines += [
        f"Suggested W8A8 rows (backends.W8A8_AUTO / W4A8_AUTO_MIN_M / FP8_W8A8_GEMM): "
        f"{result.get('suggested_w8a8')}",
        "",
        "## Roofline (M >= 1024)",
        "",
        f"Peaks: {result.get('roofline_peaks') or 'unknown for this device'}.",
        "",
        "| shape | M | backend | TFLOP/s | GB/s | % of roofline | bound |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if "tflops" in r and r["M"] >= 1024:
            pct = r.get("roofline_pct")
            lines.append(
                f"| {r['shape']} | {r['M']} | {r['backend']} | {r['tflops']:.1f} | "
                f"{r['gbs']:.0f} | {'-' if pct is None else f'{pct:.0f}%'} | "
                f"{r.get('bound') or '-'} |"
            )
    lines.append("")
    lines += targets_markdown(result.get("targets") or [], result.get("shapes_not_run") or [])
    skipped = sorted({(r["backend"], r["skipped"]) for r in rows if "skipped" in r})
    if skipped:
        lines += ["## Skipped", ""] + [f"- {b}: {why}" for b, why in skipped[:20]] + [""]
    return "\n".join(lines)


def targets_markdown(checks: list[dict], not_run: list[str]) -> list[str]:
    lines = [
        "## Targets (issue 16)",
        "",
        "Per cell the fastest correct backend of the target's set; the worst cell decides. "
        "Roofline: achieved TFLOP/s and GB/s of that cell and its share of "
        "min(peak math, intensity x peak bandwidth).",
        "",
        "| target | M | least | worst cell | speed | TFLOP/s | GB/s | % of roofline | "
        "cells below | met |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in checks:
        lo, hi = t["m_range"]
        m = f"{lo}" if lo == hi else f">= {lo}"
        w = t["worst"]
        if w is None:
            lines.append(
                f"| {t['target']} | {m} | {t['least_speedup']}x | not measured "
                "| - | - | - | - | - | no |"
            )
            continue
        pct = "-" if w["roofline_pct"] is None else f"{w['roofline_pct']:.0f}% ({w['bound']})"
        below = f"{len(t['shortfalls'])}/{t['cells']}"
        if t.get("missing"):
            below += f" (+{t['missing']} unmeasured)"
        lines.append(
            f"| {t['target']} | {m} | {t['least_speedup']}x | {w['shape']} M={w['M']} "
            f"{w['backend']} | {w['speedup_vs_bf16']:.2f}x | {w['tflops']:.0f} | {w['gbs']:.0f} "
            f"| {pct} | {below} | {'yes' if t['met'] else 'no'} |"
        )
    if not_run:
        lines += ["", f"Shapes not run (time budget): {', '.join(not_run)}."]
    return lines + [""] + shortfalls_markdown(checks)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def shortfalls_markdown(checks: list[dict]) -> list[str]:
    """Every cell below its target with what holds it (`shortfall`): for the layers that
    quantize their own activations, their GEMM alone and the per-token pass; for the others,
    the compute and bandwidth the target's time would take against what the cell reached."""
    own = [(t, s) for t in checks if t["target"] in ALONE_OF for s in t["shortfalls"]]
    rest = [(t, s) for t in checks if t["target"] not in ALONE_OF for s in t["shortfalls"]]
    lines = []
    if own:
        lines += [
            "## Shortfalls of the layers that quantize their own activations",
            "",
            "Per cell below its target: the layer's time (us), its GEMM alone on rows made "
            "beforehand (the fastest such backend, same cell, same run) and that GEMM's share of "
            "the 8-bit tensor-core peak, the rest (the per-token pass: bf16 rows in, 8-bit rows "
            "and float32 scales out), that pass's time at the HBM peak, and the layer's speed "
            "if the pass ran at that peak beside the same GEMM. Where that speed is still below "
            "the target, no faster separate pass can meet it.",
            "",
            "| target | cell | backend | speed | need | layer | GEMM alone | its % of peak "
            "| pass | pass at peak | speed with it |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t, s in own:
            if "alone_us" not in s:
                continue
            lines.append(
                f"| {t['target']} | {s['shape']} M={s['M']} | {s['backend']} | "
                f"{s['speedup_vs_bf16']:.2f}x | {t['least_speedup']}x | {s['us']:.1f} | "
                f"{s['alone_us']:.1f} ({s['alone_backend']}) | {_pct(s['alone_pct_peak_tflops'])} "
                f"| {s['pass_us']:.1f} | {s.get('pass_us_at_peak', float('nan')):.1f} | "
                f"{s.get('speed_with_pass_at_peak', float('nan')):.2f}x |"
            )
        lines.append("")
    if rest:
        lines += [
            "## Other shortfalls: what the target's time would take",
            "",
            "Per cell below its target: its time and the time the target asks for (us); the "
            "TFLOP/s and GB/s the cell reached and those that time would take, each also as a "
            "share of the device's peak (bf16 or 8-bit tensor cores as the kernel runs; HBM).",
            "",
            "| target | cell | backend | speed | us | need us | TFLOP/s (% peak) | needs "
            "| GB/s (% peak) | needs |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t, s in rest:
            if "need_us" not in s:
                continue
            lines.append(
                f"| {t['target']} | {s['shape']} M={s['M']} | {s['backend']} | "
                f"{s['speedup_vs_bf16']:.2f}x | {s['us']:.1f} | {s['need_us']:.1f} | "
                f"{s['tflops']:.0f} ({_pct(s.get('pct_peak_tflops'))}) | "
                f"{s['need_tflops']:.0f} ({_pct(s.get('need_pct_peak_tflops'))}) | "
                f"{s['gbs']:.0f} ({_pct(s.get('pct_peak_gbs'))}) | "
                f"{s['need_gbs']:.0f} ({_pct(s.get('need_pct_peak_gbs'))}) |"
            )
        lines.append("")
    return lines


# the plot's lines (kernels.md has every backend): the baseline, W4A16 auto and its parts,
# and the fastest 8-bit-activation backends of each kind
PLOTTED = (BASELINE, "int4_torch", "int4_cpu", "triton_w4", "triton_dq", "auto_w4")
PLOTTED += ("fp8_w8a8", "fp8_scaled_mm", "int8_w8a8", "int8_intmm", "w4a8_fp8_dq")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    ncols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(shapes) :]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes, strict=False):
        for name in [n for n in result["backends"] if n in PLOTTED]:
            pts = [
                (r["M"], r["speedup_vs_bf16"])
                for r in result["rows"]
                if r["shape"] == shape and r["backend"] == name and "speedup_vs_bf16" in r
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="M (token rows)",
            ylabel="speed vs bf16",
            title=f"in x out = {shape}",
        )
    axes[0][0].legend(fontsize=8)
    fig.suptitle(result["record"]["device"])
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=80)
    plt.close(fig)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,3584x512' -> [(4096, 4096), (3584, 512)]."""
    try:
        return [(int(a), int(b)) for a, b in (s.split("x") for s in text.split(","))]
    except ValueError:
        raise SystemExit(
            f"--shapes: expected IN x OUT pairs like 4096x4096, got {text!r}"
        ) from None


def select(cands: list[Candidate], names: str | None) -> list[Candidate]:
    """The candidates named in `names` (comma list; the bf16 baseline is always kept)."""
    if not names:
        return cands
    wanted = set(names.split(","))
    unknown = wanted - {c.name for c in cands}
    if unknown:
        known = ", ".join(c.name for c in cands)
        raise SystemExit(f"--backends: unknown {sorted(unknown)} (this device has: {known})")
    return [c for c in cands if c.name == BASELINE or c.name in wanted]


# the W4A16 backends `fastest_w4` ranks
FASTEST_W4 = (
    "int4_torch",
    "int4_aten",
    "dequant_bf16",
    "gemlite_w4",
    "triton_w4",
    "triton_dq",
    "triton_gemv",
    "cutlass_w4",  # the tile rule's pick; the sweeps of single configurations list those apart
    "cuda_gemv",
)


def summarize(record: dict, device_type: str, shapes, ms, cands, rows, l2: int) -> dict:
    """kernels.json's content for the rows measured so far (`shapes_not_run`: the shapes a
    time budget left out, or that are still to come in a partial write)."""
    add_speedups(rows)
    done = list(dict.fromkeys(r["shape"] for r in rows))
    result = {
        "record": {**record, "cuda": torch.version.cuda, "l2_bytes": l2, "gemlite": _gemlite()},
        "device_type": device_type,
        "dtype": "bfloat16",
        "shapes": done,
        "shapes_not_run": [f"{i}x{o}" for i, o in shapes if f"{i}x{o}" not in done],
        "shape_sources": {s: SHAPE_SOURCES.get(s, "smoke") for s in done},
        "rotation_l2_multiple": ROTATION_L2_MULTIPLE,
        "Ms": ms,
        "backends": [c.name for c in cands],
        "max_rel_err": MAX_REL_ERR,
        "w4_auto_in_code": [[b, list(n)] for b, n in W4_AUTO.get(device_type, [])],
        "rows": rows,
    }
    result["crossover"] = crossover(rows)
    result["suggested_w4_auto"] = suggested_w4_auto(rows)
    result["triton_autotune"] = triton_choices()
    result["roofline_peaks"] = PEAKS.get(DEVICE_PEAKS)
    result["suggested_w8a8"] = suggested_w8a8(rows)
    result["int4_vs_bf16"] = crossover(rows, small="int4_aten", large=BASELINE)
    result["fastest_w4"] = fastest(rows, FASTEST_W4)
    result["targets"] = targets(rows)
    return result


def rounded(obj, digits: int = 6):  # noqa: ANN001, ANN201 - any JSON value
    """Floats to `digits` significant digits (timings vary far more than that from run to run)."""
    if isinstance(obj, float) and math.isfinite(obj):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def pack_rows(rows: list[dict]) -> dict:
    """Rows as {"columns": [key lists], "values": [[column-list index, *values]]}: a sweep's
    ~1,000 rows of ~20 fields without their keys repeated (a third of the size; the tracked
    tree has a size limit). `unpack_rows` restores the dicts, in order."""
    columns: list[list[str]] = []
    index: dict[tuple, int] = {}
    values = []
    for row in rows:
        keys = tuple(row)
        if keys not in index:
            index[keys] = len(columns)
            columns.append(list(keys))
        values.append([index[keys], *row.values()])
    return {"columns": columns, "values": values}


def unpack_rows(rows: list | dict) -> list[dict]:
    """`pack_rows`' inverse; files written before it hold a plain list of dicts."""
    if isinstance(rows, list):
        return rows
    return [dict(zip(rows["columns"][v[0]], v[1:], strict=True)) for v in rows["values"]]


def load_result(path: Path) -> dict:
    """A kernels.json (or kernels.json.gz, as the largest recorded ones are kept) with its rows
    as dicts, whichever way it was written."""
    path = Path(path)
    zipped = path if path.suffix == ".gz" else path.with_name(path.name + ".gz")
    if zipped.is_file() and not path.is_file() or path.suffix == ".gz":
        result = json.loads(gzip.decompress(zipped.read_bytes()))
    else:
        result = json.loads(path.read_text())
    result["rows"] = unpack_rows(result["rows"])
    return result


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # compact (kernels.md is the readable form): keys once per row kind, floats to 6 digits
    packed = rounded({**result, "rows": pack_rows(result["rows"])})
    atomic.write_json(out / "kernels.json", packed, indent=None, separators=(",", ":"))
    atomic.write_text(out / "kernels.md", markdown(result))
    if result["rows"]:  # nothing to draw before the first shape
        plot(result, out / "kernels.png")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for kernels.json / .md / .png")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a test runs this)")
    p.add_argument("--ms", help="comma list of M values (default: the full grid)")
    p.add_argument("--shapes", help="comma list of IN x OUT shapes (default: every SHAPES row)")
    p.add_argument("--backends", help="comma list of backends to time (default: all; bf16 always)")
    p.add_argument("--min-seconds", type=float, default=None, help="timed time per cell")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no new shape after this (results are written after every shape; "
        "the shapes left out are listed as shapes_not_run)",
    )
    p.add_argument(
        "--rerender",
        metavar="JSON",
        help="rewrite the report of a recorded kernels.json (no timing)",
    )
    p.add_argument(
        "--merge",
        metavar="JSON",
        nargs="+",
        help="one report from the rows of several recorded kernels.json of the same device and "
        "grid (e.g. shapes split over the GPUs of one lease; no timing)",
    )
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.rerender:
        return rerender(Path(args.rerender), Path(args.out))
    if args.merge:
        command = " ".join(["python", "benchmarks/kernels.py", *argv])
        return merge([Path(m) for m in args.merge], Path(args.out), command)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cpu" if args.smoke else "cuda")
    global DEVICE_PEAKS
    name = torch.cuda.get_device_name(0).lower() if device.type == "cuda" else ""
    DEVICE_PEAKS = "h200" if "h200" in name else None
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = parse_shapes(args.shapes) if args.shapes else (SMOKE_SHAPES if args.smoke else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (SMOKE_MS if args.smoke else MS)
    min_seconds = args.min_seconds or (0.002 if args.smoke else 0.05)
    # CPU smoke: a token rotation (2 copies) keeps it fast; it checks that the code runs
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device.type == "cuda" else 2**16
    cands = select(candidates(device), args.backends)
    record = run_record(["python", "benchmarks/kernels.py", *argv])
    out, rows, start = Path(args.out), [], time.perf_counter()
    for in_f, out_f in shapes:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"time budget spent: {in_f}x{out_f} not run", file=sys.stderr)
            continue
        flush = ROTATION_L2_MULTIPLE * l2
        rows += bench_shape(in_f, out_f, ms, cands, device, flush, min_seconds)
        # written after every shape: a run cut short keeps what it measured
        write(summarize(record, device.type, shapes, ms, cands, rows, l2), out)
        print(f"done {in_f}x{out_f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    result = summarize(record, device.type, shapes, ms, cands, rows, l2)
    result["record"]["seconds"] = time.perf_counter() - start
    write(result, out)
    return result


def rerender(path: Path, out: Path) -> dict:
    """The report (targets, Markdown, plot) of a recorded run, recomputed from its rows: for a
    report format that changed after the run. The record and rows are kept as they are."""
    result = load_result(path)
    global DEVICE_PEAKS
    DEVICE_PEAKS = "h200" if "h200" in result["record"]["device"].lower() else None
    result["targets"] = targets(result["rows"])
    write(result, out)
    return result


def merge(paths: list[Path], out: Path, command: str = "") -> dict:
    """One report from several recorded runs' rows: every part must come from the same device,
    torch, commit, M grid and backends (else the rows are not comparable and this refuses). The
    first part's record leads; every part's record is kept under `parts`."""
    parts = [load_result(p) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        for key in ("device", "torch", "cuda", "gemlite", "git_commit"):
            if part["record"].get(key) != first["record"].get(key):
                raise SystemExit(f"--merge: {path} has another {key} than {paths[0]}")
        for key in ("Ms", "backends", "device_type"):
            if part[key] != first[key]:
                raise SystemExit(f"--merge: {path} has other {key} than {paths[0]}")
    part_shapes = [s for part in parts for s in part["shapes"]]
    if len(part_shapes) != len(set(part_shapes)):
        raise SystemExit("--merge: the parts overlap (each shape must come from one part)")
    rows = [r for part in parts for r in part["rows"]]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    global DEVICE_PEAKS
    DEVICE_PEAKS = "h200" if "h200" in first["record"]["device"].lower() else None
    result = {
        **first,
        "record": {
            **first["record"],
            "merged_by": command,
            "parts": [p["record"] for p in parts],
        },
        "shapes": shapes,
        "shapes_not_run": [
            s for p in parts for s in p.get("shapes_not_run", []) if s not in shapes
        ],
        "shape_sources": {s: SHAPE_SOURCES.get(s, "smoke") for s in shapes},
        "rows": rows,
        "crossover": crossover(rows),
        "suggested_w4_auto": suggested_w4_auto(rows),
        "triton_autotune": _merged_autotune(p.get("triton_autotune", {}) for p in parts),
        "suggested_w8a8": suggested_w8a8(rows),
        "int4_vs_bf16": crossover(rows, small="int4_aten", large=BASELINE),
        "fastest_w4": fastest(rows, FASTEST_W4),
        "targets": targets(rows),
    }
    result["shapes_not_run"] = list(dict.fromkeys(result["shapes_not_run"]))
    write(result, out)
    return result


def _merged_autotune(choices) -> dict:  # noqa: ANN001 - an iterable of triton_choices() dicts
    merged: dict = {}
    for choice in choices:
        for kernel, configs in choice.items():
            merged.setdefault(kernel, {}).update(configs)
    return merged


if __name__ == "__main__":
    main()

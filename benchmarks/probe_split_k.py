"""Probe: the W8A8 GEMM's split K on a layer of few output tiles (Dream-7B's 3584 -> 512 K / V),
each tile / split / warps / stages fixed, CUDA-graph timed beside bf16 cuBLAS and
torch._scaled_mm on the same rows (the GEMM alone: rows quantized outside the timed call).

    python benchmarks/probe_split_k.py --out DIR   # DIR/split-k-probe.txt
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton

from faircalib.kernels import backends
from faircalib.kernels import triton_w8a8 as k


def bench(fn) -> float:  # noqa: ANN001
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1000.0  # us


def probe_m(m, n, depth, w8, w_s, wb, tiles, gen) -> list[str]:  # noqa: ANN001
    """Every fixed tile x split at M rows, beside bf16 and _scaled_mm."""
    x = torch.randn(m, depth, generator=gen, device="cuda", dtype=torch.bfloat16)
    a8, a_s = k.quantize_rows(x, "fp8")
    bf16 = bench(lambda: x @ wb.T)
    sm = bench(
        lambda: backends.fp8_rows_matmul(
            a8, a_s, w8, w_s.reshape(1, -1), None, torch.bfloat16, gemm="scaled_mm"
        )
    )
    auto = bench(lambda: k.w8a8_matmul(a8, a_s, w8, w_s, torch.bfloat16))
    lines = [
        f"M={m} bf16 {bf16:.1f} us | scaled_mm {bf16 / sm:.2f}x | w8a8_matmul autotuned "
        f"(split {k.split_k_for(m, n, depth, 132)}) {bf16 / auto:.2f}x"
    ]
    for (bm, bn, bk, warps, stages), split in itertools.product(tiles, (1, 2, 4, 8)):
        meta = {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "SPLIT_K": split,
            "num_warps": warps,
            "num_stages": stages,
        }
        try:
            t = bench(lambda meta=meta: k.w8a8_matmul(a8, a_s, w8, w_s, torch.bfloat16, meta=meta))
            lines.append(
                f"  M={m} tile {bm}x{bn}x{bk} w{warps} s{stages} split {split}: "
                f"{t:.1f} us = {bf16 / t:.2f}x"
            )
        except Exception as err:  # noqa: BLE001 - out of shared memory: recorded
            lines.append(f"  M={m} tile {bm}x{bn}x{bk} split {split}: {type(err).__name__}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ms", default="256,1024,2048")
    parser.add_argument("--shape", default="3584x512")
    args = parser.parse_args()
    depth, n = (int(v) for v in args.shape.split("x"))
    lines = [
        f"# split-K probe, {args.shape}, {torch.cuda.get_device_name()}, triton "
        f"{triton.__version__}"
    ]
    tiles = [
        (128, 128, 128, 8, 4),
        (128, 128, 128, 8, 3),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (64, 64, 256, 4, 3),
        (128, 128, 256, 8, 3),
    ]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, depth, generator=gen, device="cuda")
    w8, w_s = backends.fp8_quantize(w)
    wb = w.bfloat16()
    for m in (int(v) for v in args.ms.split(",")):
        lines += probe_m(m, n, depth, w8, w_s, wb, tiles, gen)
        print("\n".join(lines[-30:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split-k-probe.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Probe (GPU): is the per-token row quantizer held by DRAM or by its arithmetic?

    python benchmarks/probe_row_quant_arith.py [--out DIR]   # one line per width and M; ~30 s

Five kernels of `triton_w8a8._quant_rows_kernel`'s two-pass shape (2048-column chunks, 8 warps,
one program a row), graph-timed with the inputs rotated through 4x the L2 as
benchmarks/row_quant.py does:

  div_rn      `quantize_rows(x, "fp8")` as it was: an IEEE division x / scale per element
  quant       `quantize_rows(x, "fp8")` itself: x * RN(1 / scale) and two FMA corrections, the
              same IEEE quotient (triton_w8a8._divide); rows up to 4096 wide held in registers
  recip       x * (1 / scale) alone: one multiply, not the IEEE quotient (the floor)
  copy        the two passes without arithmetic: the abs-max pass, then x cast to e4m3 unscaled
  one_pass    x cast to e4m3 in a single pass (no abs-max): the bytes a call must move, once

Results: benchmarks/results/row-quant/README.md.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kbench  # noqa: E402
from faircalib.kernels import triton_w8a8 as T  # noqa: E402


@triton.jit
def _probe_kernel(x_ptr, q_ptr, s_ptr, K, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * K, q_ptr + row * K
    rk = tl.arange(0, BLOCK_K)
    scale = 1.0
    if MODE != 3:  # every mode but one_pass: the abs-max pass
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-8) / 448.0
        tl.store(s_ptr + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + rk < K
        x = tl.load(x_row + k0 + rk, mask=ok, other=0.0).to(tl.float32)
        if MODE == 0:
            x = tl.minimum(tl.maximum(tl.math.div_rn(x, tl.zeros_like(x) + scale), -448.0), 448.0)
        if MODE == 1:
            x = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(q_row + k0 + rk, x.to(q_row.dtype.element_ty), mask=ok)


def probe(mode: int):  # noqa: ANN201
    def run(x: torch.Tensor):  # noqa: ANN202
        m, k = x.shape
        q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
        s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
        _probe_kernel[(m,)](x, q, s, k, MODE=mode, BLOCK_K=2048, num_warps=8)
        return q, s

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", help="also write the lines to this folder's probe.txt")
    args = p.parse_args(argv)
    lines = []
    device = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    fns = {"div_rn": probe(0), "quant": lambda x: T.quantize_rows(x, "fp8"), "recip": probe(1)}
    fns["copy"] = probe(2)
    fns["one_pass"] = probe(3)
    for k in (3584, 4096, 12288, 14336, 18944):
        for m in (1024, 4096):
            copies = max(2, -(-4 * l2 // (3 * m * k)))
            xs = [torch.randn(m, k, device=device).bfloat16() for _ in range(copies)]
            line = []
            for name, fn in fns.items():
                times, _ = kbench.time_round_ms([fn] * copies, xs, device, 0.2, graph=True)
                us = sorted(times)[len(times) // 2] * 1e3
                line.append(f"{name} {us:.1f} us ({3 * m * k / us / 1e3:.0f} GB/s)")
            lines.append(f"K={k} M={m}: " + ", ".join(line))
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "probe.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

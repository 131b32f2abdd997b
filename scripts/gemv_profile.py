"""Calls the W4A16 GEMV (kernels.cuda_gemv) on one random layer in a few configurations
(warps a block), a few times each, for a profiler to read
(benchmarks/run_gpu.sh, job gemv-ncu):
    ncu --clock-control none -k regex:gemv python3 scripts/gemv_profile.py --shape 4096x14336 \
        --out DIR
Each variant runs `--calls` times, in the order printed; DIR/variants-<shape>.json lists them."""

import argparse
import json
from pathlib import Path

import torch

from faircalib.kernels import cuda_gemv

# (name, tiles, warps a block)
VARIANTS = (("w4", 2, 4), ("w8", 2, 8), ("w16", 2, 16))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="4096x14336", help="in x out")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ("name", "tiles", "warps")
    rows = [dict(zip(fields, v, strict=True)) for v in VARIANTS]
    (out / f"variants-{args.shape}.json").write_text(json.dumps(rows, indent=1) + "\n")
    k, n = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scale = torch.rand(n, k // 128, generator=gen, device="cuda") / 64
    zero = torch.full((n, k // 128), 8, device="cuda", dtype=torch.uint8)
    weight = cuda_gemv.GemvWeight.prepare(packed, scale, zero, 128)
    x = torch.randn(args.m, k, generator=gen, device="cuda").to(torch.bfloat16)
    for name, tiles, warps in VARIANTS:
        for _ in range(args.calls):
            cuda_gemv.w4a16_gemv(x, weight, tiles, 1, warps)
        torch.cuda.synchronize()
        print(name, flush=True)


if __name__ == "__main__":
    main()

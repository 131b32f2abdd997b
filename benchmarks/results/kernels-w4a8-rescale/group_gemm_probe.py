"""Diagnostic: the group-scaled FP8 GEMM against the per-channel one, same tile, bare kernels."""

# The probe as it ran (from the commit its README names; its options are gone since). The
# lambdas are timed at once, inside their loop, so late binding is harmless.
# ruff: noqa: B023, SIM115

import json
import sys

import torch
import triton

from faircalib.kernels import triton_w8a8 as k
from faircalib.kernels.triton_w4 import pack_tiles

torch.manual_seed(0)
dev = "cuda"
out = {}
M, K, N = 4096, 4096, 14336
a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
a8, a_s = k.quantize_rows(a, "fp8")
w8 = (torch.randn(N, K, device=dev) * 4).to(torch.float8_e4m3fn)
ws = torch.rand(N, device=dev) + 0.5
st = torch.rand(K // 128, N, device=dev) + 0.5
codes = torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8)
packed = pack_tiles(codes)
zt = torch.full((K // 128, N), 8, device=dev, dtype=torch.int32)


def bench(name, fn):
    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200)
    out[name] = round(ms * 1000, 1)
    print(name, out[name], "us", flush=True)


for bm, bn, w, s in [(128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4)]:
    tag = f"{bm}x{bn}w{w}s{s}"
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    bench(
        f"w8a8 {tag}",
        lambda: k.w8a8_matmul(a8, a_s, w8, ws, torch.bfloat16, meta={**meta, "BLOCK_K": 128}),
    )
    bench(f"group {tag}", lambda: k.w8_group_matmul(a8, a_s, w8, st, torch.bfloat16, meta=meta))
    bench(
        f"rescale {tag}",
        lambda: k.w8_group_matmul(a8, a_s, w8, st, torch.bfloat16, meta=meta, rescale=True),
    )
bench("unpack", lambda: k.w4a8_unpack(packed, zt, "fp8"))
bench("quantize_rows", lambda: k.quantize_rows(a, "fp8"))
wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
bench("bf16 mm", lambda: a @ wb.T)
json.dump(out, open(sys.argv[1], "w"))

"""Diagnostic: the row quantizer's launch (two passes of 2048 vs one pass) and the FP8 layer."""

# The probe as it ran (from the commit its README names; its options are gone since). The
# lambdas are timed at once, inside their loop, so late binding is harmless.
# ruff: noqa: B023, SIM115

import json
import sys

import torch
import triton

from faircalib.kernels import triton_w8a8 as k
from faircalib.kernels.backends import fp8_quantize

dev = "cuda"
res = []


def bench(fn, xs):
    i = [0]

    def step():
        fn(xs[i[0] % len(xs)])
        i[0] += 1

    step()
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=25, rep=150) * 1000


for m, kk, n in [
    (1024, 4096, 4096),
    (4096, 4096, 14336),
    (1024, 14336, 4096),
    (4096, 14336, 4096),
    (1024, 3584, 512),
    (4096, 3584, 512),
    (1024, 18944, 3584),
    (256, 4096, 4096),
]:
    copies = max(2, min(8, (200 << 20) // (m * kk * 2)))
    xs = [torch.randn(m, kk, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    w = torch.randn(n, kk, device=dev) / kk**0.5
    w8, ws = fp8_quantize(w)
    ws = ws.reshape(1, -1).contiguous()
    wb = w.to(torch.bfloat16)
    old = (2048, 8)
    new = k._rows_launch(kk)
    row = {"M": m, "K": kk, "N": n, "new_launch": list(new)}
    for kind in ("fp8", "int8"):
        ref = k.quantize_rows(xs[0], kind, launch=old)
        for name, launch in (
            ("old", old),
            ("new", new),
            ("new_w4", (new[0], max(1, new[1] // 2))),
            ("new_w2x", (new[0], min(32, new[1] * 2))),
        ):
            q, s = k.quantize_rows(xs[0], kind, launch=launch)
            assert torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(
                s, ref[1]
            ), (name, kind)
            row[f"{kind}_{name}_us"] = round(
                bench(lambda x, l=launch, kd=kind: k.quantize_rows(x, kd, launch=l), xs), 2
            )

    def layer(x, launch):
        x8, xs_ = k.quantize_rows(x, "fp8", launch=launch)
        return torch._scaled_mm(
            x8, w8.t(), scale_a=xs_, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    row["bf16_us"] = round(bench(lambda x: x @ wb.T, xs), 2)
    row["fp8_layer_old_us"] = round(bench(lambda x: layer(x, old), xs), 2)
    row["fp8_layer_new_us"] = round(bench(lambda x: layer(x, new), xs), 2)
    row["bytes"] = m * kk * 3
    print(row, flush=True)
    res.append(row)
json.dump(
    {
        "rows": res,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name(),
    },
    open(sys.argv[1], "w"),
)

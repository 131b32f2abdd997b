"""Probe (GPU): RMSNorm / SwiGLU fused with the FP8 row quantization vs the two kernels apart.

    python benchmarks/probe_fused_quant.py        # prints one line per op and M; ~30 s

Bare calls timed eagerly with triton.testing.do_bench (microseconds; Python dispatch included,
which dominates at M = 1024): "apart" is the compiled op then `quantize_rows`; "fused" the fused
kernel (reading its output back for the quantization). The recorded run also timed a variant
that computed the output again from the inputs ("recompute"), removed after it lost. Then one
e2e.py fp8_w8a8 block stack counts which row quantizers run per call (the first call learns
the readers' kind). Results: benchmarks/results/e2e/fused-quant-probes.txt.
"""

import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, "benchmarks")
import e2e  # noqa: E402
from faircalib.fusion import fused  # noqa: E402
from faircalib.kernels import triton_w8a8 as T  # noqa: E402
from faircalib.kernels.fused_quant import rms_norm, swiglu  # noqa: E402
from faircalib.kernels.shared_activations import share_activations  # noqa: E402


def counting(calls: dict, name: str, fn):  # noqa: ANN001, ANN201
    def counted(*args):  # noqa: ANN002, ANN202
        calls[name] += 1
        return fn(*args)

    return counted


def time_us(fns: dict) -> dict:
    return {k: round(do_bench(f, warmup=50, rep=300) * 1000, 1) for k, f in fns.items()}


def main() -> None:
    norm, act = fused(rms_norm, "cuda"), fused(swiglu, "cuda")
    for m in (1024, 8192):
        x = torch.randn(m, 4096, device="cuda").bfloat16()
        w = torch.rand(4096, device="cuda").bfloat16() + 0.5
        print("norm", m, time_us({
            "apart": lambda: T.quantize_rows(norm(x, w, 1e-5), "fp8"),  # noqa: B023
            "fused": lambda: T.rms_norm_quantize_rows(x, w, 1e-5, "fp8"),  # noqa: B023
            "norm": lambda: norm(x, w, 1e-5),  # noqa: B023
            "quant": lambda: T.quantize_rows(x, "fp8"),  # noqa: B023
        }))  # fmt: skip
        g = torch.randn(m, 12288, device="cuda").bfloat16()
        u = torch.randn(m, 12288, device="cuda").bfloat16()
        print("swiglu", m, time_us({
            "apart": lambda: T.quantize_rows(act(g, u), "fp8"),  # noqa: B023
            "fused": lambda: T.swiglu_quantize_rows(g, u, "fp8"),  # noqa: B023
            "swiglu": lambda: act(g, u),  # noqa: B023
            "quant": lambda: T.quantize_rows(g, "fp8"),  # noqa: B023
        }))  # fmt: skip
    calls = {"quantize_rows": 0, "rms_norm_quantize_rows": 0, "swiglu_quantize_rows": 0}
    for name in calls:
        setattr(T, name, counting(calls, name, getattr(T, name)))
    cfg, device = dict(e2e.LLADA_8B), torch.device("cuda")
    blocks = e2e.build_blocks(cfg, 2, device)
    e2e.quantize_blocks(blocks, e2e.VARIANTS["fp8_w8a8"])
    share_activations(blocks)
    ctx = e2e.block_context(cfg, device)
    h = torch.randn(1, cfg["seq"], cfg["hidden"], device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for i in range(3):
            calls.update(dict.fromkeys(calls, 0))
            e2e.run_blocks(blocks, h, ctx)
            print("e2e call", i, "(2 blocks)", calls)


if __name__ == "__main__":
    main()

"""Does each warp-specialized config of the persistent TMA W8A8 GEMM finish on this GPU?

Each config runs alone in a child process with a time limit (a hung kernel cannot be stopped
from inside its process), once for INT8 and once for FP8, at M = 1000, N = K = 4096, and is
checked against the float64 product. Writes ws_probe.json into --out.
    python benchmarks/probes/w8a8_ws_hang.py --out DIR [--timeout 60]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, torch
import faircalib.kernels.triton_w8a8 as k
kind, index = sys.argv[1], int(sys.argv[2])
cfg = [c for c in k._tma_configs(True) if c.kwargs["WARP_SPECIALIZE"]][index]
torch.manual_seed(0)
m, n, kk = 1000, 4096, 4096
dt = torch.int8 if kind == "int8" else torch.float8_e4m3fn
if kind == "int8":
    a = torch.randint(-127, 128, (m, kk), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (n, kk), device="cuda", dtype=torch.int8)
else:
    a = torch.randn(m, kk, device="cuda").to(dt)
    w = torch.randn(n, kk, device="cuda").to(dt)
sa, sw = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
y = k.w8a8_matmul_tma(a, sa, w, sw, torch.float32, meta=meta)
torch.cuda.synchronize()
ref = (a.double() @ w.double().T) * sa.double()[:, None] * sw.double()[None, :]
print(float((y.double() - ref).abs().max() / ref.abs().max()))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    import faircalib.kernels.triton_w8a8 as k
    from faircalib.bench import run_record

    configs = [c for c in k._tma_configs(True) if c.kwargs["WARP_SPECIALIZE"]]
    results = []
    for kind in ("int8", "fp8"):
        for i, cfg in enumerate(configs):
            row = {"kind": kind, "config": str(cfg)}
            try:
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, kind, str(i)],
                    capture_output=True, text=True, timeout=args.timeout,
                )  # fmt: skip
                row["finished"] = done.returncode == 0
                row["result"] = done.stdout.strip() or done.stderr.strip()[-400:]
            except subprocess.TimeoutExpired:
                row["finished"], row["result"] = False, f"no result after {args.timeout:.0f} s"
            print(row, flush=True)
            results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(["python", "benchmarks/probes/w8a8_ws_hang.py", *sys.argv[1:]])
    (out / "ws_probe.json").write_text(json.dumps({"record": record, "rows": results}, indent=1))


if __name__ == "__main__":
    main()

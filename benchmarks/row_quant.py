"""The per-token row quantizers alone (GPU): their launch rule against the alternatives.

    python benchmarks/row_quant.py --out benchmarks/results/row-quant     # H200: a few minutes

Every W8A8 / W4A8 layer quantizes its input rows per token before the GEMM: `quantize_rows`
when the rows come from elsewhere, `rms_norm_quantize_rows` / `swiglu_quantize_rows` when a
block's RMSNorm or SwiGLU writes them (kernels.fused_quant). These are memory-bound; this times
them alone on the real dLLM widths (LLaDA-8B and Dream-7B hidden and MLP sizes), M = 1024 and
4096 token rows, e4m3 and int8 rows, under launch settings (triton_w8a8's module constants):

  passes_bB_wW  each row in B-column chunks, W warps a program: the abs-max pass, then the row
                read again (from L1/L2) and quantized (the fused ops: a third pass);
                passes_b2048_w8 is the rule before rows were held in registers (`before`)
  whole_wW      the whole row held in registers, W warps a program, read from memory once
                (rows up to 8192 wide)
  rule          what the launch rule in the code picks

CUDA-graph device time; the inputs rotate through copies over 4x the L2 cache, so each call
reads from DRAM. GB/s counts the bytes each call must move (its inputs read once, its outputs
written once), against the H200's 4.8 TB/s. Every variant's bits are compared with `before`'s
(the whole-row RMSNorm sums its squares in another order: its rstd may differ in the last bit).
Writes row_quant.json, row_quant.md and row_quant.png into --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kbench  # noqa: E402 - benchmarks/ is no package
from faircalib import atomic  # noqa: E402
from faircalib.provenance import run_record  # noqa: E402

PEAK_GBS = 4800.0
ROTATION_L2_MULTIPLE = 4
# (op, K, what the width is)
WIDTHS = [
    ("rows", 3584, "Dream-7B hidden"),
    ("rows", 4096, "LLaDA-8B hidden"),
    ("rows", 12288, "LLaDA-8B MLP"),
    ("rows", 14336, "LLaMA-3-8B MLP"),
    ("rows", 18944, "Dream-7B MLP"),
    ("norm", 3584, "Dream-7B hidden"),
    ("norm", 4096, "LLaDA-8B hidden"),
    ("swiglu", 12288, "LLaDA-8B MLP"),
    ("swiglu", 18944, "Dream-7B MLP"),
]
MS = [1024, 4096]
KINDS = ["fp8", "int8"]
PASS_BLOCKS = [2048, 4096, 8192]
WARPS = [4, 8, 16]
BEFORE = "passes_b2048_w8"
# whole rows wider than this ran 2-4x slower than `before` in the first run (16-32 warps a
# program, one program an SM; results/row-quant/README.md): not tried again
WHOLE_MAX_TRIED = 8192


def bytes_moved(op: str, m: int, k: int) -> int:
    """What one call must read and write (bf16 inputs and outputs, 8-bit rows, fp32 scales)."""
    reads, writes = {"rows": (2, 1), "norm": (2, 3), "swiglu": (4, 3)}[op]
    return m * k * (reads + writes) + 4 * m + (2 * k if op == "norm" else 0)


def inputs(op: str, m: int, k: int, device: torch.device, seed: int) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed)
    first = torch.randn(m, k, generator=gen, device=device).mul(2).bfloat16()
    if op == "rows":
        return (first,)
    if op == "norm":
        return first, (torch.rand(k, generator=gen, device=device) + 0.5).bfloat16()
    return first, torch.randn(m, k, generator=gen, device=device).bfloat16()


def call(op: str, kind: str) -> Callable:
    from faircalib.kernels import triton_w8a8 as T

    if op == "rows":
        return lambda x: T.quantize_rows(x[0], kind)
    if op == "norm":
        return lambda xw: T.rms_norm_quantize_rows(xw[0], xw[1], 1e-5, kind)
    return lambda gu: T.swiglu_quantize_rows(gu[0], gu[1], kind)


def variant_settings(name: str) -> dict:
    """The launch-rule settings (triton_w8a8's module constants) a variant runs with."""
    if name == "rule":
        return {}
    if name.startswith("whole_w"):
        return {"WHOLE_ROW_MAX_K": 1 << 20, "WHOLE_ROW_WARPS": int(name.removeprefix("whole_w"))}
    block, warps = name.removeprefix("passes_b").split("_w")
    return {"WHOLE_ROW_MAX_K": 0, "PASS_BLOCK_K": int(block), "PASS_WARPS": int(warps)}


def variants_for(k: int, kind: str) -> list[str]:
    """`before` first (the bits' reference), the rule, then the alternatives (e4m3 rows only:
    int8 rows move the same bytes)."""
    if kind != "fp8":
        return [BEFORE, "rule"]
    passes = [
        f"passes_b{b}_w{w}" for b in PASS_BLOCKS for w in WARPS if f"passes_b{b}_w{w}" != BEFORE
    ]
    whole = [f"whole_w{w}" for w in WARPS] if k <= WHOLE_MAX_TRIED else []
    return [BEFORE, "rule", *passes, *whole]


def measure(op, kind, m, k, variant, device, l2, min_seconds) -> tuple[dict, tuple]:  # noqa: ANN001
    from faircalib.kernels import triton_w8a8 as T

    per_copy = bytes_moved(op, m, k)
    copies = max(2, -(-ROTATION_L2_MULTIPLE * l2 // per_copy))
    xs = [inputs(op, m, k, device, seed=i) for i in range(copies)]
    fn = call(op, kind)
    settings = variant_settings(variant)
    saved = {name: getattr(T, name) for name in settings}
    for name, value in settings.items():
        setattr(T, name, value)
    try:  # the launch rule is read when the graph is captured
        times, mode = kbench.time_round_ms([fn] * copies, xs, device, min_seconds, graph=True)
        out = fn(xs[0])
    finally:
        for name, value in saved.items():
            setattr(T, name, value)
    torch.cuda.synchronize(device)
    ms = statistics.median(times)
    row = {"op": op, "kind": kind, "K": k, "M": m, "variant": variant, "us": ms * 1e3}
    row |= {"gbs": per_copy / (ms * 1e-3) / 1e9, "timing": mode, "copies": copies}
    row["pct_peak_gbs"] = 100 * row["gbs"] / PEAK_GBS
    return row, tuple(t.cpu() for t in out)


def same_bits(a: tuple, b: tuple) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype.itemsize == 1 else t

    return all(torch.equal(raw(x), raw(y)) for x, y in zip(a, b, strict=True))


def run(device: torch.device, min_seconds: float) -> list[dict]:
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows = []
    for op, k, _ in WIDTHS:
        for kind in KINDS:
            for m in MS:
                base = None
                for variant in variants_for(k, kind):
                    row, out = measure(op, kind, m, k, variant, device, l2, min_seconds)
                    base = out if base is None else base
                    row["same_bits_as_before"] = same_bits(out, base)
                    rows.append(row)
                    print(f"{op} {kind} K={k} M={m} {variant}: {row['us']:.1f} us "
                          f"{row['gbs']:.0f} GB/s", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (op, kind, K, M): `before`, the rule and the fastest variant."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["op"], r["kind"], r["K"], r["M"]), {})[r["variant"]] = r
    out = []
    for (op, kind, k, m), by in cells.items():
        best = min(by.values(), key=lambda r: r["us"])
        out.append({
            "op": op, "kind": kind, "K": k, "M": m,
            "before_us": by[BEFORE]["us"], "rule_us": by["rule"]["us"],
            "rule_gbs": by["rule"]["gbs"], "rule_pct_peak_gbs": by["rule"]["pct_peak_gbs"],
            "best": best["variant"], "best_us": best["us"],
            "rule_vs_before": by[BEFORE]["us"] / by["rule"]["us"],
            "bits_equal": all(r["same_bits_as_before"] for r in by.values()),
        })  # fmt: skip
    return out


def markdown(result: dict) -> str:
    rec = result["record"]
    lines = [
        "# Per-token row quantizers alone: the launch rule against the alternatives",
        "",
        f"`{rec['command']}` on {rec.get('device')} ({rec.get('date')}, commit "
        f"{rec.get('git_commit')}). CUDA-graph device time, inputs rotated through "
        f"{ROTATION_L2_MULTIPLE}x the L2. Microseconds per call; the rule's GB/s and % of "
        f"{PEAK_GBS:.0f} GB/s; every variant's time is in row_quant.json.",
        "",
        "| op | kind | K | M | before | rule | rule GB/s (% peak) | rule vs before | fastest | "
        "its time | bits equal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for c in result["summary"]:
        lines.append(
            f"| {c['op']} | {c['kind']} | {c['K']} | {c['M']} | {c['before_us']:.1f} | "
            f"{c['rule_us']:.1f} | {c['rule_gbs']:.0f} ({c['rule_pct_peak_gbs']:.0f}%) | "
            f"{c['rule_vs_before']:.2f}x | {c['best']} | {c['best_us']:.1f} | {c['bits_equal']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["summary"] if c["kind"] == "fp8"]
    labels = [f"{c['op']}\nK={c['K']}\nM={c['M']}" for c in cells]
    fig, ax = plt.subplots(figsize=(12, 4))
    for i, (key, name) in enumerate((("before_us", "before"), ("rule_us", "rule"),
                                     ("best_us", "fastest variant"))):  # fmt: skip
        ax.bar([j + i * 0.27 for j in range(len(cells))], [c[key] for c in cells], 0.27, label=name)
    ax.set_xticks([j + 0.27 for j in range(len(cells))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("microseconds a call (e4m3 rows)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for row_quant.json / .md / .png")
    p.add_argument("--min-seconds", type=float, default=0.2, help="timed seconds per cell")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("row_quant.py: needs a CUDA GPU (it times Triton kernels)")
    device = torch.device("cuda")
    rows = run(device, args.min_seconds)
    argv = argv if argv is not None else sys.argv[1:]
    result = {"record": run_record(["python", "benchmarks/row_quant.py", *argv], device)}
    result |= {"peak_gbs": PEAK_GBS, "widths": WIDTHS, "summary": summary(rows), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "row_quant.json", kbench.rounded(result))
    atomic.write_text(out / "row_quant.md", markdown(result))
    plot(result, out / "row_quant.png")
    return result


if __name__ == "__main__":
    main()

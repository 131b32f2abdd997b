"""The per-token row quantizers alone (GPU): rows held in registers against rows taken in passes.

    python benchmarks/row_quant.py --out benchmarks/results/row-quant     # H200: about a minute

Every W8A8 / W4A8 layer quantizes its input rows per token before the GEMM: `quantize_rows`
when the rows come from elsewhere, `rms_norm_quantize_rows` / `swiglu_quantize_rows` when a
block's RMSNorm or SwiGLU writes them (kernels.fused_quant). These are memory-bound; this times
them alone on the real dLLM widths (LLaDA-8B and Dream-7B hidden and MLP sizes), M = 1024 and
4096 token rows, e4m3 and int8 rows:

  passes      each row in BLOCK_K = 2048 chunks: the abs-max pass, then the row read again (from
              L1/L2) and quantized (the fused ops: a third pass)
  whole_eN    the whole row held in registers, N float32 elements a thread
              (triton_w8a8.WHOLE_ROW_PER_THREAD), read from memory once

CUDA-graph device time; the inputs rotate through copies over 4x the L2 cache, so each call
reads from DRAM. GB/s counts the bytes each call must move (its inputs read once, its outputs
written once), against the H200's 4.8 TB/s. Every variant's bits are compared with `passes`.
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
PER_THREAD = [8, 16, 32]


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


def variant_settings(name: str) -> tuple[int, int]:
    """(WHOLE_ROW_MAX_K, WHOLE_ROW_PER_THREAD) of a variant."""
    if name == "passes":
        return 0, 16
    return 1 << 20, int(name.removeprefix("whole_e"))


def measure(op, kind, m, k, variant, device, l2, min_seconds) -> tuple[dict, tuple]:  # noqa: ANN001
    from faircalib.kernels import triton_w8a8 as T

    per_copy = bytes_moved(op, m, k)
    copies = max(2, -(-ROTATION_L2_MULTIPLE * l2 // per_copy))
    xs = [inputs(op, m, k, device, seed=i) for i in range(copies)]
    fn = call(op, kind)
    T.WHOLE_ROW_MAX_K, T.WHOLE_ROW_PER_THREAD = variant_settings(variant)
    try:  # the launch rule is read when the graph is captured
        times, mode = kbench.time_round_ms([fn] * copies, xs, device, min_seconds, graph=True)
        out = fn(xs[0])
    finally:
        T.WHOLE_ROW_MAX_K, T.WHOLE_ROW_PER_THREAD = 32768, 16
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
    variants = ["passes", *[f"whole_e{n}" for n in PER_THREAD]]
    rows = []
    for op, k, _ in WIDTHS:
        for kind in ("fp8", "int8"):
            for m in MS:
                base = None
                for variant in variants:
                    row, out = measure(op, kind, m, k, variant, device, l2, min_seconds)
                    base = out if base is None else base
                    row["same_bits_as_passes"] = same_bits(out, base)
                    rows.append(row)
                    print(f"{op} {kind} K={k} M={m} {variant}: {row['us']:.1f} us "
                          f"{row['gbs']:.0f} GB/s", flush=True)  # fmt: skip
    return rows


def markdown(result: dict) -> str:
    rec = result["record"]
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    lines = [
        "# Per-token row quantizers alone: rows in registers vs in passes",
        "",
        f"`{rec['command']}` on {rec.get('device')} ({rec.get('date')}, commit "
        f"{rec.get('git_commit')}). CUDA-graph device time, inputs rotated through "
        f"{ROTATION_L2_MULTIPLE}x the L2. Microseconds per call, (GB/s, % of {PEAK_GBS:.0f}).",
        "",
        "| op | kind | K | M | " + " | ".join(variants) + " | bits equal |",
        "|---|---|---:|---:|" + "---:|" * len(variants) + "---|",
    ]
    cells: dict[tuple, dict] = {}
    for r in result["rows"]:
        cells.setdefault((r["op"], r["kind"], r["K"], r["M"]), {})[r["variant"]] = r
    for (op, kind, k, m), by in cells.items():
        shown = [
            f"{by[v]['us']:.1f} ({by[v]['gbs']:.0f}, {by[v]['pct_peak_gbs']:.0f}%)"
            for v in variants
        ]
        equal = all(r["same_bits_as_passes"] for r in by.values())
        lines.append(f"| {op} | {kind} | {k} | {m} | " + " | ".join(shown) + f" | {equal} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp8 = [r for r in result["rows"] if r["kind"] == "fp8"]
    variants = list(dict.fromkeys(r["variant"] for r in fp8))
    cases = list(dict.fromkeys((r["op"], r["K"], r["M"]) for r in fp8))
    gbs = {(r["op"], r["K"], r["M"], r["variant"]): r["gbs"] for r in fp8}
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [gbs[(*c, v)] for c in cases], width, label=v)
    ax.axhline(PEAK_GBS, color="k", lw=0.8, ls="--", label="H200 peak")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{o}\nK={k}\nM={m}" for o, k, m in cases], fontsize=7)
    ax.set_ylabel("GB/s (e4m3 rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    result |= {"peak_gbs": PEAK_GBS, "widths": WIDTHS, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "row_quant.json", kbench.rounded(result))
    atomic.write_text(out / "row_quant.md", markdown(result))
    plot(result, out / "row_quant.png")
    return result


if __name__ == "__main__":
    main()

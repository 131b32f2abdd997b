"""Calibration with and without offloading: peak GPU memory of GPTQ on a ~1.5B-parameter MDLM.

    python benchmarks/offload.py --out benchmarks/results/offload      # GPU, about 2 minutes
    python benchmarks/offload.py --smoke --out /tmp/offload             # CPU, tiny, seconds

Builds a random MDLM on the CPU (default shape: hidden 4096, 7 blocks, 32 heads, MLP 4x, vocab
8192, seq_len 512: 1.50B parameters in float32, the dtype `faircalib quantize` loads models in;
the adaLN modulations get small random weights so every block changes its input), then runs
GPTQ W4 g128 (act-order) through the layer-wise engine (faircalib.calib.quantize_model) on 16
random token sequences of 512 tokens masked at stratified t, twice from the same float weights:

  offload    the model stays on the CPU; the engine keeps the stem/head and one block at a time
             on the GPU (`faircalib quantize --offload`)
  on_device  the whole model is moved to the GPU first, as `faircalib quantize --device cuda`
             loads it, and stays there

For each: peak GPU memory (torch.cuda.max_memory_allocated, reset before the run), wall time
(model transfer included), the engine's stage timings and where the quantized model ends; with
the model's and one block's parameter bytes. Both runs must give identical quantized weights and
codes. A warm-up calibration of a tiny model runs first so library loading is not timed.
With --smoke everything runs on the CPU on a tiny shape: peak GPU memory is null, both modes
still run and are compared. Writes offload.json and offload.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from faircalib import atomic
from faircalib.bench import run_record
from faircalib.calib import masked_inputs, quantize_model
from faircalib.calib.engine import quant_results
from faircalib.config import CalibConfig, GPTQConfig
from faircalib.models.mdlm import MDLM, MDLMConfig


@dataclass
class Shape:
    hidden: int = 4096
    blocks: int = 7
    heads: int = 32
    vocab: int = 8192
    seq_len: int = 512
    nsamples: int = 16


SMOKE = Shape(hidden=128, blocks=2, heads=4, vocab=256, seq_len=64, nsamples=4)
METHOD = GPTQConfig(bits=4, group_size=128)


def build_model(shape: Shape, seed: int = 0) -> MDLM:
    """A random MDLM on the CPU. MDLM zero-initialises adaLN (a block then passes its input
    through unchanged); small random modulation weights make every block matter."""
    torch.manual_seed(seed)
    cfg = MDLMConfig(
        vocab_size=shape.vocab,
        mask_id=shape.vocab - 1,
        seq_len=shape.seq_len,
        hidden_dim=shape.hidden,
        n_blocks=shape.blocks,
        n_heads=shape.heads,
    )
    model = MDLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def devices(model: torch.nn.Module) -> list[str]:
    """Every device holding a tensor of the model, its quantization codes included."""
    found = {str(v.device) for v in model.state_dict().values()}
    for res in quant_results(model).values():
        found |= {str(res.weight.device), str(res.codes.device), str(res.qparams.scale.device)}
    return sorted(found)


def calibrate(
    float_model: MDLM, x_t: torch.Tensor, t: torch.Tensor, device: torch.device, offload: bool
) -> tuple[MDLM, dict]:
    """Quantize a copy of the float (CPU) model; returns it and the measurements."""
    model = copy.deepcopy(float_model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    calib = CalibConfig(
        n_samples=len(x_t), seq_len=x_t.shape[1], device=str(device), offload=offload
    )
    start = time.perf_counter()
    if not offload:
        model.to(device)  # what `faircalib quantize` does without --offload
    report = quantize_model(model, METHOD, x_t, t, calib_cfg=calib, progress=False)
    if cuda:
        torch.cuda.synchronize()
    row = {
        "mode": "offload" if offload else "on_device",
        "offload": offload,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "wall_s": time.perf_counter() - start,
        "engine_timings": report.timings,
        "model_ends_on": devices(model),
    }
    return model, row


def compare(a: MDLM, b: MDLM) -> dict:
    """Quantized weights (every state tensor) and codes of two runs, on the CPU."""
    sa, sb = a.state_dict(), b.state_dict()
    same_keys = list(sa) == list(sb)
    max_diff = 0.0
    identical = same_keys
    for k in sa if same_keys else []:
        x, y = sa[k].cpu(), sb[k].cpu()
        identical &= torch.equal(x, y)
        if x.is_floating_point():
            max_diff = max(max_diff, float((x - y).abs().max()) if x.numel() else 0.0)
    ra, rb = quant_results(a), quant_results(b)
    codes_identical = ra.keys() == rb.keys() and all(
        torch.equal(ra[k].codes.cpu(), rb[k].codes.cpu()) for k in ra
    )
    return {
        "identical_weights": bool(identical),
        "identical_codes": bool(codes_identical),
        "quantized_layers": len(ra),
        "max_abs_weight_diff": max_diff,
    }


def warm_up(device: torch.device) -> None:
    model = build_model(SMOKE)
    tokens = torch.randint(0, SMOKE.vocab - 1, (2, SMOKE.seq_len))
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=2))
    quantize_model(model, METHOD, x_t, t, calib_cfg=CalibConfig(device=str(device)), progress=False)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def markdown(result: dict) -> str:
    rec, s, sizes = result["record"], result["shape"], result["sizes"]
    lines = [
        f"# Calibration offloading: peak GPU memory ({rec['device']})",
        "",
        f"Command: `{rec['command']}`  \nCommit: {rec['git_commit']}  \nDate: {rec['date']}  "
        f"\ntorch {rec['torch']}",
        "",
        f"Random MDLM: hidden {s['hidden']}, {s['blocks']} blocks, {s['heads']} heads, MLP 4x, "
        f"vocab {s['vocab']}, seq_len {s['seq_len']}: {sizes['parameters'] / 1e6:,.1f}M "
        f"parameters, {size(sizes['model_bytes'])} in {result['dtype']}; one block "
        f"{size(sizes['block_bytes'])}, stem + head {size(sizes['stem_head_bytes'])}.",
        f"Calibration: {result['method']} on {s['nsamples']} random sequences x {s['seq_len']} "
        "tokens masked at stratified t; the same float weights for both modes.",
        "",
        "| mode | peak GPU memory | peak / model bytes | wall time (s) | stats / quantize / "
        "propagate (s) | model ends on |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in result["modes"]:
        ratio = (
            "-"
            if row["peak_gpu_bytes"] is None
            else f"{row['peak_gpu_bytes'] / sizes['model_bytes']:.2f}x"
        )
        tm = row["engine_timings"]
        lines.append(
            f"| {row['mode']} | {size(row['peak_gpu_bytes'])} | {ratio} | {row['wall_s']:.1f} | "
            f"{tm['stats_s']:.1f} / {tm['quantize_s']:.1f} / {tm['propagate_s']:.1f} | "
            f"{', '.join(row['model_ends_on'])} |"
        )
    cmp = result["comparison"]
    lines += [
        "",
        f"Identical quantized weights in both modes: {'yes' if cmp['identical_weights'] else 'NO'}"
        f" (codes: {'yes' if cmp['identical_codes'] else 'NO'}, {cmp['quantized_layers']} "
        f"layers, max |weight difference| {cmp['max_abs_weight_diff']:.3g}).",
    ]
    if result["device_type"] == "cpu":
        lines += ["", "CPU run (--smoke): no GPU memory to measure; modes compared only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for offload.json / offload.md")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (a test runs this)")
    p.add_argument("--blocks", type=int, help="number of blocks (default 7; smoke 2)")
    p.add_argument("--nsamples", type=int, help="calibration sequences (default 16; smoke 4)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    shape = copy.copy(SMOKE if args.smoke else Shape())
    shape.blocks = args.blocks or shape.blocks
    shape.nsamples = args.nsamples or shape.nsamples
    warm_up(device)  # first calls load linear-algebra libraries: keep them out of the timings

    tick = time.perf_counter()
    float_model = build_model(shape)
    build_s = time.perf_counter() - tick
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab - 1, (shape.nsamples, shape.seq_len), generator=gen)
    x_t, t = masked_inputs(float_model, tokens, CalibConfig(n_samples=shape.nsamples))
    print(
        f"[offload] {float_model.num_parameters() / 1e6:,.1f}M parameters built in {build_s:.0f}s",
        file=sys.stderr,
    )

    modes = []
    offloaded, row = calibrate(float_model, x_t, t, device, offload=True)
    modes.append(row)
    print(f"[offload] offload: {row}", file=sys.stderr)
    on_device, row = calibrate(float_model, x_t, t, device, offload=False)
    modes.append(row)
    print(f"[offload] on_device: {row}", file=sys.stderr)
    comparison = compare(offloaded, on_device)
    del offloaded, on_device

    block_bytes = param_bytes(float_model.blocks[0])
    model_bytes = param_bytes(float_model)
    result = {
        "record": run_record(["python", "benchmarks/offload.py", *argv]),
        "device_type": device.type,
        "shape": asdict(shape),
        "dtype": str(next(float_model.parameters()).dtype).removeprefix("torch."),
        "method": f"GPTQ W{METHOD.bits} g{METHOD.group_size} (act_order={METHOD.act_order})",
        "sizes": {
            "parameters": float_model.num_parameters(),
            "model_bytes": model_bytes,
            "block_bytes": block_bytes,
            "stem_head_bytes": model_bytes - param_bytes(float_model.blocks),
        },
        "build_s": build_s,
        "modes": modes,
        "comparison": comparison,
    }
    peaks = {m["mode"]: m["peak_gpu_bytes"] for m in modes}
    result["checks"] = {
        "identical": comparison["identical_weights"] and comparison["identical_codes"],
        "offload_ends_on_cpu": modes[0]["model_ends_on"] == ["cpu"],
        # GPU only: offloading must need less than the model itself (null on the CPU)
        "offload_peak_below_model_bytes": None
        if peaks["offload"] is None
        else peaks["offload"] < model_bytes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "offload.json", result, **atomic.COMPACT)
    atomic.write_text(out / "offload.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

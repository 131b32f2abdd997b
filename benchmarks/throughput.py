"""Generation throughput of a shipped MDLM: bf16 vs fake-quant INT4 vs packed INT4 / INT8.

    python benchmarks/throughput.py --device cuda --out benchmarks/results/throughput   # GPU
    python benchmarks/throughput.py --smoke --out /tmp/throughput                       # CPU

Variants of one model (default `mdlm-small`), each run with the project's own sampler
(`faircalib.frontier.samplers.generate`, low-confidence, greedy, fixed seed):

  bf16            the float model, weights stored in bf16
  fake_w4g{G}     RTN INT4 group-G weights dequantized to bf16 nn.Linear weights: the
                  fake-quant model the quality numbers are measured on
  packed_w4g{G}   the same RTN INT4 codes written by `faircalib quantize`'s packed writer
                  (`save_quantized(fmt="packed")`) and loaded back with `faircalib.hub.load`:
                  QuantLinear layers, backend "auto" (`kernels.backends.auto_backend` picks by
                  device, dtype and M, the token rows of a call)
  packed_w8       RTN W8 per-channel, packed the same way (weight-only: no int8 GEMM applies, so
                  `auto` takes the dequantize-then-matmul path)

G is --group-size (128); a model whose quantized widths G does not divide falls back to the
largest of 128/64/32 that divides them, and the output says so.

Every variant keeps its float parameters in bf16 and runs under torch.autocast(bf16), the
project's way of running bf16 (QuantLinear follows autocast's dtype; its scales stay float32
as the packed loader leaves them). On the CPU that is bf16 activations for dense layers (native
where oneDNN reports bf16 support, recorded) and for torch's int4 kernel, which takes bf16 only;
`auto` never hands a backend a dtype it does not support, and the backends that ran are
recorded per variant and batch (QuantLinear.last_backend).

Per variant and batch: one warm-up generation (compilation, autotuning, kernel layouts), then
the median of --repeats timed generations (CUDA synchronised before the clock is read):
tokens/s = batch x gen_length / seconds, seconds per denoising step, peak GPU memory (reset per
variant and batch; null on the CPU), resident weight bytes (parameters + buffers as stored;
QuantLinear's cached kernel layouts reported beside them), speed vs bf16 (same run), and the
share of generated tokens identical to bf16's under the same seed (1 - a flip rate; bf16 against
its own warm-up run checks determinism). Only the measured variant is on the device. On CUDA
every variant is measured twice: as is, and as `<name>+graph` with each denoising step replayed
from a captured CUDA graph (faircalib.models.cuda_graph; --no-cuda-graph skips it), which
removes the per-layer Python dispatch that dominates a small model's step; their speed is
relative to bf16+graph.
Outputs throughput.json, throughput.md and throughput.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from faircalib import hub
from faircalib.bench import record_lines, run_record
from faircalib.calib import quantize_for_bench, save_quantized
from faircalib.calib.fakequant_io import fold_fake_quant
from faircalib.data import calibration_batch
from faircalib.frontier.samplers import SamplerConfig, generate
from faircalib.kernels import QuantLinear
from faircalib.models.cuda_graph import CUDAGraphDenoiser
from faircalib.models.io import write_json

GROUP_FALLBACKS = (128, 64, 32)
FULL = {"model": "mdlm-small", "batches": "1,8", "gen_length": 256, "steps": 256, "nsamples": 8}
SMOKE = {"model": "mdlm-tiny", "batches": "1,2", "gen_length": 16, "steps": 8, "nsamples": 2}
PROMPT_SEED = 1234  # C4 validation prefixes, the same draw the bench harness's flip prompts use


# --- building the variants ----------------------------------------------------------------------
def quantized_widths(model) -> list[int]:
    return sorted(
        {lin.in_features for block in model.blocks for _, lin in model.quantizable_linears(block)}
    )


def choose_group_size(model, requested: int) -> tuple[int, str | None]:
    """`requested` if it divides every quantized layer's input width, else the largest of
    128/64/32 that does (with a note saying so)."""
    widths = quantized_widths(model)
    if all(w % requested == 0 for w in widths):
        return requested, None
    for g in GROUP_FALLBACKS:
        if all(w % g == 0 for w in widths):
            return g, (
                f"group size {requested} does not divide the quantized widths {widths}; "
                f"fell back to {g}"
            )
    raise SystemExit(f"no group size of {GROUP_FALLBACKS} divides the quantized widths {widths}")


def store_bf16(model: nn.Module) -> nn.Module:
    """Float parameters to bf16 (what a bf16 deployment stores). Buffers stay as they are:
    QuantLinear's codes, float32 scales and zeros, and the rotary frequencies."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    return model


def build_variants(args, base, tokenizer, group: int, workdir: Path) -> dict[str, dict]:
    """name -> {"model" (on the CPU), "description", "checkpoint_bytes"}."""
    source = hub.resolve(args.model)
    quant_device = args.device  # RTN needs no statistics, but the engine runs the model once

    def rtn(bits: int, group_size: int | None):
        return quantize_for_bench(
            copy.deepcopy(base),
            tokenizer,
            method="rtn",
            bits=bits,
            group_size=group_size,
            nsamples=args.nsamples,
            seq_len=None,
            seed=0,
            device=quant_device,
            progress=False,
            scale_dtype="bfloat16",  # the scales a packed checkpoint stores, before codes
        )

    def packed(qmodel, report, name: str) -> Path:
        out = workdir / name
        # the `faircalib quantize --format packed` writer; it moves the model to the CPU
        save_quantized(qmodel, report, out, source / "tokenizer.json", fmt="packed")
        return out

    w4, w4_report = rtn(4, group)
    w4_dir = packed(w4, w4_report, f"w4g{group}")
    fold_fake_quant(w4)  # FakeQuantLinear -> nn.Linear holding the dequantized weight
    w8, w8_report = rtn(8, None)
    w8_dir = packed(w8, w8_report, "w8")
    del w8
    return {
        "bf16": {
            "model": store_bf16(base),
            "description": "float model, bf16 weights (nn.Linear)",
            "checkpoint_bytes": shard_bytes(source),
        },
        f"fake_w4g{group}": {
            "model": store_bf16(w4),
            "description": f"RTN W4 g{group} asym, dequantized to bf16 nn.Linear (fake-quant)",
            "checkpoint_bytes": None,
        },
        f"packed_w4g{group}": {
            "model": store_bf16(hub.load(w4_dir)),
            "description": f"RTN W4 g{group} asym, packed checkpoint -> QuantLinear (auto)",
            "checkpoint_bytes": shard_bytes(w4_dir),
        },
        "packed_w8": {
            "model": store_bf16(hub.load(w8_dir)),
            "description": "RTN W8 per-channel asym, packed checkpoint -> QuantLinear (auto)",
            "checkpoint_bytes": shard_bytes(w8_dir),
        },
    }


def shard_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers as stored (QuantLinear: codes, scales, zeros)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_cache_bytes(model: nn.Module) -> int:
    """The kernel layouts QuantLinear repacked its codes into (held next to the codes)."""
    return sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, QuantLinear)
        for prepared in m._prepared.values()
        for t in prepared
        if isinstance(t, torch.Tensor)
    )


def backends_used(model: nn.Module) -> dict[str, int]:
    """Backend name -> number of QuantLinear layers whose last call ran it."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.last_backend is not None:
            counts[m.last_backend] = counts.get(m.last_backend, 0) + 1
    return dict(sorted(counts.items()))


# --- measuring ---------------------------------------------------------------------------------
def prompts_for(args, tokenizer, n: int) -> torch.Tensor:
    """[n, P] prompts: C4 validation prefixes (distinct per row), or --prompt repeated."""
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise SystemExit("--prompt encodes to no tokens")
        return torch.tensor([ids] * n, dtype=torch.long)
    return calibration_batch(tokenizer, "c4", "validation", n, args.prompt_len, seed=PROMPT_SEED)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_generation(model, prompts, cfg: SamplerConfig, seed: int, device: torch.device):
    """-> (seconds, generated tokens [B, gen_length] on the CPU)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    sync(device)
    start = time.perf_counter()
    with autocast:
        result = generate(model, prompts, cfg, seed, trace=False)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, result.tokens[:, result.prompt_len :].cpu()


def measure(model, prompts, cfg: SamplerConfig, args, device: torch.device) -> dict:
    """Warm-up, then the median of --repeats timed generations of one variant at one batch."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warm_s, warm_tokens = one_generation(model, prompts, cfg, args.seed, device)
    times, outputs = [], []
    for _ in range(args.repeats):
        seconds, tokens = one_generation(model, prompts, cfg, args.seed, device)
        times.append(seconds)
        outputs.append(tokens)
    median = statistics.median(times)
    b = prompts.shape[0]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "seconds": median,
        "seconds_all": times,
        "warmup_seconds": warm_s,
        "tokens_per_s": b * cfg.gen_length / median,
        "seconds_per_step": median / cfg.steps,
        "peak_gpu_bytes": peak,
        "repeat_consistent": all(torch.equal(o, warm_tokens) for o in outputs),
        "backends": backends_used(model),
        "_warmup_tokens": warm_tokens,
        "_tokens": outputs[-1],
    }


def run_variant(
    name: str, variant: dict, prompts: dict[int, torch.Tensor], cfg, args, device, graph=False
):
    """Measure one variant at every batch size; `graph`: every denoising step replayed from a
    captured CUDA graph (faircalib.models.cuda_graph) instead of called from Python."""
    model = variant["model"].to(device).eval()
    if graph:
        model = CUDAGraphDenoiser(model)
    rows = {}
    for b, p in prompts.items():
        rows[b] = measure(model, p.to(device), cfg, args, device)
        print(
            f"[throughput] {name} batch {b}: {rows[b]['tokens_per_s']:.1f} tok/s, "
            f"{1e3 * rows[b]['seconds_per_step']:.2f} ms/step, backends {rows[b]['backends']}",
            file=sys.stderr,
            flush=True,
        )
    out = {
        "description": variant["description"],
        "weight_bytes": weight_bytes(model),
        "kernel_cache_bytes": kernel_cache_bytes(model),  # after the runs: caches filled
        "checkpoint_bytes": variant["checkpoint_bytes"],
        "batches": rows,
    }
    variant["model"] = model.to("cpu")  # leave the device to the next variant
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of generated positions [B, gen_length] holding the reference's token."""
    return float((tokens == reference).double().mean())


def add_comparisons(variants: dict[str, dict]) -> None:
    """Speed, bytes and token agreement of every variant against bf16, then drop the tokens.
    The reference tokens are bf16's warm-up generation, so bf16's own agreement (its last timed
    run against them) is 1.0 exactly when bf16 generation is deterministic."""
    ref = variants["bf16"]
    for name, v in variants.items():
        v["weight_bytes_vs_bf16"] = v["weight_bytes"] / ref["weight_bytes"]
        # speed against bf16 run the same way (CUDA-graph steps against bf16+graph)
        speed_ref = variants.get("bf16+graph", ref) if name.endswith("+graph") else ref
        for b, row in v["batches"].items():
            base = ref["batches"][b]
            row["speed_vs_bf16"] = row["tokens_per_s"] / speed_ref["batches"][b]["tokens_per_s"]
            row["agreement_vs_bf16"] = agreement(row["_tokens"], base["_warmup_tokens"])
    for name, v in variants.items():  # same codes, packed kernels vs bf16 dequantized weights
        fake = variants.get(name.replace("packed_", "fake_"))
        if name.startswith("packed_") and fake is not None:
            for b, row in v["batches"].items():
                row["agreement_vs_fake"] = agreement(row["_tokens"], fake["batches"][b]["_tokens"])
    for v in variants.values():
        for row in v["batches"].values():
            del row["_tokens"], row["_warmup_tokens"]


# --- outputs ------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def markdown(result: dict) -> str:
    rec, cfg = result["record"], result["config"]
    lines = [
        f"# Generation throughput: {cfg['model']} ({rec['device']})",
        "",
        *record_lines(rec),
        "",
        f"{cfg['sampler']} sampler, {cfg['gen_length']} tokens in {cfg['steps']} denoising steps "
        f"after a {cfg['prompt_tokens']}-token prompt, seed {cfg['seed']}; median of "
        f"{cfg['repeats']} timed generations after one warm-up. Activations "
        f"{cfg['activation_dtype']} (torch.autocast); weights stored as in the variant. "
        "Agreement: share of generated tokens identical to bf16's under the same seed. "
        "`+graph`: every denoising step replayed from a CUDA graph; its speed is relative to "
        "bf16+graph. Eager steps of this small model are bound by Python dispatch, so their "
        "times vary from run to run.",
        "",
    ]
    if cfg["group_size_note"]:
        lines += [f"Note: {cfg['group_size_note']}.", ""]
    lines += [
        "| variant | batch | tokens/s | ms/step | speed vs bf16 | agreement vs bf16 "
        "| peak GPU MiB | weight MiB (vs bf16) | backends |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, v in result["variants"].items():
        for b, row in v["batches"].items():
            backends = ", ".join(f"{k} x{n}" for k, n in row["backends"].items()) or "nn.Linear"
            lines.append(
                f"| {name} | {b} | {row['tokens_per_s']:.1f} | "
                f"{1e3 * row['seconds_per_step']:.2f} | {row['speed_vs_bf16']:.2f}x | "
                f"{row['agreement_vs_bf16']:.3f} | {_mib(row['peak_gpu_bytes'])} | "
                f"{_mib(v['weight_bytes'])} ({v['weight_bytes_vs_bf16']:.2f}x) | {backends} |"
            )
    lines += ["", "| variant | what it is | checkpoint MiB | kernel-layout cache MiB |"]
    lines += ["|---|---|---:|---:|"]
    for name, v in result["variants"].items():
        lines.append(
            f"| {name} | {v['description']} | {_mib(v['checkpoint_bytes'])} | "
            f"{_mib(v['kernel_cache_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    batches = list(result["variants"]["bf16"]["batches"])
    width = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, b in enumerate(batches):
        values = [result["variants"][n]["batches"][b]["tokens_per_s"] for n in names]
        xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=f"batch {b}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("generated tokens / s")
    cfg = result["config"]
    ax.set_title(
        f"{cfg['model']}: {cfg['gen_length']} tokens, {cfg['steps']} steps "
        f"({result['record']['device']})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_outputs(result: dict, out: Path) -> None:
    """Each file is written beside its final name and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "throughput.json", result)
    tmp = out / ".throughput.md.tmp"
    tmp.write_text(markdown(result))
    tmp.replace(out / "throughput.md")
    plot(result, out / "throughput.png")


# --- command ------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for throughput.json / .md / .png")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--smoke", action="store_true", help="mdlm-tiny, tiny sizes (a test runs it)")
    p.add_argument("--model", help="shipped name or model directory (mdlm-small; smoke: tiny)")
    p.add_argument("--group-size", type=int, default=128, help="INT4 group (falls back if needed)")
    p.add_argument("--batches", help="comma-separated batch sizes (1,8; smoke: 1,2)")
    p.add_argument("--gen-length", type=int, help="generated tokens (256; smoke: 16)")
    p.add_argument("--steps", type=int, help="denoising steps (256; smoke: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations (median)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens of each C4 prompt")
    p.add_argument("--prompt", help="one prompt text for every row (default: C4 prefixes)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed, the same for every variant")
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="on CUDA, skip the second measurement of every variant with CUDA-graph steps",
    )
    p.add_argument("--nsamples", type=int, help="calibration sequences for RTN (8; smoke: 2)")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --smoke on the CPU)")
    if args.repeats < 1 or min(args.batches) < 1:
        p.error("--repeats and batch sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = hub.load(args.model)
    tokenizer = hub.load_tokenizer(args.model)
    group, note = choose_group_size(base, args.group_size)
    cfg = SamplerConfig(sampler="low_confidence", steps=args.steps, gen_length=args.gen_length)
    all_prompts = prompts_for(args, tokenizer, max(args.batches))
    prompts = {b: all_prompts[:b] for b in args.batches}
    n_params = base.num_parameters()

    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        built = build_variants(args, base, tokenizer, group, Path(tmp))
        variants = {}
        for name, variant in built.items():
            variants[name] = run_variant(name, variant, prompts, cfg, args, device)
            if device.type == "cuda" and not args.no_cuda_graph:
                variants[f"{name}+graph"] = run_variant(
                    f"{name}+graph", variant, prompts, cfg, args, device, graph=True
                )
    add_comparisons(variants)
    for v in variants.values():
        v["batches"] = {str(b): row for b, row in v["batches"].items()}

    result = {
        "record": {
            **run_record(["python", "benchmarks/throughput.py", *argv]),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "config": {
            "model": str(args.model),
            "parameters": n_params,
            "quantized_widths": quantized_widths(base),
            "device": str(device),
            "batches": args.batches,
            "gen_length": args.gen_length,
            "steps": args.steps,
            "sampler": cfg.sampler,
            "temperature": cfg.temperature,
            "seed": args.seed,
            "repeats": args.repeats,
            "prompt": args.prompt,
            "prompt_source": "text" if args.prompt is not None else "c4:validation",
            "prompt_tokens": int(all_prompts.shape[1]),
            "group_size_requested": args.group_size,
            "group_size": group,
            "group_size_note": note,
            "calib_nsamples": args.nsamples,
            "activation_dtype": "bfloat16",
            "cpu_bf16_native": (
                bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                if device.type == "cpu" and torch.backends.mkldnn.is_available()
                else None
            ),
            "compile_disabled": bool(os.environ.get("FAIRCALIB_NO_COMPILE")),
        },
        "variants": variants,
    }
    write_outputs(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()

"""Where one denoising step of a packed W4 LLaDA-8B-shaped model spends its time (issues 13, 16).

Writes a random LLaDA-8B-shaped checkpoint with --blocks blocks (the published d_model, FFN,
heads and 126k vocabulary; fewer blocks), packs it with RTN W4 g128 through the CLI, then times
one step (`model.log_probs` of a [1, seq_len] canvas, half masked) side by side for

    bf16         hub.load(checkpoint, dtype=bf16)                - the dense baseline
    packed       hub.load(packed, dtype=bf16)                    - as benchmarks/llada_8b.py does
    packed-cast  the same, then model.to(bf16)                   - float tensors in bf16 too

and runs torch.profiler on each step: the top ops/kernels by device time and by CPU time, the
backend each QuantLinear ran (`last_backend`), the dtype its input arrived in, and the dtypes of
the float tensors outside QuantLinears (a dense model's linears included). `packed` and
`packed-cast` differ only while the packed loader keeps embedding, norms and output layer in
float32: then every QuantLinear gets fp32 input and `auto` runs the fp32 `dequant` reference
instead of triton_dq (issue 16).

    python benchmarks/profile_step.py --out /root/results/profile-step       # GPU, 4 blocks
    python benchmarks/profile_step.py --smoke --out /tmp/profile-smoke        # CPU, tiny sizes

Writes profile_step.json and profile_step.md under --out, with the run record.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/llada_8b.py: shapes and writer
import llada_8b  # noqa: E402
from faircalib import atomic, cli, hub  # noqa: E402
from faircalib.bench import run_record  # noqa: E402
from faircalib.kernels import QuantLinear  # noqa: E402

MASK_TOKEN = "<|mdm_mask|>"
SMOKE = {  # LLaDA's layout, tiny; d_model 128 so that g128 and the Triton backends apply
    "d_model": 128, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 256,
    "embedding_size": 1024, "vocab_size": 1024, "mask_token_id": 1000,
    "eos_token_id": 999, "pad_token_id": 999,
}  # fmt: skip


def model_config(blocks: int, smoke: bool) -> dict:
    return {**llada_8b.LLADA_8B, **(SMOKE if smoke else {}), "n_layers": blocks}


def pack_rtn(ckpt: Path, out: Path, group_size: int, device: str) -> float:
    """RTN W4 through the CLI's entry point, as `faircalib quantize` runs it (in this process:
    RTN needs no calibration worth isolating); returns the wall seconds."""
    argv = ["quantize", str(ckpt), "--method", "rtn", "--bits", "4", "--group-size",
            str(group_size), "--nsamples", "2", "--seq-len", "32", "--device", device,
            "--format", "packed", "--out", str(out), "--overwrite"]  # fmt: skip
    print("$ faircalib", " ".join(argv), file=sys.stderr, flush=True)
    tick = time.time()
    if cli.main(argv) != 0:
        raise SystemExit(f"faircalib {' '.join(argv)} failed")
    return time.time() - tick


def canvas(seq_len: int, mask_id: int, device: str) -> torch.Tensor:
    """[1, seq_len] random byte tokens, the second half masked (benchmarks/llada_8b.py's)."""
    x = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
    x[:, seq_len // 2 :] = mask_id
    return x.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_ms(step: Callable[[], object], device: str, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of `reps` steps after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):  # kernel selection, autotuning, layout caches
        step()
    sync(device)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - tick))
    return times


def _us(event: object, *names: str) -> float:
    """The first of `names` the profiler event has (torch renamed cuda_* to device_*), in us."""
    return next((float(getattr(event, n)) for n in names if hasattr(event, n)), 0.0)


def op_rows(prof: profile, steps: int) -> list[dict]:
    """Every op and kernel of the profiled steps, times per step in milliseconds."""
    rows = []
    for e in prof.key_averages():
        rows.append(
            {
                "name": e.key,
                "calls_per_step": e.count / steps,
                "self_device_ms": _us(e, "self_device_time_total", "self_cuda_time_total")
                / steps
                / 1e3,
                "device_ms": _us(e, "device_time_total", "cuda_time_total") / steps / 1e3,
                "self_cpu_ms": e.self_cpu_time_total / steps / 1e3,
                "cpu_ms": e.cpu_time_total / steps / 1e3,
            }
        )
    return rows


def profiled(step: Callable[[], object], device: str, steps: int, top: int) -> dict:
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    rows = op_rows(prof, steps)
    return {
        "by_device_time": sorted(rows, key=lambda r: -r["self_device_ms"])[:top],
        "by_cpu_time": sorted(rows, key=lambda r: -r["self_cpu_ms"])[:top],
    }


def float_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """dtype -> element count of the float tensors outside QuantLinears (QuantLinear scales are
    float32 by design and not what the model computes in)."""
    quant = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    counts: collections.Counter = collections.Counter()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and name.rpartition(".")[0] not in quant:
            counts[str(t.dtype).removeprefix("torch.")] += t.numel()
    return dict(counts)


def record_inputs(model: torch.nn.Module) -> dict[str, set]:
    """A forward hook per QuantLinear noting the dtypes its input arrives in."""
    seen: dict[str, set] = collections.defaultdict(set)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.register_forward_hook(
                lambda mod, inp, out, n=name: seen[n].add(str(inp[0].dtype).removeprefix("torch."))
            )
    return seen


def load_variant(name: str, ckpt: Path, packed: Path, device: str) -> torch.nn.Module:
    if name == "bf16":
        return hub.load(ckpt, device=device, dtype=torch.bfloat16)
    model = hub.load(packed, device=device, dtype=torch.bfloat16)
    return model.to(torch.bfloat16) if name == "packed-cast" else model


def measure(name: str, ckpt: Path, packed: Path, args: argparse.Namespace, mask_id: int) -> dict:
    """One variant: loaded, timed and profiled; the peak device memory covers load and steps."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = measure_model(load_variant(name, ckpt, packed, args.device), args, mask_id)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
    return {**result, "peak_device_bytes": int(peak)}  # the model is freed by now


@torch.no_grad()
def measure_model(model: torch.nn.Module, args: argparse.Namespace, mask_id: int) -> dict:
    inputs = record_inputs(model)
    x = canvas(args.seq_len, mask_id, args.device)
    t = torch.full((1,), 0.5, device=args.device)

    def step() -> None:
        model.log_probs(x, t)

    times = step_ms(step, args.device, args.warmup, args.reps)
    ops = profiled(step, args.device, args.profile_steps, args.top)
    layers = {
        n: {"backend": m.last_backend, "input_dtypes": sorted(inputs[n])}
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    return {
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "float_dtypes": float_dtypes(model),
        "backends": dict(collections.Counter(v["backend"] for v in layers.values())),
        "layers": layers,
        "ops": ops,
    }


def markdown(result: dict) -> str:
    base = result["variants"]["bf16"]["step_ms"]
    lines = [
        f"# One denoising step, LLaDA-8B shape, {result['blocks']} blocks, M = {result['seq_len']}",
        "",
        f"Device: {result['record'].get('device')}; command: `{result['record'].get('command')}`",
        "",
        "| variant | step ms | bf16 / variant | peak GiB | QuantLinear backends | float dtypes |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        backends = ", ".join(f"{k} x{n}" for k, n in v["backends"].items()) or "-"
        dtypes = ", ".join(f"{k} {n / 1e6:.1f}M" for k, n in v["float_dtypes"].items())
        lines.append(
            f"| {name} | {v['step_ms']:.2f} | {base / v['step_ms']:.2f}x | "
            f"{v['peak_device_bytes'] / 2**30:.2f} | {backends} | {dtypes} |"
        )
    for name, v in result["variants"].items():
        for key, col in (("by_device_time", "self_device_ms"), ("by_cpu_time", "self_cpu_ms")):
            lines += ["", f"## {name}: top ops {key.replace('_', ' ')} (ms per step)", ""]
            lines += ["| op | calls | self device ms | self CPU ms |", "|---|---|---|---|"]
            for r in v["ops"][key][:15]:
                if r[col] <= 0:
                    break
                lines.append(
                    f"| `{r['name'][:90]}` | {r['calls_per_step']:g} | "
                    f"{r['self_device_ms']:.3f} | {r['self_cpu_ms']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks (4; smoke: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="canvas length M (2048; smoke: 64)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cuda if available (smoke: cpu)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--top", type=int, default=30, help="ops kept per ranking")
    p.add_argument("--variants", default="bf16,packed,packed-cast")
    p.add_argument("--work", default="/tmp/faircalib-profile-step", help="checkpoints go here")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test)")
    args = p.parse_args(argv)
    args.blocks = args.blocks or (2 if args.smoke else 4)
    args.seq_len = args.seq_len or (64 if args.smoke else 2048)
    cuda = torch.cuda.is_available() and not args.smoke
    args.device = args.device or ("cuda" if cuda else "cpu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    record = run_record(argv if argv is not None else sys.argv[1:])
    config = model_config(args.blocks, args.smoke)
    work = Path(args.work)
    shape = f"{'smoke' if args.smoke else 'llada-8b'}-{args.blocks}blocks"
    ckpt = llada_8b.write_random_checkpoint(work / f"{shape}-bf16", config, MASK_TOKEN, args.device)
    packed = work / f"{shape}-w4g{args.group_size}-rtn"
    pack_s = pack_rtn(ckpt, packed, args.group_size, args.device)
    variants = {}
    for name in args.variants.split(","):
        variants[name] = measure(name, ckpt, packed, args, config["mask_token_id"])
    result = {
        "blocks": args.blocks,
        "seq_len": args.seq_len,
        "group_size": args.group_size,
        "smoke": args.smoke,
        "pack_s": pack_s,
        "variants": variants,
        "record": record,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "profile_step.json", json.dumps(result, indent=2) + "\n")
    atomic.write_text(out / "profile_step.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

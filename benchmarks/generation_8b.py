"""Generation tokens/s of an 8B-shaped random dLLM, with and without the block K/V cache.

    python benchmarks/generation_8b.py --out benchmarks/results/generation-8b            # GPU
    python benchmarks/generation_8b.py --packed /root/work/llada/w4-gptq --out ...       # + W4
    python benchmarks/generation_8b.py --cuda-graph --out ...                           # graphs
    python benchmarks/generation_8b.py --smoke --work /tmp/gen8b --out /tmp/gen8b-out   # CPU

The model is `benchmarks/llada_8b.py`'s random checkpoint in the published layout (LLaDA-8B by
default, `--family dream` for Dream-7B), written once into --work. Schemes, each loaded in
bf16 and run by the shared sampler (`faircalib.frontier.generate`, low_confidence, greedy):
  bf16       the float checkpoint
  w4_rtn     the same weights, every block linear swapped in process for a packed int4 g128
             `QuantLinear` (round to nearest; backend auto): the INT4 path without a
             quantize run (--no-w4-rtn to skip)
  w8a8_rtn   the same with int8 per-channel symmetric weights and per-token int8 activations
             (act_bits 8; backend auto: int8_w8a8 on a GPU, gemlite's kernels below M = 1024
             where installed; --no-w8a8-rtn to skip)
  packed     a packed checkpoint written by `faircalib quantize --format packed` (--packed DIR,
             e.g. llada_8b.py's w4 output), loaded as a user would
For each scheme and cache (none, prefix, dual: `frontier.cache`) and each batch size: one
warm-up generation, then --reps timed ones (the sampler's own wall clock, device synchronised);
reported: median tokens/s (batch x gen_length / seconds), token rows run relative to the
uncached run, speed vs the scheme's own uncached run and vs bf16 uncached, and the flip rate of
the cached tokens against the same scheme's uncached tokens (same seed and noise).
Weights are random: the flip rate only shows the cache is an approximation; quality needs real
weights (`frontier.metrics.cache_flip_metrics`). Writes generation_8b.json and .md into --out.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by tests
from faircalib import atomic, hub  # noqa: E402
from faircalib.bench import run_record  # noqa: E402
from faircalib.config import QuantConfig  # noqa: E402
from faircalib.formats.packed import stack_readers  # noqa: E402
from faircalib.frontier import SamplerConfig, generate  # noqa: E402
from faircalib.kernels import QuantLinear  # noqa: E402
from faircalib.kernels.shared_activations import share_activations  # noqa: E402
from faircalib.models.cuda_graph import CUDAGraphDenoiser  # noqa: E402
from faircalib.quant.primitives import compute_qparams, quantize  # noqa: E402
from llada_8b import SHAPES, SMOKE_SIZES, write_random_checkpoint  # noqa: E402

CACHES = ("none", "prefix", "dual")
TARGET_SPEEDUP = 1.5  # issue 16: cached INT4 generation vs bf16 (uncached) tokens/s


@torch.no_grad()
def pack_rtn_w4(model: torch.nn.Module, group_size: int, backend: str = "auto") -> int:
    """Swap every block linear for an int4 g`group_size` asymmetric RTN QuantLinear, one at a
    time (the float weight is freed as it goes). -> linears swapped."""
    cfg = QuantConfig(bits=4, group_size=group_size, symmetric=False)
    return _swap_rtn(model, cfg, None, backend)


@torch.no_grad()
def pack_rtn_w8a8(model: torch.nn.Module, backend: str = "auto") -> int:
    """Swap every block linear for an int8 per-channel symmetric RTN QuantLinear that also
    quantizes its activations per token to int8 (W8A8). -> linears swapped."""
    cfg = QuantConfig(bits=8, group_size=None, symmetric=True)
    return _swap_rtn(model, cfg, 8, backend)


def _swap_rtn(model: torch.nn.Module, cfg: QuantConfig, act_bits: int | None, backend: str) -> int:
    swapped = 0
    for block in model.blocks:
        for path, linear in model.quantizable_linears(block):
            w = linear.weight.data
            qp = compute_qparams(w, cfg)
            layer = QuantLinear.from_codes(
                quantize(w, qp), qp, bias=linear.bias, backend=backend, act_bits=act_bits
            )
            layer = layer.to(device=w.device, dtype=w.dtype)
            parent, _, leaf = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, layer)
            swapped += 1
    if act_bits is not None:  # q, k, v (gate, up) quantize their shared input once
        share_activations(model.blocks)
    return swapped


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, prompt: torch.Tensor, cfg: SamplerConfig, reps: int) -> dict:
    """One warm-up, then `reps` timed generations; -> tokens/s and the last run's tokens."""
    generate(model, prompt, cfg, seed=0, trace=False)  # warm-up (kernel choice, autotuning)
    runs = [generate(model, prompt, cfg, seed=0, trace=False) for _ in range(reps)]
    stats = runs[-1].stats
    return {
        "tokens_per_s": statistics.median(r.stats.tokens_per_s for r in runs),
        "seconds": statistics.median(r.stats.seconds for r in runs),
        "model_calls": stats.model_calls,
        "full_calls": stats.full_calls,
        "row_fraction": stats.row_fraction,
        "tokens": runs[-1].tokens[:, runs[-1].prompt_len :].cpu(),
    }


def bench_scheme(
    name: str, model, args, mask_id: int, vocab: int, tokens_out: dict | None = None
) -> list[dict]:
    """One row per (batch, cache); `tokens_out`, when given, gets each cell's tokens."""
    rows = []
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, min(vocab, 256), (batch, args.prompt_len), generator=gen)
        prompt = prompt.masked_fill(prompt == mask_id, 0)
        base = SamplerConfig(
            steps=args.steps, gen_length=args.gen_length, block_length=args.block_length
        )
        reference = None
        for cache in args.caches:
            m = measure(model, prompt, replace(base, cache=cache), args.reps)
            tokens = m.pop("tokens")
            if tokens_out is not None:
                tokens_out[batch, cache] = tokens
            if cache == "none":
                reference = tokens
            flips = None if reference is None else (tokens != reference).float().mean().item()
            rows.append({"scheme": name, "batch": batch, "cache": cache, **m, "flip_rate": flips})
            print(
                f"{name} B={batch} cache={cache}: {m['tokens_per_s']:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def add_speedups(rows: list[dict]) -> None:
    def find(scheme, batch, cache):
        return next(
            (r for r in rows if (r["scheme"], r["batch"], r["cache"]) == (scheme, batch, cache)),
            None,
        )

    for r in rows:
        own, bf16 = find(r["scheme"], r["batch"], "none"), find("bf16", r["batch"], "none")
        r["speedup_vs_own_uncached"] = r["tokens_per_s"] / own["tokens_per_s"] if own else None
        r["speedup_vs_bf16"] = r["tokens_per_s"] / bf16["tokens_per_s"] if bf16 else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(SHAPES), default="llada")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/root/work", help="where the random checkpoint is written")
    p.add_argument("--packed", help="a packed checkpoint directory (faircalib quantize output)")
    p.add_argument("--no-w4-rtn", action="store_true", help="skip the in-process RTN W4 scheme")
    p.add_argument(
        "--no-w8a8-rtn", action="store_true", help="skip the in-process RTN W8A8 (INT8) scheme"
    )
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch", help="comma list of batch sizes (default: 1,8; smoke: 1,2)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--caches", default=",".join(CACHES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay every step (cached ones too) from CUDA graphs, as generate --cuda-graph",
    )
    p.add_argument(
        "--stack-linears",
        nargs="?",
        const="all",
        choices=["all", "both"],
        help="all: every scheme (bf16 too) runs q, k, v and gate, up as one stacked layer each, "
        "as generate --stack-linears (kernels.stacked_linears); both: every scheme apart and "
        "then stacked ('<scheme>+stacked'), side by side in one run",
    )
    args = p.parse_args(argv)
    record = run_record(["python", "benchmarks/generation_8b.py", *(argv or sys.argv[1:])])
    config, mask_token = SHAPES[args.family]
    if args.smoke:
        config = {**config, **SMOKE_SIZES[args.family]}
        args.device, args.group_size, args.reps = "cpu", 32, 1
        args.prompt_len, args.gen_length, args.block_length, args.steps = 8, 16, 4, 16
    elif not args.device.startswith("cuda"):
        p.error("an 8B model on the CPU would take hours: run on a GPU, or use --smoke")
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error("--cuda-graph needs a CUDA device")
    args.batch = [int(b) for b in (args.batch or ("1,2" if args.smoke else "1,8")).split(",")]
    args.caches = [c for c in args.caches.split(",") if c]
    if "none" not in args.caches:
        args.caches.insert(0, "none")  # the reference every cached row is compared with
    work = Path(args.work) / f"{args.family}{'-smoke' if args.smoke else ''}"
    ckpt = write_random_checkpoint(work / "bf16", config, mask_token, args.device)
    mask_id, vocab = config["mask_token_id"], config.get("embedding_size") or config["vocab_size"]
    rows: list[dict] = []
    schemes = [("bf16", ckpt, None)]
    if not args.no_w4_rtn:
        schemes.append(("w4_rtn", ckpt, lambda m: pack_rtn_w4(m, args.group_size)))
    if not args.no_w8a8_rtn:
        schemes.append(("w8a8_rtn", ckpt, pack_rtn_w8a8))
    if args.packed:
        schemes.append(("packed", Path(args.packed), None))
    stack_modes = {None: [False], "all": [True], "both": [False, True]}[args.stack_linears]
    apart_tokens: dict = {}  # "both": each apart scheme's tokens, what its stacked run must match
    for (scheme, directory, swap), stacked in itertools.product(schemes, stack_modes):
        model = hub.load(directory, device=args.device, dtype=torch.bfloat16)
        if swap is not None:
            swap(model)
        groups, name = 0, scheme
        if stacked:  # after the swap: the quantized layers are what stacks
            report = stack_readers(model)
            if report.left:
                raise SystemExit(f"{scheme}: layers left unstacked: {report.left}")
            groups = len(report.stacked)
            if args.stack_linears == "both":
                name = f"{scheme}+stacked"
        if args.cuda_graph:  # after the swap: the graphs capture the quantized layers
            model = CUDAGraphDenoiser(model)
        tokens: dict = {}
        new_rows = bench_scheme(name, model, args, mask_id, vocab, tokens)
        for r in new_rows:
            r["stacked_groups"] = groups
            apart = apart_tokens.get((scheme, r["batch"], r["cache"]))
            if stacked and apart is not None:  # the same math: how many tokens came out equal
                same = tokens[r["batch"], r["cache"]] == apart
                r["same_tokens_as_apart"] = same.float().mean().item()
            elif not stacked:
                apart_tokens[scheme, r["batch"], r["cache"]] = tokens[r["batch"], r["cache"]]
        rows += new_rows
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    add_speedups(rows)
    result = {
        "record": {**record, "device_name": _device_name(args.device)},
        "family": args.family,
        "smoke": args.smoke,
        "cuda_graph": args.cuda_graph,
        "stack_linears": args.stack_linears,
        "sampler": {
            "sampler": "low_confidence",
            "steps": args.steps,
            "gen_length": args.gen_length,
            "block_length": args.block_length,
            "prompt_len": args.prompt_len,
            "temperature": 0.0,
        },
        "target_speedup_int4_cached_vs_bf16": TARGET_SPEEDUP,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "generation_8b.json", result, **atomic.COMPACT)
    atomic.write_text(out / "generation_8b.md", markdown(result))
    return result


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def markdown(result: dict) -> str:
    s = result["sampler"]
    lines = [
        f"# Generation tokens/s, {result['family']}-shaped random model"
        + (" (smoke)" if result["smoke"] else "")
        + (", steps replayed from CUDA graphs" if result.get("cuda_graph") else ", eager")
        + {
            None: "",
            False: "",
            True: ", q/k/v and gate/up stacked",  # records written before "all" / "both"
            "all": ", q/k/v and gate/up stacked",
            "both": ", each scheme apart and with q/k/v and gate/up stacked",
        }[result.get("stack_linears")],
        "",
        f"Command: `{result['record']['command']}`  ",
        f"Commit: {result['record']['git_commit']}  \nDevice: {result['record']['device_name']}"
        f"  \nDate: {result['record']['date']}",
        "",
        f"low_confidence, greedy, prompt {s['prompt_len']}, gen_length {s['gen_length']}, "
        f"block_length {s['block_length']}, {s['steps']} steps. Rows: token rows run vs the "
        "uncached run. Flips: cached tokens that differ from the same scheme's uncached ones. "
        f"Target: cached INT4 >= {result['target_speedup_int4_cached_vs_bf16']}x bf16 uncached.",
        "",
        "| scheme | batch | cache | tokens/s | rows | vs own uncached | vs bf16 | flips |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        flips = "-" if r["flip_rate"] is None else f"{r['flip_rate']:.3f}"
        lines.append(
            f"| {r['scheme']} | {r['batch']} | {r['cache']} | {r['tokens_per_s']:.1f} | "
            f"{r['row_fraction']:.2f} | {r['speedup_vs_own_uncached']:.2f}x | "
            f"{r['speedup_vs_bf16']:.2f}x | {flips} |"
        )
    lines += _stacked_vs_apart(result["rows"])
    return "\n".join(lines) + "\n"


def _stacked_vs_apart(rows: list[dict]) -> list[str]:
    """--stack-linears both: each stacked row's speed and tokens against the same scheme apart."""
    apart = {(r["scheme"], r["batch"], r["cache"]): r for r in rows}
    lines = []
    for r in rows:
        base = apart.get((r["scheme"].removesuffix("+stacked"), r["batch"], r["cache"]))
        if r["scheme"].endswith("+stacked") and base is not None:
            lines.append(
                f"- {r['scheme']} batch {r['batch']} cache {r['cache']}: "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x of apart, "
                f"{r['stacked_groups']} groups stacked, "
                f"same tokens as apart {r['same_tokens_as_apart']:.3f}"
            )
    return ["", "Stacked vs apart (this run):", *lines] if lines else []


if __name__ == "__main__":
    main()

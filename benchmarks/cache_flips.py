"""Cached block decoding on a trained model: how far the prefix and dual caches move the output.

    python benchmarks/cache_flips.py --out benchmarks/results/cache-flips          # CPU, minutes
    python benchmarks/cache_flips.py --smoke --out /tmp/cache-flips                 # seconds

The block cache (Fast-dLLM's prefix and dual cache, `frontier.cache`) reuses keys and values
computed at a block's first step, so with bidirectional attention its output can differ from
the uncached sampler's. Random weights (benchmarks/generation_8b.py) give near-uniform logits
that any perturbation flips; this measures it on a trained model: a shipped MDLM (default
mdlm-small), the bench's flip prompts (C4 validation windows, seed 1234), semi-autoregressive
low-confidence decoding, greedy, in blocks. Schemes: the float model and the same model with
GPTQ W4 g128 (`faircalib.quantize`, C4 train windows). Per (scheme, cache in none / prefix /
dual): the flip rate of the generated tokens against the same scheme uncached (the cache's own
error) and against the float model uncached (what a user compares against), the share of
prompts generated identically, and the token rows the cache ran against the uncached run.
Writes cache_flips.json and cache_flips.md into --out with command, commit, device and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import faircalib
from faircalib import atomic
from faircalib.bench import record_lines, run_record
from faircalib.data import calibration_batch
from faircalib.frontier import SamplerConfig, generate

CACHES = ("none", "prefix", "dual")


def settings(args: argparse.Namespace) -> dict:
    if args.smoke:
        return dict(model="mdlm-tiny", prompts=2, prompt_len=16, gen=32, block=8, steps=32, calib=4)
    return dict(
        model=args.model,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        gen=args.gen_length,
        block=args.block_length,
        steps=args.steps,
        calib=args.nsamples,
    )


def run(s: dict, device: str) -> list[dict]:
    """Generate every (scheme, cache) on the same prompts and seed; flips against two refs."""
    float_model = faircalib.load(s["model"], device=device)
    quantized = faircalib.quantize(
        faircalib.load(s["model"], device=device),
        method="gptq",
        bits=4,
        group_size=128,
        nsamples=s["calib"],
        format="fake",
        device=device,
    )
    prompts = calibration_batch(
        quantized.tokenizer, "c4", "validation", s["prompts"], s["prompt_len"], seed=1234
    ).to(device)
    cfg = SamplerConfig(
        sampler="low_confidence", steps=s["steps"], gen_length=s["gen"], block_length=s["block"]
    )
    tokens, rows = {}, []
    for scheme, model in (("float", float_model), ("gptq_w4g128", quantized.model)):
        for cache in CACHES:
            res = generate(model, prompts, SamplerConfig(**{**vars(cfg), "cache": cache}), 0)
            gen = res.tokens[:, res.prompt_len :]
            tokens[scheme, cache] = gen
            own, ref = tokens[scheme, "none"], tokens["float", "none"]
            rows.append(
                {
                    "scheme": scheme,
                    "cache": cache,
                    "flip_vs_own_uncached": (gen != own).float().mean().item(),
                    "flip_vs_float_uncached": (gen != ref).float().mean().item(),
                    "identical_prompts_vs_own": (gen == own).all(dim=1).float().mean().item(),
                    "row_fraction": res.stats.rows / res.stats.canvas_rows,
                    "tokens_per_s": res.stats.tokens_per_s,
                    "generated": gen.tolist(),  # the tokens, so the flips can be recounted
                }
            )
            print(f"{scheme} {cache}: {rows[-1]}", file=sys.stderr)
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Cached block decoding on {s['model']}: flips against uncached decoding",
        "",
        *record_lines(result["record"]),
        "",
        f"{s['prompts']} C4 validation prompts of {s['prompt_len']} tokens; {s['gen']} tokens "
        f"generated in blocks of {s['block']}, {s['steps']} steps, low-confidence, greedy. "
        f"GPTQ W4 g128 calibrated on {s['calib']} C4 windows. Flips: share of generated "
        "tokens that differ. Tokens/s: this machine, one process (see the record).",
        "",
        "| scheme | cache | flips vs own uncached | flips vs float uncached | prompts identical "
        "to own uncached | rows run vs uncached | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scheme']} | {r['cache']} | {r['flip_vs_own_uncached']:.3f} | "
            f"{r['flip_vs_float_uncached']:.3f} | {r['identical_prompts_vs_own']:.2f} | "
            f"{r['row_fraction']:.2f} | {r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for cache_flips.json / .md")
    p.add_argument("--smoke", action="store_true", help="mdlm-tiny, 2 short prompts (a test)")
    p.add_argument("--model", default="mdlm-small", help="a shipped name or a model directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration windows")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.manual_seed(0)
    s = settings(args)
    result = {
        "record": run_record(["python", "benchmarks/cache_flips.py", *argv]),
        "settings": s,
        "rows": run(s, args.device),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "cache_flips.json", result, **atomic.COMPACT)
    atomic.write_text(out / "cache_flips.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

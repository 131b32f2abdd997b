"""Activation quantization on a dLLM: float / W8A8 INT8 / W8A8 FP8 / W4A8 / W4A4 x methods.

    python benchmarks/w4a4.py --model mdlm-small --device cuda --out benchmarks/results/w4a4
    python benchmarks/w4a4.py --smoke --out /tmp/w4a4        # CPU, mdlm-tiny, seconds

Methods (`faircalib.calib.activations.METHODS`): rtn, gptq, smoothquant, quarot-rtn (online
randomized Hadamard + RTN weights), quarot (Hadamard + GPTQ weights, QuaRot's recipe),
flatquant (learned Kronecker transform, smoothing and clipping, RTN weights), flatquant-gptq and
fair (flatquant's optimiser on FAIR-Calib's calibration rows and frontier-instability row
weights). Every row calibrates on the same C4 draw, is scored on WikiText-2 test with the same
evaluation noise (likelihood bound, `--mc-samples` draws) and, at W4A4 (`--flip-schemes`),
generates under the same sampler noise as the float model for its flip rate. With `--ablation`
the file also holds the per-layer A4 ablation and the masked/clean activation statistics.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from faircalib import atomic, hub
from faircalib.bench import record_lines, run_record
from faircalib.calib import fair_inputs
from faircalib.calib.activations import (
    METHODS,
    SCHEMES,
    ActCalibConfig,
    a4_ablation,
    activation_outlier_stats,
    quantize_activations_model,
    summarize_stats,
)
from faircalib.calib.inputs import masked_inputs
from faircalib.config import CalibConfig, FairCalibConfig
from faircalib.data import calibration_batch, eval_sequences
from faircalib.eval import likelihood_bound
from faircalib.quant.flatquant import FlatQuantConfig

DEFAULT_METHODS = "rtn,gptq,smoothquant,quarot-rtn,quarot,flatquant,fair"
DEFAULT_SCHEMES = "w8a8,w8a8fp8,w4a8,w4a8fp8,w4a4"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mdlm-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--nsamples", type=int, default=128, help="calibration texts (C4 train)")
    p.add_argument("--seq-len", type=int, help="default: the model's")
    p.add_argument("--eval-limit", type=int, help="WikiText-2 sequences (default: all)")
    p.add_argument("--mc-samples", type=int, default=2)
    p.add_argument("--flat-steps", type=int, default=200)
    p.add_argument("--block-steps", default="0",
                   help="comma list: steps of the block-wise stage of flatquant/fair, one row "
                   "per value (0: per-layer only; rows METHOD+blockN)")  # fmt: skip
    p.add_argument("--clip-search", action="store_true", help="search activation clip ratios")
    p.add_argument("--flip-schemes", default="w4a4", help="schemes that get a flip rate")
    p.add_argument("--flip-prompts", type=int, default=8)
    p.add_argument("--ablation", action="store_true", help="per-layer A4 ablation + statistics")
    p.add_argument("--stats-only", action="store_true", help="only the ablation and statistics")
    p.add_argument("--stats-sequences", type=int, default=32, help="calibration texts they use")
    p.add_argument(
        "--smoke", action="store_true", help="mdlm-tiny, tiny sizes, CPU (a test runs it)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.nsamples, args.seq_len = "mdlm-tiny", "cpu", 4, 64
        args.eval_limit, args.mc_samples, args.flat_steps, args.flip_prompts = 4, 1, 2, 2
        args.ablation, args.schemes, args.stats_sequences = True, "w8a8fp8,w4a4", 4
        args.methods = "rtn,smoothquant,quarot,flatquant,fair"  # every code path once
    for name in args.schemes.split(","):
        if name not in SCHEMES:
            p.error(f"unknown scheme {name}; choose from {sorted(SCHEMES)}")
    for name in args.methods.split(","):
        if name not in METHODS:
            p.error(f"unknown method {name}; choose from {sorted(METHODS)}")
    args.ablation = args.ablation or args.stats_only
    return args


def method_variants(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(method, block-wise steps) per row: the learned-transform methods once per
    --block-steps value, the others once."""
    steps = [int(v) for v in args.block_steps.split(",")]
    return [
        (method, n)
        for method in args.methods.split(",")
        for n in (steps if method in ("flatquant", "fair") else [0])
    ]


def fair_rows(model, tokens, args, seed: int):
    """FAIR-Calib's mixed calibration rows (x_t, t, row weights): half the texts masked at
    stratified t (weight 1), half recorded sampler states with frontier-instability weights,
    from the toolkit's own split (`faircalib.calib.fair_inputs`)."""
    fcfg = FairCalibConfig(bits=4, group_size=None, n_prompts=len(tokens) // 2, preset="fast")
    if args.smoke:
        fcfg.steps, fcfg.prefix_len = 4, 16
    calib = CalibConfig(n_samples=len(tokens), seed=seed, device=args.device)
    inputs, _ = fair_inputs(model, fcfg, tokens, calib)
    return inputs["x_t"], inputs["t"], inputs["weights"].float(), inputs["text_ids"]


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    model = hub.load(args.model, device=args.device)
    tok = hub.load_tokenizer(args.model)
    seq_len = args.seq_len or model.seq_len
    seqs, n_bytes = eval_sequences(tok, "wikitext2", "test", seq_len)
    if args.eval_limit:
        n_bytes, seqs = round(n_bytes * args.eval_limit / len(seqs)), seqs[: args.eval_limit]
    tokens = calibration_batch(tok, "c4", "train", args.nsamples, seq_len, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=args.nsamples, seed=0))
    prompts = calibration_batch(tok, "c4", "validation", args.flip_prompts, 16, seed=1234)
    batch = 8 if args.device == "cpu" else 64

    def score(m) -> float:
        res = likelihood_bound(
            m, seqs, n_bytes, mc_samples=args.mc_samples, progress=False, batch_size=batch
        )
        return res.ppl

    def flips(m) -> float:
        from faircalib.frontier import SamplerConfig, compare_generations

        steps = 8 if args.smoke else 32
        scfg = SamplerConfig(sampler="low_confidence", steps=steps, gen_length=steps)
        res = compare_generations(model, m, prompts.to(args.device), scfg, seed=0, max_positions=0)
        return res["flip_rate"]

    rows = [{"scheme": "float", "method": "float", "ppl": score(model)}]
    fair_data = None
    for scheme in [] if args.stats_only else args.schemes.split(","):
        for method, block_steps in method_variants(args):
            cfg = ActCalibConfig(
                scheme=scheme,
                method=method,
                clip_search=args.clip_search,
                flat=FlatQuantConfig(steps=args.flat_steps),
                device=args.device,
                block_steps=block_steps,
            )
            q = copy.deepcopy(model)
            start = time.time()
            if method == "fair":
                fair_data = fair_data or fair_rows(model, tokens, args, 0)
                x_f, t_f, w_f, ids_f = fair_data
                layers = quantize_activations_model(q, x_f, t_f, cfg, w_f, ids_f)
            else:
                layers = quantize_activations_model(q, x_t, t, cfg)
            method = f"{method}+block{block_steps}" if block_steps else method
            row = {
                "scheme": scheme,
                "method": method,
                "ppl": score(q),
                "calib_s": time.time() - start,
                "mean_layer_error": statistics.mean(r["rel_error"] for r in layers),
                "layers": layers,
            }
            if scheme in args.flip_schemes.split(","):
                row["flip_rate"] = flips(q)
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("scheme", "method", "ppl", "calib_s")}),
                file=sys.stderr,
                flush=True,
            )
            del q
    out = {
        "record": run_record(
            ["python", "benchmarks/w4a4.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "model": args.model,
        "calib": {
            "source": "c4:train",
            "nsamples": args.nsamples,
            "seq_len": seq_len,
            "masking": "uniform t",
        },
        "eval": {"data": "wikitext2:test", "sequences": len(seqs), "mc_samples": args.mc_samples},
        "rows": rows,
    }
    if args.ablation:
        n = min(len(x_t), args.stats_sequences)
        out["a4_ablation"] = a4_ablation(model, x_t[:n], t[:n], leave_one_out=not args.smoke)
        stats = activation_outlier_stats(model, x_t[:n], t[:n])
        out["activation_stats"] = {
            "sequences": n,
            "layers": stats,
            "by_kind": summarize_stats(stats),
        }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "w4a4.json", out, indent=1)
    atomic.write_text(dest / "w4a4.md", markdown(out))
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    fp = out["rows"][0]["ppl"]
    lines = [
        f"# Activation quantization: {out['model']}",
        "",
        *record_lines(out["record"]),
        "",
        f"WikiText-2 test likelihood bound ({out['eval']['sequences']} sequences, "
        f"{out['eval']['mc_samples']} MC samples, the same noise for every row); float {fp:.2f}. "
        f"Calibration: {out['calib']['nsamples']} C4 texts x {out['calib']['seq_len']} tokens, "
        "masked at stratified t.",
        "",
        "| scheme | method | ppl | vs float | mean layer error | flip rate | calib s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"][1:]:
        flip = f"{r['flip_rate']:.3f}" if "flip_rate" in r else "-"
        lines.append(
            f"| {r['scheme']} | {r['method']} | {r['ppl']:.2f} | {100 * (r['ppl'] / fp - 1):+.1f}% | "
            f"{r['mean_layer_error']:.4f} | {flip} | {r['calib_s']:.1f} |"
        )
    if "a4_ablation" in out:
        ab = out["a4_ablation"]
        lines += [
            "",
            f"## Per-layer A4 ablation (float weights; KL(float || A4) per masked position, "
            f"{ab['masked_positions']} positions; all layers A4: {ab['all']:.4f})",
            "",
            "| layer | A4 on this layer only | A4 on all but this layer |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {r['layer']} | {r['only']:.4f} | {r.get('all_but', float('nan')):.4f} |"
            for r in ab["layers"]
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""FAIR-Calib ablations on one model: weighting, token selection, calibration inputs, sample count.

    python benchmarks/fair_ablation.py --model mdlm-small --device cuda --out benchmarks/results/fair-ablation

Every row calibrates on the same C4 draw (seed 0) and is scored with the same evaluation noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from faircalib import atomic, hub
from faircalib.bench import run_record
from faircalib.calib import quantize
from faircalib.config import CalibConfig, FairCalibConfig, GPTQConfig
from faircalib.data import calibration_batch, eval_sequences
from faircalib.eval import likelihood_bound

VARIANTS = {
    "gptq (uniform-t masked inputs)": ("gptq", {}, "uniform"),
    "gptq (clean inputs, AR-style)": ("gptq", {}, "none"),
    "fair: states only, uniform weights": (
        "fair",
        {"weighting": "uniform", "inputs": "states"},
        None,
    ),
    "fair: states only, instability, frontier": ("fair", {"inputs": "states"}, None),
    "fair: mixed inputs, uniform weights": ("fair", {"weighting": "uniform"}, None),
    "fair: mixed inputs, instability, frontier (default)": ("fair", {}, None),
    "fair: instability, all masked tokens": ("fair", {"tokens": "all"}, None),
    "fair: margin, frontier": ("fair", {"weighting": "margin"}, None),
    "fair: random-noise instability": ("fair", {"noise": "random"}, None),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mdlm-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--schemes", default="4:64,3:64", help="bits:group list")
    p.add_argument("--nsamples", default="128", help="comma list; the first is used for variants")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = hub.load(args.model, device=args.device)
    tok = hub.load_tokenizer(args.model)
    seqs, n_bytes = eval_sequences(tok, "wikitext2", "test", model.seq_len)
    if args.eval_limit:
        n_bytes, seqs = round(n_bytes * args.eval_limit / len(seqs)), seqs[: args.eval_limit]

    def score(m) -> float:
        batch = 64 if args.device != "cpu" else 8
        return likelihood_bound(
            m, seqs, n_bytes, mc_samples=2, progress=False, batch_size=batch
        ).ppl

    counts = [int(n) for n in args.nsamples.split(",")]
    rows = [{"variant": "float", "ppl": score(model)}]
    for scheme in args.schemes.split(","):
        bits, group = (int(v) for v in scheme.split(":"))
        runs = [(name, *spec, counts[0]) for name, spec in VARIANTS.items()]
        runs += [(f"fair: {n} samples", "fair", {}, None, n) for n in counts[1:]]
        for name, method, knobs, masking, n in runs:
            tokens = calibration_batch(tok, "c4", "train", n, model.seq_len, seed=0)
            if method == "gptq":
                cfg = GPTQConfig(bits=bits, group_size=group)
            else:
                cfg = FairCalibConfig(bits=bits, group_size=group, n_prompts=n, **knobs)
            calib = CalibConfig(
                n_samples=n, seed=0, device=args.device, masking=masking or "uniform"
            )
            q = copy.deepcopy(model)
            start = time.time()
            quantize(q, cfg, tokens, calib, progress=False)
            rows.append(
                {
                    "scheme": f"w{bits}g{group}",
                    "variant": name,
                    "nsamples": n,
                    "ppl": score(q),
                    "calib_s": time.time() - start,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {
        "record": run_record(["python", "benchmarks/fair_ablation.py", *(argv or sys.argv[1:])]),
        "model": args.model,
        "rows": rows,
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    atomic.write_json(dest / "fair_ablation.json", out, **atomic.COMPACT)
    fp = rows[0]["ppl"]
    lines = [
        f"# FAIR-Calib ablations: {args.model}",
        "",
        f"Command: `{out['record']['command']}`  ",
        f"Device: {out['record']['device']}, date: {out['record']['date']}",
        "",
        f"WikiText-2 test bound perplexity (2 MC samples, same noise for all rows); float {fp:.2f}.",
        "",
        "| scheme | variant | calibration samples | ppl | degradation | calib s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['scheme']} | {r['variant']} | {r['nsamples']} | {r['ppl']:.2f} | "
            f"{100 * (r['ppl'] / fp - 1):+.2f}% | {r['calib_s']:.1f} |"
        )
    atomic.write_text(dest / "fair_ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
